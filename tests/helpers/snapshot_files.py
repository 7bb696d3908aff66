"""Where a committed snapshot keeps a table shard's files: the paths its manifest names (a writer's
files carry its own id, ps/snapshot/files.py)."""

from __future__ import annotations

import json
from pathlib import Path


def shard_file(step_dir: Path, table: str, shard: int, suffix: str = ".parquet") -> Path:
    """The file of (table, shard) in the committed step folder `step_dir` whose name ends in
    `suffix`: ".parquet" the rows, ".pending.parquet", ".deleted.parquet", ".layout.parquet"."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    files = manifest["tables"][table]["shards"][str(shard)]["files"]
    if suffix == ".parquet":
        return step_dir / files[0]
    (path,) = [f for f in files if f.endswith(suffix)]
    return step_dir / path
