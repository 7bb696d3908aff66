"""The PS shard process (`embps ps`): the gRPC server over one shard's tables.

    server.py            ParameterServer service (Lookup, Push, Stats, Subscribe), start and drain
    state.py             Shard: the tables a shard holds, push ids it remembers, update logs
    update_log.py        which keys each applied push touched (what Subscribe streams)
    range_messages.py    the messages of one Subscribe range, made as they are taken
    stream_turns.py      turns of Subscribe streams at full copies and at the memory ranges hold
    heartbeats.py        which Subscribe streams send heartbeats (one per connection and group)
    snapshot_service.py  SnapshotControl service, restore at start
    metrics.py           the shard's Prometheus metrics
    cli.py               `embps ps`: its arguments, the malloc re-exec, then server.serve_shard
"""
