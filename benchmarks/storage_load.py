"""How far one study database goes: N simulated workers against PostgreSQL, no training.

    python benchmarks/storage_load.py [--workers 8,32,128] [--processes 8] [--n-trials 600]
                                      [--own-server [--max-connections 100]] [--smoke]

Each simulated worker is tuner's own worker loop (`worker.run_trials`: lease, `TrialRunner.start`
with the real `suggest` and param attrs, `trial.report` after every epoch, the tell with its attrs,
`await_stragglers` at the end) on a `LeaseManager` from `open_lease_manager` (its heartbeat thread
beats for the running trial), with one change: the epoch engine sleeps `--epoch-ms` per epoch
instead of training, so the database, not the model, is what is timed. The timings come from
wrapping the manager's methods on the instance (`lease`, `tell`, the gate's `acquire`, the
storage's `set_trial_intermediate_value` and `record_heartbeat`); nothing in tuner is changed.

N workers are P processes (at most `--processes`, default 8) × N/P threads, each thread its own
LeaseManager (its own gate connection and SQLAlchemy pool). Threads of one process share the GIL:
the client-side Python (Optuna's reads, sampling) of one process runs one thread at a time. The
gate's threading lock is per Gate object, so it does not serialize threads that own separate
managers; what serializes every lease study-wide is the PostgreSQL advisory lock itself, for
threads and processes alike.

Per N: trials per second study-wide (told ÷ the time from the start to the last tell, and the
steady rate between the 10th and 90th percentile tell), p50/p99 of the time inside `lease()`, of
the wait for the gate within it and of the time it held the gate (`gate_hold_ms`), of `tell`, of
one `report` write and of one heartbeat; the gate's busy fraction (Σ hold of the leases that
returned a trial ÷ the window: near 1 the gate is the bottleneck); the peak of `pg_stat_activity`
rows for the benchmark's database (sampled every 0.25 s) and for the whole server; errors (a
manager that could not open, a worker loop that raised, transient errors retried by
`storage.Retry`, failed heartbeats), whether the deadline (`--max-seconds`) cut the run short, and
the study's trial states afterwards (the budget is exact: `n_trials` trials, no more). CPU: cores
used by the worker processes, by the PostgreSQL backends of the benchmark's database (from /proc,
sampled with the connections), and by everything else (`other_processes_cpu_cores`), plus the
1-minute load average before and after.

**Connections.** A worker holds about three: its gate connection, and the pool connections of its
main thread and its heartbeat thread. PostgreSQL's default `max_connections` is 100, so the shared
server of a development machine cannot take N = 128 without refusing others; N is skipped when
3N + 4 exceeds the connections the server has free, unless `--own-server` starts a throwaway
PostgreSQL (initdb in a temporary folder, a free port, `max_connections` = `--max-connections`),
where refusals are a finding instead of someone else's failure.

One JSON line at the end of stdout (progress on stderr). `--smoke`: N = 2, 1 process, 12 trials of
2 × 10 ms epochs, what the test suite runs (no timing is asserted there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_ADMIN = os.environ.get("TUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CONNECTIONS_PER_WORKER = 3  # gate + main-thread pool connection + heartbeat-thread pool connection
SPACE = {
    "lr": {"low": 1.0e-4, "high": 1.0, "log": True},
    "one_minus_beta1": {"low": 1.0e-2, "high": 0.5, "log": True},
    "optimizer": {"choices": ["adam", "adamw"]},
    "schedule": {"choices": ["constant", "cosine"]},
}


def log(message: str) -> None:
    print(f"[storage_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The simulated worker (runs in the pool processes)
# ---------------------------------------------------------------------------------------------

class SleepEngine:
    """An `EpochEngine` of capacity 1 that sleeps instead of training: each epoch takes `epoch_s`
    and reports a made-up validation accuracy."""

    capacity = 1

    def __init__(self, epochs: int, epoch_s: float, seed: int) -> None:
        self.epochs, self.epoch_s = epochs, epoch_s
        self.rng = random.Random(seed)
        self.key: Any = None
        self.done = 0
        self.history: list[dict[str, Any]] = []
        self.value = 0.0

    @property
    def free(self) -> int:
        return 0 if self.key is not None else 1

    def add(self, key: Any, params: Any, resume_from: Any = None) -> None:
        self.key, self.done, self.history, self.value = key, 0, [], self.rng.random()

    def run_epoch(self) -> dict[Any, Any]:
        from tuner.training.train import EpochRecord, SlotEpoch

        if self.key is None:
            return {}
        time.sleep(self.epoch_s)
        self.done += 1
        acc = self.value * self.done / self.epochs
        rec = EpochRecord(epoch=self.done, train_loss=1.0 - acc, val_loss=1.0 - acc, val_accuracy=acc, lr=1e-3,
                          seconds=self.epoch_s, grad_norm_p50=1.0, grad_norm_p90=1.0, grad_norm_max=1.0,
                          clip_fraction=0.0)
        self.history.append(rec.to_dict())
        return {self.key: SlotEpoch(rec, finished=self.done >= self.epochs)}

    def epoch(self, key: Any) -> int:
        return self.done

    def save_checkpoint(self, key: Any, path: str | Path) -> None:
        Path(path).write_bytes(b"")

    def result(self, key: Any, **_: Any) -> Any:
        from tuner.training.train import TrainResult

        acc = self.history[-1]["val_accuracy"] if self.history else None
        return TrainResult("completed", list(self.history), self.done, self.epoch_s * self.done, "cpu",
                           val_accuracy=acc)

    def remove(self, key: Any) -> None:
        self.key = None


class Timings:
    """One simulated worker's samples (appended from its main and heartbeat threads)."""

    def __init__(self) -> None:
        self.lease: list[float] = []  # seconds inside lease() that returned a trial
        self.lease_none: list[float] = []  # lease() that returned None (budget used, or waiting)
        self.gate_wait: list[float] = []  # acquiring the gate inside lease()
        self.hold: list[float] = []  # a lease that returned a trial, less its wait for the gate
        self.waited = 0.0  # the gate waits of the lease() in progress
        self.tell: list[float] = []
        self.tell_end: list[float] = []  # time.time() at the end of each tell
        self.report: list[float] = []
        self.beat: list[float] = []
        self.beat_errors = 0
        self.retries = 0  # transient errors storage.Retry slept on and retried
        self.in_lease = False


class _Beats:
    """The heartbeat thread's storage, with `record_heartbeat` timed (everything else passes through)."""

    def __init__(self, storage: Any, t: Timings) -> None:
        self._storage, self._t = storage, t

    def record_heartbeat(self, trial_id: int) -> None:
        t0 = time.perf_counter()
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception:
            self._t.beat_errors += 1
            raise
        self._t.beat.append(time.perf_counter() - t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


def instrument(m: Any, t: Timings) -> None:
    """Wrap the manager's steps on the instance (tuner's code is not changed)."""
    lease, tell, acquire, sleep = m.lease, m.tell, m.gate.acquire, m.retry.sleep
    report = m.storage.set_trial_intermediate_value

    def timed_lease() -> Any:
        t0 = time.perf_counter()
        t.in_lease, t.waited = True, 0.0
        try:
            out = lease()
        finally:
            t.in_lease = False
        spent = time.perf_counter() - t0
        (t.lease if out is not None else t.lease_none).append(spent)
        if out is not None:
            t.hold.append(spent - t.waited)
        return out

    def timed_tell(trial: Any, outcome: Any) -> None:
        t0 = time.perf_counter()
        tell(trial, outcome)
        t.tell.append(time.perf_counter() - t0)
        t.tell_end.append(time.time())

    def timed_acquire() -> None:
        t0 = time.perf_counter()
        acquire()
        if t.in_lease:
            t.gate_wait.append(time.perf_counter() - t0)
            t.waited += t.gate_wait[-1]

    def counted_sleep(seconds: float) -> None:
        t.retries += 1
        sleep(seconds)

    def timed_report(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = report(*args, **kwargs)
        t.report.append(time.perf_counter() - t0)
        return out

    m.lease, m.tell, m.gate.acquire, m.retry.sleep = timed_lease, timed_tell, timed_acquire, counted_sleep
    m.storage.set_trial_intermediate_value = timed_report  # the study's cached storage calls its backend's
    m.heartbeat.storage = _Beats(m.heartbeat.storage, t)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One pool process: `job["threads"]` simulated workers, opened, then started together with the
    other processes (the cross-process barrier), run to the end of the budget."""
    from tuner.engine.faults import StopController
    from tuner.engine.lease import open_lease_manager
    from tuner.engine.runner import RunContext
    from tuner.engine.worker import run_trials
    from tuner.storage.artifacts import CheckpointPolicy
    from tuner.study.settings import Flags, resolve

    warnings.simplefilter("ignore")  # Optuna's ExperimentalWarnings, as run_worker silences them
    barrier = job["barrier"]
    k = job["threads"]
    tmp = Path(tempfile.mkdtemp(prefix="storage-load-"))
    settings = resolve(Flags(storage=job["url"], artifact_dir=tmp / "store", checkpoint_every=1e9), env={})
    opened = threading.Barrier(k + 1)
    go = threading.Event()
    timings = [Timings() for _ in range(k)]
    errors: list[str] = []
    ran = [False] * k

    def worker(i: int) -> None:
        t = timings[i]
        manager = None
        try:
            stop = StopController()
            manager = open_lease_manager(settings, job["study"], stop,
                                         {"device": "cpu", "worker": f"{job['index']}.{i}", "pid": str(os.getpid())})
            instrument(manager, t)
        except Exception as exc:  # noqa: BLE001 - too many connections, typically: a finding
            errors.append(f"open: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            manager = None
        opened.wait()
        go.wait()
        if manager is None:
            return
        try:
            with manager:
                ran[i] = True
                ctx = RunContext(manager, None, CheckpointPolicy(1e9, "none", stop), tmp)  # type: ignore[arg-type]
                engine = SleepEngine(job["epochs"], job["epoch_s"], seed=job["index"] * 1000 + i)
                run_trials(ctx, engine, time.monotonic() + job["max_seconds"])
        except Exception as exc:  # noqa: BLE001
            errors.append(f"run: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            traceback.print_exc(file=sys.stderr)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    for th in threads:
        th.start()
    opened.wait()
    barrier.wait()  # every process has opened its managers; the parent starts its clock here
    cpu0 = _cpu_self()
    go.set()
    for th in threads:
        th.join()
    cpu = _cpu_self() - cpu0
    shutil.rmtree(tmp, ignore_errors=True)
    keys = ("lease", "lease_none", "gate_wait", "hold", "tell", "tell_end", "report", "beat")
    return {
        **{key: [x for t in timings for x in getattr(t, key)] for key in keys},
        "beat_errors": sum(t.beat_errors for t in timings), "retries": sum(t.retries for t in timings),
        "errors": errors, "ran": sum(ran), "cpu_s": cpu,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _warm(_: int) -> int:
    """Imported once per pool process, before anything is timed."""
    import tuner.engine.lease  # noqa: F401
    import tuner.engine.runner  # noqa: F401
    import tuner.engine.worker  # noqa: F401

    return os.getpid()


# ---------------------------------------------------------------------------------------------
# The server side: databases, connections, CPU
# ---------------------------------------------------------------------------------------------

class OwnServer:
    """A throwaway PostgreSQL cluster: initdb in a temporary folder, a free local port, trust auth."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.dir = Path(tempfile.mkdtemp(prefix="storage-load-pg-"))
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> OwnServer:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections={self.max_connections}")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def _proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _busy() -> float:
    """CPU seconds all processes used since boot (user nice system irq softirq)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:7]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Every 0.25 s: pg_stat_activity rows for the benchmark's database and for the whole server, and
    the CPU time of the database's backends (the last value seen per backend pid, from /proc)."""

    def __init__(self, engine: Any, db: str) -> None:
        self.engine, self.db = engine, db
        self.peak_db = self.peak_all = 0
        self.backend_cpu: dict[int, float] = {}
        self.backend_cpu0: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            while not self._stop.is_set():
                rows = conn.execute(sa.text("SELECT pid, datname FROM pg_stat_activity")).all()
                conn.rollback()
                mine = [pid for pid, db in rows if db == self.db]
                self.peak_db, self.peak_all = max(self.peak_db, len(mine)), max(self.peak_all, len(rows))
                for pid in mine:
                    cpu = _proc_cpu(pid)
                    if cpu is not None:
                        self.backend_cpu0.setdefault(pid, cpu)
                        self.backend_cpu[pid] = cpu
                self._stop.wait(0.25)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop; the backends' CPU seconds while sampled."""
        self._stop.set()
        self._thread.join()
        return sum(self.backend_cpu[p] - self.backend_cpu0[p] for p in self.backend_cpu)


def server_facts(engine: Any) -> dict[str, Any]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        def one(q: str) -> Any:
            return conn.execute(sa.text(q)).scalar()

        return {"max_connections": int(one("SHOW max_connections")),
                "superuser_reserved_connections": int(one("SHOW superuser_reserved_connections")),
                "connections_now": int(one("SELECT count(*) FROM pg_stat_activity")),
                "version": str(one("SHOW server_version"))}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ms(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50": _r(pct(xs, 50), 1000), "p99": _r(pct(xs, 99), 1000),
            "mean": _r(statistics.fmean(xs), 1000) if xs else None}


def _r(x: float | None, scale: float = 1.0, nd: int = 2) -> float | None:
    return None if x is None else round(x * scale, nd)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# One N
# ---------------------------------------------------------------------------------------------

def study_config(name: str, args: argparse.Namespace) -> Any:
    from tuner.study.config import parse_study

    return parse_study({
        "name": name, "direction": "maximize", "dataset": "synthetic:1000", "model": "tiny",
        "epochs": args.epochs, "batch_size": 64, "seed": 0, "n_trials": args.n_trials,
        "sampler": "random", "pruner": "none",
        "heartbeat": {"interval": args.heartbeat_interval, "grace_period": args.grace_period},
        "space": SPACE,
    })


def split(n: int, procs: int) -> list[int]:
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def run_n(n: int, args: argparse.Namespace, pool: Any, mgr: Any, url: str, admin: Any, db: str) -> dict[str, Any]:
    import optuna

    from tuner.engine.sweep import prepare_study
    from tuner.storage import keys
    from tuner.storage.database import open_storage

    facts = server_facts(admin)
    need = CONNECTIONS_PER_WORKER * n + 4
    free = facts["max_connections"] - facts["connections_now"]
    if need > free and not args.own_server and not args.allow_refusals:
        reason = (f"needs about {need} connections, the shared server has {free} free of "
                  f"{facts['max_connections']}: run with --own-server")
        log(f"N={n}: skipped ({reason})")
        return {"workers": n, "skipped": reason, "server": facts}
    name = f"load-n{n}"
    prepare_study(study_config(name, args), url, args.n_trials).engine.dispose()
    procs = min(n, args.processes)
    shares = split(n, procs)
    before_load = load_average()
    idle0, t_idle = _busy(), time.perf_counter()
    time.sleep(args.idle_seconds)  # the machine's load with nothing of ours running
    idle_cores = (_busy() - idle0) / (time.perf_counter() - t_idle)
    barrier = mgr.Barrier(procs + 1)
    jobs = [{"index": i, "threads": k, "url": url, "study": name, "epochs": args.epochs,
             "epoch_s": args.epoch_ms / 1000, "max_seconds": args.max_seconds, "barrier": barrier}
            for i, k in enumerate(shares)]
    log(f"N={n}: {procs} processes × {shares[0]} threads, {args.n_trials} trials of {args.epochs} × "
        f"{args.epoch_ms:g} ms; opening the managers")
    sampler = Sampler(admin, db).start()
    pending = pool.map_async(run_job, jobs, chunksize=1)
    barrier.wait(timeout=300)
    start_wall, start = time.time(), time.perf_counter()
    busy0, own0 = _busy(), _cpu_self()
    results = pending.get(timeout=args.max_seconds + 300)
    wall = time.perf_counter() - start
    busy, own = _busy() - busy0, _cpu_self() - own0
    server_cpu = sampler.stop()
    after_load = load_average()
    merged: dict[str, Any] = {key: [x for r in results for x in r[key]]
                              for key in ("lease", "lease_none", "gate_wait", "hold", "tell", "tell_end", "report",
                                          "beat")}
    errors = [e for r in results for e in r["errors"]]
    workers_cpu = sum(r["cpu_s"] for r in results)
    ends = sorted(merged["tell_end"])
    told = len(ends)
    window = (ends[-1] - start_wall) if ends else None
    steady = None
    if told >= 20:
        lo, hi = ends[told // 10], ends[(told * 9) // 10]
        steady = ((told * 9) // 10 - told // 10) / (hi - lo) if hi > lo else None
    gate_busy = sum(merged["hold"])  # the gate held by the leases that returned a trial
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    used = keys.budget_used(trials)
    out = {
        "workers": n, "processes": procs, "threads_per_process": shares, "n_trials": args.n_trials,
        "epochs": args.epochs, "epoch_ms": args.epoch_ms, "heartbeat_interval_s": args.heartbeat_interval,
        "trials_told": told, "wall_s": round(wall, 2), "window_s": _r(window),
        "trials_per_s": _r(told / window if window else None), "trials_per_s_steady": _r(steady),
        "lease_ms": ms(merged["lease"]), "gate_wait_ms": ms(merged["gate_wait"]), "gate_hold_ms": ms(merged["hold"]),
        "lease_none": len(merged["lease_none"]), "tell_ms": ms(merged["tell"]), "report_ms": ms(merged["report"]),
        "heartbeat_ms": ms(merged["beat"]),
        "gate_busy_fraction": _r(gate_busy / window if window else None, nd=3),
        "connections_peak": sampler.peak_db, "server_connections_peak": sampler.peak_all,
        "errors": {"open": sum(e.startswith("open:") for e in errors), "run": sum(e.startswith("run:") for e in errors),
                   "messages": sorted(set(errors))[:5], "transient_retries": sum(r["retries"] for r in results),
                   "heartbeat_errors": sum(r["beat_errors"] for r in results)},
        "workers_ran": sum(r["ran"] for r in results),
        "timed_out": bool(wall >= args.max_seconds),
        "study_states": states, "budget_used": used, "budget_exact": used == args.n_trials and len(trials) >= used,
        "cpu_cores": {"workers": _r(workers_cpu / wall), "postgres_backends": _r(server_cpu / wall),
                      "this_process": _r(own / wall), "machine": _r(busy / wall)},
        "other_processes_cpu_cores": _r(max(0.0, busy - workers_cpu - server_cpu - own) / wall),
        "other_processes_cpu_cores_before": _r(idle_cores),
        "load_average": {"before": before_load, "after": after_load},
        "worker_process_rss_mb_max": _r(max(r["rss_mb"] for r in results), nd=0),
        "server": facts,
    }
    log(f"N={n}: {out['trials_per_s']} trials/s (steady {out['trials_per_s_steady']}), lease p50/p99 "
        f"{out['lease_ms']['p50']}/{out['lease_ms']['p99']} ms, tell p50/p99 {out['tell_ms']['p50']}/"
        f"{out['tell_ms']['p99']} ms, gate busy {out['gate_busy_fraction']}, connections {sampler.peak_db} "
        f"(server {sampler.peak_all}), errors {out['errors']['open']}+{out['errors']['run']}, "
        f"retries {out['errors']['transient_retries']}, other cores {out['other_processes_cpu_cores']}")
    return out


def saturation(runs: list[dict[str, Any]]) -> int | None:
    """The smallest N whose rate grew less than 10 % over the N before it (None: it kept growing)."""
    done = [r for r in runs if r.get("trials_per_s")]
    for prev, cur in zip(done, done[1:]):
        if cur["trials_per_s"] < 1.1 * prev["trials_per_s"]:
            return int(cur["workers"])
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/storage_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="8,32,128", help="simulated worker counts, comma-separated")
    p.add_argument("--processes", type=int, default=8, help="at most this many processes (threads share the rest)")
    p.add_argument("--n-trials", type=int, default=600, help="the study budget per N")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epoch-ms", type=float, default=50.0, help="the sleep standing in for one epoch")
    p.add_argument("--heartbeat-interval", type=int, default=1, help="seconds (tuner's minimum is 1)")
    p.add_argument("--grace-period", type=int, default=60, help="seconds without a beat before a trial is stale")
    p.add_argument("--max-seconds", type=float, default=120.0, help="the worker loops' deadline per N")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="the machine's load is sampled this long first")
    p.add_argument("--admin-url", default=DEFAULT_ADMIN, help="a superuser URL of the server (its postgres db)")
    p.add_argument("--own-server", action="store_true", help="start a throwaway PostgreSQL for the run")
    p.add_argument("--max-connections", type=int, default=100, help="the own server's max_connections")
    p.add_argument("--allow-refusals", action="store_true",
                   help="run an N even where the shared server has too few free connections")
    p.add_argument("--smoke", action="store_true", help="N=2, 1 process, 12 trials of 2 × 10 ms (the test suite)")
    args = p.parse_args(argv)
    if args.smoke:
        args.workers, args.processes, args.n_trials, args.epochs, args.epoch_ms = "2", 1, 12, 2, 10.0
        args.max_seconds, args.idle_seconds = 60.0, 0.2
    try:
        args.worker_counts = [int(x) for x in args.workers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--workers: comma-separated integers, got {args.workers!r}")
    if not args.worker_counts or min(args.worker_counts) < 1 or args.processes < 1 or args.n_trials < 1:
        p.error("--workers, --processes and --n-trials must be >= 1")
    if args.grace_period < args.heartbeat_interval or args.heartbeat_interval < 1:
        p.error("--heartbeat-interval must be >= 1 and <= --grace-period")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    began, load_before = time.perf_counter(), load_average()
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        admin_url = args.admin_url
        if args.own_server:
            server = stack.enter_context(OwnServer(args.max_connections))
            admin_url = server.url
            log(f"own PostgreSQL on port {server.port}, max_connections={args.max_connections}")
        admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        stack.callback(admin.dispose)
        db = f"tuner_load_{os.getpid()}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db}"'))

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))

        stack.callback(drop)
        url = make_url(admin_url).set(database=db).render_as_string(hide_password=False)
        procs = min(max(args.worker_counts), args.processes)
        ctx = mp.get_context("spawn")
        mgr = stack.enter_context(ctx.Manager())
        pool = stack.enter_context(ctx.Pool(procs))
        log(f"{procs} worker processes importing tuner")
        pool.map(_warm, range(procs), chunksize=1)
        for n in args.worker_counts:
            runs.append(run_n(n, args, pool, mgr, url, admin, db))
        facts = server_facts(admin)
    meta = {
        "cpu_count": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                        / 2**30, 1),
        "server": "own (throwaway initdb)" if args.own_server else make_url(args.admin_url).render_as_string(),
        "max_connections": facts["max_connections"], "postgres": facts["version"],
        "load_average_1m": [load_before[0], load_average()[0]], "seconds": round(time.perf_counter() - began, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
    }
    with contextlib.suppress(Exception):
        import optuna

        meta["optuna"] = optuna.__version__
    for r in runs:
        if "skipped" in r:
            continue
        print(f"N={r['workers']:>4}  {r['trials_per_s'] or 0:7.1f} trials/s  lease p50/p99 "
              f"{r['lease_ms']['p50']}/{r['lease_ms']['p99']} ms  tell p50/p99 {r['tell_ms']['p50']}/"
              f"{r['tell_ms']['p99']} ms  connections {r['connections_peak']}  errors "
              f"{r['errors']['open'] + r['errors']['run']}")
    failed = any(r.get("errors", {}).get("run") for r in runs)
    print(json.dumps({"benchmark": "storage_load", "runs": runs, "saturated_at_workers": saturation(runs),
                      "meta": meta}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
