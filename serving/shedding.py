"""Load shedding for a serving replica without the serving gate: at most `max_queue` Lookups
admitted and not yet answered; one more is answered RESOURCE_EXHAUSTED at once, before its bytes
are parsed or any work is done.

By default a replica runs behind the serving gate (serving/gate.py), which holds the bound in
C++ and refuses with RESOURCE_EXHAUSTED whatever the load; this module is what a replica does
without it (a build without grpc++, or EMBPS_SERVING_GATE=0), and why that is weaker.

Why a queue bound: a replica offered more than it can answer otherwise holds every call, and the
latency of all of them grows with the backlog until deadlines expire (then the work done was
wasted). With the bound, an answered call waits behind at most max_queue - 1 others, and a shed
call costs the caller one round trip, so it can back off or try another replica.

Why our own counter and not grpc.aio's `maximum_concurrent_rpcs`: that limiter (grpcio 1.85)
does answer RESOURCE_EXHAUSTED, but it counts every RPC of the server: with it full of Lookups,
a Health check is refused too (checked: limit 2, two slow calls in flight, Health.Check gets
RESOURCE_EXHAUSTED in 0 ms), so k8s probes would kill a replica for being busy, and Status
stops answering when operators need it most. It also refuses below Python, so nothing counts
the refused calls or shows how full the queue is. Here only Lookup is counted, the count is
exact (the event loop is the only thread that touches it) and it is exported as a gauge
(`embps_serving_lookup_queue`), with a counter of shed calls (`embps_serving_shed_lookups_total`).

Where the queue is, and the second bound: grpc.aio takes one call from grpc's core per turn of
the event loop and runs it as a task. A Lookup answered inline never yields the loop, so the loop
takes calls no faster than it answers them, and under overload the backlog of small lookups
stays in the core's queue of calls not yet taken (measured: 3x overload with 64-key lookups, the
gauge above never over 2, latency growing to the deadline). A refusal made in Python would not
help there anyway: for a small lookup it costs nearly as much as the answer. So the core's queue
gets the same bound (`core_backlog_options`: grpc.server.max_pending_requests and its hard limit
= max_queue): a call arriving when max_queue Lookups already wait in the core is refused there, in
C++, for a few microseconds. With gRPC's default HTTP/2 server transport (grpcio 1.85) the core
answers those with CANCELLED, not RESOURCE_EXHAUSTED, without telling the server
(serving/core_calls.py counts them from channelz). Clients of a replica treat CANCELLED as they
treat RESOURCE_EXHAUSTED: back off, or try another replica. The core's queue is per registered
method, so Health and Status calls are never refused for a Lookup backlog.

The same core bound answers RESOURCE_EXHAUSTED ("Too many pending requests for this server") when
the replica runs gRPC's promise-based HTTP/2 server transport: GRPC_EXPERIMENTS=ph2_server in its
environment (read once, when grpc starts in the process). Tested both ways (tests/serving/
test_shedding.py, tests/bench/test_overload_bench.py), but not the default: upstream calls that
transport work in progress, and here it cost 20% more server CPU per call (0.25 against 0.21 ms,
a bare aio server answering at once). No refusal made in Python can stand in for it: one costs
~0.2 ms of server CPU (the same bare server), nearly half an answered 64-key Lookup (~0.47 ms),
so at 3x capacity refusing alone would need more than the replica's core.
So an answered Lookup waits behind at most max_queue calls in the core plus max_queue in Python.
A Lookup is admitted when its task first runs this interceptor
(before its message is received or parsed) and released when that task ends (reply sent,
aborted or cancelled: a done callback fires exactly once), so `depth` is exactly the number of
Lookup tasks in the replica. This interceptor must be the first (outermost) of the server's
list: a shed call then costs no other interceptor's work.
"""

from __future__ import annotations

import asyncio
import os

import grpc

from serving.metrics import ServingMetrics

LOOKUP_METHOD = "/embps.v1.Serving/Lookup"
LOOKUP_MANY_METHOD = "/embps.v1.Serving/LookupMany"
LOOKUP_METHODS = (LOOKUP_METHOD, LOOKUP_MANY_METHOD)  # bounded together by max_queue


def core_refusal_code() -> grpc.StatusCode:
    """What gRPC's core answers a call beyond its queue bound with in this process: RESOURCE_EXHAUSTED
    under the ph2_server transport (GRPC_EXPERIMENTS, as the process started), CANCELLED otherwise."""
    experiments = {name.strip() for name in os.environ.get("GRPC_EXPERIMENTS", "").split(",")}
    if experiments & {"ph2_server", "ph2_client_server"}:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.CANCELLED


def core_backlog_options(max_queue: int) -> list[tuple[str, int]]:
    """gRPC server options that bound each method's queue of calls the core holds and the server
    has not taken yet to max_queue (0: no bound). Calls beyond it are refused by the core
    (`core_refusal_code()`)."""
    if max_queue == 0:
        return []
    return [("grpc.server.max_pending_requests", max_queue), ("grpc.server.max_pending_requests_hard_limit", max_queue)]


class LookupQueue(grpc.aio.ServerInterceptor):
    """Counts Lookups admitted and not yet answered; sheds those beyond max_queue (0: no bound)."""

    def __init__(self, max_queue: int, metrics: ServingMetrics) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0 (0: no bound), got {max_queue}")
        self.max_queue = max_queue
        self.depth = 0
        self.metrics = metrics
        metrics.lookup_queue_limit.set(max_queue)
        metrics.lookup_queue.set(0)
        message = f"serving queue full: {max_queue} lookups waiting; retry with backoff or add replicas"

        def refusal(method: str) -> grpc.RpcMethodHandler:
            """The handler that sheds a call of `method`, counted under its own name (as the
            native gate counts it; LookupMany's were counted as Lookup's)."""
            name = method.rsplit("/", 1)[-1]

            async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
                metrics.shed.inc()
                metrics.requests.labels("", name, grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

            return grpc.unary_unary_rpc_method_handler(refuse)  # no deserializer: bytes stay unparsed

        self._refusals = {method: refusal(method) for method in LOOKUP_METHODS}

    def _release(self, _task: asyncio.Task) -> None:
        self.depth -= 1
        self.metrics.lookup_queue.set(self.depth)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in LOOKUP_METHODS:
            return await continuation(handler_call_details)
        if self.max_queue and self.depth >= self.max_queue:
            return self._refusals[handler_call_details.method]
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("LookupQueue: grpc.aio runs every call in a task; this one has none")
        self.depth += 1
        self.metrics.lookup_queue.set(self.depth)
        task.add_done_callback(self._release)
        return await continuation(handler_call_details)
