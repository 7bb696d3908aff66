"""Table work on a shard is serialised whatever callers do: offloaded calls whose callers give up
(deadline, cancel) keep the tables thread busy, and no call may run beside them."""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import make_job

DIM = 16
BIG_KEYS = 60_000  # ~4.3 MB of work: offloaded to the tables thread


class OverlapProbe:
    """Wraps a table's methods; counts calls that start while another one runs."""

    def __init__(self, table, methods: tuple[str, ...]) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.calls = 0
        self.overlaps = 0
        for name in methods:
            setattr(table, name, self._wrap(getattr(table, name)))

    def _wrap(self, method):
        @functools.wraps(method)
        def probed(*args, **kwargs):
            with self.lock:
                self.running += 1
                self.calls += 1
                if self.running > 1:
                    self.overlaps += 1
            try:
                return method(*args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

        return probed


def test_cancelled_offloaded_calls_never_overlap_later_calls():
    table_config = TableConfig("user", dim=DIM, optimizer=OptimizerConfig(OptimizerKind.ADAGRAD))
    with InProcessShards.start(make_job([table_config])) as shards:
        table = shards.servicers[0].shard.tables["user"]
        probe = OverlapProbe(table, ("read", "apply_gradients"))
        options = [("grpc.max_send_message_length", 64 << 20)]
        channel = grpc.insecure_channel(shards.job.shards[0].address, options=options)
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        rng = np.random.default_rng(0)
        big_keys = rng.integers(0, 1 << 40, BIG_KEYS).astype("<i8")
        big = ps_pb2.PushRequest(
            table="user", keys=big_keys.tobytes(), grads=np.ones((BIG_KEYS, DIM), "<f4").tobytes(), dim=DIM
        )
        small = ps_pb2.LookupRequest(table="user", keys=big_keys[:64].tobytes(), dim=DIM)
        stub.Push(big, timeout=30)  # the rows exist: later pushes cost the same each time
        gave_up = 0

        def small_calls(stop: threading.Event) -> int:
            n = 0
            while not stop.is_set():
                stub.Lookup(small, timeout=30)
                n += 1
            return n

        stop = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            lookups = [pool.submit(small_calls, stop) for _ in range(2)]
            for i in range(30):
                future = stub.Push.future(big, timeout=30)
                # Give up while the push runs: by deadline on even rounds, by cancel on odd ones.
                if i % 2:
                    threading.Event().wait(0.005)
                    gave_up += future.cancel()
                else:
                    try:
                        stub.Push(big, timeout=0.005)
                    except grpc.RpcError as e:
                        gave_up += e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    future.cancel()
            stop.set()
            num_lookups = sum(f.result() for f in lookups)
        channel.close()
    assert gave_up >= 10, f"only {gave_up} calls were abandoned: the test did not exercise cancellation"
    assert num_lookups > 0 and probe.calls > num_lookups
    assert probe.overlaps == 0, f"{probe.overlaps} of {probe.calls} table calls ran beside another one"
