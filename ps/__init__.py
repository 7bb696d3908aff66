"""embps parameter-server core: the library every embps process imports, and the shard process.

    table/     one embedding table in one process: config, rows, optimizers (no RPC)
    shard/     the PS shard process (`embps ps`): gRPC server, update log, metrics
    snapshot/  snapshots and exports on file://, s3://, hdfs://; `embps snapshot`
    security/  TLS, mutual TLS and bearer tokens for every port
    process/   plumbing shared by every process: status codes, child processes, health, malloc
    rpc/       generated gRPC stubs of proto/
    client.py  PSClient: Lookup and Push against a job's shards
    sharding.py, wire.py, native.py, job_config.py, errors.py: key -> shard, byte layout on the
               wire, the one import point of the C++ core, the job TOML, domain errors
    toml_writer.py  the one TOML writer (escaped strings) behind every config dump

This package imports neither `worker` nor `serving` nor `bench` (tests/test_layout.py).
"""
