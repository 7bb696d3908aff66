"""The launcher's serving replicas (worker/serving_fleet.py) when a restart goes wrong: a replica
restarted that never serves counts as another death (it was left running, forgotten, and never
restarted again), and a restart that cannot start a process ends the job through on_fatal (the
watcher thread died silently, and the replicas were watched no more)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench.ports import free_ports
from ps.process import children
from tests.helpers.waiting import wait_until
from worker import serving_fleet

DIES = [sys.executable, "-c", "raise SystemExit(3)"]
HANGS = [sys.executable, "-c", "import signal; signal.pause()"]  # a replica that never serves, until stopped


def _fleet(tmp_path: Path, fatal: list[str], monkeypatch, start, serves) -> serving_fleet.ServingFleet:
    monkeypatch.setattr(serving_fleet.processes, "start_replica", start)

    def wait_serving(address, proc, name, timeout=90.0, security=None, cancelled=None):
        if not serves(proc):
            raise TimeoutError(f"{name} at {address} was not serving")

    monkeypatch.setattr(children, "wait_serving", wait_serving)
    job = SimpleNamespace(ps=SimpleNamespace(security=None, tables=()), path=str(tmp_path / "job.toml"))
    spec = SimpleNamespace(listen="127.0.0.1:1", metrics_port=0)
    fleet = serving_fleet.ServingFleet(job, (spec,), tmp_path, max_restarts=2, on_fatal=fatal.append)
    return fleet


def test_a_restarted_replica_that_never_serves_counts_as_another_death(tmp_path, monkeypatch):
    fatal: list[str] = []
    started: list[subprocess.Popen] = []

    def start(config_path, log_path):  # each restart hangs in its start, never serving
        started.append(subprocess.Popen(HANGS))
        return started[-1]

    fleet = _fleet(tmp_path, fatal, monkeypatch, start, serves=lambda proc: proc not in started)
    fleet.procs = [subprocess.Popen(DIES)]
    try:
        fleet.wait()
        wait_until(lambda: fatal, "the fleet to give up on the replica", timeout=60)
        assert fleet.restarts == [2] and len(started) == 2
        assert "no restarts left (max_restarts = 2)" in fatal[0]
        assert all(p.poll() is not None for p in started), "a restart that never served was left running"
    finally:
        fleet.stop()


def test_a_restart_that_cannot_start_a_process_ends_the_job(tmp_path, monkeypatch):
    fatal: list[str] = []

    def start(config_path, log_path):
        raise OSError(24, "Too many open files")

    fleet = _fleet(tmp_path, fatal, monkeypatch, start, serves=lambda proc: True)
    fleet.procs = [subprocess.Popen(DIES)]
    try:
        fleet.wait()
        wait_until(lambda: fatal, "on_fatal", timeout=60)
        assert "its restart failed: OSError(24, 'Too many open files')" in fatal[0]
    finally:
        fleet.stop()


def test_stop_during_a_restart_that_hangs_in_its_start_ends_at_once(tmp_path, monkeypatch):
    """stop() (the launcher's Ctrl-C, SIGTERM or end) waited for the watcher, which waited out the
    whole 90 s start wait of a restarted replica that did not serve: ~105 s before the launcher ended."""
    fatal: list[str] = []
    started: list[subprocess.Popen] = []
    first = subprocess.Popen(DIES)
    real_wait = children.wait_serving

    def start(config_path, log_path):
        started.append(subprocess.Popen(HANGS))
        return started[-1]

    def wait_serving(address, proc, name, **kwargs):
        if proc is not first:  # the restart: the real wait, on a port where nothing listens
            real_wait(address, proc, name, **kwargs)

    monkeypatch.setattr(serving_fleet.processes, "start_replica", start)
    monkeypatch.setattr(children, "wait_serving", wait_serving)
    (port,) = free_ports(1)
    job = SimpleNamespace(ps=SimpleNamespace(security=None, tables=()), path=str(tmp_path / "job.toml"))
    spec = SimpleNamespace(listen=f"127.0.0.1:{port}", metrics_port=0)
    fleet = serving_fleet.ServingFleet(job, (spec,), tmp_path, max_restarts=2, on_fatal=fatal.append)
    fleet.procs = [first]
    fleet.wait()
    wait_until(lambda: started, "the replica's restart")
    began = time.monotonic()
    fleet.stop()
    assert time.monotonic() - began < 10, "stop() waited for the restart's start wait"
    assert all(p.poll() is not None for p in started) and not fatal

