"""Private Optuna names live in one module, tuner/storage/_optuna.py, with a reason beside each."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tuner"
ALLOWED = PACKAGE / "storage" / "_optuna.py"
# a private Optuna module, or a private attribute of an object tuner gets from Optuna
PRIVATE = re.compile(r"optuna(\.[a-z_]+)*\._[a-z]|from optuna[\w.]*\s+import\s+_|"
                     r"\.(_study_id|_trial_id|_backend|_storage|_cached_frozen_trial|_max_retry|_get_filepath|"
                     r"_get_trials|_get_stale_trial_ids|_create_new_trial|_set_trial_param|_get_best_trial_id|"
                     r"_thread_local|_pop_waiting_trial_id|_study_name|_heartbeat\w*)\b")


def offending(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == ALLOWED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                found.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return found


def test_private_optuna_names_only_in_the_one_module():
    assert offending() == []


def test_the_check_finds_a_private_name(tmp_path):
    (tmp_path / "x.py").write_text("import optuna\nsid = study._study_id\nfrom optuna.storages._rdb import models\n")
    assert len(offending(tmp_path)) == 2


def test_the_one_module_says_why_for_each_name():
    doc = ALLOWED.read_text(encoding="utf-8").split('"""')[1]
    for name in re.findall(r"\._[a-z_]+\b", ALLOWED.read_text(encoding="utf-8").split('"""', 2)[2]):
        assert name in doc, f"{name} is used in tuner/storage/_optuna.py without a reason in its docstring"


def test_domain_code_reads_no_environment_variables():
    """Settings are resolved once at the CLI edge (tuner/study/settings.py, tuner/cli/)."""
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"os\.environ|os\.getenv|getenv\(", text):
            readers.append(str(rel))
    assert readers == []
