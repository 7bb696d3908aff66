"""The serving replicas `embps launch` runs beside a job ([[launch.serving]] in the job's TOML).

Each replica is `embps serve` with a serve.toml the launcher writes into <output_dir>/serving/,
following the job's shards and serving every table. Replicas start with the first shards and
live through training restarts: while the shards are down they keep serving the rows they have,
and they take a full copy from each shard when it comes back (a new incarnation, see
serving/follower.py). A replica that dies is restarted alone, up to max_restarts times per
replica; past that the job fails. Training is never stopped for a replica.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ps.process import children
from serving.config import ServeConfig, dump_serve_config
from worker import processes
from worker.launch_config import ReplicaSpec
from worker.train_config import TrainingJob

POLL_SECONDS = 0.2


class ServingFleet:
    """The job's replicas: start() and wait() bring them up, then a watcher thread restarts a dead one.

    The watcher thread starts the restarted replicas, and a child started with PDEATHSIG dies
    with the thread that started it, so the thread lives until stop()."""

    def __init__(
        self, job: TrainingJob, specs: tuple[ReplicaSpec, ...], out: Path, max_restarts: int,
        on_fatal: Callable[[str], None],
    ) -> None:
        self.job = job
        self.specs = specs
        self.max_restarts = max_restarts
        self.on_fatal = on_fatal  # called once, from the watcher thread, when a replica is out of restarts
        self.config_paths = [out / "serving" / f"replica-{i}.toml" for i in range(len(specs))]
        self.log_paths = [out / "logs" / f"serve-{i}.log" for i in range(len(specs))]
        self.procs: list[subprocess.Popen] = []
        self.restarts = [0] * len(specs)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return bool(self.procs)

    @property
    def watching(self) -> bool:
        """Whether wait() saw every replica serve and the watcher runs."""
        return self._watcher is not None

    def start(self) -> None:
        """Writes each replica's serve.toml and starts them; they follow the shards as soon as
        those serve (wait() health-waits the replicas)."""
        tables = tuple(t.name for t in self.job.ps.tables)
        for spec, path in zip(self.specs, self.config_paths, strict=True):
            config = ServeConfig(job=self.job.ps, listen=spec.listen, metrics_port=spec.metrics_port, tables=tables)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_serve_config(config, str(self.job.path)))
        self.procs = [processes.start_replica(p, log) for p, log in zip(self.config_paths, self.log_paths, strict=True)]

    def wait(self) -> None:
        """Waits until every replica serves, then watches them; RuntimeError naming a replica that
        does not come up."""
        for index in range(len(self.procs)):
            self._wait_serving(index)
        self._watcher = threading.Thread(target=self._watch, name="serving-fleet", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stops the watcher (no more restarts; the wait of one under way ends within a poll), then
        every replica by pid."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        children.stop_all(self.procs)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            for index, proc in enumerate(self.procs):
                if proc.poll() is None or self._stop.is_set():
                    continue
                what = f"serving replica {index} (pid {proc.pid}) exited ({children.describe_exit(proc.returncode)})"
                if self.restarts[index] >= self.max_restarts:
                    self.on_fatal(f"{what}; no restarts left (max_restarts = {self.max_restarts})")
                    return
                self.restarts[index] += 1
                # tqdm.write: a line of its own, never glued to the progress bar's
                tqdm.write(f"embps launch: {what}; restart {self.restarts[index]}/{self.max_restarts} of this replica "
                           "(training goes on)")
                sys.stdout.flush()
                try:
                    self.procs[index] = processes.start_replica(self.config_paths[index], self.log_paths[index])
                except Exception as exc:  # noqa: BLE001 - the watcher thread must end in on_fatal, not silently
                    self.on_fatal(f"{what}; its restart failed: {exc!r}")
                    return
                try:
                    self._wait_serving(index)
                except RuntimeError as exc:
                    if self._stop.is_set():
                        return  # stop() stops every replica, this one with them
                    tqdm.write(f"embps launch: {exc}")
                    # Alive and not serving is counted as another death: stopped, the next round sees
                    # it exited (it was left running, never restarted again, and the job went on).
                    children.stop(self.procs[index])

    def _wait_serving(self, index: int) -> None:
        """RuntimeError when replica `index` exits first or does not serve in time (a TimeoutError
        escaped both callers: it ended the watcher thread, or the launch with a traceback)."""
        try:
            children.wait_serving(
                self.specs[index].listen, self.procs[index], f"serving replica {index}", security=self.job.ps.security,
                cancelled=self._stop.is_set,
            )
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc} (see {self.log_paths[index]})") from None
