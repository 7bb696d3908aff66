"""How `embps launch` stops an attempt: a process started as the stop begins is stopped with the rest.

Each test forces one interleaving with the launcher's own code: a new standby whose start the
shards' watcher decided on as the attempt stopped, and a signal that reaches the launcher between
torch's start of one worker and the next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from ps.process import children
from tests.helpers.waiting import wait_until
from tests.worker.test_launch_start import TABLE, one_shard_job
from tests.worker.training_jobs import write_training_job
from worker import launcher
from worker.train_config import load_training_job


def sleeper() -> subprocess.Popen:
    """A stand-in shard process: alive until stopped."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


class ExitedStandby(subprocess.Popen):
    """A standby that has exited; a thread other than the main one sees it exited only once `go`
    is set (the shards' watcher thread waits there, `seen` set, just before it acts on the exit)."""

    def __init__(self, seen: threading.Event, go: threading.Event) -> None:
        self.seen, self.go = seen, go
        super().__init__([sys.executable, "-c", ""])
        self.wait()

    def poll(self) -> int | None:
        if threading.current_thread() is not threading.main_thread():
            self.seen.set()
            self.go.wait(30)
        return super().poll()


def test_a_new_standby_decided_on_as_the_attempt_stops_is_never_left_running(tmp_path, monkeypatch):
    """The watcher saw a standby exited and went to start a new one while the attempt stopped its
    shards: the stop had listed the processes already, so the new standby was not among them and
    ran on, at worst until the launcher exited (a restart's start could find the standby's port taken)."""
    job = one_shard_job(tmp_path)
    seen, go = threading.Event(), threading.Event()
    primary = sleeper()
    standby = ExitedStandby(seen, go)
    new_standbys: list[subprocess.Popen] = []

    def start_shard(config_path, index, log_path, restore_step=None, standby=None) -> subprocess.Popen:
        new_standbys.append(sleeper())
        return new_standbys[-1]

    def run_workers(*args) -> None:
        wait_until(seen.is_set, "the watcher to find the standby exited")
        return None  # the workers finished: the attempt stops its shards

    stop_all = children.stop_all

    def stop_all_once_the_watcher_goes_on(procs, timeout=15.0) -> None:
        go.set()  # the watcher acts on the exit only once the stop began
        stop_all(procs, timeout)

    monkeypatch.setattr(launcher, "_start_restorable_shards", lambda *args: (([primary], [standby]), None))
    monkeypatch.setattr(launcher.processes, "start_shard", start_shard)
    monkeypatch.setattr(launcher, "_run_workers", run_workers)
    monkeypatch.setattr(children, "stop_all", stop_all_once_the_watcher_goes_on)
    before = set(threading.enumerate())
    try:
        failed = launcher._run_attempt(
            job, launcher.LaunchOptions(job.path), True, None, tmp_path / "progress.jsonl", launcher._Failures(),
            None, SimpleNamespace(wait=lambda: None),
        )
        assert failed is None
        for watcher in set(threading.enumerate()) - before:
            watcher.join(30)
        assert primary.poll() is not None
        running = [p.pid for p in new_standbys if p.poll() is None]
        assert not running, f"new standbys left running after the attempt stopped: pids {running}"
    finally:
        go.set()
        for proc in (primary, *new_standbys):
            proc.kill()
            proc.wait()


TORCH_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # torch's agent takes them over


def test_a_signal_between_two_worker_starts_leaves_no_worker_running(tmp_path, monkeypatch):
    """SIGTERM reaches the launcher just after torch's agent started worker 0 of 2: the agent records
    its workers only once every one started, so its shutdown stopped none, and worker 0 ran on
    (until the launcher's own exit, or through the next attempt when a component's SIGUSR1 did this)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    train = {"workers": 2, "steps": 10, "batch_size": 8, "tables": ["emb"], "output_dir": str(tmp_path / "out")}
    path, _ = write_training_job(tmp_path / "job.toml", [TABLE], 1, train, {"num_keys": 100})
    job = load_training_job(path)
    workers: list[subprocess.Popen] = []
    popen = subprocess_handler.SubprocessHandler._popen

    def popen_then_signal(handler, args: tuple, env: dict[str, str]) -> subprocess.Popen:
        workers.append(popen(handler, args, env))
        if len(workers) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler raises at the next bytecode, in torch's start
        return workers[-1]

    monkeypatch.setattr(subprocess_handler.SubprocessHandler, "_popen", popen_then_signal)
    monkeypatch.setenv(children.LAUNCHER_PID_ENV, str(os.getpid()))
    for name in ("EMBPS_PROGRESS_FILE", "PYTHONPATH"):  # _run_workers sets them for the workers
        monkeypatch.setenv(name, os.environ.get(name, ""))
    handlers = {sig: signal.getsignal(sig) for sig in (*TORCH_SIGNALS, signal.SIGUSR1)}
    signal.signal(signal.SIGTERM, launcher._raise_signal_exception)
    try:
        with pytest.raises(SignalException):
            launcher._run_workers(
                job, launcher.LaunchOptions(str(path)), tmp_path / "progress.jsonl", launcher._Failures(), None
            )
        assert len(workers) == 1
        running = [p.pid for p in workers if p.poll() is None]
        assert not running, f"workers left running after the launcher's stop: pids {running}"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for proc in workers:
            proc.kill()
            proc.wait()
