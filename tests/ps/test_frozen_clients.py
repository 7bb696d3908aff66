"""A client that stops reading altogether (a stopped or hung worker) against a real shard process:
the shard keeps answering others, and FROZEN_PEER_SECONDS after the client's window closed it
closes the connection, which ends the calls and frees what their replies held (ps/shard/server.py
FROZEN_PEER_SECONDS; the process's RSS says little of that, since malloc keeps part of what is freed).

The client is a raw HTTP/2 connection (tests/helpers/stalled_client.py FrozenCall) that opens its
flow-control windows, asks for a large lookup and never reads its socket again: the shard's TCP
sends meet a zero window, as they do when a worker process is stopped."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ps import wire
from ps.client import PSClient
from ps.job_config import dump_job_config
from ps.process.children import stop as stop_pid
from ps.rpc import ps_pb2
from ps.shard.server import FROZEN_PEER_SECONDS, SERVICE_NAME
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import make_job, rss_bytes, start_shard, wait_serving
from tests.helpers.stalled_client import FrozenCall
from tests.helpers.waiting import wait_until

ROWS = 8_000  # keys of a request that fits the 64 KiB window a client may send before the server's SETTINGS
DIM = 800  # a lookup of every row: a 25.6 MB reply
CALLS = 8
STUCK_BYTES = 256 << 10
TABLE = TableConfig("t", dim=DIM, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.1))


def _connections(server_port: int) -> dict[int, int]:
    """The shard's side of its TCP connections: the peer's port -> bytes not yet acknowledged or not
    yet sent (the tx_queue column of /proc/net/tcp, or tcp6 for a socket bound to both families)."""
    found = {}
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == server_port and fields[3] == "01":  # ESTABLISHED
            found[remote_port] = int(fields[4].split(":")[0], 16)
    return found


@pytest.mark.slow
def test_a_client_that_stops_reading_is_cut_off_while_others_are_answered(tmp_path):
    job = make_job([TABLE])
    config = tmp_path / "job.toml"
    config.write_text(dump_job_config(job))
    log = tmp_path / "shard.log"
    proc = start_shard(config, 0, log)
    calls: list[FrozenCall] = []
    try:
        address = job.shards[0].address
        port = int(address.rsplit(":", 1)[1])
        wait_serving(address, proc, log_path=log)
        client = PSClient([address], dims={"t": DIM})
        keys = np.arange(ROWS, dtype=np.int64)
        client.push("t", keys, np.ones((ROWS, DIM), np.float32))
        expected = client.lookup("t", keys[:1000])
        before = rss_bytes(proc.pid)
        request = ps_pb2.LookupRequest(table="t", dim=DIM, keys=wire.encode_keys(keys)).SerializeToString()
        calls = [FrozenCall(address, f"/{SERVICE_NAME}/Lookup", request) for _ in range(CALLS)]
        frozen_ports = {call.local_port for call in calls}

        def all_stuck() -> bool:
            # More than the few hundred bytes of the server's SETTINGS and headers, which a loaded
            # machine may not have acknowledged yet: reply bytes the client's window keeps back.
            queues = _connections(port)
            return frozen_ports <= set(queues) and all(queues[p] > STUCK_BYTES for p in frozen_ports)

        wait_until(all_stuck, "every frozen client's connection holding unsent reply bytes", timeout=30)
        stuck_at = time.monotonic()
        held = rss_bytes(proc.pid) - before
        assert held > CALLS * ROWS * DIM * 4 // 2, f"the replies should be held meanwhile: +{held >> 20} MiB"
        np.testing.assert_array_equal(client.lookup("t", keys[:1000]), expected)

        wait_until(lambda: not frozen_ports & set(_connections(port)), "the shard closing the frozen clients'"
                   " connections", timeout=FROZEN_PEER_SECONDS + 30)
        waited = time.monotonic() - stuck_at
        assert waited > FROZEN_PEER_SECONDS / 4, f"closed after {waited:.1f} s: a client that is merely slow is cut"
        np.testing.assert_array_equal(client.lookup("t", keys[:1000]), expected)
        assert proc.poll() is None
    finally:
        for call in calls:
            call.close()
        stop_pid(proc)
