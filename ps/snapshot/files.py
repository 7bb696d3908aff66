"""Snapshots of embedding tables on any pyarrow.fs URI: format, writer, reader, restore.

    <uri>/<job>/LATEST                                  newest committed step, as decimal text
    <uri>/<job>/<step>/manifest.json                    written last: the commit point
    <uri>/<job>/<step>/<table>/shard-<s>-<w>.parquet        rows (below)
    <uri>/<job>/<step>/<table>/shard-<s>-<w>.pending.parquet  keys pending admission (full, incremental)
    <uri>/<job>/<step>/<table>/shard-<s>-<w>.deleted.parquet  keys evicted since the parent (incremental)
    <uri>/<job>/<step>/<table>/shard-<s>-<w>.layout.parquet   free rows, cursors (full, incremental)
    <uri>/<job>/<step>/extra/<name>                     named blobs: dense.pt, trainer_state.json, ...

<w> is the writing process's own (SnapshotWriter.write_id, 8 random hex digits): two processes that
write the same step (a deposed primary still writing beside the standby that took over, a try the
coordinator gave up on beside its retry) never write one file, so the files a committed manifest
names keep the bytes its checksums were taken from. Readers go by the manifest's paths only.

Rows file, one row per key, sorted by key:
    key int64 | value fixed_size_list<float32>[dim] | optimizer_state fixed_size_list<float32>[w]
    | freq uint32 | last_step uint32
w = the optimizer's state width; the column is absent when w = 0 (sgd: Arrow has no 0-wide
lists). A float16 or int8 table (TableConfig.storage) stores its rows as they are kept, bit for
bit: `value_encoded fixed_size_list<uint8>[4 * value_words]` (csrc/row_codec.h) replaces `value`,
and the schema metadata embps.storage names the storage. An export holds key and value only,
value float32 or float16; an export in the tables' stored form (export_for_serving dtype
"stored") holds an int8 table's rows bit for bit as `value_encoded` (as above, manifest dtype
"int8"; readers that predate it cannot read that table and must take a float32 or float16 export).
Pending file: key int64 | count uint32 | last_step uint32. Deleted file: key int64.
Where the rows lie (ps/table/state.py TableLayout), so that a restored table evicts what the
snapshotted one would have: the rows file's `row uint32` column and the pending file's `row uint32`
and `seq int64` (first seen) columns, and `<table>/shard-<s>-<w>.layout.parquet` (the free rows,
`row uint32 | pending bool`, each map's in the order new keys take them, with the counters and the
eviction sampler's state as JSON in its schema metadata embps.layout). A snapshot written before
them has none of these; its tables restore with rows laid out by key (eviction starts afresh).
Every file's schema metadata: embps.format_version, embps.job, embps.snapshot_step,
embps.kind, embps.table, embps.shard, embps.table_version, embps.table_step.

manifest.json: format, format_version, job, step, kind (full | incremental | export), parent
(the step an incremental applies on top of, else null), created (UTC ISO-8601), num_shards,
tables {name: {dim, state_width, dtype, config (TableConfig fields or null),
shards {"s": {rows, pending, deleted, version, step, files [relative paths]}}}},
files {relative path: {size, sha256}} and extra {name: {path, size, sha256}}. Checksums are
computed while writing and verified on every read.

A reader trusts a step only through its manifest: a step folder without a complete, parseable
manifest is ignored (list_snapshots) or refused (read_manifest). The writer writes the manifest
after every other file is closed, and LATEST after the manifest, so a writer killed at any point
leaves earlier snapshots and LATEST as they were. `latest()` goes by manifests, not LATEST: a
writer killed between its manifest and LATEST has committed its step all the same. Restore = the
last full snapshot + each later incremental of its parent chain, applied like
EmbeddingTable.load_delta.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ps import native
from ps.arrays import sorted_unique
from ps.snapshot import bounded, storage
from ps.snapshot.manifest import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    RETIRED_MANIFEST,
    FileEntry,
    Manifest,
    ShardEntry,
    ShardRecord,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotKind,
    TableEntry,
    check_name,
    check_step,
    check_table_name,
)
from ps.snapshot.storage import StorageConfig
from ps.table.config import Storage, TableConfig
from ps.table.state import TableLayout, TableState

__all__ = [
    "FileEntry",
    "Manifest",
    "ShardEntry",
    "ShardRecord",
    "ShardState",
    "Snapshot",
    "SnapshotCorruptError",
    "SnapshotError",
    "SnapshotKind",
    "SnapshotWriter",
    "TableEntry",
    "apply_delta",
    "latest",
    "list_snapshots",
    "load_table_shard",
    "open_snapshot",
    "read_extra",
    "read_manifest",
    "restore",
    "snapshot_chain",
]

_ROW_GROUP_BYTES = 64 << 20
# Trained float rows barely compress; writing them plain keeps snapshots at disk/network speed.
_COMPRESSION = "none"


@dataclass
class ShardState:
    """A table shard read from one snapshot: its state, and for incrementals the keys deleted since
    the parent, deleted_keys (d,) int64 (empty for full snapshots)."""

    state: TableState
    deleted_keys: np.ndarray


class _HashingSink:
    """A file-like wrapper that hashes and counts every byte on its way to a pyarrow stream."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._stream.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(n, w) array -> fixed_size_list<type>[w], zero-copy for C-contiguous input."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _from_fixed_list(column: pa.ChunkedArray, n: int, width: int, dtype: np.dtype) -> np.ndarray:
    """fixed_size_list column of n rows -> (n, width) array of dtype."""
    size = getattr(column.type, "list_size", None)
    if size != width:  # a manifest whose dim is not its files': numpy's reshape named neither
        raise SnapshotCorruptError(f"a list column of {size} values a row where the manifest gives {width}")
    if width == 0:
        return np.zeros((n, 0), dtype=dtype)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(n, width)


class SnapshotWriter:
    """Writes one snapshot: table shards and extra files, then commit() publishes it.

        w = SnapshotWriter("s3://bucket/snaps", "ctr", step=2000, kind="incremental", parent=1000)
        w.write_table_shard("user", 0, state, deleted_keys)   # per table and shard
        w.write_extra("dense.pt", blob)
        manifest = w.commit()                                 # manifest.json, then LATEST

    Nothing is visible to readers before commit(); a writer that dies leaves only unlisted files.
    num_shards: shards per table (default: 1 + the largest shard written); commit() refuses a
    table with a missing shard. tables: TableConfigs recorded in the manifest.
    """

    def __init__(
        self,
        uri: str,
        job: str,
        step: int,
        kind: SnapshotKind | str = SnapshotKind.FULL,
        parent: int | None = None,
        *,
        num_shards: int | None = None,
        tables: Iterable[TableConfig] = (),
        storage_config: StorageConfig | None = None,
    ) -> None:
        self.job = check_name("job", job)
        self.step = check_step("step", step)
        if kind not in set(SnapshotKind):
            raise ValueError(f"kind: must be one of {', '.join(map(repr, SnapshotKind))}, got {kind!r}")
        self.kind = SnapshotKind(kind)
        if (self.kind == SnapshotKind.INCREMENTAL) != (parent is not None):
            raise ValueError(f"parent: an incremental snapshot needs its parent step, others have none; got {parent!r}")
        if parent is not None and not check_step("parent", parent) < self.step:
            raise ValueError(f"parent: must be an earlier step than {self.step}, got {parent}")
        if num_shards is not None and (
            isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
        ):
            raise ValueError(f"num_shards: must be an integer >= 1, got {num_shards!r}")
        self.parent = parent
        self.num_shards = num_shards
        self._configs = {c.name: c for c in tables}
        with storage.unavailable_on_failure(f"opening {uri}"):
            self.fs, base = storage.open_uri(uri, storage_config)
            self._job_dir = storage.join(base, self.job)
            self.dir = storage.join(self._job_dir, str(self.step))
            committed = storage.exists(self.fs, storage.join(self.dir, MANIFEST))
        if committed:
            raise SnapshotError(f"{self.job} step {self.step}: a snapshot is already committed there")
        self.write_id = secrets.token_hex(4)  # in this writer's file names (the module's docstring)
        self._records: dict[tuple[str, int], ShardRecord] = {}
        self._records_lock = threading.Lock()  # table shards may be written from several threads
        self._extra: dict[str, FileEntry] = {}
        self._committed = False
        self._parent_snapshot: Snapshot | None = None

    def parent_snapshot(self) -> Snapshot:
        """The committed snapshot an incremental builds on (SnapshotError if it is not readable),
        its manifest read once per writer."""
        if self.parent is None:
            raise ValueError(f"step {self.step}: a {self.kind} snapshot has no parent")
        if self._parent_snapshot is None:
            manifest = read_manifest_at(self.fs, self._job_dir, self.parent)
            self._parent_snapshot = Snapshot(self.fs, self._job_dir, manifest)
        return self._parent_snapshot

    def write_table_shard(
        self,
        table: str,
        shard: int,
        state: TableState,
        deleted_keys: np.ndarray | None = None,
        config: TableConfig | None = None,
    ) -> ShardRecord:
        """Writes one table shard: rows and pending keys of `state` (as EmbeddingTable.export gives),
        and for incrementals deleted_keys (d,) int64, the keys evicted since the parent."""
        self._check_open()
        check_table_name(table)
        shard = check_step("shard", shard)
        config = config if config is not None else self._configs.get(table)
        if deleted_keys is not None and self.kind != SnapshotKind.INCREMENTAL:
            raise ValueError("deleted_keys: only an incremental snapshot records deletions")
        deleted = sorted_unique(np.asarray(deleted_keys if deleted_keys is not None else [], dtype=np.int64))
        u, dim = state.values.shape
        width = state.optimizer_state.shape[1]
        if config is not None and config.dim != dim:
            raise ValueError(f"state.values: table {table} has dim {config.dim}, got {dim} columns")
        if deleted.shape[0] and np.intersect1d(deleted, state.keys).shape[0]:
            raise ValueError("deleted_keys: a key cannot be both deleted and written by one snapshot")
        meta = self._metadata(table, shard, state.version, state.step)
        columns = {"key": pa.array(state.keys, pa.int64())}
        if state.encoded is not None:
            columns["value_encoded"] = _fixed_list(state.encoded)
            meta[b"embps.storage"] = state.storage.encode()
        else:
            columns["value"] = _fixed_list(state.values.astype(np.float32, copy=False))
        if width:
            columns["optimizer_state"] = _fixed_list(state.optimizer_state.astype(np.float32, copy=False))
        columns["freq"] = pa.array(state.freq, pa.uint32())
        columns["last_step"] = pa.array(state.last_step, pa.uint32())
        layout = state.layout
        if layout is not None:
            columns["row"] = pa.array(layout.rows.astype(np.uint32), pa.uint32())
        stem = f"{table}/shard-{shard}-{self.write_id}"
        files = [self._write_parquet(f"{stem}.parquet", pa.table(columns).replace_schema_metadata(meta))]
        pending_columns = {
            "key": pa.array(state.pending_keys, pa.int64()),
            "count": pa.array(state.pending_counts, pa.uint32()),
            "last_step": pa.array(state.pending_last_step, pa.uint32()),
        }
        if layout is not None:
            pending_columns["row"] = pa.array(layout.pending_rows.astype(np.uint32), pa.uint32())
            pending_columns["seq"] = pa.array(layout.pending_seq, pa.int64())
        pending = pa.table(pending_columns).replace_schema_metadata(meta)
        files.append(self._write_parquet(f"{stem}.pending.parquet", pending))
        if self.kind == SnapshotKind.INCREMENTAL:
            deleted_table = pa.table({"key": pa.array(deleted, pa.int64())}).replace_schema_metadata(meta)
            files.append(self._write_parquet(f"{stem}.deleted.parquet", deleted_table))
        if layout is not None:
            files.append(self._write_parquet(f"{stem}{_LAYOUT_SUFFIX}", _layout_table(layout, meta)))
        entry = ShardEntry(
            rows=u,
            pending=int(state.pending_keys.shape[0]),
            deleted=int(deleted.shape[0]),
            version=int(state.version),
            step=int(state.step),
            files=tuple(f.path for f in files),
        )
        record = ShardRecord(table, shard, dim, width, "float32", _config_dict(config), entry, tuple(files))
        self.add_shard_record(record)
        return record

    def write_values_shard(
        self, table: str, shard: int, keys: np.ndarray, values: np.ndarray, version: int = 0, step: int = 0,
        int8_dim: int | None = None,
    ) -> ShardRecord:
        """Export only: keys (n,) int64 sorted, values (n, dim) float32 or float16; or, with
        int8_dim, an int8 table's rows as stored: values (n, 4 * value_words) uint8."""
        self._check_open()
        if self.kind != SnapshotKind.EXPORT:
            raise ValueError(f"kind: write_values_shard is for exports, this snapshot is {self.kind}")
        check_table_name(table)
        shard = check_step("shard", shard)
        allowed = (np.uint8,) if int8_dim is not None else (np.float32, np.float16)
        if values.dtype not in allowed or values.ndim != 2 or values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"values: expected ({keys.shape[0]}, width) {' or '.join(np.dtype(d).name for d in allowed)}, "
                f"got {values.shape} {values.dtype}"
            )
        meta = self._metadata(table, shard, version, step)
        columns = {"key": pa.array(keys, pa.int64())}
        if int8_dim is not None:
            if values.shape[1] != 4 * native.value_words(native.Storage.INT8, int8_dim):
                raise ValueError(f"values: {values.shape[1]} bytes a row is not an int8 row of dim {int8_dim}")
            columns["value_encoded"] = _fixed_list(values)
            meta[b"embps.storage"] = b"int8"
        else:
            columns["value"] = _fixed_list(values)
        data = pa.table(columns).replace_schema_metadata(meta)
        entry_file = self._write_parquet(f"{table}/shard-{shard}-{self.write_id}.parquet", data)
        entry = ShardEntry(int(keys.shape[0]), 0, 0, int(version), int(step), (entry_file.path,))
        dim, dtype = (int8_dim, "int8") if int8_dim is not None else (values.shape[1], str(values.dtype))
        record = ShardRecord(table, shard, dim, 0, dtype, None, entry, (entry_file,))
        self.add_shard_record(record)
        return record

    def add_shard_record(self, record: ShardRecord) -> None:
        """Lists a table shard whose files are already written into this step (by this writer or by
        another process writing the same step folder). Safe from several threads."""
        self._check_open()
        key = (record.table, record.shard)
        with self._records_lock:
            if key in self._records:
                raise ValueError(f"table {record.table} shard {record.shard}: written twice in step {self.step}")
            self._records[key] = record

    def write_extra(self, name: str, data: bytes) -> FileEntry:
        """Stores a named blob (e.g. "dense.pt", "trainer_state.json") as extra/<name>."""
        self._check_open()
        check_name("extra name", name)
        if name in self._extra:
            raise ValueError(f"extra {name!r}: written twice in step {self.step}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra {name!r}: data must be bytes, got {type(data).__name__}")
        path = f"extra/{name}"
        full = storage.join(self.dir, path)
        with storage.unavailable_on_failure(f"writing {full}"):
            storage.make_parent_dir(self.fs, full)
            with self.fs.open_output_stream(full, compression=None) as out:
                sink = _HashingSink(out)
                sink.write(data)
            storage.sync(self.fs, full)
        entry = FileEntry(path, sink.size, sink.hexdigest())
        self._extra[name] = entry
        return entry

    def commit(self) -> Manifest:
        """Checks that every table has all its shards, writes manifest.json, then moves LATEST."""
        self._check_open()
        if self.kind == SnapshotKind.INCREMENTAL:
            try:
                with storage.unavailable_on_failure(f"reading parent step {self.parent}"):
                    read_manifest_at(self.fs, self._job_dir, self.parent)
            except SnapshotError as e:
                raise SnapshotError(f"{self.job} step {self.step}: parent step {self.parent} is unusable ({e})") from e
        tables: dict[str, TableEntry] = {}
        files: dict[str, FileEntry] = {}
        for (name, shard), r in sorted(self._records.items()):
            t = tables.setdefault(name, TableEntry(r.dim, r.state_width, r.dtype, r.config))
            if (t.dim, t.state_width, t.dtype) != (r.dim, r.state_width, r.dtype):
                raise SnapshotError(
                    f"table {name}: shard {shard} has dim/state width/dtype "
                    f"{(r.dim, r.state_width, r.dtype)}, shard 0 has {(t.dim, t.state_width, t.dtype)}"
                )
            t.shards[shard] = r.entry
            files.update({f.path: f for f in r.files})
        num_shards = self.num_shards or 1 + max((s for _, s in self._records), default=0)
        for name, t in tables.items():
            missing = sorted(set(range(num_shards)) - set(t.shards))
            if missing or max(t.shards) >= num_shards:
                raise SnapshotError(f"table {name}: shards {sorted(t.shards)} written, expected 0..{num_shards - 1}")
        manifest = Manifest(
            job=self.job,
            step=self.step,
            kind=self.kind,
            parent=self.parent,
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            num_shards=num_shards,
            tables=tables,
            files=files,
            extra=dict(self._extra),
        )
        with storage.unavailable_on_failure(f"committing {self.dir}"):
            # The entries of the files it names in their folders, up to the job's (which holds the
            # step's folder), before the manifest (its own write syncs it, then the step's folder).
            storage.make_parent_dir(self.fs, storage.join(self.dir, MANIFEST))  # a step of no files has none yet
            folders = {self.dir, self._job_dir}
            for name in [*files, *(e.path for e in self._extra.values())]:
                parts = name.split("/")[:-1]
                folders.update(storage.join(self.dir, *parts[: i + 1]) for i in range(len(parts)))
            for folder in sorted(folders, key=len, reverse=True):
                storage.sync(self.fs, folder)
            try:
                storage.write_bytes_new(self.fs, storage.join(self.dir, MANIFEST), manifest.to_json().encode())
            except FileExistsError:
                raise SnapshotError(
                    f"{self.job} step {self.step}: another writer committed this step while this one wrote it (two "
                    "jobs of one name writing to one snapshot uri?); this commit is refused and the step keeps the "
                    "other's manifest (each writer's files have names of their own: the other's stay as it wrote them)"
                ) from None
            current = _read_latest(self.fs, self._job_dir)
            if current is None or current < self.step:
                storage.write_bytes_atomic(self.fs, storage.join(self._job_dir, LATEST), f"{self.step}\n".encode())
        self._committed = True
        return manifest

    def _check_open(self) -> None:
        if self._committed:
            raise SnapshotError(f"{self.job} step {self.step}: already committed; start a new SnapshotWriter")

    def _metadata(self, table: str, shard: int, version: int, step: int) -> dict[bytes, bytes]:
        fields = {
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "snapshot_step": self.step,
            "kind": str(self.kind),
            "table": table,
            "shard": shard,
            "table_version": int(version),
            "table_step": int(step),
        }
        return {f"embps.{k}".encode(): str(v).encode() for k, v in fields.items()}

    def _write_parquet(self, relative: str, data: pa.Table) -> FileEntry:
        path = storage.join(self.dir, relative)
        row_bytes = max(1, data.nbytes // max(1, data.num_rows))
        with storage.unavailable_on_failure(f"writing {path}"):
            storage.make_parent_dir(self.fs, path)
            with self.fs.open_output_stream(path, compression=None) as out:
                sink = _HashingSink(out)
                with pq.ParquetWriter(
                    sink, data.schema, compression=_COMPRESSION, use_dictionary=False, write_statistics=["key"]
                ) as writer:
                    writer.write_table(data, row_group_size=max(1024, _ROW_GROUP_BYTES // row_bytes))
            storage.sync(self.fs, path)  # before a manifest can name it (commit syncs its folder)
        return FileEntry(relative, sink.size, sink.hexdigest())


_LAYOUT_SUFFIX = ".layout.parquet"
_LAYOUT_COUNTERS = ("num_rows", "pending_num_rows", "next_seq", "sweep_cursor", "pending_sweep_cursor")


def _layout_table(layout: TableLayout, meta: dict[bytes, bytes]) -> pa.Table:
    """The free rows of both maps, and the layout's counters and sampler state as metadata."""
    free = np.concatenate([layout.free_rows, layout.pending_free_rows])
    pending = np.zeros(free.shape[0], dtype=np.bool_)
    pending[layout.free_rows.shape[0] :] = True
    fields = {name: int(getattr(layout, name)) for name in _LAYOUT_COUNTERS}
    fields["rng"] = layout.rng
    data = pa.table({"row": pa.array(free, pa.uint32()), "pending": pa.array(pending, pa.bool_())})
    return data.replace_schema_metadata({**meta, b"embps.layout": json.dumps(fields).encode()})


def _read_layout(table: pa.Table, rows: pa.Table, pending: pa.Table, where: str) -> TableLayout:
    """The TableLayout of a rows and a pending file with their layout file; SnapshotCorruptError
    when a part is missing or not what _layout_table writes (the table's load checks the rest)."""
    try:
        fields = json.loads((table.schema.metadata or {})[b"embps.layout"])
        counters = {name: fields[name] for name in _LAYOUT_COUNTERS}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters.values()):
            raise ValueError(f"counters {counters}")
        if not isinstance(fields["rng"], dict):
            raise ValueError("rng: not an object")
        free = table.column("row").to_numpy().astype(np.uint32, copy=False)
        in_pending = table.column("pending").to_numpy(zero_copy_only=False).astype(np.bool_, copy=False)
        return TableLayout(
            rows=rows.column("row").to_numpy().astype(np.int64),
            free_rows=np.ascontiguousarray(free[~in_pending]),
            pending_rows=pending.column("row").to_numpy().astype(np.int64),
            pending_seq=pending.column("seq").to_numpy().astype(np.int64, copy=False),
            pending_free_rows=np.ascontiguousarray(free[in_pending]),
            rng=fields["rng"],
            **counters,
        )
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise SnapshotCorruptError(f"{where}: a layout that does not read ({type(exc).__name__}: {exc})") from None


def _config_dict(config: TableConfig | None) -> dict | None:
    return None if config is None else json.loads(json.dumps(asdict(config)))


# -- reading ---------------------------------------------------------------------------------


def _read_latest(fs: pafs.FileSystem, job_dir: str) -> int | None:
    try:
        text = storage.read_bytes(fs, storage.join(job_dir, LATEST)).decode().strip()
        return int(text)
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def read_manifest_at(fs: pafs.FileSystem, job_dir: str, step: int) -> Manifest:
    """The manifest of `step` under job_dir; SnapshotError if absent, SnapshotCorruptError if bad."""
    path = storage.join(job_dir, str(step), MANIFEST)
    try:
        text = storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise SnapshotError(f"step {step}: no manifest at {path} (never committed, or still being written)") from None
    manifest = Manifest.from_json(text, where=path)
    if manifest.step != step:
        raise SnapshotCorruptError(f"{path}: says step {manifest.step}, lies in folder {step}")
    return manifest


def step_dirs(fs: pafs.FileSystem, job_dir: str) -> list[int]:
    """Steps with a folder under job_dir, committed or not, ascending."""
    # ASCII digits in canonical form: int() takes '²' (isdigit) badly and '05' as folder 5.
    return sorted(
        int(name) for name in storage.list_dir_names(fs, job_dir)
        if name.isascii() and name.isdigit() and str(int(name)) == name
    )


def _open_job(uri: str, job: str, storage_config: StorageConfig | None) -> tuple[pafs.FileSystem, str]:
    fs, base = storage.open_uri(uri, storage_config)
    return fs, storage.join(base, check_name("job", job))


def list_snapshots(uri: str, job: str, storage_config: StorageConfig | None = None) -> list[Manifest]:
    """Manifests of the committed snapshots of `job`, oldest first; incomplete steps are skipped."""
    fs, job_dir = _open_job(uri, job, storage_config)
    manifests = []
    for step in step_dirs(fs, job_dir):
        try:
            manifests.append(read_manifest_at(fs, job_dir, step))
        except SnapshotError:
            continue
    return manifests


def latest(
    uri: str, job: str, storage_config: StorageConfig | None = None, before: int | None = None
) -> int | None:
    """The newest committed step (older than `before` when given), else None.

    A step is committed by its manifest, and LATEST is moved after it: a writer killed between the
    two leaves a committed step newer than the one LATEST names. That step counts (a job resumed
    from the older one would reach it again and find it already committed), so this looks for the
    newest step folder with a valid manifest; it reads one manifest in the common case.
    """
    fs, job_dir = _open_job(uri, job, storage_config)
    for step in reversed(step_dirs(fs, job_dir)):
        if before is not None and step >= before:
            continue
        try:
            read_manifest_at(fs, job_dir, step)
            return step
        except SnapshotError:
            continue
    return None


def retire(uri: str, job: str, step: int, storage_config: StorageConfig | None = None) -> str:
    """Takes committed training snapshot `step` out of use: its manifest moves beside its files as
    RETIRED_MANIFEST (kept for a look at what broke), so latest() and a resume no longer pick it,
    gc counts its folder as incomplete (deleted once a newer step is committed), and a job resumed
    from an older step writes that step again when it gets there. For a step that cannot be
    restored (SnapshotError: files corrupt or missing), which no restart mends: left in place, it
    stayed the newest step, so every resume tried it first, the job could not write that step
    again, and gc, keeping the newest steps by number, kept it and deleted the usable older ones
    the job went on from. Returns where the manifest went; an export is never retired (ValueError)."""
    fs, job_dir = _open_job(uri, job, storage_config)
    manifest = read_manifest_at(fs, job_dir, step)
    if manifest.kind == SnapshotKind.EXPORT:
        raise ValueError(f"step {step}: an export is not a training snapshot; not retired")
    source = storage.join(job_dir, str(step), MANIFEST)
    target = storage.join(job_dir, str(step), RETIRED_MANIFEST)
    with storage.unavailable_on_failure(f"retiring {source}"):
        fs.move(source, target)
    return target


def read_manifest(uri: str, job: str, step: int | None = None, storage_config: StorageConfig | None = None) -> Manifest:
    """The manifest of `step` (default: latest); SnapshotError when there is none."""
    return open_snapshot(uri, job, step, storage_config).manifest


def open_snapshot(uri: str, job: str, step: int | None = None, storage_config: StorageConfig | None = None) -> Snapshot:
    """A committed snapshot, ready to read (step None: the latest)."""
    fs, job_dir = _open_job(uri, job, storage_config)
    if step is None:
        step = latest(uri, job, storage_config)
        if step is None:
            raise SnapshotError(f"job {job}: no committed snapshot under {uri}")
    return Snapshot(fs, job_dir, read_manifest_at(fs, job_dir, check_step("step", step)))


class Snapshot:
    """Reads the files of one committed snapshot, each checked against the manifest's size and sha256."""

    def __init__(self, fs: pafs.FileSystem, job_dir: str, manifest: Manifest) -> None:
        self.fs = fs
        self.job_dir = job_dir
        self.dir = storage.join(job_dir, str(manifest.step))
        self.manifest = manifest
        self.on_bytes: Callable[[int], None] | None = None  # progress of reads: on_bytes(n) per chunk

    def read_file(self, entry: FileEntry) -> bytes:
        """The verified bytes of a listed file; SnapshotCorruptError on a size or checksum mismatch."""
        path = storage.join(self.dir, entry.path)
        try:
            data = storage.read_bytes(self.fs, path, self.on_bytes)
        except FileNotFoundError:
            raise SnapshotCorruptError(f"{path}: listed in the manifest but missing") from None
        if len(data) != entry.size:
            raise SnapshotCorruptError(
                f"{path}: {len(data)} bytes, the manifest says {entry.size} (truncated or replaced)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise SnapshotCorruptError(f"{path}: sha256 {digest} differs from the manifest's {entry.sha256}")
        return data

    def read_extra(self, name: str) -> bytes:
        """The blob stored by SnapshotWriter.write_extra(name, ...)."""
        if name not in self.manifest.extra:
            raise KeyError(f"extra {name!r}: not in step {self.manifest.step} (has {sorted(self.manifest.extra)})")
        return self.read_file(self.manifest.extra[name])

    def _parquet(self, path: str) -> pa.Table:
        data = self.read_file(self.manifest.files[path])
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise SnapshotCorruptError(f"{storage.join(self.dir, path)}: unreadable parquet ({e})") from e

    def shard_file_bytes(self, table: str, shard: int) -> int:
        """Bytes of table `table` shard `shard`'s files in this step (0 where it has none)."""
        entry = self.manifest.tables.get(table)
        files = entry.shards[shard].files if entry is not None and shard in entry.shards else ()
        return sum(self.manifest.files[path].size for path in files if path in self.manifest.files)

    def _shard(self, table: str, shard: int) -> tuple[TableEntry, ShardEntry]:
        if table not in self.manifest.tables:
            raise KeyError(f"table {table!r}: not in step {self.manifest.step} (has {sorted(self.manifest.tables)})")
        entry = self.manifest.tables[table]
        if shard not in entry.shards:
            raise KeyError(f"table {table} shard {shard}: not in step {self.manifest.step}")
        return entry, entry.shards[shard]

    def load_table_shard(self, table: str, shard: int) -> ShardState:
        """The TableState of one table shard (+ deleted keys for incrementals). Arrays may be
        read-only views of Arrow buffers; EmbeddingTable.load/load_delta copy them."""
        if self.manifest.kind == SnapshotKind.EXPORT:
            raise SnapshotError(f"step {self.manifest.step} is an export (values only): use load_values")
        t, s = self._shard(table, shard)
        rows = self._parquet(s.files[0])
        meta = rows.schema.metadata or {}
        version, step = int(meta.get(b"embps.table_version", b"-1")), int(meta.get(b"embps.table_step", b"-1"))
        if (version, step, rows.num_rows) != (s.version, s.step, s.rows):
            raise SnapshotCorruptError(
                f"{table} shard {shard}: file says version {version}, step {step}, {rows.num_rows} rows; "
                f"manifest says {s.version}, {s.step}, {s.rows}"
            )
        n = rows.num_rows
        pending = self._parquet(s.files[1])
        deleted = np.empty(0, dtype=np.int64)
        if self.manifest.kind == SnapshotKind.INCREMENTAL:
            deleted = self._parquet(s.files[2]).column("key").to_numpy().astype(np.int64, copy=False)
        layout_files = [f for f in s.files if f.endswith(_LAYOUT_SUFFIX)]
        layout = (
            _read_layout(self._parquet(layout_files[0]), rows, pending, f"{table} shard {shard}")
            if layout_files else None
        )
        row_storage, encoded = "float32", None
        if "value_encoded" in rows.column_names:
            row_storage = meta.get(b"embps.storage", b"").decode()
            if row_storage not in ("float16", "int8"):
                raise SnapshotCorruptError(f"{table} shard {shard}: encoded rows of unknown storage {row_storage!r}")
            width = rows.schema.field("value_encoded").type.list_size
            if width != 4 * native.value_words(native.native_enum(native.Storage, Storage(row_storage)), t.dim):
                raise SnapshotCorruptError(
                    f"{table} shard {shard}: {row_storage} rows of {width} bytes for dim {t.dim}"
                )
            encoded = np.ascontiguousarray(_from_fixed_list(rows.column("value_encoded"), n, width, np.uint8))
            values = native.decode_words(Storage(row_storage), encoded.view(np.float32), t.dim)
        else:
            values = _from_fixed_list(rows.column("value"), n, t.dim, np.float32)
        state = TableState(
            keys=rows.column("key").to_numpy().astype(np.int64, copy=False),
            values=values,
            optimizer_state=(
                _from_fixed_list(rows.column("optimizer_state"), n, t.state_width, np.float32)
                if t.state_width
                else np.zeros((n, 0), dtype=np.float32)
            ),
            freq=rows.column("freq").to_numpy().astype(np.uint32, copy=False),
            last_step=rows.column("last_step").to_numpy().astype(np.uint32, copy=False),
            pending_keys=pending.column("key").to_numpy().astype(np.int64, copy=False),
            pending_counts=pending.column("count").to_numpy().astype(np.uint32, copy=False),
            pending_last_step=pending.column("last_step").to_numpy().astype(np.uint32, copy=False),
            version=version,
            step=step,
            storage=row_storage,
            encoded=encoded,
            layout=layout,
        )
        return ShardState(state, deleted)

    def load_values(self, table: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """keys (n,) int64 and values (n, dim) in the stored dtype (exports: float32 or float16;
        an int8 table's rows decoded to float32)."""
        keys, storage, rows = self.load_stored_values(table, shard)
        if storage == "int8":
            return keys, native.decode_words(Storage.INT8, rows, self.manifest.tables[table].dim)
        return keys, rows

    def load_stored_values(self, table: str, shard: int) -> tuple[np.ndarray, str, np.ndarray]:
        """An export's rows as written: (keys (n,) int64, storage, rows): float32 or float16 values
        (n, dim), or for "int8" the rows as the table stored them, (n, value_words) float32 words.
        SnapshotError for a training snapshot: an incremental's rows are only those its step touched."""
        if self.manifest.kind != SnapshotKind.EXPORT:
            raise SnapshotError(
                f"step {self.manifest.step} is a training snapshot ({self.manifest.kind}), not an export "
                "(write one with `embps snapshot export`)"
            )
        t, s = self._shard(table, shard)
        rows = self._parquet(s.files[0])
        keys = rows.column("key").to_numpy()
        if t.dtype == "int8":
            width = native.value_words(native.Storage.INT8, t.dim)
            if "value_encoded" not in rows.column_names:
                raise SnapshotCorruptError(f"{table} shard {shard}: an int8 export without value_encoded")
            codes = _from_fixed_list(rows.column("value_encoded"), rows.num_rows, 4 * width, np.uint8)
            return keys, "int8", np.ascontiguousarray(codes).view(np.float32)
        dtype = np.float16 if t.dtype == "float16" else np.float32
        return keys, str(np.dtype(dtype)), _from_fixed_list(rows.column("value"), rows.num_rows, t.dim, dtype)


def load_table_shard(
    uri: str, job: str, step: int, table: str, shard: int, storage_config: StorageConfig | None = None
) -> ShardState:
    """One table shard of one committed snapshot (see Snapshot.load_table_shard)."""
    return open_snapshot(uri, job, step, storage_config).load_table_shard(table, shard)


def read_extra(uri: str, job: str, step: int | None, name: str, storage_config: StorageConfig | None = None) -> bytes:
    """An extra blob of a committed snapshot (step None: the latest)."""
    return open_snapshot(uri, job, step, storage_config).read_extra(name)


def snapshot_chain(
    uri: str, job: str, step: int | None = None, storage_config: StorageConfig | None = None
) -> list[Snapshot]:
    """The snapshots a restore of `step` reads: the full one it builds on, then each incremental
    in order, ending with `step` itself (default: latest)."""
    chain = [open_snapshot(uri, job, step, storage_config)]
    while chain[-1].manifest.kind == SnapshotKind.INCREMENTAL:
        last = chain[-1]
        m = last.manifest
        try:
            chain.append(Snapshot(last.fs, last.job_dir, read_manifest_at(last.fs, last.job_dir, m.parent)))
        except SnapshotError as e:
            raise SnapshotError(f"step {m.step} is incremental on step {m.parent}, which is unusable: {e}") from e
    if chain[-1].manifest.kind != SnapshotKind.FULL:
        raise SnapshotError(f"step {chain[-1].manifest.step} is an export; snapshots restore from full ones")
    return chain[::-1]


def apply_delta(base: TableState, delta: TableState, deleted_keys: np.ndarray) -> TableState:
    """EmbeddingTable.load_delta in numpy: drop deleted_keys (d,) and the rows `delta` rewrites,
    add delta's rows, keep rows sorted by key; pending keys, version and step come from delta."""
    if base.values.shape[1] != delta.values.shape[1] or base.optimizer_state.shape[1] != delta.optimizer_state.shape[1]:
        raise SnapshotError(
            f"delta: rows of width {delta.values.shape[1]}+{delta.optimizer_state.shape[1]} on a base of "
            f"{base.values.shape[1]}+{base.optimizer_state.shape[1]} (dim + optimizer state)"
        )
    if base.storage != delta.storage:
        raise SnapshotError(f"delta: {delta.storage} rows on a base of {base.storage} rows")
    keep = ~np.isin(base.keys, np.concatenate([deleted_keys, delta.keys]))
    keys = np.concatenate([base.keys[keep], delta.keys])
    order = np.argsort(keys)  # distinct keys (a base's kept rows and a delta's): one permutation

    def merged(name: str) -> np.ndarray:
        return np.concatenate([getattr(base, name)[keep], getattr(delta, name)])[order]

    layout = None
    if base.layout is not None and delta.layout is not None:  # the rows of both; the rest is the delta's
        rows = np.concatenate([base.layout.rows[keep], delta.layout.rows])[order]
        layout = dataclasses.replace(delta.layout, rows=rows)

    return TableState(
        keys=keys[order],
        values=merged("values"),
        optimizer_state=merged("optimizer_state"),
        freq=merged("freq"),
        last_step=merged("last_step"),
        pending_keys=delta.pending_keys,
        pending_counts=delta.pending_counts,
        pending_last_step=delta.pending_last_step,
        version=delta.version,
        step=delta.step,
        storage=delta.storage,
        encoded=merged("encoded") if base.encoded is not None and delta.encoded is not None else None,
        layout=layout,
    )


def restore(
    uri: str, job: str, step: int | None = None, storage_config: StorageConfig | None = None
) -> dict[str, dict[int, TableState]]:
    """{table: {shard: TableState}} as of `step` (default: latest) = its full snapshot with every
    later incremental of its chain applied in order."""
    chain = snapshot_chain(uri, job, step, storage_config)
    parts = sorted({(name, shard) for s in chain for name, t in s.manifest.tables.items() for shard in t.shards})

    def load(name: str, shard: int) -> TableState:
        state = None
        for snapshot in chain:
            entry = snapshot.manifest.tables.get(name)
            if entry is not None and shard in entry.shards:
                loaded = snapshot.load_table_shard(name, shard)
                state = loaded.state if state is None else apply_delta(state, loaded.state, loaded.deleted_keys)
        return state

    # A table shard's files over the chain, read, parsed and merged: about three times their bytes.
    tasks = [(3 * sum(c.shard_file_bytes(n, s) for c in chain), lambda n=n, s=s: functools.partial(load, n, s))
             for n, s in parts]
    states = bounded.run_bounded(tasks)
    tables: dict[str, dict[int, TableState]] = {}
    for (name, shard), state in zip(parts, states, strict=True):
        tables.setdefault(name, {})[shard] = state
    return tables
