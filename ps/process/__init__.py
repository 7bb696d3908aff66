"""Plumbing shared by every embps process and command (shard, replica, launcher, CLI, bench).

    calls.py     domain errors -> gRPC status codes; undecodable requests -> INVALID_ARGUMENT
    children.py  child processes by pid: die with the parent, wait for health, SIGTERM then SIGKILL
    malloc.py    glibc malloc settings for large per-call buffers (servers: re-exec; workers: mallopt)
    health.py    `embps health`: one gRPC health check, for probes and operators
    metrics.py   what the Prometheus metrics of every server share (latency buckets)
"""
