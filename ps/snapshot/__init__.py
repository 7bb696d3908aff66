"""Snapshots and exports of tables on any pyarrow.fs URI (file://, s3://, hdfs://).

    files.py     the on-disk format (documented there), writer, reader, restore
    manifest.py  manifests: what a committed snapshot holds; SnapshotError
    ops.py       what is done with snapshots: write live tables, export for serving, gc
    storage.py   URIs -> pyarrow.fs, atomic writes, S3/HDFS settings
    cli.py       `embps snapshot list|inspect|export|gc`
"""
