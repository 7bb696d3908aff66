"""What is done with snapshots: write live tables (full or incremental), export for serving, gc.

snapper = ShardSnapshotter({"user": table, "item": table2}, shard=0)
snapper.snapshot(uri, "ctr", step=1000, kind="full")                # turns on change tracking
...train...
snapper.snapshot(uri, "ctr", step=2000, kind="incremental")         # parent: step 1000
export_for_serving(uri, "ctr", None, serving_uri, dtype="float16")
collect_garbage(uri, "ctr", keep=3)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ps import wire
from ps.snapshot import bounded, storage
from ps.snapshot.files import (
    MANIFEST,
    Manifest,
    ShardRecord,
    Snapshot,
    SnapshotError,
    SnapshotKind,
    SnapshotWriter,
    check_step,
    open_snapshot,
    read_manifest_at,
    restore,
    step_dirs,
)
from ps.snapshot.manifest import check_name
from ps.snapshot.storage import StorageConfig
from ps.table.state import TableChanges, TableState

if TYPE_CHECKING:  # the table brings torch; `embps snapshot` only reads files and needs none
    from pyarrow.fs import FileSystem

    from ps.table.embedding_table import EmbeddingTable


def _merge_changes(older: TableChanges, newer: TableChanges) -> TableChanges:
    """Changes over both periods; the newer event of a key wins, as in the table's own tracker."""
    if not (older.complete and newer.complete):
        empty = np.empty(0, dtype=np.int64)
        return TableChanges(empty, empty, complete=False)
    touched = np.union1d(np.setdiff1d(older.touched_keys, newer.deleted_keys), newer.touched_keys)
    deleted = np.union1d(np.setdiff1d(older.deleted_keys, newer.touched_keys), newer.deleted_keys)
    return TableChanges(touched, deleted)


def _keys_at(snapshot: Snapshot, table: str, shard: int) -> np.ndarray:
    """The sorted keys (u,) int64 of one table shard as of `snapshot` (full + incrementals)."""
    chain = [snapshot]
    while chain[-1].manifest.kind == SnapshotKind.INCREMENTAL:
        last = chain[-1]
        chain.append(Snapshot(last.fs, last.job_dir, read_manifest_at(last.fs, last.job_dir, last.manifest.parent)))
    keys = np.empty(0, dtype=np.int64)
    for part in (s.load_table_shard(table, shard) for s in reversed(chain)):
        keys = np.union1d(np.setdiff1d(keys, part.deleted_keys), part.state.keys)
    return keys


@dataclass
class _TableWrite:
    """One table's part of a shard's snapshot write. whole: every row (a full snapshot, or an
    incremental whose changes are unknown, with the parent's keys that are gone as deletions);
    else the rows of changes.touched_keys and changes.deleted_keys. parent: the snapshot an
    incremental builds on, for a whole one."""

    table: EmbeddingTable
    shard: int
    changes: TableChanges
    whole: bool
    parent: Snapshot | None

    def export_bytes(self) -> int:
        """About what the export and its files' buffers hold while this write runs: its rows (words
        as stored, float32 values decoded from them, key and row index) and every pending key
        (always exported whole: key, row, order, count, last step), twice. A whole table's rows
        are every row handed out, free ones too: its image copies them all."""
        table = self.table
        rows = table.num_rows if self.whole else int(self.changes.touched_keys.shape[0])
        return 2 * (rows * (4 * table.width + 4 * table.dim + 16) + table.num_pending * 32)

    def export(self, writer: SnapshotWriter) -> Callable[[], Callable[[], ShardRecord]]:
        """Copies the table's rows now; returns `prepare`, which reads nothing of the table (it may
        run while pushes change it): prepare() readies the copy (a whole table's is its image, the
        words in row order, a third of export()'s time where pushes wait, made a TableState here)
        and returns what writes it. Call both on the thread whose heap the copy's memory belongs to
        (bounded.run_bounded's calling thread: it says why); the write runs on its pool."""
        table, config = self.table, self.table.config
        if not self.whole:
            state = table.export(self.changes.touched_keys)
            deleted = self.changes.deleted_keys
            return lambda: lambda: writer.write_table_shard(table.name, self.shard, state, deleted, config=config)
        image = [table.image()]
        parent = self.parent

        def prepare() -> Callable[[], ShardRecord]:
            state = table.state_of_image(image.pop())  # the image is freed once its state is built

            def write() -> ShardRecord:
                gone = None if parent is None else np.setdiff1d(_keys_at(parent, table.name, self.shard), state.keys)
                return writer.write_table_shard(table.name, self.shard, state, gone, config=config)

            return write

        return prepare


def _export_now(write: _TableWrite, writer: SnapshotWriter) -> Callable[[], ShardRecord]:
    return write.export(writer)()


@dataclass
class StagedWrite:
    """A shard's snapshot write once its tables are copied: `written` holds the records of the
    tables written while pushes waited (those past the staging budget), by position in the
    shard's table order; `pending` the (bytes, prepare) of the copies (_TableWrite.export), which
    finish() writes."""

    written: dict[int, ShardRecord]
    pending: dict[int, tuple[int, Callable[[], Callable[[], ShardRecord]]]]

    @property
    def staged_bytes(self) -> int:
        """The estimated bytes the copies hold until finish() has written them."""
        return sum(size for size, _ in self.pending.values())

    def finish(self) -> list[ShardRecord]:
        """Writes the copies (several tables at once, bounded.run_bounded); returns every table's
        record in the shard's table order. Touches no table: call it while pushes go on."""
        order = sorted(self.pending)
        tasks = [self.pending[i] for i in order]
        self.pending = {}  # each copy is freed once its file is written
        records = dict(self.written)
        records.update(zip(order, bounded.run_bounded(tasks), strict=True))
        return [records[i] for i in sorted(records)]


class ShardSnapshotter:
    """Writes the live EmbeddingTables of one shard into snapshots.

    Full: every row (export()). Incremental: the rows touched since the previous snapshot written
    through this object, plus the keys evicted since then (take_changes()). Changes handed to a
    write are kept until mark_committed(), and folded into the next incremental: if a commit
    fails, nothing touched in between is lost (at worst a row is written twice).
    Changes are tracked only from the first full write or mark_committed() (a restored step) on,
    so a shard that takes no snapshots keeps no history. When more keys changed than a table's
    tracker holds, the next incremental carries every row and, as deletions, the parent's keys
    that are gone: a full snapshot's cost, an incremental's format.
    Not thread-safe: call it where the tables' pushes are serialised.
    """

    def __init__(self, tables: Mapping[str, EmbeddingTable], shard: int) -> None:
        if not tables:
            raise ValueError("tables: at least one table is needed")
        for name, table in tables.items():
            if name != table.name:
                raise ValueError(f"tables[{name!r}]: the key must be the table's name, got {table.name!r}")
        self.tables = dict(tables)
        self.shard = check_step("shard", shard)
        self.last_committed_step: int | None = None
        self._unconfirmed: dict[str, TableChanges] = {}

    def write(self, writer: SnapshotWriter) -> list[ShardRecord]:
        """Writes this shard's tables into `writer` (full or incremental, per writer.kind)."""
        return self.stage(writer, staging_bytes=0).finish()

    def stage(self, writer: SnapshotWriter, staging_bytes: int) -> StagedWrite:
        """Takes this shard's part of snapshot `writer` as the tables stand now: copies the tables
        whose exports fit in `staging_bytes` together (taken in table order while they fit) and
        writes the others here, as write() does. Call it where pushes are serialised;
        the StagedWrite's finish() writes the copies and may run while pushes change the tables.
        Memory: the copies hold up to `staging_bytes` (estimated: _TableWrite.export_bytes) until
        finish() ends, beside the tables themselves."""
        if writer.kind not in (SnapshotKind.FULL, SnapshotKind.INCREMENTAL):
            raise ValueError(f"writer.kind: live tables go into full or incremental snapshots, got {writer.kind}")
        if writer.kind == SnapshotKind.INCREMENTAL and not all(t.tracks_changes for t in self.tables.values()):
            raise SnapshotError(
                f"kind: shard {self.shard} wrote no full snapshot since it started and restored none, so it "
                f"has no changes to write on step {writer.parent}; write a full snapshot"
            )
        # The changes held are those since the last committed step: an incremental on another
        # parent (an older step, named by the caller) gets every row, as when the tracker overflowed.
        other_parent = self.last_committed_step is not None and writer.parent != self.last_committed_step
        parent = None
        writes = []
        for name, table in sorted(self.tables.items()):
            table.enable_change_tracking()  # from a full write on (export and tracking see the same rows)
            changes = table.take_changes()
            if name in self._unconfirmed:
                changes = _merge_changes(self._unconfirmed[name], changes)
            # Kept even for a full write: if that one never commits, the next incremental (on the
            # last committed step) still needs them.
            self._unconfirmed[name] = changes
            whole = writer.kind == SnapshotKind.FULL or not changes.complete or other_parent
            if whole and writer.kind == SnapshotKind.INCREMENTAL and parent is None:
                parent = writer.parent_snapshot()  # read once, here: its deleted keys are per table
            writes.append(_TableWrite(table, self.shard, changes, whole, parent))
        sizes = [w.export_bytes() for w in writes]
        staged: list[int] = []
        now: list[int] = []
        budget = staging_bytes
        for i, size in enumerate(sizes):
            if size <= budget:
                budget -= size
                staged.append(i)
            else:
                now.append(i)
        # One after the other, a round of 500 tables wrote its 2,000 files in ~10 s to a loopback S3
        # server, holding the shard's pushes all along: each file is a request whose latency, not its
        # bytes, set the time.
        records = bounded.run_bounded([(sizes[i], functools.partial(_export_now, writes[i], writer)) for i in now])
        return StagedWrite(
            written=dict(zip(now, records, strict=True)),
            pending={i: (sizes[i], writes[i].export(writer)) for i in staged},
        )

    @property
    def unconfirmed_keys(self) -> int:
        """Keys (touched or deleted) of the writes not yet known to be committed, kept for the next
        incremental: what a shard holds between snapshots, bounded by what one write carried once
        the coordinator names each committed step."""
        return sum(c.touched_keys.shape[0] + c.deleted_keys.shape[0] for c in self._unconfirmed.values())

    def mark_committed(self, step: int) -> None:
        """The snapshot holding the last write() (or the step the tables were restored from) is
        committed: forget the changes it carried, track changes from here on."""
        for table in self.tables.values():
            table.enable_change_tracking()
        self._unconfirmed.clear()
        self.last_committed_step = step

    def snapshot(
        self,
        uri: str,
        job: str,
        step: int,
        kind: SnapshotKind | str = SnapshotKind.FULL,
        parent: int | None = None,
        extras: Mapping[str, bytes] | None = None,
        storage_config: StorageConfig | None = None,
    ) -> Manifest:
        """Writes and commits a one-shard snapshot of these tables (+ extras: name -> bytes).
        An incremental's parent defaults to the last step committed through this object."""
        if kind == SnapshotKind.INCREMENTAL and parent is None:
            if self.last_committed_step is None:
                raise SnapshotError(
                    "kind: the first snapshot of a ShardSnapshotter must be full, or name its parent "
                    "(changes are tracked only from this object's creation)"
                )
            parent = self.last_committed_step
        if self.shard != 0:
            raise ValueError("shard: snapshot() commits a one-shard job; for more, write() each shard and commit")
        writer = SnapshotWriter(uri, job, step, kind, parent, num_shards=1, storage_config=storage_config)
        self.write(writer)
        for name, data in (extras or {}).items():
            writer.write_extra(name, data)
        manifest = writer.commit()
        self.mark_committed(step)
        return manifest


def check_export_place(field: str, job: str, src: tuple[FileSystem, str], dst: tuple[FileSystem, str]) -> None:
    """Raises ValueError naming `field` (the destination) when the export's job folder, dst/<job>,
    cannot be made (a local file is it or lies above it: the export read the whole snapshot, then
    failed writing its first file on "Not a directory", exit 1 without naming the destination), or
    when it and the snapshots' job folder, src/<job>, lie one inside the other: gc of a job deletes a
    step folder whole, and takes a folder named like a step for an unfinished one, so the training
    job's gc deleted an export a replica loads (or the exports' gc the training snapshots)."""
    src_job = storage.join(src[1], check_name("job", job))
    dst_job = storage.join(dst[1], job)
    if (file := storage.file_in_the_way(dst[0], dst_job)) is not None:
        raise ValueError(f"{field}: the export would go to {dst_job}, and {file!r} is a file; give a folder")
    if storage.folder_within((dst[0], dst_job), (src[0], src_job)):
        raise ValueError(
            f"{field}: the export would go to {dst_job}, inside {src_job}, the snapshots of job {job!r}, whose gc "
            "(snapshot.keep, `embps snapshot gc`) deletes step folders with all they hold; export elsewhere"
        )
    if storage.folder_within((src[0], src_job), (dst[0], dst_job)):
        raise ValueError(
            f"{field}: the export would go to {dst_job}, which holds {src_job}, the snapshots of job {job!r}: a "
            "gc of the exports would delete them with the step folder they lie in; export elsewhere"
        )


def export_for_serving(
    src_uri: str,
    job: str,
    step: int | None,
    dst_uri: str,
    dtype: str = "float32",
    storage_config: StorageConfig | None = None,
    dst_storage_config: StorageConfig | None = None,
) -> Manifest:
    """Writes the values of snapshot `step` (default: latest; full + incrementals resolved) to
    <dst_uri>/<job>/<step>/<table>/shard-<s>-<w>.parquet as (key int64, value fixed_size_list<dtype>[dim]),
    copies its extra files (the dense model) beside them, commits a manifest of kind "export" and
    moves the destination's LATEST (<dst_uri>/<job> outside <src_uri>/<job>, and not around it:
    check_export_place). dtype: "float32", "float16" or "stored": each table as it
    stores its rows, bit for bit (float32, float16 halves, or int8 rows as `value_encoded`, which
    only readers that know the int8 export can load; ps/snapshot/files.py)."""
    if dtype not in ("float32", "float16", "stored"):
        raise ValueError(f"dtype: must be 'float32', 'float16' or 'stored', got {dtype!r}")
    src_fs, src_base = storage.open_uri(src_uri, storage_config)
    dst_fs, dst_base = storage.open_uri(dst_uri, dst_storage_config)
    if storage.same_folder((src_fs, src_base), (dst_fs, dst_base)):
        raise ValueError("dst_uri: must differ from src_uri (an export would overwrite the snapshot's step folder)")
    check_export_place("dst_uri", job, (src_fs, src_base), (dst_fs, dst_base))
    newest = open_snapshot(src_uri, job, step, storage_config)
    tables = restore(src_uri, job, newest.manifest.step, storage_config)
    m = newest.manifest
    writer = SnapshotWriter(
        dst_uri, job, m.step, SnapshotKind.EXPORT, num_shards=m.num_shards, storage_config=dst_storage_config
    )

    def convert(name: str, shard: int, state: TableState) -> Callable[[], ShardRecord]:
        """The values in the export's dtype (on the calling thread: bounded.run_bounded says why),
        and what writes them."""
        dim = state.values.shape[1]
        if dtype == "stored" and state.encoded is not None and state.storage == "int8":
            return functools.partial(
                writer.write_values_shard, name, shard, state.keys, state.encoded, state.version, state.step, dim
            )
        if dtype == "stored" and state.encoded is not None:  # float16: the halves as stored
            values = np.ascontiguousarray(state.encoded).view(np.float16)[:, :dim]
        else:
            values = wire.to_float16(state.values) if dtype == "float16" else state.values
        return functools.partial(writer.write_values_shard, name, shard, state.keys, values, state.version, state.step)

    # Table shards' files written on several threads (bounded).
    bounded.run_bounded(
        [
            (2 * state.values.nbytes, functools.partial(convert, name, shard, state))
            for name, shards in sorted(tables.items())
            for shard, state in sorted(shards.items())
        ]
    )
    for name in sorted(m.extra):
        writer.write_extra(name, newest.read_extra(name))
    return writer.commit()


@dataclass(frozen=True)
class GcResult:
    """Steps kept (committed), steps deleted (committed ones, then incomplete folders)."""

    kept: tuple[int, ...]
    deleted: tuple[int, ...]
    deleted_incomplete: tuple[int, ...]


def collect_garbage(
    uri: str, job: str, keep: int, storage_config: StorageConfig | None = None, dry_run: bool = False
) -> GcResult:
    """Keeps the newest `keep` committed snapshots and every snapshot their restore needs (the
    full one and incrementals an incremental builds on); deletes the other committed ones, and
    incomplete step folders older than the newest committed step (newer ones may be in progress).
    A snapshot's manifest is deleted first, so a gc that dies midway leaves no half snapshot."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: must be an integer >= 1 (LATEST must stay readable), got {keep!r}")
    fs, base = storage.open_uri(uri, storage_config)
    job_dir = storage.join(base, check_name("job", job))  # "..": another folder's snapshots
    manifests: dict[int, Manifest] = {}
    incomplete = []
    for step in step_dirs(fs, job_dir):
        try:
            manifests[step] = read_manifest_at(fs, job_dir, step)
        except SnapshotError:
            incomplete.append(step)
    committed = sorted(manifests)
    kept = set(committed[-keep:])
    for step in list(kept):
        parent = manifests[step].parent
        while parent is not None:
            if parent not in manifests:
                raise SnapshotError(f"step {step}: builds on step {parent}, which is not committed; gc deleted nothing")
            kept.add(parent)
            parent = manifests[parent].parent
    deleted = [s for s in committed if s not in kept]
    newest = committed[-1] if committed else -1
    stale = [s for s in incomplete if s < newest]
    if not dry_run:
        for step in deleted:
            step_dir = storage.join(job_dir, str(step))
            try:
                fs.delete_file(storage.join(step_dir, MANIFEST))
            except FileNotFoundError:
                pass  # another gc of the job (a training job's own, a scheduled one) deleted it first
            storage.delete_dir(fs, step_dir)
        for step in stale:
            storage.delete_dir(fs, storage.join(job_dir, str(step)))
    return GcResult(tuple(sorted(kept)), tuple(deleted), tuple(stale))
