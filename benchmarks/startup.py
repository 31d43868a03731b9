"""Start-up figures: the wall time of a read-side `tuner` command as a user runs it.

`tuner --help` and `tuner export NAME` each run in a fresh process (`python -m tuner`, the console
script's code path), on a small real study made here with plain Optuna. Nothing of tuner is
imported in this process for it; the figure is what a user waits for, interpreter start included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .core import ROOT, Context, Measurement, interleaved, log, median, rounded, spread

STUDY = "startup"

# One untimed run that says whether the command imported torch (the read side should not).
_PROBE = ("import sys\n"
          "from tuner.cli import main\n"
          "try:\n"
          "    main(sys.argv[1:])\n"
          "except SystemExit:\n"
          "    pass\n"
          "print('TORCH_IMPORTED', 'torch' in sys.modules, file=sys.stderr)\n")


def _env() -> dict[str, str]:
    """This checkout's tuner (not an installed copy), and none of the user's TUNER_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def make_study(url: str, name: str = STUDY, trials: int = 8) -> None:
    """A study as `tuner sweep` leaves it: the stored config, and COMPLETE trials with their params."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from tuner.storage import keys
    from tuner.study.config import parse_study
    from tuner.study.params import TrialParams

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = parse_study({"name": name, "dataset": "synthetic", "model": "tiny", "epochs": 4, "batch_size": 128,
                          "n_trials": trials, "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}})
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    study.set_user_attr(keys.CONFIG, config.to_dict())
    for i in range(trials):
        params = TrialParams().with_training(model="tiny", epochs=4, batch_size=128, dataset="synthetic").to_dict()
        params["optimizer"]["lr"] = 1e-4 * 2.5 ** i
        value = 0.2 + 0.05 * i
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                     intermediate_values={e: value * e / 4 for e in range(1, 5)},
                                     user_attrs={keys.PARAMS: params, keys.SECONDS: 1.0, keys.EPOCHS: 4}))


def _timed_run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"tuner {' '.join(args)} failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    return seconds


def _imports_torch(args: list[str], cwd: Path) -> bool | None:
    run = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    found = [line.split()[1] for line in run.stderr.splitlines() if line.startswith("TORCH_IMPORTED")]
    return found[0] == "True" if found else None


def startup(ctx: Context) -> Measurement:
    """Seconds of `tuner --help` and of `tuner export NAME` (stdout), median of 3 interleaved runs
    after one untimed round (which warms the file cache and writes the bytecode)."""
    rounds = 3
    with tempfile.TemporaryDirectory(prefix="tuner-bench-startup-") as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'tuner.db'}"
        make_study(url)
        commands = {"help": ["--help"], "export": ["export", STUDY, "--storage", url]}
        log(f"start-up: {', '.join('tuner ' + ' '.join(a[:2]) for a in commands.values())}, {rounds} rounds")
        samples = interleaved({k: (lambda a=a: _timed_run(a, folder)) for k, a in commands.items()}, rounds=rounds)
        torch_imported = {k: _imports_torch(a, folder) for k, a in commands.items()}
    values = {f"startup_{k}_seconds": rounded(median(v), 3) for k, v in samples.items()}
    details = {"samples_s": {k: [round(s, 3) for s in v] for k, v in samples.items()},
               "spread": {k: round(spread(v), 3) for k, v in samples.items()},
               "torch_imported": torch_imported, "rounds": rounds}
    slow = [k for k, v in torch_imported.items() if v]
    note = "fresh `python -m tuner` processes, median of 3" + (
        f"; {', '.join(slow)} imported torch" if slow else "; torch not imported")
    return Measurement(values=values, details=details, note=note)
