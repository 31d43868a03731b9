"""Many hosts, partitions (the issue "run on a cluster"): three hosts made as network namespaces on
this machine, two `tuner worker` processes on each, sharing only the study database (PostgreSQL)
and the checkpoint bucket (moto's S3 server), both reached through TCP forwarders in the root
namespace, as a cluster's workers reach them over the network.

Host B's workers are killed with SIGKILL mid-trial. Host A is cut off from the database and the
bucket (its link goes down) for longer than the grace period, then healed: its trials are failed
by the other hosts' workers and resumed from the bucket, and A's workers, alive through the outage
(TUNER_DB_RETRY_SECONDS), find their trials taken over and leave them to the copies without a
second tell. Host C, and A after the partition, finish the study: exactly `n_trials`, nothing
left RUNNING or WAITING, every checkpoint object removed at the end.

Needs root (CAP_NET_ADMIN) and `ip`; skips with the reason otherwise (TUNER_REQUIRE_NETNS=1: fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState
from test_faults import Proc, assert_study_done, create_study, env_for, trials, wait_for

from conftest import S3Bucket, need

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

EPOCHS = 10  # of ~0.3-1 s each (synthetic:1200, the tiny net, one thread): a partition lands mid-trial
N_TRIALS = 12
GRACE = 4  # seconds without a heartbeat (every 1 s) before another worker fails the trial
# host A heals once its trials were failed elsewhere (grace, then the next lease on host C: ~4-8 s)
# and PARTITION_MIN passed, or after PARTITION_MAX at most: a checkpoint upload of A's retries for
# ~14 s (S3Store: 8 tries, delays 0.1 s doubling) before the worker gives up (database steps: for
# TUNER_DB_RETRY_SECONDS, 180 s here)
PARTITION_MIN, PARTITION_MAX = GRACE + 2, 11


# ---------------------------------------------------------------------------------------------
# Network: namespaces, veth pairs, forwarders
# ---------------------------------------------------------------------------------------------

def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if run.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {run.stderr.strip()}")


class Forwarder:
    """TCP relays in the root namespace (listen address -> target), on one asyncio loop in a thread.
    A client that closes its side closes the relayed connection: a killed worker's database session
    ends (and its locks go) as it would on a real network."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forwarder", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []
        self.writers: set[asyncio.StreamWriter] = set()

    def add(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        handler = functools.partial(self._relay, target)
        start = asyncio.start_server(handler, listen[0], listen[1], reuse_address=True)
        self.servers.append(asyncio.run_coroutine_threadsafe(start, self.loop).result(10))

    async def _relay(self, target: tuple[str, int], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # close(): end quietly
            pass
        finally:
            self.writers -= {writer, up_writer}

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for writer in list(self.writers):
                writer.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Host:
    label: str  # a, b, c
    ns: str  # the network namespace
    inside: str  # its end of the veth pair (in the namespace)
    outside: str  # the root namespace's end
    address: str  # the root side's address: the forwarders listen there
    procs: list[Proc] = field(default_factory=list)

    def partition(self) -> None:
        ip("link", "set", self.inside, "down", ns=self.ns)

    def heal(self) -> None:
        ip("link", "set", self.inside, "up", ns=self.ns)


@dataclass
class Cluster:
    hosts: dict[str, Host]
    db_port: int
    s3_port: int
    forwarder: Forwarder

    def storage_url(self, pg_url: str, host: Host) -> str:
        return sa.engine.make_url(pg_url).set(host=host.address, port=self.db_port).render_as_string(
            hide_password=False)

    def s3_endpoint(self, host: Host) -> str:
        return f"http://{host.address}:{self.s3_port}"


def _free_subnets(count: int) -> list[int]:
    """Third octets N of 10.231.N.0/24 not on any interface (a run that was killed may have left some)."""
    shown = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    used = {int(part.split(".")[2]) for part in shown.split() if part.startswith("10.231.")}
    free = [n for n in range(10, 250) if n not in used]
    return random.Random().sample(free, count)


@pytest.fixture
def cluster(s3: S3Bucket, pg_url: str) -> Iterator[Cluster]:
    """Hosts a, b, c: a network namespace each (loopback up), a veth pair to the root namespace
    (10.231.N.2 inside, 10.231.N.1 outside) and forwarders on 10.231.N.1 to PostgreSQL
    (127.0.0.1:5432) and to the S3 server. Everything is removed afterwards, on failure too, after
    the hosts' processes are killed (before `pg_url` drops the database)."""
    if shutil.which("ip") is None:
        need("netns", "`ip` (iproute2) is not installed: cannot make network namespaces")
    if os.geteuid() != 0:
        need("netns", "network namespaces need root (CAP_NET_ADMIN)")
    token = uuid.uuid4().hex[:6]
    made_ns: list[str] = []
    made_links: list[str] = []
    forwarder = Forwarder()
    hosts: dict[str, Host] = {}
    try:
        try:
            for label, n in zip("abc", _free_subnets(3)):
                host = Host(label, f"tuner-{token}-{label}", f"tn{token}{label}i", f"tn{token}{label}o",
                            f"10.231.{n}.1")
                ip("netns", "add", host.ns)
                made_ns.append(host.ns)
                ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside)
                made_links.append(host.outside)
                ip("link", "set", host.inside, "netns", host.ns)
                ip("addr", "add", f"{host.address}/24", "dev", host.outside)
                ip("link", "set", host.outside, "up")
                ip("addr", "add", f"10.231.{n}.2/24", "dev", host.inside, ns=host.ns)
                ip("link", "set", host.inside, "up", ns=host.ns)
                ip("link", "set", "lo", "up", ns=host.ns)
                hosts[label] = host
        except OSError as exc:
            need("netns", f"cannot make network namespaces here ({exc})")
        db = sa.engine.make_url(os.environ.get("TUNER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/x"))
        db_target = (db.host or "127.0.0.1", db.port or 5432)
        s3_host, s3_port = s3.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
        for host in hosts.values():
            forwarder.add((host.address, db_target[1]), db_target)
            forwarder.add((host.address, int(s3_port)), (s3_host, int(s3_port)))
        yield Cluster(hosts, db_target[1], int(s3_port), forwarder)
    finally:
        for host in hosts.values():
            for proc in host.procs:
                proc.kill()
                for fh in (proc._out, proc._err):
                    fh.close()
        forwarder.close()
        for link in made_links:  # deleting one end deletes its peer, in the namespace too
            with contextlib.suppress(OSError):
                ip("link", "del", link)
        for ns in made_ns:
            with contextlib.suppress(OSError):
                ip("netns", "del", ns)


class HostProc(Proc):
    """`python -m tuner ARGS` in a host's network namespace (`ip netns exec` keeps the process id)."""

    def __init__(self, host: Host, folder: Path, tag: str, *args: str, env: dict[str, str]) -> None:
        self.out_path, self.err_path = folder / f"{tag}.out", folder / f"{tag}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115 - closed in wait
        self.popen = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "tuner", *args],
                                      cwd=folder, env=env, stdout=self._out, stderr=self._err)
        host.procs.append(self)


# ---------------------------------------------------------------------------------------------
# A checkpoint upload that loses the network (what host A's workers hit), in this process
# ---------------------------------------------------------------------------------------------

class LosesFirstUpload:
    """An S3 client whose first upload goes to a closed port: a real boto3 failure, after which
    s3transfer has closed the source stream."""

    def __init__(self, client: Any) -> None:
        import boto3
        from botocore.config import Config

        self.client, self.failures = client, 0
        self.dead = boto3.client("s3", endpoint_url="http://127.0.0.1:9",
                                 config=Config(connect_timeout=2, retries={"max_attempts": 1}))

    def upload_fileobj(self, *args: Any, **kw: Any) -> None:
        if not self.failures:
            self.failures += 1
            self.dead.upload_fileobj(*args, **kw)
        self.client.upload_fileobj(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("source", ["file", "stream"])
def test_a_checkpoint_upload_that_loses_the_network_is_retried(s3: S3Bucket, tmp_path: Path, source: str) -> None:
    from tuner.storage.artifacts import S3Store

    client = LosesFirstUpload(s3.client)
    store = S3Store(s3.url, client=client)
    path = tmp_path / "ck.pt"
    path.write_bytes(os.urandom(100_000))
    if source == "file":
        store.write("checkpoint-trial-0-x.pt", path)
    else:
        with path.open("rb") as fh:
            store.write("checkpoint-trial-0-x.pt", fh)
            assert not fh.closed  # the caller's stream stays the caller's
    assert client.failures == 1
    store.copy_to("checkpoint-trial-0-x.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

def _running_mid_trial(url: str, name: str, pids: set[int]) -> dict[int, FrozenTrial] | None:
    """Each of `pids` runs a trial that has a checkpoint (epoch >= 1) and has epochs left: {pid: trial}."""
    from tuner.storage import keys

    found = {}
    for t in trials(url, name):
        ck = t.user_attrs.get(keys.CHECKPOINT) or {}
        pid = int((t.user_attrs.get(keys.ENV) or {}).get("pid", 0))
        if t.state == TrialState.RUNNING and pid in pids and 1 <= ck.get("epoch", 0) <= EPOCHS - 4:
            found[pid] = t
    return found if set(found) == pids else None


def _holds_gate(admin: sa.engine.Engine, app_prefix: str) -> bool:
    """A connection of these workers (PGAPPNAME) holds an advisory lock: tuner's budget gate."""
    with admin.connect() as conn:
        return bool(conn.execute(sa.text(
            "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid "
            "where l.locktype = 'advisory' and l.granted and a.application_name like :p"),
            {"p": app_prefix + "%"}).scalar())


@pytest.mark.timeout(300)
def test_partitioned_and_killed_hosts_trials_resume_elsewhere_and_none_runs_twice(
        cluster: Cluster, pg_url: str, s3: S3Bucket, tmp_path: Path) -> None:
    from tuner.storage import keys

    name = create_study(tmp_path, pg_url, name="partitioned", n_trials=N_TRIALS, epochs=EPOCHS,
                        dataset="synthetic:1200", heartbeat={"interval": 1, "grace_period": GRACE, "max_retry": 3})
    a, b, c = (cluster.hosts[k] for k in "abc")
    for host in (a, b, c):
        folder = tmp_path / f"host-{host.label}"  # nothing shared between hosts but the database and the bucket
        folder.mkdir()
        for i in (1, 2):
            env = env_for(cluster.storage_url(pg_url, host), TUNER_ARTIFACT_STORE=s3.url,
                          AWS_ENDPOINT_URL=cluster.s3_endpoint(host), TUNER_DB_RETRY_SECONDS="180",
                          PGAPPNAME=f"{host.ns}-w{i}")
            HostProc(host, folder, f"w{i}", "worker", "--study-name", name, env=env)
    pids = {label: {p.popen.pid for p in host.procs} for label, host in cluster.hosts.items()}
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        # -- host B: both workers killed mid-trial ------------------------------------------------
        killed = wait_for("both of host B's workers mid-trial with a checkpoint",
                          lambda: _running_mid_trial(pg_url, name, pids["b"]), 120, every=0.3)
        for proc in b.procs:
            os.kill(proc.popen.pid, signal.SIGKILL)
        for proc in b.procs:
            assert proc.wait(10) == -signal.SIGKILL, proc.output()
        killed_ids = {t.number: t.user_attrs[keys.CHECKPOINT]["artifact_id"] for t in killed.values()}
        bucket = set(s3.keys())  # the victims' checkpoints are in the bucket, nowhere else
        assert {f"{s3.prefix}/{i}" for i in killed_ids.values()} <= bucket, bucket

        # -- host A: cut off from the database and the bucket mid-trial, not while holding the gate
        def a_mid_trial() -> dict[int, FrozenTrial] | None:
            found = _running_mid_trial(pg_url, name, pids["a"])
            return found if found and not _holds_gate(admin, a.ns) else None

        cut = wait_for("both of host A's workers mid-trial with a checkpoint", a_mid_trial, 120, every=0.3)
        a.partition()
        started = time.monotonic()
        cut_numbers = {t.number for t in cut.values()}
        cut_ids = {t.number: t.user_attrs[keys.CHECKPOINT]["artifact_id"] for t in cut.values()}
        bucket = set(s3.keys())
        assert {f"{s3.prefix}/{i}" for i in cut_ids.values()} <= bucket, bucket

        def failed_elsewhere() -> bool:
            ts = {t.number: t for t in trials(pg_url, name)}
            return all(ts[n].state == TrialState.FAIL for n in cut_numbers)

        with contextlib.suppress(pytest.fail.Exception):  # a worker of A may hold a row lock: heal anyway
            wait_for("host A's trials failed by the other hosts' workers", failed_elsewhere, PARTITION_MAX, every=0.5)
        # the stale rule counts from A's last heartbeat (up to 1 s before the cut): keep A cut off
        # longer than the grace period in any case
        time.sleep(max(0.0, started + PARTITION_MIN - time.monotonic()))
        outage = time.monotonic() - started
        a.heal()
        assert outage > GRACE
        wait_for("host A's trials failed (after the heal at the latest)", failed_elsewhere, 60, every=0.5)

        # -- hosts A and C finish the study ----------------------------------------------------------
        for proc in a.procs + c.procs:
            assert proc.wait(200) == 0, proc.output()
            assert "Traceback" not in proc.stderr(), proc.output()
    finally:
        admin.dispose()

    ts = assert_study_done(pg_url, name, N_TRIALS)  # exactly n_trials, none RUNNING or WAITING
    assert keys.budget_used(ts) == N_TRIALS
    by_number = {t.number: t for t in ts}
    a_err = "".join(p.stderr() for p in a.procs)
    victims = killed_ids.keys() | cut_numbers
    for number in victims:
        victim = by_number[number]
        assert victim.state == TrialState.FAIL  # as the stale rule set it: never told by its own worker
        assert victim.value is None and keys.SECONDS not in victim.user_attrs and keys.HISTORY not in victim.user_attrs
        (retry,) = [t for t in ts if keys.history(t)[-1:] == [number]]  # one retry copy
        assert retry.params == victim.params
        assert retry.user_attrs[keys.RESUMED_TRIAL] == number
        assert retry.user_attrs[keys.RESUMED] > 0  # from its checkpoint in the bucket
        if retry.number not in victims:  # (a copy of B's trial may have run on host A when it was cut off)
            assert retry.state == TrialState.COMPLETE
            assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))
        # the copy started only once the trial was failed: the trial never ran twice at once
        assert victim.datetime_complete is not None and retry.datetime_start is not None
        assert retry.datetime_start >= victim.datetime_complete
        retry_pid = int(retry.user_attrs[keys.ENV]["pid"])
        assert retry_pid in pids["a"] | pids["c"]
    for number in cut_numbers:  # A's workers came back, found their trials taken over and went on
        assert f"trial {number} was failed by another worker" in a_err, a_err
    assert s3.keys() == []  # all finished: every checkpoint object removed


@pytest.mark.timeout(180)
def test_a_gate_holder_cut_off_from_the_database_loses_the_gate(cluster: Cluster, pg_url: str,
                                                               tmp_path: Path) -> None:
    """A process on host A takes a study's budget gate and is then cut off mid-hold. The forwarder
    keeps its TCP connection to PostgreSQL open (as a proxy or NAT would), so only the server's limit
    on a silent holder (gate.HOLD_LIMIT_S, 3 s here) lets a worker elsewhere take the gate."""
    from tuner.engine.gate import Gate
    from tuner.storage.database import StorageURL

    a = cluster.hosts["a"]
    holder_url = cluster.storage_url(pg_url, a)
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "import tuner.engine.gate as gate\n"
        "from tuner.storage.database import StorageURL\n"
        "gate.HOLD_LIMIT_S = 3.0\n"
        f"g = gate.Gate(StorageURL.parse({holder_url!r}), 7)\n"
        "g.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNER_")}
    holder = subprocess.Popen(["ip", "netns", "exec", a.ns, sys.executable, str(script)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held", holder.stderr
        a.partition()
        other = Gate(StorageURL.parse(pg_url), 7)
        took: list[float] = []
        started = time.monotonic()

        def take() -> None:
            other.acquire()
            took.append(time.monotonic() - started)
            other.release()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        thread.join(40)
        assert took, "the gate was still held 40 s after its holder was cut off"
        assert took[0] >= 2.0  # it was held: the other worker waited for the server to end the holder's session
        other.close()
    finally:
        a.heal()
        holder.kill()
        holder.wait()
