"""PSClient against real shard processes: round trips equal an in-process table, splitting at the
message limit, retries, push-id dedupe, error translation and deadlines."""

import os
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps.client import (
    InvalidArgumentError,
    PSClient,
    RPCError,
    ShardUnavailableError,
    TableFullError,
    TableNotFoundError,
    _LookupPlan,
    _translate,
)
from ps.errors import CapacityError, UnknownTableError
from ps.job_config import Deadlines, dump_job_config
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.table.config import (
    AdmissionConfig,
    AdmissionKind,
    OptimizerConfig,
    OptimizerKind,
    TableConfig,
)
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.in_process import InProcessShards
from tests.helpers.processes import ShardCluster, make_job, start_shard, stop_pid, wait_serving
from tests.helpers.waiting import wait_until

USER = TableConfig("user", dim=8, seed=3, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.3))
ITEM = TableConfig(
    "item",
    dim=5,
    seed=11,
    optimizer=OptimizerConfig(kind=OptimizerKind.ADAM, lr=0.05),
    admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2),
)
TINY = TableConfig("tiny", dim=2, capacity=4)


@pytest.fixture(scope="module")
def cluster():
    with InProcessShards.start(make_job([USER, ITEM, TINY], num_shards=2)) as shards:
        yield shards


@pytest.fixture(scope="module")
def client(cluster):
    with PSClient.from_job(cluster.job) as c:
        yield c


REFERENCE = {t.name: EmbeddingTable(t) for t in (USER, ITEM)}


def zipf_keys(rng, n: int) -> np.ndarray:
    """Skewed, repeating keys spread over the whole int64 range (so over both shards)."""
    ranks = rng.zipf(1.3, n).astype(np.uint64)
    return (ranks * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["user", "item"]),
    st.integers(0, 300),
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), st.integers(1, 1000)),
)
def test_lookup_after_push_equals_the_table_updated_in_process(client, table, n, seed, step):
    """2 shards over gRPC == one EmbeddingTable in this process, for the same pushes."""
    rng = np.random.default_rng(seed)
    keys = zipf_keys(rng, n)
    grads = rng.standard_normal((n, REFERENCE[table].dim)).astype(np.float32)
    result = client.push(table, keys, grads, step=step)
    expected = REFERENCE[table].apply_gradients(keys, grads, step=step)
    assert result.num_updated == expected.num_updated
    assert result.num_inserted == expected.num_inserted
    probe = np.concatenate([keys, zipf_keys(rng, 50)])
    np.testing.assert_allclose(client.lookup(table, probe), REFERENCE[table].lookup(probe).numpy(), rtol=0, atol=1e-6)


def test_push_k_times_then_lookup_sees_k_updates(client):
    keys = np.array([101, 202, 101, 303], dtype=np.int64)
    table = EmbeddingTable(USER)
    grads = np.full((4, 8), 0.25, dtype=np.float32)
    before = client.lookup("user", keys)
    np.testing.assert_array_equal(before, REFERENCE["user"].lookup(keys).numpy())
    for _ in range(3):
        client.push("user", keys, grads, step=5)
        REFERENCE["user"].apply_gradients(keys, grads, step=5)
    after = client.lookup("user", keys)
    np.testing.assert_allclose(after, REFERENCE["user"].lookup(keys).numpy(), rtol=0, atol=1e-6)
    assert np.all(after < table.init_values(keys)), "positive gradients lower every value"
    np.testing.assert_array_equal(after[0], after[2])


def test_empty_batches(client):
    assert client.lookup("user", np.empty(0, dtype=np.int64)).shape == (0, 8)
    assert client.push("user", np.empty(0, dtype=np.int64), np.empty((0, 8), dtype=np.float32)).num_updated == 0


def test_two_clients_given_one_name_each_apply_their_own_pushes(cluster, client):
    """Sequences start at 1 in every client, and a shard knows a repeated push by (client_id,
    sequence): a second client of the same name (a process restarted with it) had its pushes
    answered as the first's repeats, reported applied, and never applied. Each client now makes
    the name its own; a push is sent again with its ids through send_push (the next test)."""
    keys = np.arange(5000, 5100, dtype=np.int64)
    grads = np.ones((100, 8), dtype=np.float32)
    with PSClient.from_job(cluster.job, client_id="restarted") as first:
        applied = first.push("user", keys, grads, step=9)
    after_first = client.lookup("user", keys)
    with PSClient.from_job(cluster.job, client_id="restarted") as second:
        assert second.client_id.startswith("restarted-") and second.client_id != first.client_id
        again = second.push("user", keys, grads, step=9)
    assert applied.num_duplicates == 0 and again.num_duplicates == 0
    assert not np.array_equal(client.lookup("user", keys), after_first)
    for _ in range(2):
        REFERENCE["user"].apply_gradients(keys, grads, step=9)


@pytest.mark.parametrize("name", ["", "c" * 244])
def test_a_client_id_that_would_turn_repeats_off_or_be_refused_is_refused_at_once(cluster, name):
    """An empty id turned the shards' repeat check off (a re-sent push applied twice); one past the
    limit was accepted, and then every push refused."""
    with pytest.raises(ValueError, match="client_id: 1 to 243 bytes"):
        PSClient.from_job(cluster.job, client_id=name)


def test_a_prepared_push_sent_again_applies_once(cluster, client):
    """How the trainer retries a push past an outage: the same PreparedPush, the same push ids."""
    keys = np.arange(6000, 6064, dtype=np.int64)
    user_grads = np.full((64, 8), 0.5, dtype=np.float32)
    item_grads = np.full((64, 5), 0.25, dtype=np.float32)
    items = [("user", keys, user_grads, None), ("item", keys, item_grads, np.full(64, 2, dtype=np.int64))]
    prepared = client.prepare_push(items, step=11)
    first = client.send_push(prepared)
    after = client.lookup_many({"user": keys, "item": keys})
    again = client.send_push(prepared)
    assert first.num_duplicates == 0 and again.num_duplicates == len(prepared.calls) == 4
    assert again.versions == first.versions
    for table, values in client.lookup_many({"user": keys, "item": keys}).items():
        np.testing.assert_array_equal(values, after[table])
    REFERENCE["user"].apply_gradients(keys, user_grads, step=11)
    REFERENCE["item"].apply_gradients(keys, item_grads, step=11, counts=np.full(64, 2, dtype=np.int64))
    np.testing.assert_allclose(after["user"], REFERENCE["user"].lookup(keys).numpy(), rtol=1e-6, atol=1e-6)


def test_errors_become_embps_exceptions(cluster, client):
    with pytest.raises(TableNotFoundError, match="table .nope. is not on shard") as info:
        client.lookup("nope", np.arange(3, dtype=np.int64))
    assert isinstance(info.value, UnknownTableError)
    with PSClient.from_job(cluster.job, dims={"nope": 4}) as other:
        with pytest.raises(TableNotFoundError, match="table 'nope' is not declared"):
            other.lookup("nope", np.arange(3, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="INVALID_ARGUMENT.*dim") as info:
        with PSClient.from_job(cluster.job, dims={"user": 4}) as other:
            other.push("user", np.array([1, 2, 3], dtype=np.int64), np.ones((3, 4), dtype=np.float32))
    assert isinstance(info.value, ValueError) and info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TableFullError, match="RESOURCE_EXHAUSTED") as info:
        client.push("tiny", np.arange(40, dtype=np.int64), np.ones((40, 2), dtype=np.float32))
    assert isinstance(info.value, CapacityError)
    with pytest.raises(ValueError, match=r"grads: expected shape \(3, 8\)"):
        client.push("user", np.array([1, 2, 3], dtype=np.int64), np.ones((3, 7), dtype=np.float32))
    # A count of 0 was sent as "one sighting each" when no key's count was above 1 (and refused by
    # the shard when one was): refused here, before any RPC, in both kinds of push.
    keys, grads = np.array([5, 6], dtype=np.int64), np.ones((2, 8), dtype=np.float32)
    for counts in ([0, 1], [0, 5], [-1, 1], [1, 2**32]):
        with pytest.raises(ValueError, match=r"^counts: every entry must be in \[1, 4294967295\]"):
            client.push("user", keys, grads, counts=np.array(counts, dtype=np.int64))
        with pytest.raises(ValueError, match=r"^counts: every entry must be in \[1, 4294967295\]"):
            client.prepare_push_multi(["user"], keys, np.array([0, 2]), grads, counts=np.array(counts, dtype=np.int64))
    assert client.lookup("user", np.array([7], dtype=np.int64)).shape == (1, 8), "still serving"



def test_a_push_with_a_bad_gradient_is_refused_before_any_shard_applies_any_of_it(cluster, client):
    """Each shard refused its own part of such a push, and the other shard applied its part: one
    NaN in a 2-shard push left half its rows trained, and the error named a row of the shard's part,
    not the caller's. Refused here now, before any RPC, naming the key and the caller's row; the
    bound is on what a push sends, a key's summed gradients (the shards check the same)."""
    keys = np.arange(100, 140, dtype=np.int64)
    on_shard = cluster.job.shard_map.shard_of(keys)
    assert set(on_shard.tolist()) == {0, 1}
    before = client.lookup("user", keys)
    grads = np.ones((40, 8), dtype=np.float32)
    grads[37, 2] = np.nan
    with pytest.raises(ValueError, match=r"^grads: non-finite value for key 137 \(row 37\).*refused, on every shard"):
        client.push("user", keys, grads)
    offsets = np.array([0, 20, 40], dtype=np.int64)
    multi_keys = np.concatenate([keys[:20], keys[20:]])
    flat = np.ones(20 * 8 + 20 * 5, dtype=np.float32)
    flat[20 * 8 + 3 * 5 + 1] = np.inf  # the 4th key of "item"
    for distinct in (False, True):
        with pytest.raises(ValueError, match=r"^grads: non-finite value for key 123 of table 'item'"):
            client.prepare_push_multi(["user", "item"], multi_keys, offsets, flat, distinct=distinct)
    twice = np.array([150, 150], dtype=np.int64)  # each within the bound, their sum beyond it
    with pytest.raises(ValueError, match=r"^grads: value 1.2e\+10 beyond \+-1e\+10 for key 150 \(row 0\)"):
        client.push("user", twice, np.full((2, 8), 6e9, dtype=np.float32))
    np.testing.assert_array_equal(client.lookup("user", keys), before)  # nothing applied on either shard


def test_stats_of_every_shard(cluster, client):
    stats = client.stats()
    assert [s.shard for s in stats] == [0, 1]
    rows = {t.name: 0 for t in stats[0].tables}
    for s in stats:
        for t in s.tables:
            rows[t.name] += t.rows
    assert rows["user"] == REFERENCE["user"].size


def test_batches_above_the_message_limit_are_split(start_shards):
    table = TableConfig("wide", dim=64, seed=5)
    limit = 64 << 10
    cluster = start_shards(make_job([table], num_shards=2, message_limit_bytes=limit))
    keys = np.random.default_rng(1).integers(-(2**62), 2**62, 4096, dtype=np.int64)
    grads = np.random.default_rng(2).standard_normal((4096, 64)).astype(np.float32)
    with PSClient.from_job(cluster.job) as client:
        client.push("wide", keys, grads, step=1)
        got = client.lookup("wide", keys)
        versions = [s.tables[0].version for s in client.stats()]
    reference = EmbeddingTable(table)
    reference.apply_gradients(keys, grads, step=1)
    np.testing.assert_allclose(got, reference.lookup(keys).numpy(), rtol=0, atol=1e-6)
    per_rpc = (limit - 4096) // (8 + 64 * 4)
    owned = np.bincount(cluster.job.shard_map.shard_of(keys), minlength=2)
    assert versions == [-(-int(n) // per_rpc) for n in owned], "one push RPC per chunk"
    assert sum(versions) > 2
    with grpc.insecure_channel(cluster.job.shards[0].address) as channel:
        oversized = ps_pb2.LookupRequest(table="wide", keys=np.zeros(20_000, dtype=np.int64).tobytes(), dim=64)
        with pytest.raises(grpc.RpcError) as info:
            ps_pb2_grpc.ParameterServerStub(channel).Lookup(oversized, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_push_of_more_calls_to_a_shard_than_its_dedupe_window_is_refused_before_it_is_sent(start_shards):
    """A shard remembers push_dedupe_window push ids of a client: a prepared push of more calls to
    one shard, sent again, had the ids of its first calls forgotten by then and applied them twice
    (a review's repro: window 4, message limit 9,000 bytes, 10 calls; most rows updated twice)."""
    import dataclasses

    table = TableConfig("a", dim=4, seed=1, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=1.0))
    job = dataclasses.replace(make_job([table], num_shards=1, message_limit_bytes=9000), push_dedupe_window=4)
    cluster = start_shards(job)
    keys = np.arange(2000, dtype=np.int64)
    with PSClient.from_job(cluster.job) as client:
        prepared = client.prepare_push([("a", keys, np.ones((2000, 4), np.float32), None)])
        assert len(prepared.calls) > 4
        with pytest.raises(ValueError, match=r"push_dedupe_window: 4 push ids, and this push sends \d+ calls"):
            client.send_push(prepared)
        assert client.stats()[0].tables[0].version == 0, "nothing was sent"
        few = client.prepare_push([("a", keys[:300], np.ones((300, 4), np.float32), None)])
        assert 1 < len(few.calls) <= 4
        assert client.send_push(few).num_duplicates == 0
        assert client.send_push(few).num_duplicates == len(few.calls)  # sent again: every call a repeat


@pytest.mark.processes
def test_lookup_retries_unavailable_until_the_shard_comes_up(tmp_path):
    job = make_job([USER], num_shards=1, deadlines=Deadlines(lookup=60.0, push=5.0, stats=5.0))
    cluster = ShardCluster(job, tmp_path / "job.toml", [], [tmp_path / "shard.log"])
    cluster.config_path.write_text(dump_job_config(job))
    keys = np.arange(10, dtype=np.int64)
    outcome: dict = {}

    def call():
        with PSClient.from_job(job, backoff_seconds=0.05, max_attempts=1000) as c:
            outcome["values"] = c.lookup("user", keys)

    # Until the shard starts, its port is a plain socket that accepts and closes connections:
    # each accept is one of the client's attempts, so the test knows the client has been refused
    # (and kept trying) several times before the shard comes up.
    host, port = job.shards[0].address.rsplit(":", 1)
    attempts = 0
    thread = threading.Thread(target=call)
    with socket.create_server((host, int(port))) as refuser:
        refuser.settimeout(30)
        thread.start()
        while attempts < 3:
            refuser.accept()[0].close()
            attempts += 1
    assert thread.is_alive(), "the client gave up while the shard was down"
    proc = start_shard(cluster.config_path, 0, cluster.log_paths[0])
    try:
        wait_serving(job.shards[0].address, proc, log_path=cluster.log_paths[0])
        thread.join(30)
        np.testing.assert_array_equal(outcome["values"], EmbeddingTable(USER).init_values(keys))
    finally:
        assert stop_pid(proc) == 0


@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_a_dead_or_hung_shard_fails_the_call_within_its_deadline(start_cluster, failure):
    table = TableConfig("big", dim=16)
    deadline = 2.0
    cluster = start_cluster(make_job([table], deadlines=Deadlines(lookup=deadline, push=deadline, stats=deadline)))
    pid = cluster.procs[0].pid
    keys = np.arange(400_000, dtype=np.int64)
    errors: list = []
    durations: list[float] = []
    answered: list[float] = []
    stop = threading.Event()

    def loop():
        with PSClient.from_job(cluster.job) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    c.lookup("big", keys)
                    answered.append(time.monotonic() - started)
                except ShardUnavailableError as err:
                    durations.append(time.monotonic() - started)
                    errors.append(err)
                    return

    thread = threading.Thread(target=loop)
    thread.start()
    wait_until(lambda: answered, "a first lookup answered by the shard")
    os.kill(pid, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
    try:
        thread.join(deadline + 5)
        assert not thread.is_alive(), "the client hung"
        assert errors, "no error after the shard went away"
        assert durations[0] < deadline + 1.0
        assert errors[0].code == grpc.StatusCode.UNAVAILABLE, errors[0]
        assert f"shard {cluster.job.shards[0].address}: UNAVAILABLE" in str(errors[0])
        assert f"within the {deadline:g} s deadline" in str(errors[0])
    finally:
        stop.set()
        if failure == "frozen":
            os.kill(pid, signal.SIGCONT)


class _NeverAnswers(grpc.GenericRpcHandler):
    """A shard that takes every call and answers none until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def service(self, handler_call_details):
        def hold(request, context):
            self.release.wait(30)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")

        return grpc.unary_unary_rpc_method_handler(hold)


def test_a_call_of_more_rpcs_than_the_pool_s_threads_ends_within_its_deadline():
    """Each RPC's timeout was taken before any was queued on the client's pool: a call split into
    more RPCs than the pool has threads ran its RPCs in rounds, each with the whole deadline (42
    RPCs, 16 threads, a 1 s deadline: the error came after 3 s, saying "within the 1 s deadline")."""
    from concurrent.futures import ThreadPoolExecutor

    never = _NeverAnswers()
    server = grpc.server(ThreadPoolExecutor(64), options=[("grpc.max_receive_message_length", 1 << 26)])
    server.add_generic_rpc_handlers((never,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    deadline = 1.0
    try:
        with PSClient(
            [f"127.0.0.1:{port}"], dims={"t": 64}, message_limit_bytes=16384,
            deadlines=Deadlines(lookup=deadline, push=deadline, stats=deadline),
        ) as client:
            keys = np.arange(2000, dtype=np.int64)
            assert len(client._plan_lookup("t", keys, None).calls) > 2 * client._pool._max_workers
            grads = np.zeros((2000, 64), np.float32)
            for call in (lambda: client.lookup("t", keys), lambda: client.push("t", keys, grads)):
                started = time.monotonic()
                with pytest.raises(ShardUnavailableError, match=f"within the {deadline:g} s deadline"):
                    call()
                assert time.monotonic() - started < deadline + 1.0  # it was 3 s: the rounds each took the deadline
    finally:
        never.release.set()
        server.stop(0)


def test_a_many_table_lookup_whose_tables_fit_alone_fits_together():
    """The lookups of one shard travel in one LookupBatch, grouped to fit the message limit; they
    were grouped by their requests' size (8 bytes a key), not their replies' (4 x dim), so two
    tables that each fit alone were refused together (the reply over the limit). And a reply over
    the client's own receive limit is not a full table: RPCError, not TableFullError."""
    a, b = TableConfig("a", dim=64, seed=1), TableConfig("b", dim=64, seed=2)
    job = make_job([a, b], num_shards=1, message_limit_bytes=1 << 20)
    keys = np.arange(3000, dtype=np.int64)  # 768 KB of rows a table: each fits 1 MiB alone
    with InProcessShards.start(job) as shards, PSClient.from_job(shards.job) as client:
        alone = {"a": client.lookup("a", keys), "b": client.lookup("b", keys)}
        together = client.lookup_many({"a": keys, "b": keys})
        for name in ("a", "b"):
            np.testing.assert_array_equal(together[name], alone[name])

    class _Status(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    too_large = _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT: Received message larger than max")
    sent_too_large = _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT: Sent message larger than max (9 vs 8)")
    full = _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "table 'a' is full (capacity 4): 2 new keys")
    for method in ("LookupBatch", "Lookup", "LookupMulti", "Stats", "Push", "PushBatch", "PushMulti"):
        for status in (too_large, sent_too_large):  # a push gRPC refused as too large was a TableFullError
            error = _translate(status, method, "127.0.0.1:1")
            assert type(error) is RPCError and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, method
    for method in ("Push", "PushBatch", "PushMulti"):
        assert isinstance(_translate(full, method, "127.0.0.1:1"), TableFullError), method


def test_a_table_named_twice_in_one_push_is_refused():
    """Each item of push_many is one optimizer step: the same table twice took two steps on its
    keys, where one step on the summed gradient is the rule (prepare_push_multi refused it already)."""
    job = make_job([USER], num_shards=1)
    keys = np.arange(4, dtype=np.int64)
    grads = np.ones((4, USER.dim), np.float32)
    with InProcessShards.start(job) as shards, PSClient.from_job(shards.job) as client:
        with pytest.raises(ValueError, match="a table appears more than once"):
            client.push_many([("user", keys, grads, None), ("user", keys, grads, None)])


def test_a_call_that_ends_on_max_attempts_says_so_not_the_deadline():
    """Retries end at the deadline or at max_attempts, whichever comes first; a call that ran out
    of attempts in a fraction of its 30 s deadline said "no answer within the 30 s deadline"."""
    # Bound and never listening for the whole call: connections are refused, and no server another
    # test starts can take the port meanwhile (closed, the kernel could hand it to one).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with PSClient([f"127.0.0.1:{port}"], dims={"t": 2}, deadlines=Deadlines(lookup=30.0, push=30.0, stats=5.0),
                      max_attempts=3, backoff_seconds=0.01) as client:
            with pytest.raises(ShardUnavailableError) as info:
                client.push("t", np.array([1], np.int64), np.ones((1, 2), np.float32))
    message = str(info.value)
    assert "(max_attempts reached before the deadline)" in message and "3 attempts" in message, message
    assert "within the 30 s deadline" not in message


def test_more_standbys_than_shards_and_calls_after_close_say_what_is_wrong(cluster):
    """Before: an IndexError after the shards' channels had opened (and were never closed), and a
    call on a closed client failed inside gRPC or the thread pool."""
    with pytest.raises(ValueError, match="standbys: 2 given for 1 shards"):
        PSClient(["127.0.0.1:1"], standbys=["127.0.0.1:2", "127.0.0.1:3"])
    client = PSClient.from_job(cluster.job)
    client.close()
    with pytest.raises(RuntimeError, match="PSClient: closed"):
        client.lookup("user", np.arange(3, dtype=np.int64))


def test_a_lookup_reply_of_another_dim_is_refused_not_returned_in_its_shape():
    """The shard checks the request's dim against its table; a reply that is not the request's
    dim anyway (a shard of another build, a proxy) came back as rows of the reply's dim."""
    plan = _LookupPlan(num_keys=2, dim=4, num_unique=2, inverse=None, spans=[np.arange(2)])
    reply = ps_pb2.LookupResponse(values=np.ones(16, np.float32).tobytes(), dim=8)
    with pytest.raises(ValueError, match="lookup reply: rows of dim 8, the table's dim is 4"):
        plan.finish([reply])
    good = ps_pb2.LookupResponse(values=np.ones(8, np.float32).tobytes(), dim=4)
    assert plan.finish([good]).shape == (2, 4)
