"""Snapshots of a running shard: the SnapshotControl service and the restore at start.

    coordinator ──StageSnapshot(uri, job, step, kind, parent)──> every shard, in parallel
        each shard copies its tables (pushes wait), answers {staged}; training may go on
        each shard writes <uri>/<job>/<step>/<table>/shard-<s>-<w>*.parquet, answers {records}
    coordinator: add_shard_record(...) for all, write_extra(dense model, trainer state), commit()

(WriteSnapshot: the same in one answer, pushes waiting until the files are written.)

A shard started with a restore step loads, for each table, the full snapshot that step builds
on and every incremental after it (its own shard files only), before it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import numpy as np

from ps import native
from ps.errors import SnapshotWriteRunningError
from ps.job_config import JobConfig, SnapshotConfig
from ps.process.calls import CallSite, stream_call, unary_call
from ps.rpc import snapshot_pb2, snapshot_pb2_grpc
from ps.snapshot import bounded
from ps.snapshot.files import Snapshot, SnapshotWriter, apply_delta, snapshot_chain
from ps.snapshot.manifest import ShardRecord, SnapshotError
from ps.snapshot.ops import ShardSnapshotter, StagedWrite
from ps.snapshot.storage import StorageError, check_uri, same_place, shown
from ps.table.embedding_table import EmbeddingTable
from ps.table.optimizers import state_width
from ps.table.state import TableState


class SnapshotControlServicer(snapshot_pb2_grpc.SnapshotControlServicer):
    """Writes this shard's tables into a snapshot step on request.

    `run_serialized(fn)` runs fn where the shard's table calls are serialised (no push runs
    during the export); `job` gives the storage config; `call_site` is the shard's, so a
    WriteSnapshot is refused while the shard drains and counted like its other calls.
    """

    def __init__(
        self,
        job: JobConfig,
        shard_index: int,
        tables: dict[str, EmbeddingTable],
        run_serialized: Callable[[Callable[[], object]], Awaitable[object]],
        call_site: CallSite,
        restored_step: int | None = None,
    ) -> None:
        self.job = job
        self.shard_index = shard_index
        self.snapshotter = ShardSnapshotter(tables, shard_index)
        if restored_step is not None:
            self.snapshotter.mark_committed(restored_step)
        self._last_written = restored_step
        self._one_write = asyncio.Lock()  # snapshot writes, one at a time (two would each hold their copies)
        self._writing: asyncio.Future[list[ShardRecord]] | None = None  # a StageSnapshot's files being written
        self._writing_step = 0  # the step of `_writing`
        self._writing_since = 0.0  # when `_writing` started (time.monotonic())
        self._doing = ""  # what `_writing` does, for a refusal's message ("writing its files of", "opening")
        self._run_serialized = run_serialized
        self.call_site = call_site

    @unary_call("WriteSnapshot")
    async def WriteSnapshot(self, request: snapshot_pb2.WriteSnapshotRequest) -> snapshot_pb2.WriteSnapshotResponse:
        self._refuse_while_writing(request.step, "WriteSnapshot")
        async with self._one_write:
            await self._staged_written(request.step, "WriteSnapshot")
            writer = await self._open(request)
            return await self._run_serialized(lambda: self.write(request, writer))

    @stream_call("StageSnapshot")
    async def StageSnapshot(
        self, request: snapshot_pb2.WriteSnapshotRequest
    ) -> AsyncIterator[snapshot_pb2.SnapshotProgress]:
        """Pushes wait only while the tables are copied (see snapshot.proto). One write at a time:
        a retry of the round's step waits for the files of the one before, whose copies it would
        otherwise hold beside its own; a request of another step while they are still written is
        refused at once (_refuse_while_writing says why). A client gone while the files are written
        leaves them to be written all the same."""
        self._refuse_while_writing(request.step, "StageSnapshot")
        async with self._one_write:
            await self._staged_written(request.step, "StageSnapshot")
            staging = self.job.snapshot.staging_bytes if self.job.snapshot is not None else 0
            writer = await self._open(request)
            staged = await self._run_serialized(lambda: self.stage(request, writer, staging))
            yield snapshot_pb2.SnapshotProgress(staged=True)
            files = asyncio.get_running_loop().run_in_executor(None, staged.finish)
            self._track(files, request.step, "writing its files of")
            records = await asyncio.shield(self._writing)
            self._last_written = request.step
        yield snapshot_pb2.SnapshotProgress(records_json=json.dumps([r.to_dict() for r in records]))

    async def _open(self, request: snapshot_pb2.WriteSnapshotRequest) -> SnapshotWriter:
        """open_writer(request) on a thread, tracked as the round's work in storage: a request of
        another step that comes while it hangs is refused, as while files are written."""
        opening = asyncio.ensure_future(asyncio.to_thread(self.open_writer, request))
        self._track(opening, request.step, "opening")
        return await asyncio.shield(opening)

    def _track(self, work: asyncio.Future, step: int, doing: str) -> None:
        self._writing, self._writing_step, self._writing_since, self._doing = work, step, time.monotonic(), doing

    def writing(self) -> tuple[int, float] | None:
        """(step, seconds) of a snapshot still in storage calls (opened, or its files written after
        a StageSnapshot's `staged`), else None."""
        if self._writing is None or self._writing.done():
            return None
        return self._writing_step, time.monotonic() - self._writing_since

    def _refuse_while_writing(self, step: int, method: str) -> None:
        """SnapshotWriteRunningError when the files of a step other than `step` are still being
        written. The coordinator asks for another step only once it has given that step's round up
        (past its round_timeout_s: its storage hangs, a hard NFS mount or an S3 server that stopped
        answering) or the round ended without it (another shard failed), and it holds training until
        every shard has staged the new round: waiting here for a write that may never end held
        training for round_timeout_s at every later round. Refused, the round is skipped at once and
        training goes on; the changes stay tracked for the next round that commits. A retry of the
        same step waits, as its round's training waits anyway, within that round's deadline."""
        running = self.writing()
        if running is None or running[0] == step:
            return
        writing_step, seconds = running
        raise SnapshotWriteRunningError(
            f"{method} of step {step}: shard {self.shard_index} is still {self._doing} snapshot step "
            f"{writing_step} ({seconds:.0f} s so far: its storage may hang); it takes no snapshot of another step "
            "until that one is through with its storage, and training does not wait for it",
            writing_step,
        )

    async def _staged_written(self, step: int, method: str) -> None:
        """Waits for the files of the previous StageSnapshot when it wrote `step` (its outcome was its
        caller's); refuses `step` if it was another's (a request that waited for the lock while that
        write began)."""
        self._refuse_while_writing(step, method)
        if self._writing is not None:
            await asyncio.wait([self._writing])
            self._writing = None

    def write(
        self, request: snapshot_pb2.WriteSnapshotRequest, writer: SnapshotWriter
    ) -> snapshot_pb2.WriteSnapshotResponse:
        """WriteSnapshot's part where pushes are serialised: every file is written when it returns."""
        records = self.stage(request, writer, staging_bytes=0).finish()
        self._last_written = request.step
        return snapshot_pb2.WriteSnapshotResponse(records_json=json.dumps([r.to_dict() for r in records]))

    def check_request(self, request: snapshot_pb2.WriteSnapshotRequest) -> SnapshotConfig:
        """The job's [snapshot] section, once the request names this job, its snapshot uri and its
        shard count (or 0); ValueError naming the field otherwise. A shard writes only where its job's
        snapshots go: any uri would let a caller have it write into any folder or bucket its
        credentials reach (another job's snapshots, its host's disk). SnapshotError for a job without
        a [snapshot] section: it takes no snapshots."""
        if request.job != self.job.job:
            raise ValueError(f"job: this shard serves job {self.job.job!r}, the request names {request.job!r}")
        config = self.job.snapshot
        if config is None:
            raise SnapshotError(f"snapshot: job {self.job.job!r} has no [snapshot] section, so its shards write none")
        check_uri(request.uri, "uri")
        if not same_place(request.uri, config.uri):
            raise ValueError(
                f"uri: this shard writes snapshots only under its job's [snapshot] uri {shown(config.uri)!r}, "
                f"the request names {shown(request.uri)!r}"
            )
        if request.num_shards not in (0, len(self.job.shards)):
            raise ValueError(
                f"num_shards: the job has {len(self.job.shards)} shards, the request names {request.num_shards}"
            )
        return config

    def open_writer(self, request: snapshot_pb2.WriteSnapshotRequest) -> SnapshotWriter:
        """The request's SnapshotWriter, with every storage call made before the tables are copied
        (the step's manifest looked for, an incremental's parent manifest read): off the section
        pushes are serialised in, which a storage that hangs (a stopped S3 server, a hard NFS mount)
        held with every push and lookup of the shard at each round, for request_timeout x
        max_attempts or for ever."""
        storage = self.check_request(request).storage
        writer = SnapshotWriter(
            request.uri,
            request.job,
            request.step,
            request.kind,
            request.parent if request.HasField("parent") else None,
            num_shards=len(self.job.shards),
            storage_config=storage,
        )
        if writer.parent is not None:
            # Read here and kept for the copy, where a table written whole needs it (most rounds
            # need it not); one that does not read now is left to that table's write, as before.
            with contextlib.suppress(SnapshotError, StorageError):
                writer.parent_snapshot()
        return writer

    def stage(
        self, request: snapshot_pb2.WriteSnapshotRequest, writer: SnapshotWriter, staging_bytes: int
    ) -> StagedWrite:
        """Takes the shard's part of the request's snapshot into `writer` (open_writer's; where
        pushes are serialised); its finish() writes the files; the coordinator commits. A shard
        learns that its previous write was committed when the next request names it
        (last_committed, or an incremental's parent); until then the changes it carried stay tracked
        (see ShardSnapshotter), so a snapshot that never commits loses nothing."""
        parent = request.parent if request.HasField("parent") else None
        committed = request.last_committed if request.HasField("last_committed") else parent
        if committed is not None and committed == self._last_written:
            self.snapshotter.mark_committed(committed)
            # Once only: a write that fails below keeps the changes it took (ShardSnapshotter), and
            # a retry naming the same parent must not forget them.
            self._last_written = None
        return self.snapshotter.stage(writer, staging_bytes)


class RestoreListener(Protocol):
    """What follows a restore: start(total bytes to read), then advance(n) as they are read."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, num_bytes: int) -> None: ...


def restore_shard_states(
    job: JobConfig, shard_index: int, step: int, progress: RestoreListener | None = None
) -> dict[str, TableState]:
    """Each table's state on this shard at snapshot `step` (full + incrementals up to it).
    SnapshotError (SnapshotCorruptError) when the step or a snapshot it builds on is unusable."""
    if job.snapshot is None:
        raise ValueError("snapshot: restoring needs a [snapshot] section with the uri")
    chain = snapshot_chain(job.snapshot.uri, job.job, step, job.snapshot.storage)
    check_fits(job, chain, step)
    if progress is not None:
        progress.start(sum(_shard_bytes(snapshot, job, shard_index) for snapshot in chain))
        lock = threading.Lock()  # the tables are read on several threads

        def advance(num_bytes: int) -> None:
            with lock:
                progress.advance(num_bytes)

        for snapshot in chain:
            snapshot.on_bytes = advance

    def load(name: str) -> TableState:
        state = None
        for snapshot in chain:
            part = snapshot.load_table_shard(name, shard_index)
            state = part.state if state is None else apply_delta(state, part.state, part.deleted_keys)
        _check_owned(job, shard_index, name, state, step)
        return state

    # A table's files, parsed, and the merge of its chain: about three times their bytes at once.
    tasks = [
        (3 * sum(s.shard_file_bytes(t.name, shard_index) for s in chain), lambda t=t: functools.partial(load, t.name))
        for t in job.tables
    ]
    return {t.name: state for t, state in zip(job.tables, bounded.run_bounded(tasks), strict=True)}


def _check_owned(job: JobConfig, shard_index: int, table: str, state: TableState, step: int) -> None:
    """ValueError naming [sharding] when the snapshot's rows of this shard are not all this shard's
    under the job's bucket map (the map changed since): the shard would hold rows that no lookup
    routes to it, and the trained values of the moved keys would read as new rows, silently."""
    for keys in (state.keys, state.pending_keys):
        if keys.shape[0] == 0 or native.first_foreign_key(keys, job.shard_map.buckets, shard_index) < 0:
            continue
        moved = int(np.count_nonzero(job.shard_map.shard_of(keys) != shard_index))
        raise ValueError(
            f"sharding.bucket_ranges: {moved:,} keys of table {table!r} that snapshot step {step} holds on shard "
            f"{shard_index} belong to another shard under the job's bucket map; the snapshot was written with "
            "another map, and moving rows between shards is not supported: restore with the map it was written with"
        )


def check_fits(job: JobConfig, chain: list[Snapshot], step: int) -> None:
    """ValueError naming the field when the job's shards or tables are not those the snapshots hold
    (another shard count, a table added since, another dim or optimizer state): a config to fix, not
    a snapshot to give up on, so the shard exits 1 (before: a KeyError's traceback, or rows of the
    wrong width). It reads manifests only: `embps launch --resume` runs it on the step before
    anything starts (worker/resume_check.py)."""
    num_shards = chain[-1].manifest.num_shards
    if num_shards != len(job.shards):
        raise ValueError(
            f"shards: snapshot step {step} was written by {num_shards} shards, the job has {len(job.shards)}; "
            "resharding a snapshot is not supported"
        )
    for snapshot in chain:
        tables, at = snapshot.manifest.tables, snapshot.manifest.step
        for table in job.tables:
            entry = tables.get(table.name)
            if entry is None:
                raise ValueError(
                    f"tables.{table.name}: not in snapshot step {at} (it holds {', '.join(sorted(tables))}): "
                    f"a table added since cannot be restored from step {step}"
                )
            if entry.dim != table.dim:
                raise ValueError(f"tables.{table.name}.dim: {table.dim} in the job, {entry.dim} in snapshot step {at}")
            width = state_width(table.optimizer.kind, table.dim)
            if entry.state_width != width:
                raise ValueError(
                    f"tables.{table.name}.optimizer: {table.optimizer.kind} keeps {width} state words a row, the "
                    f"rows of snapshot step {at} have {entry.state_width}"
                )


def check_capacity(job: JobConfig, chain: list[Snapshot], step: int) -> None:
    """ValueError naming tables.<name>.capacity when a shard of snapshot `step` (its chain: full,
    then incrementals) holds more rows of a table than the job's capacity lets one shard hold:
    EmbeddingTable.load refuses such a state whatever the eviction policy (it evicts nothing on
    load), so the shard exited 1 at every restart. From the manifests only: a full step's count is
    exact; over a chain it is a lower bound (each step's rows are still held but for the keys that
    later steps deleted), and what it lets through the shard's own load still refuses."""
    for table in job.tables:
        if table.capacity is None:
            continue
        for shard in range(chain[-1].manifest.num_shards):
            entries = [s.manifest.tables[table.name].shards.get(shard) for s in chain]
            if any(entry is None for entry in entries):
                continue  # a step without this shard's rows is corrupt: its restore says so
            deleted_after = [sum(e.deleted for e in entries[k + 1 :]) for k in range(len(entries))]
            least = max(e.rows - later for e, later in zip(entries, deleted_after, strict=True))
            if least > table.capacity:
                held = f"{least:,}" if len(chain) == 1 else f"at least {least:,}"
                raise ValueError(
                    f"tables.{table.name}.capacity: {table.capacity:,} rows a shard in the job, snapshot step {step} "
                    f"holds {held} rows of it on shard {shard}; a restored shard keeps every row (it evicts none on "
                    "load): raise the capacity to hold them"
                )


def _shard_bytes(snapshot: Snapshot, job: JobConfig, shard_index: int) -> int:
    """Bytes of this shard's files of the job's tables in one snapshot (what its restore reads)."""
    return sum(snapshot.shard_file_bytes(table.name, shard_index) for table in job.tables)
