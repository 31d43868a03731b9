"""benchmarks/storage_load.py --smoke: two simulated workers (tuner's worker loop, a sleeping epoch
engine) against PostgreSQL for a few seconds. The JSON line's shape and that its counts agree;
no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import storage_load
from conftest import PG_ADMIN_URL, ROOT, need


def _reachable() -> None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_ADMIN_URL, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        need("postgres", f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(exc).__name__})")


def test_smoke_run_reports_consistent_counts():
    _reachable()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNER_TEST_PG": PG_ADMIN_URL}
    run = subprocess.run([sys.executable, "benchmarks/storage_load.py", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "storage_load" and out["meta"]["smoke"] is True
    assert out["meta"]["max_connections"] >= 1 and out["meta"]["cpu_count"] >= 1
    (r,) = out["runs"]
    assert "skipped" not in r, r.get("skipped")
    assert r["workers"] == 2 and r["processes"] == 1 and r["threads_per_process"] == [2]
    n = r["n_trials"]
    # every trial of the budget was leased, reported once per epoch and told, exactly once
    assert r["trials_told"] == n == r["lease_ms"]["n"] == r["tell_ms"]["n"]
    assert r["report_ms"]["n"] == n * r["epochs"]
    assert r["study_states"] == {"COMPLETE": n} and r["budget_used"] == n and r["budget_exact"] is True
    assert r["workers_ran"] == 2 and r["lease_none"] >= 2  # each worker's last lease finds the budget used
    assert r["gate_wait_ms"]["n"] >= n and r["gate_hold_ms"]["n"] == n
    assert r["errors"]["open"] == r["errors"]["run"] == r["errors"]["heartbeat_errors"] == 0
    assert r["errors"]["messages"] == [] and r["timed_out"] is False
    # each worker holds its gate connection and pooled ones; the server counts at least the benchmark's
    assert 2 <= r["connections_peak"] <= r["server_connections_peak"]
    assert r["heartbeat_ms"]["n"] >= n  # the first beat of every trial, at least
    for key in ("lease_ms", "gate_wait_ms", "gate_hold_ms", "tell_ms", "report_ms", "heartbeat_ms"):
        assert r[key]["p50"] <= r[key]["p99"], key
    assert r["trials_per_s"] > 0 and r["window_s"] > 0
    assert set(r["cpu_cores"]) == {"workers", "postgres_backends", "this_process", "machine"}
    assert r["other_processes_cpu_cores"] >= 0 and len(r["load_average"]["before"]) == 3


def test_arguments_and_helpers():
    args = storage_load.parse_args(["--smoke"])
    assert args.worker_counts == [2] and args.processes == 1 and args.n_trials == 12
    assert storage_load.parse_args(["--workers", "8,32,128"]).worker_counts == [8, 32, 128]
    assert storage_load.split(10, 4) == [3, 3, 2, 2] and sum(storage_load.split(128, 8)) == 128
    assert storage_load.pct([3.0, 1.0, 2.0], 50) == 2.0 and storage_load.pct([], 99) is None
    rates = [{"workers": 2, "trials_per_s": 5.0}, {"workers": 8, "trials_per_s": 10.0},
             {"workers": 32, "trials_per_s": 10.5}]
    assert storage_load.saturation(rates) == 32 and storage_load.saturation(rates[:2]) is None
