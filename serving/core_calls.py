"""Counts of gRPC's core for the replica's server, exported to Prometheus, so that the calls the
core refuses on its own (serving/shedding.py) show up in the replica's metrics.

Why: under overload most shed Lookups never reach Python. gRPC's core refuses them beyond its
queue bound, and with the default transport it answers CANCELLED without telling the server, so
`embps_serving_shed_lookups_total` (the replica's own refusals) stays small while 90% of the calls
are refused. The core's channelz node of the server counts every call the transport accepted
(started) and every call that reached the application and ended (succeeded, or failed with any
other status, the replica's own refusals included); a call the core refused is started and never
ended. So over any window:

    refused by the core = started - ended - (change in calls still open)

and the calls still open are at most the core's queue bound per method plus those the replica
holds, so `rate(started) - rate(ended)` is the core's refusal rate. Checked with grpcio 1.85:
refusals and client deadlines while queued are counted as described; aborts, handler errors and
deadlines in the handler count as failed.

channelz is read through grpcio's internal binding (`grpc._cython.cygrpc.channelz_get_servers`,
which the grpcio-channelz servicer also uses; that package is not installable here). Where the
binding is missing, or under GRPC_EXPERIMENTS=ph2_server (whose transport does not count calls
in channelz: started stays 0), these metrics are absent and the replica says so in its log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from serving.shedding import core_refusal_code

try:
    from grpc._cython.cygrpc import channelz_get_servers
except ImportError:  # a grpcio without the binding: no core counts
    channelz_get_servers = None


def _servers() -> dict[int, dict]:
    """Every gRPC server of this process: channelz server id -> its channelz `data`."""
    if channelz_get_servers is None:
        return {}
    found: dict[int, dict] = {}
    start = 0
    while True:
        page = json.loads(channelz_get_servers(start))
        for server in page.get("server", []):
            found[int(server["ref"]["serverId"])] = server.get("data", {})
        if page.get("end", True) or not found:
            return found
        start = max(found) + 1


def server_ids() -> set[int]:
    """Ids of this process's gRPC servers (a server has one from its creation to its stop)."""
    return set(_servers())


def counts_core_calls() -> str | None:
    """None when this process's core counts its servers' calls in channelz, else why not."""
    if channelz_get_servers is None:
        return "this grpcio has no channelz binding"
    if core_refusal_code().name == "RESOURCE_EXHAUSTED":
        return "the ph2_server transport does not count calls in channelz"
    return None


class CoreCallCounts(Collector):
    """embps_serving_core_calls_started_total and embps_serving_core_calls_ended_total{outcome} of
    one server (by channelz id), read at each scrape."""

    def __init__(self, server_id: int) -> None:
        self.server_id = server_id

    def collect(self) -> Iterator[CounterMetricFamily]:
        data = _servers().get(self.server_id)
        if data is None:  # stopped
            return
        started = CounterMetricFamily(
            "embps_serving_core_calls_started",
            "Calls gRPC's core accepted on the serving port, every method (channelz). Minus the ended ones: "
            "refused by the core beyond max_queue, or still open",
        )
        started.add_metric([], int(data.get("callsStarted", 0)))
        ended = CounterMetricFamily(
            "embps_serving_core_calls_ended",
            "Calls that reached the replica and ended (channelz): ok, or error for any other status",
            labels=["outcome"],
        )
        ended.add_metric(["ok"], int(data.get("callsSucceeded", 0)))
        ended.add_metric(["error"], int(data.get("callsFailed", 0)))
        yield started
        yield ended
