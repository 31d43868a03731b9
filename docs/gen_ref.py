"""Generated reference pages: the study-file and params-file keys (from `tuner.study.schema`), the
command line (from the Typer app `tuner.cli.app`) and the list of modules (from the package's files
and their docstrings). `docs/hooks.py` puts them into the pages at build time; `tests/test_docs.py`
calls the same functions, so neither needs MkDocs to check them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tuner"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- study files and params files -------------------------------------------------------------

def schema_table(kind: str) -> str:
    """A Markdown table of every key of a study file (`kind="study"`) or params file (`"params"`)."""
    from tuner.study.schema import TABLES

    rows = ["| key | type | default | description | valid values |", "| --- | --- | --- | --- | --- |"]
    for k in TABLES[kind]:
        rows.append(f"| `{_cell(k.path)}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.description)} | "
                    f"{_cell(k.values) or '–'} |")
    return "\n".join(rows)


# --- the command line -------------------------------------------------------------------------

@dataclass(frozen=True)
class CliParam:
    command: str  # "" for the top level
    kind: str  # "argument" or "option"
    name: str  # `--flag, -f` or ARGUMENT
    type: str
    default: str
    help: str


def cli_commands(app: Any = None) -> list[tuple[str, Any]]:
    """The click commands of a Typer app (default `tuner.cli.app`), in the order `--help` lists them
    ("" is the group itself)."""
    import typer.main

    if app is None:
        from tuner.cli import app

    group = typer.main.get_command(app)  # click's classes as Typer ships them: duck-typed below
    ctx = group.context_class(group)
    out: list[tuple[str, Any]] = [("", group)]
    if hasattr(group, "list_commands"):
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                out.append((name, cmd))
    return out


def cli_params(app: Any = None) -> Iterator[CliParam]:
    """Every visible argument and option of every command of a Typer app (default `tuner.cli.app`)."""
    for name, cmd in cli_commands(app):
        for p in cmd.params:
            if getattr(p, "hidden", False) or p.name == "help":
                continue
            if p.param_type_name == "argument":
                label, kind = (p.name or "").upper(), "argument"
            else:
                label, kind = ", ".join([*p.opts, *p.secondary_opts]), "option"
            default = None if callable(p.default) else p.default
            is_flag = getattr(p, "is_flag", False)
            yield CliParam(command=name, kind=kind, name=label, type="flag" if is_flag else _type_name(p),
                           default="" if default is None or (is_flag and default is False) else str(default),
                           help=(getattr(p, "help", None) or "").strip())


def _type_name(p: Any) -> str:
    """A parameter's value type: click's name for it, or the annotation Typer read it from."""
    t = getattr(p, "type", None)
    if t is not None and getattr(t, "name", None):
        return str(t.name).lower()
    annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
    text = getattr(annotation, "__name__", None) or str(annotation or "text")
    return {"str": "text", "int": "integer", "Path": "path"}.get(text, text.lower())


def cli_reference() -> str:
    """The command-line reference: for each command its usage line, its help and a table of its parameters."""
    params = list(cli_params())
    parts: list[str] = []
    for name, cmd in cli_commands():
        title = f"tuner {name}".strip()
        parts.append(f"## `{title}`\n")
        args = [p.name for p in params if p.command == name and p.kind == "argument"]
        usage = " ".join(["[OPTIONS]", *args] if name else ["[OPTIONS]", "COMMAND", "[ARGS]..."])
        parts.append(f"```\n{title} {usage}\n```\n")
        text = (cmd.help or "").strip()
        if text:
            parts.append(text.replace("\b\n", "") + "\n")
        rows = [p for p in params if p.command == name]
        if rows:
            parts.append("| parameter | type | default | description |\n| --- | --- | --- | --- |")
            parts += [f"| `{_cell(p.name)}` | {_cell(p.type)} | {('`' + _cell(p.default) + '`') if p.default else '–'} "
                      f"| {_cell(p.help)} |" for p in rows]
            parts.append("")
    return "\n".join(parts)


# --- the modules ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str  # dotted: tuner.engine.worker
    path: str  # relative to the repository root
    summary: str  # the docstring's first line ("" when the module has none)


def modules(package: Path = PACKAGE) -> list[Module]:
    """Every module of the package, found by walking its folder (nothing is imported)."""
    out = []
    for file in sorted(package.rglob("*.py")):
        rel = file.relative_to(package.parent)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        doc = ast.get_docstring(ast.parse(file.read_text(encoding="utf-8"))) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        out.append(Module(".".join(parts), rel.as_posix(), summary))
    return out


def module_table(package: Path = PACKAGE) -> str:
    """A Markdown table of every module with the first line of its docstring."""
    rows = ["| module | file | what it is |", "| --- | --- | --- |"]
    rows += [f"| `{m.name}` | `{m.path}` | {_cell(m.summary) or '(no docstring)'} |" for m in modules(package)]
    return "\n".join(rows)


GENERATORS = {
    "study-file-keys": lambda: schema_table("study"),
    "params-file-keys": lambda: schema_table("params"),
    "cli-reference": cli_reference,
    "modules": module_table,
}


def expand(markdown: str) -> str:
    """Replace every `<!-- generated: NAME -->` marker by the output of GENERATORS[NAME]."""
    for name, make in GENERATORS.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
