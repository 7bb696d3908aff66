"""The replica's initial rows: the latest committed export (ps/snapshot/files.py's format), if any.

    <uri>/<job>/LATEST -> <uri>/<job>/<step>/manifest.json -> <table>/shard-<s>-<w>.parquet (key, value)

An export in the tables' stored form (`embps snapshot export --dtype stored`) gives a replica of
the same storage_dtype the PS's int8 rows bit for bit.

The snapshot reader checks every file against the manifest's size and checksum. Each table
shard starts at the version the manifest records for it, with incarnation 0 (unknown), so its
follower subscribes from that version and the shard resyncs it in full if its log cannot cover.
"""

from __future__ import annotations

import functools
import logging

from ps.snapshot import bounded
from ps.snapshot.manifest import SnapshotKind
from ps.snapshot.storage import StorageConfig
from serving.config import ExportSource
from serving.store import ShardRows, TableReplica

log = logging.getLogger("embps.serving")


def load_latest_export(source: ExportSource, replicas: dict[str, TableReplica]) -> int | None:
    """Fills `replicas` from the latest export under source; returns its step, or None (and
    leaves them empty) when no export was committed yet. ValueError when the export's shards or
    dims or its rows' shards disagree with the job (a replica must not serve another job's layout)."""
    from ps.snapshot import files as snapshot  # pyarrow comes with it; only replicas that load exports pay

    storage_config = StorageConfig.from_env()
    step = snapshot.latest(source.uri, source.job, storage_config)
    if step is None:
        log.info("no export of job %r under %s yet: starting empty", source.job, source.uri)
        return None
    export = snapshot.open_snapshot(source.uri, source.job, step, storage_config)
    manifest = export.manifest
    if manifest.kind != SnapshotKind.EXPORT:
        # A training snapshot's folder (same <uri>/<job>/<step> layout): an incremental holds only
        # the rows its step touched, and the replica would have served those alone as the model.
        raise ValueError(
            f"export.uri: step {step} under {source.uri} is a training snapshot ({manifest.kind}), not an export; "
            "point export.uri at what `embps snapshot export` writes"
        )
    for name, replica in replicas.items():
        if manifest.num_shards != len(replica.shards):
            raise ValueError(
                f"export.uri: step {step} has {manifest.num_shards} shards, the job has {len(replica.shards)}"
            )
        entry = manifest.tables.get(name)
        if entry is None:
            raise ValueError(f"export.uri: step {step} has no table {name!r} (has {sorted(manifest.tables)})")
        if entry.dim != replica.dim:
            raise ValueError(f"export.uri: table {name!r} has dim {entry.dim} in step {step}, {replica.dim} in the job")

    def load(name: str, replica: TableReplica) -> None:
        entry = manifest.tables[name]
        for s in range(len(replica.shards)):
            keys, storage, values = export.load_stored_values(name, s)
            keys = keys.astype("int64", copy=False)
            # The same shard count under other bucket_ranges: rows a shard's stream never touches
            # (they belong to another shard now) would be served as that shard's until a full copy.
            elsewhere = int((replica.shard_map.shard_of(keys) != s).sum())
            if elsewhere:
                raise ValueError(
                    f"export.uri: step {step}, table {name!r}, shard {s} holds {elsewhere:,} keys the job's "
                    "shard map puts on other shards (exported under other bucket_ranges); export it again"
                )
            rows = ShardRows(replica.dim, replica.dtype, version=entry.shards[s].version)
            rows.upsert_rows(keys, values, storage)
            replica.replace_shard(s, rows)
        log.info("loaded table %r from export step %d: %d rows", name, step, replica.size)

    # Tables on several threads (one file per table shard: 500 tables, 1,000 reads); a table's file
    # read, parsed and written into its store holds about three times its bytes meanwhile.
    bounded.run_bounded(
        [
            (
                3 * sum(export.shard_file_bytes(name, s) for s in range(len(replica.shards))),
                lambda name=name, replica=replica: functools.partial(load, name, replica),
            )
            for name, replica in replicas.items()
        ]
    )
    return step
