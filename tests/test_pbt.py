"""Population-based training (tuner/engine/pbt.py): ranking, explore, planning, checkpoints kept,
bad input, and real sweeps on synthetic data (one worker, a pack, a signal and its resume)."""

from __future__ import annotations

import math
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from conftest import cli_main
from tuner.engine import pbt
from tuner.storage import keys
from tuner.study.config import parse_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACE = {"lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True},
         "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True},
         "schedule": {"choices": ["constant", "cosine"]}}


def pbt_study(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "pop", "dataset": "synthetic:600", "model": "tiny", "epochs": 3, "batch_size": 64,
                            "seed": 0, "strategy": "pbt", "population": {"size": 4, "interval": 1},
                            "sampler": "random", "space": SPACE}
    data.update(changes)
    return data


def write(folder: Path, data: dict[str, Any], name: str = "pop.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


DISTS = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "one_minus_beta1": FloatDistribution(0.01, 0.5, log=True),
         "schedule": CategoricalDistribution(["constant", "cosine"])}


def segment(number: int, who: int, gen: int, value: float | None, *, state: TrialState = TrialState.COMPLETE,
            parent: int | None = None, lr: float = 0.01, beta: float = 0.1, schedule: str = "cosine") -> FrozenTrial:
    attrs = {keys.PBT_MEMBER: who, keys.PBT_GENERATION: gen, keys.PBT_PARENT: parent, keys.PBT_EXPLOIT: False,
             keys.PBT_EPOCHS: [gen + 1, gen + 1]}
    if state == TrialState.COMPLETE:
        attrs[keys.CHECKPOINT] = {"artifact_id": f"ck-{number}", "epoch": gen + 1}
    t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                     params={"lr": lr, "one_minus_beta1": beta, "schedule": schedule}, distributions=DISTS,
                     user_attrs=attrs)
    t.number = number
    return t


# ---------------------------------------------------------------------------------------------
# Ranking, explore, planning (no training)
# ---------------------------------------------------------------------------------------------

def test_quantiles_follow_rays_rule():
    peers = [segment(i, i, 0, v) for i, v in enumerate([0.5, 0.1, 0.7, 0.3, 0.9, 0.2, 0.8, 0.4])]
    bottom, top = pbt.quantiles(peers, 0.25)
    assert [t.number for t in bottom] == [1, 5] and [t.number for t in top] == [6, 4]  # ceil(8 × 0.25) = 2 each
    assert pbt.quantiles(peers[:3], 0.25) == ([peers[1]], [peers[2]])  # ceil(0.75) = 1
    assert pbt.quantiles(peers[:1], 0.5) == ([], [])  # a member alone ranks against no one
    diverged = segment(9, 1, 0, None, state=TrialState.PRUNED)
    assert pbt.quantiles([*peers[:3], diverged], 0.25)[0] == [diverged]  # a diverged segment is the worst
    ties = [segment(i, i, 0, 0.5) for i in range(4)]
    assert [t.number for t in pbt.quantiles(ties, 0.25)[0]] == [3]  # among equals the later trial ranks lower


def test_explore_perturbs_or_resamples_inside_the_range():
    config = parse_study(pbt_study(population={"size": 4, "interval": 1, "resample_probability": 0.0}))
    pop = config.population
    parent = {"lr": 0.01, "one_minus_beta1": 0.1, "schedule": "constant"}
    seen = set()
    for seed in range(40):
        out = pbt.explore(parent, pop, config.space, random.Random(seed))
        assert out["schedule"] == "constant"  # a knob that cannot change mid-run stays
        for knob in ("lr", "one_minus_beta1"):
            factor = out[knob] / parent[knob]
            assert min(abs(factor - 0.8), abs(factor - 1.25)) < 1e-12, (knob, factor)
            seen.add(round(factor, 6))
    assert seen == {0.8, 1.25}
    edge = pbt.explore({"lr": 0.1, "one_minus_beta1": 0.5, "schedule": "cosine"}, replace_pop(pop, perturb=(1.25,)),
                       config.space, random.Random(0))
    assert edge["lr"] == 0.1 and edge["one_minus_beta1"] == 0.5  # clipped to the range's top
    always = replace_pop(pop, resample_probability=1.0)
    draws = [pbt.explore(parent, always, config.space, random.Random(s))["lr"] for s in range(200)]
    assert all(1e-3 <= d <= 1e-1 for d in draws)
    assert sum(d < 1e-2 for d in draws) > 60 and sum(d > 1e-2 for d in draws) > 60  # log-uniform over the range


def replace_pop(pop, **changes):
    from dataclasses import replace

    return replace(pop, **changes)


def test_plan_starts_every_member_then_exploits_or_continues():
    config = parse_study(pbt_study())
    assert config.n_trials == 12 and config.pruner.name == "none"
    first = pbt.plan(config, [])
    assert first is not None and first.fixed is None and first.parent is None
    assert first.user_attrs == {keys.PBT_MEMBER: 0, keys.PBT_GENERATION: 0, keys.PBT_PARENT: None,
                                keys.PBT_EXPLOIT: False, keys.PBT_EPOCHS: [1, 1]}
    running = [segment(i, i, 0, None, state=TrialState.RUNNING) for i in range(4)]
    assert pbt.plan(config, running) is None  # every member trains: nothing to start
    gen0 = [segment(0, 0, 0, 0.1, lr=0.002), segment(1, 1, 0, 0.2, lr=0.004),
            segment(2, 2, 0, 0.3, lr=0.006), segment(3, 3, 0, 0.4, lr=0.008, schedule="constant")]
    worst = pbt.plan(config, gen0)
    assert worst is not None
    assert worst.user_attrs[keys.PBT_MEMBER] == 0 and worst.user_attrs[keys.PBT_GENERATION] == 1
    assert worst.user_attrs[keys.PBT_EXPLOIT] is True and worst.parent == 3  # bottom quarter copies the top
    assert worst.user_attrs[keys.PBT_EPOCHS] == [2, 2]
    assert worst.fixed is not None and worst.fixed["schedule"] == "constant"  # fixed knobs come with the weights
    assert worst.fixed["lr"] in (pytest.approx(0.008 * 0.8), pytest.approx(0.008 * 1.25)) or \
        1e-3 <= worst.fixed["lr"] <= 1e-1
    made = [*gen0, segment(4, 0, 1, None, state=TrialState.RUNNING, parent=3)]
    middle = pbt.plan(config, made)
    assert middle is not None and middle.user_attrs[keys.PBT_MEMBER] == 1
    assert middle.parent == 1 and middle.user_attrs[keys.PBT_EXPLOIT] is False  # not at the bottom: its own
    assert middle.fixed == {"lr": 0.004, "one_minus_beta1": 0.1, "schedule": "cosine"}
    last = [segment(n, n % 4, n // 4, 0.5, parent=n - 4 if n >= 4 else None) for n in range(12)]
    assert pbt.plan(config, last) is None  # every member ran its three segments


def test_plan_with_sampler_explore_leaves_the_mutable_knobs_to_the_sampler():
    config = parse_study(pbt_study(sampler="tpe", population={"size": 4, "interval": 1, "explore": "sampler"}))
    gen0 = [segment(i, i, 0, 0.1 * (i + 1), lr=0.002 * (i + 1)) for i in range(4)]
    worst = pbt.plan(config, gen0)
    assert worst is not None and worst.parent == 3 and worst.fixed == {"schedule": "cosine"}


def test_a_diverged_member_exploits_and_a_lone_first_finisher_goes_on():
    config = parse_study(pbt_study())
    lone = [segment(0, 0, 0, 0.3), *(segment(i, i, 0, None, state=TrialState.RUNNING) for i in (1, 2, 3))]
    going = pbt.plan(config, lone)
    assert going is not None and going.parent == 0 and going.user_attrs[keys.PBT_EXPLOIT] is False
    broken = [segment(0, 0, 0, None, state=TrialState.PRUNED), segment(1, 1, 0, 0.3),
              *(segment(i, i, 0, None, state=TrialState.RUNNING) for i in (2, 3))]
    rescued = pbt.plan(config, broken)
    assert rescued is not None and rescued.user_attrs[keys.PBT_MEMBER] == 0 and rescued.parent == 1
    assert rescued.user_attrs[keys.PBT_EXPLOIT] is True


def test_checkpoints_stay_while_a_member_may_still_start_from_them():
    config = parse_study(pbt_study())
    gen0 = [segment(i, i, 0, 0.1 * (i + 1)) for i in range(4)]
    assert pbt.needed_checkpoints(config, gen0) == {0, 1, 2, 3}
    some = [*gen0, segment(4, 0, 1, None, state=TrialState.RUNNING, parent=3)]
    assert pbt.needed_checkpoints(config, some) == {0, 1, 2, 3}
    moved = [*gen0, *(segment(4 + i, i, 1, None, state=TrialState.RUNNING, parent=i) for i in range(4))]
    assert pbt.needed_checkpoints(config, moved) == set()  # every member is past generation 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

BAD = {
    "size": (pbt_study(population={"size": 1, "interval": 1}), "population.size", "must be >= 2"),
    "interval": (pbt_study(population={"size": 4, "interval": 3}), "population.interval", "must be < epochs (3)"),
    "quantile-high": (pbt_study(population={"size": 4, "interval": 1, "quantile": 0.6}), "population.quantile",
                      "(0, 0.5]"),
    "quantile-zero": (pbt_study(population={"size": 4, "interval": 1, "quantile": 0}), "population.quantile",
                      "(0, 0.5]"),
    "fixed-knob": (pbt_study(population={"size": 4, "interval": 1, "mutable": ["lr", "schedule"]}),
                   "population.mutable", "schedule cannot change during training"),
    "optimizer-knob": (pbt_study(population={"size": 4, "interval": 1, "mutable": ["optimizer"]}),
                       "population.mutable", "optimizer cannot change during training"),
    "unsearched": (pbt_study(population={"size": 4, "interval": 1, "mutable": ["eps"]}), "population.mutable",
                   "eps is not searched"),
    "stages": (pbt_study(stages=[{"name": "a", "knobs": ["lr"], "trials": 4}]), "stages", "strategy: pbt"),
    "pruner": (pbt_study(pruner="median"), "pruner", "replaces pruning"),
    "n_trials": (pbt_study(n_trials=10), "n_trials", "set it to 12"),
    "no-strategy": ({**pbt_study(), "strategy": "search", "n_trials": 4}, "population", "needs strategy: pbt"),
    "no-population": ({k: v for k, v in pbt_study().items() if k != "population"}, "population.size", "is required"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_population_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    data, key, words = BAD[case]
    path = write(tmp_path, data)
    db = tmp_path / "s.db"
    code, out, err = cli_main(capsys, "sweep", str(path), "--storage", f"sqlite:///{db}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path.name) in lines[0] and key in lines[0] and words in lines[0], lines[0]
    assert not db.exists()


@pytest.mark.parametrize("flag", [("--warm-start", "sqlite:///other.db#src"), ("--n-trials", "8")])
def test_flags_a_population_refuses(tmp_path, capsys, flag):
    path = write(tmp_path, pbt_study())
    db = tmp_path / "s.db"
    code, out, err = cli_main(capsys, "sweep", str(path), "--storage", f"sqlite:///{db}", *flag)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and flag[0] in lines[0] and "strategy: pbt" in lines[0], err
    assert not db.exists()


# ---------------------------------------------------------------------------------------------
# Real sweeps on synthetic data
# ---------------------------------------------------------------------------------------------

def assert_population(url: str, name: str, size: int, segments: int, epochs: int) -> list[FrozenTrial]:
    """Exactly size × segments live segments, all finished, each with its lineage attrs; every
    segment after the first starts from its parent's checkpoint at its parent's last epoch.
    Returns the live segments."""
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    segs = keys.segments(trials)
    assert keys.budget_used(trials) == len(segs) == size * segments
    by_number = {t.number: t for t in trials}
    seen = {(t.user_attrs[keys.PBT_MEMBER], t.user_attrs[keys.PBT_GENERATION]) for t in segs}
    assert seen == {(m, g) for m in range(size) for g in range(segments)}
    for t in segs:
        a = t.user_attrs
        assert a[keys.PARAMS]["training"]["epochs"] == epochs
        assert set(a[keys.PBT_KNOBS]) <= set(t.params) and a[keys.PBT_KNOBS]
        if a[keys.PBT_GENERATION] == 0:
            assert a[keys.PBT_PARENT] is None and a[keys.PBT_EPOCHS][0] == 1
            continue
        parent = by_number[a[keys.PBT_PARENT]]
        assert parent.state == TrialState.COMPLETE
        assert parent.user_attrs[keys.PBT_GENERATION] == a[keys.PBT_GENERATION] - 1
        assert a[keys.PBT_EXPLOIT] == (parent.user_attrs[keys.PBT_MEMBER] != a[keys.PBT_MEMBER])
        if t.state == TrialState.COMPLETE:
            assert a[keys.RESUMED] == parent.user_attrs[keys.PBT_EPOCHS][1] == a[keys.PBT_EPOCHS][0] - 1 or \
                keys.history(t), (t.number, a.get(keys.RESUMED))
            assert max(t.intermediate_values) == a[keys.PBT_EPOCHS][1]
            assert set(t.intermediate_values) == set(range(1, a[keys.PBT_EPOCHS][1] + 1))  # the lineage's curve
        fixed = {k for k in t.params if k not in a[keys.PBT_KNOBS]}
        assert {k: t.params[k] for k in fixed} == {k: parent.params[k] for k in fixed}  # fixed along a lineage
        if not a[keys.PBT_EXPLOIT]:
            assert t.params == parent.params
    return segs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pack", [1, 4])
def test_a_population_sweep_runs_exactly_its_segments(tmp_path, one_thread, pack):
    from tuner.engine.sweep import run_sweep
    from tuner.study.settings import Flags

    config = parse_study(pbt_study(epochs=4, population={"size": 4, "interval": 1, "quantile": 0.25}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    art = tmp_path / "art"
    run_sweep(config, Flags(storage=url, device="cpu", artifact_dir=str(art), pack=pack), handle_signals=False)
    segs = assert_population(url, "pop", 4, 4, 4)
    assert sum(bool(t.user_attrs[keys.PBT_EXPLOIT]) for t in segs) >= 1
    assert not [p for p in art.rglob("*") if p.is_file()]  # every checkpoint deleted once nothing may need it


@pytest.mark.timeout(300)
def test_a_signal_stops_a_population_sweep_and_the_next_one_finishes_it(tmp_path):
    data = pbt_study(dataset="synthetic:3000", epochs=4, population={"size": 4, "interval": 2})
    path = write(tmp_path, data)
    url = f"sqlite:///{tmp_path / 's.db'}"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TUNER_DEBUG": "0", "TUNER_CHECKPOINT_EVERY": "0"}
    args = [sys.executable, "-m", "tuner", "sweep", str(path), "--storage", url, "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the four segments of generation 0 have finished
        time.sleep(0.2)
        try:  # read-only, with sqlite3: opening Optuna's storage here would race the sweep's schema creation
            with sqlite3.connect(f"file:{tmp_path / 's.db'}?mode=ro", uri=True) as db:
                done = db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 4:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ts = optuna.load_study(study_name="pop", storage=url).get_trials(deepcopy=False)
    stopped = [t for t in ts if t.user_attrs.get(keys.INTERRUPTED)]
    assert stopped and all(t.state == TrialState.FAIL for t in stopped)
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    segs = assert_population(url, "pop", 4, 2, 4)
    for t in stopped:  # the retry copy of each interrupted segment resumed it
        copy = next(s for s in segs if keys.history(s) and keys.history(s)[-1] == t.number)
        assert copy.user_attrs[keys.PBT_MEMBER] == t.user_attrs[keys.PBT_MEMBER]
        assert copy.user_attrs[keys.RESUMED_TRIAL] in (t.number, t.user_attrs[keys.PBT_PARENT])
        assert copy.state == TrialState.COMPLETE and math.isfinite(copy.value)


# ---------------------------------------------------------------------------------------------
# Two workers on the real subset, one killed with SIGKILL in the middle of a segment
# ---------------------------------------------------------------------------------------------

def _worker(folder: Path, tag: str, url: str) -> tuple[subprocess.Popen[str], Path]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    env.update({"TUNER_STORAGE": url, "TUNER_DEBUG": "0", "OMP_NUM_THREADS": "1", "TUNER_CHECKPOINT_EVERY": "0"})
    err = folder / f"{tag}.err"
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tuner", "worker", "--study-name", "pop", "--device", "cpu"],
                                cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=fh, text=True)
    return proc, err


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_and_a_kill9_on_the_real_subset(tmp_path, subset_path, request, backend):
    """8 members × 2 segments of 2 epochs (the tiny net, batch 128), two `tuner worker` processes;
    one is killed with SIGKILL after the first epoch of one of its segments. The other fails the
    silent segment after the grace period and runs its retry, which resumes from the killed
    segment's own checkpoint. The study ends with exactly its 16 segments, lineage attrs on each,
    and at least one exploit."""
    from tuner.engine.sweep import prepare_study

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else f"sqlite:///{tmp_path / 's.db'}"
    data = pbt_study(dataset=str(subset_path), epochs=4, batch_size=128, sampler="random",
                     population={"size": 8, "interval": 2}, heartbeat={"interval": 1, "grace_period": 3},
                     space={**SPACE, "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}})
    config = parse_study(data, file="pop.yaml")
    prepare_study(config, url, None).engine.dispose()
    first, first_err = _worker(tmp_path, "first", url)
    second, second_err = _worker(tmp_path, "second", url)
    victim = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.1)
            for t in optuna.load_study(study_name="pop", storage=url).get_trials(deepcopy=False):
                ck = t.user_attrs.get(keys.CHECKPOINT)
                mid = isinstance(ck, dict) and ck.get("epoch") == t.user_attrs[keys.PBT_EPOCHS][0]
                if t.state == TrialState.RUNNING and mid and t.user_attrs.get(keys.PBT_GENERATION) == 1:
                    victim = t  # one epoch into its two: killed now, it has a checkpoint of its own
                    break
        assert victim is not None, "no segment reached the middle of its interval"
        pid = int(victim.user_attrs["env"]["pid"])  # the worker process that leased it
        killed, other = (first, second) if first.pid == pid else (second, first)
        assert killed.pid == pid
        killed.kill()
        killed.wait(10)
        assert other.wait(300) == 0, (second_err if other is second else first_err).read_text()
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    segs = assert_population(url, "pop", 8, 2, 4)
    assert sum(bool(t.user_attrs[keys.PBT_EXPLOIT]) for t in segs) >= 1
    trials = optuna.load_study(study_name="pop", storage=url).get_trials(deepcopy=False)
    dead = next(t for t in trials if t.number == victim.number)
    copy = next(t for t in segs if keys.history(t) and keys.history(t)[-1] == victim.number)
    assert dead.state == TrialState.FAIL  # failed by the heartbeat rule, not told twice
    assert copy.user_attrs[keys.RESUMED_TRIAL] == victim.number  # from the killed segment's own checkpoint
    assert copy.user_attrs[keys.RESUMED] == victim.user_attrs[keys.PBT_EPOCHS][0]
    assert copy.state == TrialState.COMPLETE



@pytest.mark.timeout(600)
def test_export_then_train_replays_the_winner_on_the_real_subset(tmp_path, subset_path, one_thread, cli):
    """A population of 4 on the real subset (3 epochs, exploit/explore after each, cosine schedule),
    then `tuner export` and `tuner train` in real processes: the replay changes its values at the
    same epochs as the winner's lineage, every epoch's lr is the lineage's, and its final validation
    accuracy is within 1 point of the winner's (on the CPU, same seed)."""
    import json

    from tuner.engine.sweep import run_sweep
    from tuner.study.settings import Flags

    data = pbt_study(dataset=str(subset_path), epochs=3, batch_size=128,
                     population={"size": 4, "interval": 1, "quantile": 0.5},
                     space={"lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True},
                            "one_minus_beta1": {"low": 0.01, "high": 0.5, "log": True},
                            "weight_decay": {"low": 1.0e-6, "high": 1.0e-3, "log": True}, "schedule": "cosine"})
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_sweep(parse_study(data, file="pop.yaml"), Flags(storage=url, device="cpu"), handle_signals=False)
    trials = optuna.load_study(study_name="pop", storage=url).get_trials(deepcopy=False)
    winner = keys.pbt_winner(trials)
    assert winner is not None
    chain = keys.lineage(winner, {t.number: t for t in trials})
    assert [t.user_attrs[keys.PBT_GENERATION] for t in chain] == [0, 1, 2]
    assert any(t.user_attrs[keys.PBT_EXPLOIT] for t in keys.segments(trials))

    export = cli("export", "pop", "-o", "best.yaml", "--storage", url)
    assert export.returncode == 0, export.stderr
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    intervals = exported["intervals"]
    assert [i["from_epoch"] for i in intervals] == [0, 1, 2]
    for interval, seg in zip(intervals, chain):  # the values each segment trained with
        p = seg.user_attrs[keys.PARAMS]["optimizer"]
        assert interval["lr"] == pytest.approx(p["lr"]) and interval["betas"] == pytest.approx(p["betas"])
        assert interval["weight_decay"] == pytest.approx(p["weight_decay"])

    run = cli("train", "best.yaml", "--json", "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    lineage_lr = [rec["lr"] for rec in winner.user_attrs[keys.HISTORY]]
    assert [rec["lr"] for rec in out["history"]] == pytest.approx(lineage_lr, rel=1e-6)
    assert abs(out["val_accuracy"] - winner.value) <= 0.01, (out["val_accuracy"], winner.value)


def test_sampler_explore_needs_a_sampler_that_learns(tmp_path, capsys):
    data = {k: v for k, v in pbt_study(population={"size": 4, "interval": 1, "explore": "sampler"}).items()
            if k != "sampler"}
    assert parse_study(data).sampler.name == "tpe"  # the default for a population that asks its sampler
    assert parse_study({k: v for k, v in pbt_study().items() if k != "sampler"}).sampler.name == "qmc"
    path = write(tmp_path, pbt_study(sampler="qmc", population={"size": 4, "interval": 1, "explore": "sampler"}))
    code, _, err = cli_main(capsys, "sweep", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert code == 2 and "sampler" in err and "does not learn from results" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.db").exists()
