"""`tuner verify`: retrain top configs with new seeds, store statistics after each run, resume, and
`tuner export` choosing the best mean over the best single run."""

from __future__ import annotations

import statistics
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from conftest import ONE_THREAD, cli_main, run_cli
from tuner.engine.sweep import Flags, run_sweep
from tuner.errors import ConfigError, TunerError
from tuner.insight.export import choose_best, export_text, write_export
from tuner.insight.verify import SEED_BASE, read_records, record, run_verify, stats, summary, verify_seeds
from tuner.storage import keys
from tuner.storage.database import open_storage
from tuner.study.config import parse_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "name": "v", "direction": "maximize", "dataset": "synthetic:300", "model": "tiny", "epochs": 2,
    "batch_size": 64, "seed": 0, "n_trials": 4, "sampler": {"name": "random"}, "pruner": {"name": "none"},
    "space": {"lr": {"low": 3e-3, "high": 3e-2, "log": True},
              "one_minus_beta1": {"low": 0.05, "high": 0.3, "log": True}},
}


def params(lr: float, seed: int = 0) -> dict:
    return {"optimizer": {"name": "adam", "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                          "amsgrad": False},
            "schedule": {"name": "constant", "warmup_fraction": 0.0}, "clipping": {"mode": "none", "threshold": None},
            "training": {"model": "tiny", "epochs": 2, "batch_size": 64, "dataset": "synthetic:300", "seed": seed,
                         "val_fraction": 0.1, "augment": True, "precision": "auto", "compile": False}}


def constructed(url: str, values: list[float], name: str = "c", lrs: list[float] | None = None) -> optuna.Study:
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    study.set_user_attr(keys.CONFIG, {**parse_study({**TINY, "name": name}).to_dict()})
    for i, v in enumerate(values):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=v,
                                     user_attrs={"params": params((lrs or [])[i] if lrs else 1e-2 * (i + 1))}))
    return study


def test_seeds_and_stats() -> None:
    assert verify_seeds(3) == [SEED_BASE, SEED_BASE + 1, SEED_BASE + 2]
    assert verify_seeds(2, {1000}) == [1001, 1002]
    assert stats([0.5]) == (0.5, 0.0)
    mean, std = stats([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and std == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    s = summary({1001: 0.7, 1000: 0.5})
    assert s["seeds"] == [1000, 1001] and s["values"] == [0.5, 0.7] and s["n"] == 2
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))


def test_export_prefers_the_best_mean_written_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The best single run (trial 0, lucky) is not the best mean (trial 1): export picks trial 1.
    The records are in the legacy single `tuner_verify` dict, which is still read."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    study = constructed(url, [0.90, 0.85, 0.80])
    storage = open_storage(url)
    best, block = choose_best(storage, "c")
    assert best.number == 0 and block["selected_by"] == "best single run"
    study.set_user_attr(keys.VERIFY_LEGACY, {
        "0": {"mean": 0.70, "std": 0.15, "values": [0.9, 0.6, 0.6], "seeds": [1000, 1001, 1002], "n": 3},
        "1": {"mean": 0.82, "std": 0.02, "values": [0.8, 0.84, 0.82], "seeds": [1000, 1001, 1002], "n": 3},
        "2": {"mean": 0.99, "std": 0.0, "values": [], "seeds": [], "n": 0},  # nothing run: ignored
        "7": {"mean": 0.99, "std": 0.0, "values": [0.99], "seeds": [1000], "n": 1},  # no such COMPLETE trial
    })
    best, block = choose_best(storage, "c")
    assert best.number == 1
    assert block["selected_by"] == "verified mean over seeds" and block["mean"] == pytest.approx(0.82)
    assert block["seeds"] == [1000, 1001, 1002] and block["value"] == 0.85 and block["trial"] == 1
    exported = yaml.safe_load(export_text(storage, "c"))
    assert exported["optimizer"]["lr"] == pytest.approx(0.02) and exported["study"]["trial"] == 1
    code, out, err = cli_main(capsys, "export", "c", "--storage", url)
    assert code == 0, err
    assert yaml.safe_load(out)["study"]["selected_by"] == "verified mean over seeds"


def test_export_reads_per_record_keys_with_legacy_ones(tmp_path: Path) -> None:
    """Per-record keys and the legacy dict are one set of records; export writes its file atomically."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    study = constructed(url, [0.90, 0.85, 0.80], name="k")
    study.set_user_attr(keys.VERIFY_LEGACY, {"1": {"values": [0.80], "seeds": [1000], "n": 1}})
    study.set_user_attr(keys.verify_key(1, 1001), 0.84)
    study.set_user_attr(keys.verify_key(0, 1000), 0.60)
    study.set_user_attr(keys.verify_key(9, 1000), 0.99)  # no such COMPLETE trial: ignored
    storage = open_storage(url)
    best, block = choose_best(storage, "k")
    assert best.number == 1 and block["seeds"] == [1000, 1001]
    assert block["mean"] == pytest.approx(0.82) and block["std"] == pytest.approx(statistics.stdev([0.8, 0.84]))
    out = tmp_path / "sub" / "best.yaml"
    text = write_export(storage, "k", out)
    assert out.read_text(encoding="utf-8") == text and yaml.safe_load(text)["study"]["trial"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["best.yaml"]  # no temp file left behind


def test_verify_real_runs_store_resume_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_sweep(parse_study(TINY), Flags(storage=url, device="cpu"))
    storage = open_storage(url)
    sid = storage.get_study_id_from_name("v")
    top = sorted((t for t in storage.get_all_trials(sid) if t.state == TrialState.COMPLETE),
                 key=lambda t: (-t.value, t.number))[:2]

    # interrupted after the first run: that run is stored already
    seen = []

    def stop_after_one(run) -> None:
        seen.append(run)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_verify(storage, "v", top=2, n_seeds=2, device="cpu", on_run=stop_after_one)
    records = read_records(storage, sid)
    assert list(records) == [top[0].number] and list(records[top[0].number]) == [1000]
    attrs = storage.get_study_user_attrs(sid)
    assert keys.verify_key(top[0].number, 1000) in attrs and keys.VERIFY_LEGACY not in attrs

    # the CLI continues: 3 runs left, plain lines (not a TTY), then the table
    r = run_cli("verify", "v", "--top", "2", "--seeds", "2", "--storage", url, "--device", "cpu", cwd=tmp_path,
                env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "3 runs to do (1 already stored)" in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("run ")] == ["1/3", "2/3", "3/3"]
    records = read_records(storage, sid)
    assert set(records) == {t.number for t in top}
    entries = {str(n): summary(by_seed) for n, by_seed in records.items()}
    for t in top:
        e = entries[str(t.number)]
        assert e["seeds"] == [1000, 1001] and e["n"] == 2 and len(e["values"]) == 2
        assert e["mean"] == pytest.approx(statistics.fmean(e["values"]))
        assert e["std"] == pytest.approx(statistics.stdev(e["values"]))
        assert all(0.0 <= v <= 1.0 for v in e["values"])
        assert f"{e['mean']:.4f} ± {e['std']:.4f}" in r.stdout
    assert seen[0].value == entries[str(top[0].number)]["values"][0]  # the interrupted run was kept

    # nothing left: a rerun trains nothing
    result = run_verify(storage, "v", top=2, n_seeds=2, device="cpu")
    assert (result.ran, result.skipped) == (0, 4)

    # a retrain with the same seed reproduces the stored value (the stored params are complete)
    from tuner.study.params import parse_params
    from tuner.training.data import load_dataset
    from tuner.training.train import train

    p = parse_params(top[0].user_attrs["params"]).with_training(seed=1001)
    again = train(p, load_dataset("synthetic:300", "cpu"))
    assert again.val_accuracy == pytest.approx(entries[str(top[0].number)]["values"][1])

    # export follows the best mean
    best = max(entries, key=lambda k: (entries[k]["mean"], -int(k)))
    code, out, err = cli_main(capsys, "export", "v", "--storage", url)
    assert code == 0, err
    block = yaml.safe_load(out)["study"]
    assert block["trial"] == int(best) and block["selected_by"] == "verified mean over seeds"
    assert block["mean"] == pytest.approx(entries[best]["mean"])


def test_a_config_that_diverges_counts_as_zero(tmp_path: Path) -> None:
    """A lucky COMPLETE trial whose config diverges with new seeds: verify records 0 and export drops it."""
    url = f"sqlite:///{tmp_path / 'd.db'}"
    constructed(url, [0.95, 0.30], name="d", lrs=[80.0, 1e-2])
    storage = open_storage(url)
    result = run_verify(storage, "d", top=2, n_seeds=1, device="cpu")
    by = {r.trial: r.entry for r in result.rows}
    assert by[0]["values"] == [0.0] and by[0]["diverged"] == [1000]
    assert by[1]["values"][0] > 0.0 and by[1]["diverged"] == []
    assert choose_best(storage, "d")[0].number == 1


def test_a_record_is_one_key(tmp_path: Path) -> None:
    """Each (trial, seed) is its own study attr holding the value; storing it again replaces only it."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    constructed(url, [0.5], name="s")
    storage = open_storage(url)
    sid = storage.get_study_id_from_name("s")
    record(storage, sid, 0, 1000, 0.5)
    record(storage, sid, 0, 1001, 0.7)
    record(storage, sid, 0, 1000, 0.5)
    attrs = storage.get_study_user_attrs(sid)
    assert attrs[keys.verify_key(0, 1000)] == 0.5 and attrs[keys.verify_key(0, 1001)] == 0.7
    assert read_records(storage, sid) == {0: {1000: 0.5, 1001: 0.7}}
    assert summary(read_records(storage, sid)[0])["mean"] == pytest.approx(0.6)


def test_two_verify_writers_keep_both_records(tmp_path: Path) -> None:
    """Two verify processes on one study (here: two threads, each with its own storage and connection
    pool) store records at the same time. Each record is its own key, so none is lost; with the
    former single shared dict, each writer's read-modify-write dropped the other's records."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    constructed(url, [0.9, 0.8], name="w")
    errors: list[BaseException] = []

    def writer(trial: int, seeds: range) -> None:
        try:
            storage = open_storage(url)
            sid = storage.get_study_id_from_name("w")
            barrier.wait()
            for seed in seeds:
                storage.get_study_user_attrs(sid)  # what a writer reads between runs (resume planning)
                record(storage, sid, trial, seed, seed / 10_000)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(0, range(1000, 1020))),
               threading.Thread(target=writer, args=(0, range(2000, 2020))),
               threading.Thread(target=writer, args=(1, range(1000, 1020)))]
    barrier = threading.Barrier(len(threads))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    storage = open_storage(url)
    records = read_records(storage, storage.get_study_id_from_name("w"))
    assert sorted(records[0]) == [*range(1000, 1020), *range(2000, 2020)]
    assert sorted(records[1]) == list(range(1000, 1020))
    assert all(v == s / 10_000 for n in records for s, v in records[n].items())


def test_verify_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    study = optuna.create_study(storage=url, study_name="pruned-only", direction="maximize")
    study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.1}))
    storage = open_storage(url)
    with pytest.raises(TunerError, match="no COMPLETE trial"):
        run_verify(storage, "pruned-only")
    with pytest.raises(ConfigError):
        run_verify(storage, "pruned-only", top=0)
    code, _, err = cli_main(capsys, "verify", "pruned-only", "--storage", url)
    assert code == 1 and "no COMPLETE trial" in err
    code, _, err = cli_main(capsys, "verify", "pruned-only", "--seeds", "0", "--storage", url)
    assert code == 2 and "--seeds" in err
    code, _, err = cli_main(capsys, "verify", "missing", "--storage", url)
    assert code == 2 and "not found" in err
    # a sweep seed of 1000 is never used for verification
    bad = optuna.create_study(storage=url, study_name="seed1000", direction="maximize")
    bad.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"params": params(1e-2, seed=1000)}))
    result = run_verify(storage, "seed1000", top=1, n_seeds=1, device="cpu")
    assert result.seeds == [1001] and result.rows[0].entry["seeds"] == [1001]
