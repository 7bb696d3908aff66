"""Snapshot manifests: what a committed snapshot holds, and the names and kinds it uses.

The layout and every field are described in ps/snapshot/files.py; this module only models and
(de)serialises manifest.json, so readers and writers share one definition.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np

from ps.errors import EmbpsError
from ps.names import NAME_RULE, RESERVED_TABLE_NAMES, is_name
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    EvictionConfig,
    EvictionPolicy,
    Initializer,
    Kernels,
    OptimizerConfig,
    OptimizerKind,
    Storage,
    TableConfig,
)

FORMAT = "embps.snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RETIRED_MANIFEST = "manifest.json.unusable"  # a step taken out of use (files.retire), beside its files
LATEST = "LATEST"


class SnapshotKind(StrEnum):
    FULL = "full"  # every row of every table
    INCREMENTAL = "incremental"  # rows touched and keys deleted since the parent snapshot
    EXPORT = "export"  # keys and values only, for serving


class SnapshotError(EmbpsError):
    """A snapshot is missing, incomplete, or cannot be written as asked."""


class SnapshotCorruptError(SnapshotError):
    """A file of a committed snapshot differs from its manifest (size or checksum) or cannot be parsed."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: path relative to the step folder, size in bytes, sha256 hex digest."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry:
    """One table shard in a snapshot: row, pending and deleted key counts, the table's version and
    step when it was exported, and the relative paths of its files."""

    rows: int
    pending: int
    deleted: int
    version: int
    step: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class TableEntry:
    """One table: dim, optimizer state width, value dtype, its TableConfig fields (or None)."""

    dim: int
    state_width: int
    dtype: str
    config: dict | None
    shards: dict[int, ShardEntry] = field(default_factory=dict)

    def table_config(self, name: str) -> TableConfig | None:
        """The TableConfig recorded by the writer, or None if it recorded none."""
        if self.config is None:
            return None
        c = self.config
        try:
            config = TableConfig(
                **{
                    **c,
                    "initializer": Initializer(c["initializer"]),
                    "storage": Storage(c.get("storage", "float32")),
                    "kernels": Kernels(c.get("kernels", "auto")),
                    "optimizer": OptimizerConfig(**{**c["optimizer"], "kind": OptimizerKind(c["optimizer"]["kind"])}),
                    "admission": AdmissionConfig(**{**c["admission"], "kind": AdmissionKind(c["admission"]["kind"])}),
                    "eviction": EvictionConfig(**{**c["eviction"], "policy": EvictionPolicy(c["eviction"]["policy"])}),
                }
            )
            return config.validate(f"manifest.tables.{name}.config")
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorruptError(f"manifest.tables.{name}.config: not a valid TableConfig ({e})") from e


@dataclass(frozen=True)
class ShardRecord:
    """What writing one table shard produced; a process that wrote it hands it to the committer.

    to_dict()/from_dict() give a JSON-safe form, so shard processes can write their own files and
    one coordinator can commit the manifest (SnapshotWriter.add_shard_record).
    """

    table: str
    shard: int
    dim: int
    state_width: int
    dtype: str
    config: dict | None
    entry: ShardEntry
    files: tuple[FileEntry, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShardRecord:
        entry = ShardEntry(**{**data["entry"], "files": tuple(data["entry"]["files"])})
        files = tuple(FileEntry(**f) for f in data["files"])
        return cls(**{**data, "entry": entry, "files": files})


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of one committed snapshot (see the module docstring)."""

    job: str
    step: int
    kind: SnapshotKind
    parent: int | None
    created: str
    num_shards: int
    tables: dict[str, TableEntry]
    files: dict[str, FileEntry]
    extra: dict[str, FileEntry]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values()) + sum(f.size for f in self.extra.values())

    @property
    def total_rows(self) -> int:
        return sum(s.rows for t in self.tables.values() for s in t.shards.values())

    def to_json(self) -> str:
        tables = {
            name: {
                "dim": t.dim,
                "state_width": t.state_width,
                "dtype": t.dtype,
                "config": t.config,
                "shards": {str(s): {**asdict(e), "files": list(e.files)} for s, e in sorted(t.shards.items())},
            }
            for name, t in sorted(self.tables.items())
        }
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "step": self.step,
            "kind": str(self.kind),
            "parent": self.parent,
            "created": self.created,
            "num_shards": self.num_shards,
            "tables": tables,
            "files": {p: {"size": f.size, "sha256": f.sha256} for p, f in sorted(self.files.items())},
            "extra": {n: asdict(f) for n, f in sorted(self.extra.items())},
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST) -> Manifest:
        """Parses and checks a manifest; SnapshotCorruptError names what is wrong."""
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format: expected {FORMAT} v{FORMAT_VERSION}, got {d.get('format')!r}")
            num_shards = _count("num_shards", d["num_shards"], low=1)
            tables = {
                name: TableEntry(
                    dim=_count(f"tables.{name}.dim", t["dim"], low=1, high=65536),
                    state_width=_count(f"tables.{name}.state_width", t["state_width"]),
                    dtype=str(t["dtype"]),
                    config=_config(f"tables.{name}.config", t["config"]),
                    shards={
                        _shard_index(name, s, num_shards): _shard_entry(f"tables.{name}.shards.{s}", e)
                        for s, e in t["shards"].items()
                    },
                )
                for name, t in d["tables"].items()
            }
            files = {_path(p): FileEntry(p, _count(f"files.{p}.size", f["size"]), _digest(p, f["sha256"]))
                     for p, f in d["files"].items()}
            extra = {n: FileEntry(_path(f["path"]), _count(f"extra.{n}.size", f["size"]), _digest(n, f["sha256"]))
                     for n, f in d["extra"].items()}
            manifest = cls(
                job=check_name("job", d["job"]),
                step=_count("step", d["step"]),
                kind=SnapshotKind(d["kind"]),
                parent=None if d["parent"] is None else _count("parent", d["parent"]),
                created=str(d["created"]),
                num_shards=num_shards,
                tables=tables,
                files=files,
                extra=extra,
            )
            for name, t in tables.items():
                # What the writer allows (SnapshotWriter.commit): every table on every shard. A
                # manifest without one shard of a table was read as valid, and the shard restoring
                # it died on a KeyError (exit 1, not "snapshot unusable"), every restart alike.
                if set(t.shards) != set(range(num_shards)):
                    raise ValueError(f"table {name}: shards {sorted(t.shards)}, expected 0..{num_shards - 1}")
                for s, e in t.shards.items():
                    # Read by position (files.py load_table_shard): rows, pending, deleted (incrementals).
                    if len(e.files) < (least := _SHARD_FILES[manifest.kind]):
                        raise ValueError(
                            f"tables.{name}.shards.{s}.files: {len(e.files)} files, a {manifest.kind} snapshot's shard "
                            f"has at least {least}"
                        )
                    for p in e.files:
                        if p not in files:
                            raise ValueError(f"shard file {p!r} is not listed in files")
            # What the writer allows: a chain walked parent by parent then always ends (a parent
            # at or after its step looped restore and gc forever).
            if (manifest.kind == SnapshotKind.INCREMENTAL) != (manifest.parent is not None):
                raise ValueError(
                    f"kind {manifest.kind} with parent {manifest.parent}: an incremental has a parent, others none"
                )
            if manifest.parent is not None and not 0 <= manifest.parent < manifest.step:
                raise ValueError(f"parent {manifest.parent}: not an earlier step than {manifest.step}")
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            # OverflowError: a size of 1e999; RecursionError: JSON nested thousands deep. Either
            # escaped, and one bad manifest broke every listing of the job (latest, gc, a resume).
            raise SnapshotCorruptError(f"{where}: not a valid embps manifest ({e!r:.300})") from e
        return manifest


def _count(what: str, value: object, low: int = 0, high: int = 2**63 - 1) -> int:
    """An integer in [low, high] (not a bool, a float or a string of digits), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what}: must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def _config(what: str, value: object) -> dict | None:
    """A table's config as the writer stored it: an object, or null (a snapshot written without)."""
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{what}: must be an object or null, got {type(value).__name__} {value!r:.40}")
    return value


def _shard_index(table: str, key: object, num_shards: int) -> int:
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < num_shards):
        raise ValueError(f"tables.{table}.shards: {key!r:.40} is not a shard of [0, {num_shards})")
    return int(key)


# The files a table shard has at least, by snapshot kind (SnapshotWriter): rows and pending keys, the
# keys deleted since the parent too (incremental), the values only (export); a layout file may follow.
_SHARD_FILES = {SnapshotKind.FULL: 2, SnapshotKind.INCREMENTAL: 3, SnapshotKind.EXPORT: 1}


def _shard_entry(what: str, entry: dict) -> ShardEntry:
    files = entry["files"]
    if not isinstance(files, list) or not files:  # the rows' file is files[0]
        raise ValueError(f"{what}.files: must be a non-empty list, got {files!r:.40}")
    return ShardEntry(
        **{name: _count(f"{what}.{name}", entry[name]) for name in ("rows", "pending", "deleted", "version", "step")},
        files=tuple(_path(p) for p in files),
    )


def _path(path: object) -> str:
    """A file's path relative to its step folder: no '..', not absolute (it read outside the step)."""
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"file path {path!r:.80}: must be relative to the step folder, without '..'")
    return path


def _digest(what: str, digest: object) -> str:
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{what}: sha256 must be 64 lowercase hex digits, got {digest!r:.80}")
    return digest


def check_name(what: str, name: object) -> str:
    if not is_name(name):
        raise ValueError(f"{what}: must be {NAME_RULE}: it becomes a path component, got {name!r}")
    return name


def check_table_name(name: object) -> str:
    """A table's name as a snapshot takes it: a name, and not one of a step folder's own entries."""
    check_name("table", name)
    if name in RESERVED_TABLE_NAMES:
        raise ValueError(f"table: {name!r} is a snapshot step folder's own entry; name the table otherwise")
    return name


def check_step(what: str, step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{what}: must be an integer >= 0, got {step!r}")
    return int(step)
