"""ServingClient's deadline and argument checks against in-process gRPC servers (its lookups,
dedupe, failover and TLS are tested against real replicas in test_serve_process.py,
test_replica_call_metrics.py and tests/security/test_tls_tokens.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.client import ReplicasUnavailableError, ServingClient
from tests.serving.replicas import ShedEverything


class _Silent(grpc.GenericRpcHandler):
    """Takes every call and answers none until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def service(self, handler_call_details):
        def wait(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.release.wait(30)
            return b""

        return grpc.unary_unary_rpc_method_handler(wait)


def test_every_call_has_a_deadline_failovers_included() -> None:
    silent = _Silent()
    server = grpc.server(ThreadPoolExecutor(4), handlers=[silent])
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        with ShedEverything() as shedding, ServingClient([shedding.address, address], timeout_s=0.3) as client:
            keys = np.arange(3, dtype=np.int64)
            for call in (lambda: client.lookup("user", keys), lambda: client.lookup_many({"user": keys})):
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - start < 5  # the 0.3 s deadline, not the server's 30 s
    finally:
        silent.release.set()
        server.stop(0)


def test_every_replica_refusing_names_each_answer() -> None:
    with ShedEverything() as a, ShedEverything() as b, ServingClient([a.address, b.address], timeout_s=5) as client:
        with pytest.raises(ReplicasUnavailableError) as info:
            client.lookup("user", np.arange(3, dtype=np.int64))
    assert [(address, code) for address, code, _ in info.value.answers] == [
        (a.address, grpc.StatusCode.RESOURCE_EXHAUSTED), (b.address, grpc.StatusCode.RESOURCE_EXHAUSTED)
    ]
    assert "serving queue full" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addresses": []}, "addresses: give a non-empty list"),
        ({"addresses": "127.0.0.1:1"}, "addresses: give a non-empty list"),
        ({"addresses": ["nohost"]}, "addresses: each must be 'host:port'"),
        ({"addresses": ["127.0.0.1:1"], "timeout_s": 0}, "timeout_s: must be > 0"),
        ({"addresses": ["127.0.0.1:1"], "dtype": np.int8}, "dtype: must be float32 or float16"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingClient(**kwargs)


def test_keys_must_be_int64_vectors() -> None:
    with ServingClient(["127.0.0.1:1"]) as client:
        with pytest.raises(TypeError, match="keys: expected dtype int64"):
            client.lookup("user", np.arange(3, dtype=np.int32))
        with pytest.raises(ValueError, match=r"requests\['item'\]: expected shape \(n,\)"):
            client.lookup_many({"item": np.zeros((2, 2), dtype=np.int64)})
        assert client.lookup_many({}) == {}
