"""ServingClient's deadlines, reconnects and argument checks against in-process gRPC servers (its lookups,
dedupe, failover and TLS are tested against real replicas in test_serve_process.py,
test_replica_call_metrics.py and tests/security/test_tls_tokens.py)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from ps.rpc import ps_pb2, serving_pb2
from serving.client import ReplicasUnavailableError, ServingClient
from tests.helpers.slow_link import SlowLink
from tests.helpers.waiting import eventually
from tests.serving.replicas import ShedEverything


class _Silent(grpc.GenericRpcHandler):
    """Takes every call and answers none until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def service(self, handler_call_details):
        def wait(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
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
                # The silent replica last: its attempt ends at the deadline. First: it gets half the
                # time, then the other sheds, and the error names both answers.
                with pytest.raises((grpc.RpcError, ReplicasUnavailableError)) as info:
                    call()
                if isinstance(info.value, grpc.RpcError):
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else:
                    codes = {code for _, code, _ in info.value.answers}
                    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
                assert time.monotonic() - start < 5  # the 0.3 s deadline, not the server's 30 s
    finally:
        silent.release.set()
        server.stop(0)


def test_a_replica_that_is_down_is_tried_again_within_a_second() -> None:
    """Calls to a replica that is down fail at once; its channel tries to connect again within a
    second, so a replica back after a restart answers soon. With gRPC's default backoff (1 s, then
    1.6x a failure up to 2 minutes) a client got its first answer 7.2 s after a replica down for
    20 s was back; it tried 3 times in 4 s, where now it tries 5 times within about a second."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    tries: list[float] = []
    stop = threading.Event()

    def refuse() -> None:  # TCP accepts, then closes before gRPC speaks: a connection that fails
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            tries.append(time.monotonic())
            connection.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        with ServingClient([f"127.0.0.1:{listener.getsockname()[1]}"], timeout_s=0.5) as client:

            def tried_five_times() -> bool:  # a call each look, as a client that keeps asking
                with pytest.raises(ReplicasUnavailableError):
                    client.lookup("t", np.arange(3, dtype=np.int64))
                return len(tries) >= 5

            tried = eventually(tried_five_times, timeout=4.0)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert tried, f"{len(tries)} connection attempts in 4 s: {np.diff(tries).round(2).tolist()}"


def test_every_replica_refusing_names_each_answer() -> None:
    with ShedEverything() as a, ShedEverything() as b, ServingClient([a.address, b.address], timeout_s=5) as client:
        with pytest.raises(ReplicasUnavailableError) as info:
            client.lookup("user", np.arange(3, dtype=np.int64))
    assert [(address, code) for address, code, _ in info.value.answers] == [
        (a.address, grpc.StatusCode.RESOURCE_EXHAUSTED), (b.address, grpc.StatusCode.RESOURCE_EXHAUSTED)
    ]
    assert "serving queue full" in str(info.value)


def test_a_replica_refused_by_grpc_s_core_is_passed_over_for_the_next() -> None:
    """A replica without the gate sheds in gRPC's core, which answers CANCELLED (serving/shedding.py):
    the client raised it to its caller, where another replica could answer."""
    cancelling = ShedEverything(code=grpc.StatusCode.CANCELLED)
    with cancelling as a, ShedEverything() as b, ServingClient([a.address, b.address], timeout_s=5) as client:
        for _ in range(2):  # the first replica tried first, then the second
            with pytest.raises(ReplicasUnavailableError) as info:
                client.lookup("user", np.arange(3, dtype=np.int64))
            assert sorted(code.name for _, code, _ in info.value.answers) == ["CANCELLED", "RESOURCE_EXHAUSTED"]
    assert a.calls == 2 and b.calls == 2


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


DIMS = {"a": 3, "b": 8, "c": 1, "empty": 5}


def expected_row(key: int, dim: int) -> np.ndarray:
    return (key % 1000) * 0.25 + np.arange(dim, dtype=np.float32)


class _Rows(grpc.GenericRpcHandler):
    """Answers LookupMany as a replica would, each key's row expected_row(key) and its found flag
    key % 3 != 0, in the asked dtype; `mixed` answers the first table in float32 whatever was
    asked, `short` leaves the last row out of the last table's answer."""

    def __init__(self, mixed: bool = False, short: bool = False) -> None:
        self.mixed, self.short = mixed, short
        self.keys_asked: list[int] = []

    def service(self, handler_call_details):
        def lookup_many(request: bytes, context: grpc.ServicerContext) -> bytes:
            asked = serving_pb2.ServingLookupManyRequest.FromString(request)
            results = []
            for i, lookup in enumerate(asked.lookups):
                keys = np.frombuffer(lookup.keys, dtype="<i8")
                self.keys_asked.append(keys.shape[0])
                dtype = ps_pb2.FLOAT32 if self.mixed and i == 0 else lookup.dtype
                dim = DIMS[lookup.table]
                rows = np.array([expected_row(int(k), dim) for k in keys], dtype=np.float32).reshape(-1, dim)
                if self.short and i == len(asked.lookups) - 1:
                    rows = rows[:-1]
                values = rows.astype("<f2" if dtype == ps_pb2.FLOAT16 else "<f4").tobytes()
                found = (keys % 3 != 0).astype(np.uint8).tobytes()
                results.append(serving_pb2.ServingLookupResponse(values=values, found=found, dim=dim, dtype=dtype))
            return serving_pb2.ServingLookupManyResponse(results=results, model_version=7).SerializeToString()

        return grpc.unary_unary_rpc_method_handler(lookup_many)


@pytest.fixture
def rows_server():
    servers = []

    def start(**kwargs) -> tuple[str, _Rows]:
        handler = _Rows(**kwargs)
        server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
        return address, handler

    yield start
    for server in servers:
        server.stop(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mixed", [False, True], ids=["one dtype", "mixed dtypes"])
def test_lookup_many_spreads_every_tables_rows_back_to_its_keys(rows_server, dtype, mixed) -> None:
    address, handler = rows_server(mixed=mixed)
    rng = np.random.default_rng(3)
    requests = {
        "a": rng.integers(0, 40, 200, dtype=np.int64),  # many repeats
        "b": np.array([2**63 - 1, -(2**63), 5, 5, -1], dtype=np.int64),
        "empty": np.empty(0, dtype=np.int64),
        "c": np.arange(7, dtype=np.int64)[::-1],
    }
    with ServingClient([address], dtype=dtype) as client:
        rows, version = client.lookup_many_at_version(requests)
    assert version == 7 and list(rows) == list(requests)
    assert handler.keys_asked == [len(np.unique(k)) for k in requests.values()]  # each distinct key sent once
    for i, (table, keys) in enumerate(requests.items()):
        values, found = rows[table]
        answered = np.float32 if mixed and i == 0 else dtype
        want = np.array([expected_row(int(k), DIMS[table]) for k in keys], dtype=np.float32).reshape(-1, DIMS[table])
        assert values.dtype == answered and values.shape == (keys.shape[0], DIMS[table])
        np.testing.assert_array_equal(values, want.astype(answered))
        assert found.dtype == np.bool_ and found.tolist() == (keys % 3 != 0).tolist()


def test_a_replica_that_does_not_answer_is_passed_over_and_then_tried_last(rows_server) -> None:
    """A replica that takes calls and answers none (SIGSTOPped, hung) took every call's whole
    deadline in its turn, half the calls of a two-replica client (a review's repro: 10 of 20
    lookups DEADLINE_EXCEEDED). Now the call that meets it first fails, and it is tried after the
    others from then on (SLOW_REPLICA_SECONDS)."""
    silent = _Silent()
    server = grpc.server(ThreadPoolExecutor(4), handlers=[silent])
    silent_address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    address, handler = rows_server()
    keys = np.arange(1, 6, dtype=np.int64)
    try:
        with ServingClient([silent_address, address], timeout_s=2.0) as client:
            with pytest.raises(grpc.RpcError) as info:  # the turn starts at the silent replica
                client.lookup_many({"a": keys})
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(10):  # in turn, every other call would start at the silent replica
                values, _ = client.lookup_many({"a": keys})["a"]
                np.testing.assert_array_equal(values[0], expected_row(1, DIMS["a"]))
        assert silent.calls == 1  # tried once, then after the other, which answered every call
        assert len(handler.keys_asked) == 10
    finally:
        silent.release.set()
        server.stop(0)



class _Slow(_Rows):
    """_Rows, each answer after `seconds`."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def service(self, handler_call_details):
        answer = super().service(handler_call_details)

        def slowly(request: bytes, context: grpc.ServicerContext) -> bytes:
            threading.Event().wait(self.seconds)  # the replica's work, not a wait for anything
            return answer.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(slowly)


def test_replicas_slower_than_half_the_deadline_still_answer_every_call() -> None:
    """Each attempt once got half the time left while another replica was left: two replicas that
    each answer in 0.6 s of a 1 s deadline failed every call, where one replica alone answered
    every call (a review). Each attempt has the whole time left again (here: 1.2 s answers, a 2 s
    deadline)."""
    servers = []
    try:
        addresses = []
        for _ in range(2):
            server = grpc.server(ThreadPoolExecutor(4), handlers=[_Slow(1.2)])
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            server.start()
            servers.append(server)
        keys = np.arange(1, 4, dtype=np.int64)
        with ServingClient(addresses, timeout_s=2.0) as client:
            for _ in range(3):
                values, _ = client.lookup_many({"a": keys})["a"]
                np.testing.assert_array_equal(values[0], expected_row(1, DIMS["a"]))
    finally:
        for server in servers:
            server.stop(0)


class _RefusesLate(grpc.GenericRpcHandler):
    """Answers every call `code` (RESOURCE_EXHAUSTED: a shedding replica) after `seconds`, as a replica
    behind a slow link."""

    def __init__(self, seconds: float, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        self.seconds = seconds
        self.code = code
        self.calls = 0

    def service(self, handler_call_details):
        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            self.calls += 1
            threading.Event().wait(self.seconds)  # the link's delay, not a wait for anything
            context.abort(self.code, "refused late (a stand-in)")

        return grpc.unary_unary_rpc_method_handler(refuse)


def _late_refuser_first_then_the_healthy_one(late, healthy, calls_after: int) -> tuple[grpc.StatusCode, int, int]:
    """Two scripted replicas, `late` first in the client's turn, a 2 s timeout: one call, then
    `calls_after` more. Returns (the first call's code, the later calls answered with the right
    row, the calls the late refuser got)."""
    servers = []
    try:
        addresses = []
        for handler in (late, healthy):
            server = grpc.server(ThreadPoolExecutor(4), handlers=[handler])
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            server.start()
            servers.append(server)
        keys = np.arange(1, 4, dtype=np.int64)
        answered = 0
        with ServingClient(addresses, timeout_s=2.0) as client:
            with pytest.raises(grpc.RpcError) as info:  # the turn starts at the late refuser
                client.lookup_many({"a": keys})
            for _ in range(calls_after):
                values, _ = client.lookup_many({"a": keys})["a"]
                answered += bool(np.array_equal(values[0], expected_row(1, DIMS["a"])))
        return info.value.code(), answered, late.calls
    finally:
        for server in servers:
            server.stop(0)


def test_a_replica_left_a_sliver_of_the_deadline_is_not_tried_last() -> None:
    """A healthy replica tried after one that refused late got what the call's deadline had left,
    missed it and was tried last for SLOW_REPLICA_SECONDS: every call then began at the late
    refuser, left the healthy replica a sliver again (marking it anew) and failed, where the calls
    that began at it would have been answered. Only an attempt with a fair share of the timeout
    marks its replica."""
    late, healthy = _RefusesLate(1.4), _Slow(0.8)  # of a 2 s deadline: 0.6 s left for the healthy one
    outcome = _late_refuser_first_then_the_healthy_one(late, healthy, calls_after=1)
    assert outcome == (grpc.StatusCode.DEADLINE_EXCEEDED, 1, 1), outcome  # in turn, the healthy replica first


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_replica_that_refuses_late_is_tried_last(code: grpc.StatusCode) -> None:
    """A replica that refuses after most of the deadline (shedding behind a slow link) was never tried
    last: only a DEADLINE_EXCEEDED marked a replica slow, so every call that began at it left the healthy
    replica the sliver after its refusal and failed (every other call of a two-replica client). An attempt
    that refused or failed after half of timeout_s marks its replica, judged by the attempt's own time:
    the healthy replica, left 0.6 s and missing it, is not marked."""
    late, healthy = _RefusesLate(1.4, code), _Slow(0.8)  # of a 2 s deadline: 0.6 s left for the healthy one
    outcome = _late_refuser_first_then_the_healthy_one(late, healthy, calls_after=3)  # the 2nd would start at it
    assert outcome == (grpc.StatusCode.DEADLINE_EXCEEDED, 3, 1), outcome


def test_a_reply_short_of_rows_is_an_error_naming_the_sizes(rows_server) -> None:
    address, _ = rows_server(short=True)
    with ServingClient([address]) as client, pytest.raises(RuntimeError, match="Lookup reply: 224 value bytes"):
        client.lookup_many({"a": np.arange(4, dtype=np.int64), "b": np.arange(8, dtype=np.int64)})


class _Limited(grpc.GenericRpcHandler):
    """A replica whose replies hold at most `max_keys` keys: a call for more is refused as a
    replica refuses a reply over the message limit. Each call answers at the next of `versions`
    (the last one repeats)."""

    def __init__(self, max_keys: int, versions: list[int]) -> None:
        self.max_keys, self.versions, self.calls = max_keys, list(versions), 0

    def service(self, handler_call_details):
        many = handler_call_details.method.endswith("/LookupMany")

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            lookups = (serving_pb2.ServingLookupManyRequest.FromString(request).lookups if many
                       else [serving_pb2.ServingLookupRequest.FromString(request)])
            version = self.versions[min(self.calls, len(self.versions) - 1)]
            self.calls += 1
            if sum(len(lookup.keys) // 8 for lookup in lookups) > self.max_keys:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "keys: the reply would be about 99 bytes, over message_limit_bytes 64; split the request")
            results = []
            for lookup in lookups:
                keys = np.frombuffer(lookup.keys, dtype="<i8")
                dim = DIMS[lookup.table]
                rows = np.array([expected_row(int(k), dim) for k in keys], dtype=np.float32).reshape(-1, dim)
                found = (keys % 3 != 0).astype(np.uint8).tobytes()
                results.append(serving_pb2.ServingLookupResponse(
                    values=rows.tobytes(), found=found, dim=dim, dtype=ps_pb2.FLOAT32, model_version=version))
            if not many:
                return results[0].SerializeToString()
            return serving_pb2.ServingLookupManyResponse(results=results, model_version=version).SerializeToString()

        return grpc.unary_unary_rpc_method_handler(answer)


def _limited_server(handler: _Limited):
    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, address


def test_a_lookup_whose_reply_is_over_the_limit_is_split_and_answered_whole() -> None:
    """A replica refuses a reply over message_limit_bytes with RESOURCE_EXHAUSTED; the client took
    that for load shedding, asked every replica the same, and raised ReplicasUnavailableError for a
    request that no replica could ever answer. It splits the call now, into parts at one version."""
    handler = _Limited(max_keys=5, versions=[7])
    server, address = _limited_server(handler)
    try:
        with ServingClient([address, address]) as client:
            keys = np.array([9, 4, 4, 11, 2, 8, 1, 30, 31, 32, 33, 34, 4, 9], dtype=np.int64)
            values, found = client.lookup("a", keys)
            np.testing.assert_array_equal(values, np.stack([expected_row(int(k), 3) for k in keys]))
            np.testing.assert_array_equal(found, keys % 3 != 0)
            requests = {"a": np.arange(9, dtype=np.int64), "b": np.arange(4, dtype=np.int64), "c": np.array([5])}
            rows, version = client.lookup_many_at_version(requests)
            assert version == 7
            for table, asked in requests.items():
                want = np.stack([expected_row(int(k), DIMS[table]) for k in asked])
                np.testing.assert_array_equal(rows[table][0], want)
            handler.max_keys = 0  # not even one key's row fits
            with pytest.raises(ValueError, match="one key's reply is over message_limit_bytes"):
                client.lookup("a", np.array([1], dtype=np.int64))
    finally:
        server.stop(None)


def test_a_lookup_whose_request_is_over_the_limit_is_split_and_answered_whole() -> None:
    """A request takes 8 bytes a key, more than its reply's row at dim 1 (or dim 3 in float16): past
    the limit gRPC refused to send it (RESOURCE_EXHAUSTED "Sent message larger than max"), the
    client took that for load shedding and raised ReplicasUnavailableError, naming every replica,
    for a lookup none of them had seen (a review's repro: 45,000 keys of a dim-1 table at a 256 KiB
    limit). A request over message_limit_bytes is split now, and so is one a replica of a smaller
    limit refuses ("Received message larger than max")."""
    handler = _Limited(max_keys=1 << 30, versions=[7])
    server, address = _limited_server(handler)
    try:
        with ServingClient([address, address], message_limit_bytes=4096, timeout_s=30) as client:
            keys = np.arange(9_000, dtype=np.int64)  # 72 KB: past the limit and gRPC's 64 KiB above it
            values, found = client.lookup("c", keys)
            np.testing.assert_array_equal(values[:, 0], np.array([expected_row(int(k), 1)[0] for k in keys]))
            np.testing.assert_array_equal(found, keys % 3 != 0)
            rows = client.lookup_many({"c": keys, "a": keys[:3]})
            np.testing.assert_array_equal(rows["c"][0][:, 0], values[:, 0])
            assert handler.calls > 3
    finally:
        server.stop(None)
    small = grpc.server(ThreadPoolExecutor(2), handlers=[_Limited(max_keys=1 << 30, versions=[7])],
                        options=[("grpc.max_receive_message_length", 1000)])
    address = f"127.0.0.1:{small.add_insecure_port('127.0.0.1:0')}"
    small.start()
    try:
        with ServingClient([address], timeout_s=30) as client:
            values, found = client.lookup("c", np.arange(600, dtype=np.int64))
            assert values.shape == (600, 1) and found.shape == (600,)
    finally:
        small.stop(None)


def test_parts_of_a_split_lookup_answered_at_two_model_versions_are_asked_again() -> None:
    handler = _Limited(max_keys=4, versions=[7, 7, 8, 8, 8])  # whole refused, part at 7, part at 8, then 8s
    server, address = _limited_server(handler)
    try:
        with ServingClient([address]) as client:
            rows, version = client.lookup_many_at_version({"a": np.arange(6, dtype=np.int64)})
            assert version == 8
            np.testing.assert_array_equal(rows["a"][0], np.stack([expected_row(k, 3) for k in range(6)]))
    finally:
        server.stop(None)


def test_a_split_lookup_over_replicas_at_different_cuts_is_answered_by_one_of_them() -> None:
    """Two replicas steadily at different cuts (one behind, as a replica cut off from a shard keeps
    its last cut): the parts of a split lookup went to the replicas in turn, came back at two
    versions on every try, and the lookup failed each time, though either replica alone answered
    it. Every part goes to the replica that answered the one before now."""
    behind, ahead = _Limited(max_keys=4, versions=[7]), _Limited(max_keys=4, versions=[8])
    servers = [_limited_server(behind), _limited_server(ahead)]
    try:
        with ServingClient([address for _, address in servers]) as client:
            for _ in range(4):
                rows, version = client.lookup_many_at_version({"a": np.arange(6, dtype=np.int64)})
                assert version in (7, 8)
                np.testing.assert_array_equal(rows["a"][0], np.stack([expected_row(k, 3) for k in range(6)]))
                values, _ = client.lookup("a", np.arange(6, dtype=np.int64))
                np.testing.assert_array_equal(values, np.stack([expected_row(k, 3) for k in range(6)]))
        assert behind.calls > 0 and ahead.calls > 0, "the lookups' first parts go to the replicas in turn"
    finally:
        for server, _ in servers:
            server.stop(None)


def test_a_replica_a_slow_link_away_is_answered_on_the_first_call(rows_server) -> None:
    """A replica whose answers cross a link 0.4 s long (another region; TLS would take more round
    trips): gRPC's connection attempts were cut at grpc.min_reconnect_backoff_ms, 100 ms, before the
    replica's HTTP/2 settings arrived ("timed out before receiving SETTINGS frame"), and each next
    attempt only after a backoff: the first calls missed their deadline, and a link past the backoff's
    1 s cap was never connected. Attempts now have seconds; a refused one is still tried again at once."""
    address, _ = rows_server()
    with SlowLink(address, delay=0.4) as link, ServingClient([link.address], timeout_s=3.0) as client:
        started = time.monotonic()
        values, found = client.lookup_many({"a": np.arange(1, 4, dtype=np.int64)})["a"]
        assert time.monotonic() - started < 2.0  # one connection (settings + reply: two crossings), not several
    np.testing.assert_array_equal(values[0], expected_row(1, DIMS["a"]))
