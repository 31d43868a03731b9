"""The documentation's generated references and the README's shape (no MkDocs needed).

The study-file reference comes from `tuner.study.schema`, the CLI reference from the Typer app and
the module list from the package's files, through `docs/gen_ref.py` (which the MkDocs hook calls).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from tuner.errors import ConfigError
from tuner.study import schema
from tuner.study.config import parse_study
from tuner.study.params import parse_params

ROOT = Path(__file__).resolve().parent.parent


def _load_gen_ref() -> Any:
    spec = importlib.util.spec_from_file_location("gen_ref", ROOT / "docs" / "gen_ref.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_ref"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen_ref = _load_gen_ref()


# --- the schema is the validators' source of truth ---------------------------------------------

def _valid_keys(message: str) -> list[str]:
    match = re.search(r"unknown key \(valid keys: (.*)\)$", message)
    assert match, message
    return match.group(1).split(", ")


def _study(**extra: Any) -> dict[str, Any]:
    return {"name": "t", "model": "tiny", "dataset": "synthetic", "n_trials": 2,
            "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, **extra}


# (section as the schema names it, a study mapping with an unknown key `zzz` in that section)
STUDY_PROBES = [
    ("", _study(zzz=1)),
    ("sampler", _study(sampler={"name": "tpe", "zzz": 1})),
    ("pruner", _study(pruner={"name": "median", "zzz": 1})),
    ("heartbeat", _study(heartbeat={"zzz": 1})),
    ("training", _study(training={"zzz": 1})),
    ("training.augment", _study(training={"augment": {"zzz": 1}})),
    ("space", _study(space={"lr": 0.001, "zzz": 1})),
    ("space.<knob>", _study(space={"lr": {"low": 1e-4, "high": 1e-1, "zzz": 1}})),
    ("space.<knob>", _study(space={"optimizer": {"choices": ["adam"], "zzz": 1}})),
    ("stages[]", _study(n_trials=None, stages=[{"knobs": ["lr"], "trials": 1, "zzz": 1}])),
    ("population", _study(n_trials=None, epochs=2, strategy="pbt", population={"size": 2, "interval": 1, "zzz": 1})),
]
PARAMS_PROBES = [
    ("", {"zzz": 1}),
    ("optimizer", {"optimizer": {"zzz": 1}}),
    ("schedule", {"schedule": {"zzz": 1}}),
    ("clipping", {"clipping": {"zzz": 1}}),
    ("training", {"training": {"zzz": 1}}),
    ("training.augment", {"training": {"augment": {"zzz": 1}}}),
    ("intervals[]", {"intervals": [{"from_epoch": 0, "zzz": 1}]}),
]


@pytest.mark.parametrize("section,data", STUDY_PROBES, ids=[f"study:{s or 'top'}:{i}" for i, (s, _) in enumerate(STUDY_PROBES)])
def test_study_file_validator_accepts_exactly_the_schema_keys(section: str, data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_study(data, file="s.yaml")
    accepted = _valid_keys(str(err.value))
    described = list(schema.allowed(section))
    if "choices" in accepted:
        described = ["choices"]  # a categorical knob's mapping
    elif section == "space.<knob>":
        described = [k for k in described if k != "choices"]  # a range's mapping
    assert accepted == described, f"{section}: the validator accepts {accepted}, the schema describes {described}"


@pytest.mark.parametrize("section,data", PARAMS_PROBES, ids=[f"params:{s or 'top'}" for s, _ in PARAMS_PROBES])
def test_params_file_validator_accepts_exactly_the_schema_keys(section: str, data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(data, file="p.yaml")
    assert _valid_keys(str(err.value)) == list(schema.allowed(section, schema.PARAMS_FILE))


def test_every_section_of_the_schema_is_probed() -> None:
    """A new mapping in the schema needs a probe above, so its keys are checked against its validator."""
    for table, probes in ((schema.STUDY_FILE, STUDY_PROBES), (schema.PARAMS_FILE, PARAMS_PROBES)):
        sections = {k.parent for k in table}
        assert sections == {s for s, _ in probes}


@pytest.mark.parametrize("kind", ["study", "params"])
def test_every_schema_key_has_a_description_and_a_type(kind: str) -> None:
    table = schema.TABLES[kind]
    assert len({k.path for k in table}) == len(table), "a key is listed twice"
    for key in table:
        assert key.description.strip() and key.type.strip(), key.path
        assert f"`{key.path}`" in gen_ref.schema_table(kind)


def test_a_key_without_a_description_is_refused() -> None:
    with pytest.raises(ValueError, match="description"):
        schema.Key("training.new_setting", "int", "1", "")


def test_schema_values_follow_the_registries_and_knobs() -> None:
    from tuner.study.registry import PRUNERS, SAMPLERS
    from tuner.study.space import KNOBS

    assert set(schema.SAMPLER_NAMES) == set(SAMPLERS)
    assert set(schema.PRUNER_NAMES) == set(PRUNERS)
    assert schema.allowed("space") == tuple(KNOBS)


# --- the command line ------------------------------------------------------------------------

def test_every_cli_argument_and_option_has_a_description() -> None:
    params = list(gen_ref.cli_params())
    commands = {c for c, _ in gen_ref.cli_commands()}
    assert {"train", "sweep", "worker", "export", "report", "compare", "verify"} <= commands
    assert {p.command for p in params} >= commands - {""}
    missing = [f"tuner {p.command} {p.name}" for p in params if not p.help]
    assert not missing, f"no help text: {missing}"
    for name, cmd in gen_ref.cli_commands():
        assert (cmd.help or "").strip(), f"tuner {name}: no help text"
    reference = gen_ref.cli_reference()
    for p in params:
        assert f"`{p.name}`" in reference


def test_an_undescribed_cli_option_is_caught() -> None:
    app = typer.Typer()

    @app.command()
    def go(flag: int = typer.Option(0, "--flag")) -> None:
        """Go."""

    @app.command()
    def stop() -> None:
        """Stop."""

    assert [p.name for p in gen_ref.cli_params(app) if not p.help] == ["--flag"]


# --- the modules -----------------------------------------------------------------------------

def test_every_module_is_in_the_architecture_list() -> None:
    table = gen_ref.module_table()
    found = []
    for file in sorted((ROOT / "tuner").rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append(".".join(parts))
        assert f"| `{'.'.join(parts)}` | `{file.relative_to(ROOT).as_posix()}` |" in table
    assert len(found) == len(gen_ref.modules()) > 40
    undocumented = [m.name for m in gen_ref.modules() if not m.summary]
    assert not undocumented, f"modules without a docstring: {undocumented}"


def test_a_new_module_appears_in_the_list(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""The package."""\n')
    (package / "sub" / "new.py").write_text('"""A module added later.\n\nMore."""\n')
    assert "| `pkg.sub.new` | `pkg/sub/new.py` | A module added later. |" in gen_ref.module_table(package)


# --- the pages -------------------------------------------------------------------------------

def test_every_generated_reference_is_used_by_a_page() -> None:
    pages = {p: p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")}
    markers = {m for text in pages.values() for m in re.findall(r"<!-- generated: ([\w-]+) -->", text)}
    assert markers == set(gen_ref.GENERATORS)
    for text in pages.values():
        assert "<!-- generated:" not in gen_ref.expand(text)


def test_nav_pages_exist() -> None:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r":\s*([\w/-]+\.md)\s*$", text, flags=re.M)
    assert len(pages) >= 20
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), page


README = ROOT / "README.md"


def quickstart_lines(text: str) -> list[str]:
    """The first ```bash block under '## Quickstart', as `.ci/run` reads it."""
    lines, inside, block = [], False, False
    for line in text.splitlines():
        if line.startswith("## Quickstart"):
            inside = True
        elif inside and not block and line.startswith("```bash"):
            block = True
        elif block and line.startswith("```"):
            return lines
        elif block:
            lines.append(line)
    return lines


def test_readme_is_short_with_a_two_line_quickstart() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert quickstart_lines(text) == [
        "pip install -e . && tuner sweep studies/quickstart.yaml",
        "pip install -e '.[test]' && pytest",
    ]


def test_quickstart_reader_sees_a_third_line() -> None:
    assert len(quickstart_lines("## Quickstart\n\n```bash\na\nb\nc\n```\n")) == 3


def test_docs_describe_the_software_not_its_making() -> None:
    pattern = re.compile(r"\bagents?\b|\bLLM\b|\bthis session\b|\bsession's\b|what was cut", re.I)
    for page in [README, *(ROOT / "docs").rglob("*.md")]:
        hits = pattern.findall(page.read_text(encoding="utf-8"))
        assert not hits, f"{page.relative_to(ROOT)}: {hits}"
