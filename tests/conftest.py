"""Shared fixtures: real shard processes on free loopback ports (see tests/helpers/processes.py);
the hypothesis profiles; the fast tier's rule that a test starting a process is skipped there.

Hypothesis profiles (`--hypothesis-profile NAME`): `default` (make test, make check) gives the fuzz
suite (tests/fuzz) 1,000 requests per method; `deep` (make test-deep) gives it 10,000. Other
property tests set their own max_examples.
"""

from __future__ import annotations

import multiprocessing.process
import shutil
import signal
import subprocess

import pytest
from hypothesis import settings

from tests.helpers.etcd import start_etcd
from tests.helpers.in_process import InProcessShards
from tests.helpers.loop_thread import LoopThread
from tests.helpers.processes import ShardCluster
from tests.helpers.s3_server import S3Bucket, S3Server

# No deadline per example: on a shared 2-core machine a busy core pauses any example past
# hypothesis's 200 ms now and then, which it reports as a failure ("Unreliable test timings").
settings.register_profile("default", max_examples=1_000, deadline=None)
settings.register_profile("deep", max_examples=10_000, deadline=None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-processes",
        action="store_true",
        help="the fast tier (make check): a test is skipped where it would start a process",
    )


def pytest_configure(config: pytest.Config) -> None:
    _restore_ctrl_c()


def pytest_collection(session: pytest.Session) -> None:
    """The fast tier refuses processes from the start of collection on: after pytest's own start
    (a pytest-xdist worker runs `uname` then), and never in the process that starts the workers
    (`-n 2`), which runs no test."""
    config = session.config
    starts_workers = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    if config.getoption("--no-processes") and not starts_workers:
        _skip_where_a_process_starts()


def _restore_ctrl_c() -> None:
    """The processes the tests start must see Ctrl-C as a user's terminal delivers it. A shell
    that starts pytest in the background without job control (`make test &` in a script, CI
    runners) sets SIGINT to ignored, every child inherits that, and the tests that send SIGINT
    (Ctrl-C of `embps launch`, of the load generator) would wait for a process that never sees
    it. A handled signal is reset to the default at exec, so catching it here gives children the
    default disposition, and Python's KeyboardInterrupt in each."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the fast tier, tests marked `processes` (they start one only after threads of their own
    are running, which a skip at that point would leave behind) are skipped before they begin."""
    if config.getoption("--no-processes"):
        skip = pytest.mark.skip(reason="starts processes: runs in make test, not in the fast tier")
        for item in items:
            if item.get_closest_marker("processes"):
                item.add_marker(skip)


def _skip_where_a_process_starts() -> None:
    """Every way the suite starts a process (subprocess, multiprocessing) skips the test that asks,
    so the fast tier runs exactly the tests that need none, with no list to keep up to date."""
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def refuse(what: str) -> None:
        pytest.skip(f"starts a process ({what}): runs in make test, not in the fast tier")

    def guarded_popen_init(self, args, *rest, **kwargs):
        refuse(f"subprocess {args if isinstance(args, str) else ' '.join(map(str, args))[:80]}")
        popen_init(self, args, *rest, **kwargs)

    def guarded_start(self):
        refuse(f"multiprocessing {self.name}")
        process_start(self)

    subprocess.Popen.__init__ = guarded_popen_init
    multiprocessing.process.BaseProcess.start = guarded_start


@pytest.fixture(scope="module")
def loop_thread():
    """An asyncio loop running on a thread of its own (tests/helpers/loop_thread.py)."""
    with LoopThread() as loop:
        yield loop


@pytest.fixture
def start_cluster(tmp_path):
    """start_cluster(job, name=...) -> a running ShardCluster, stopped by pid when the test ends."""
    clusters: list[ShardCluster] = []

    def start(job, name: str = "cluster", env: dict[str, str] | None = None) -> ShardCluster:
        cluster = ShardCluster.start(job, tmp_path / name, env)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def start_shards():
    """start_shards(job) -> InProcessShards: the job's shards served from this process on port 0
    (for tests that kill or signal no shard), stopped when the test ends."""
    started: list[InProcessShards] = []

    def start(job) -> InProcessShards:
        shards = InProcessShards.start(job)
        started.append(shards)
        return shards

    yield start
    for shards in started:
        shards.stop()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A real etcd on free loopback ports, one per test module (tests/helpers/etcd.py), stopped by
    pid; skips the test where etcd is not installed (Debian `etcd-server`, make system-tools)."""
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package `prometheus`); skips the test where it is absent."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install the Debian package `prometheus` (make system-tools)")
    subprocess.run([path, "--version"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Bucket:
    """A real S3 server (SeaweedFS on 127.0.0.1, credentials checked) for the whole session,
    stopped by pid at the end; tests write under s3.fresh_uri() with s3.config."""
    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield S3Bucket.create(server)
    finally:
        server.stop()
