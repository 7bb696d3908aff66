"""The TOML job config: a full example loads, and every bad field is named in its error."""

import dataclasses
import tomllib

import numpy as np
import pytest

from ps.errors import ConfigTypeError
from ps.job_config import SnapshotConfig, dump_job_config, load_job_config, parse_job_config
from ps.sharding import ShardMap
from ps.snapshot.storage import StorageConfig
from ps.table.config import EvictionPolicy, OptimizerKind

EXAMPLE = """
job = "ctr"
message_limit_bytes = 1048576

[deadlines]
lookup = 2.5
push = 7

[sharding]
bucket_ranges = [[0, 40000, 0], [40000, 65536, 1]]

[[shards]]
address = "127.0.0.1:7001"
metrics_port = 9101

[[shards]]
address = "127.0.0.1:7002"

[tables.user]
dim = 16
capacity = 1000
optimizer = { kind = "adagrad", lr = 0.05 }
eviction = { policy = "lfu" }

[tables.item]
dim = 8
"""


def test_example_loads_into_frozen_dataclasses(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(EXAMPLE)
    job = load_job_config(path)
    assert job.job == "ctr"
    assert job.addresses == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert job.shards[0].metrics_port == 9101 and job.shards[1].metrics_port == 0
    assert job.message_limit_bytes == 1 << 20
    assert (job.deadlines.lookup, job.deadlines.push, job.deadlines.stats) == (2.5, 7, 5.0)
    user = job.table("user")
    assert user.dim == 16 and user.capacity == 1000
    assert user.optimizer.kind is OptimizerKind.ADAGRAD and user.optimizer.lr == 0.05
    assert user.eviction.policy is EvictionPolicy.LFU
    assert job.table("item").dim == 8
    assert np.bincount(job.shard_map.buckets).tolist() == [40000, 25536]
    with pytest.raises(AttributeError):
        job.job = "other"


def test_dump_reads_back_equal():
    job = parse_job_config(tomllib.loads(EXAMPLE))
    assert parse_job_config(tomllib.loads(dump_job_config(job))) == job


def test_default_shard_map_is_uniform():
    text = EXAMPLE.replace("[sharding]\nbucket_ranges = [[0, 40000, 0], [40000, 65536, 1]]\n", "")
    assert "bucket_ranges" not in text
    job = parse_job_config(tomllib.loads(text))
    assert job.shard_map == ShardMap.uniform(2)


def _with(old: str, new: str) -> dict:
    assert old in EXAMPLE
    return tomllib.loads(EXAMPLE.replace(old, new, 1))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("dim = 16", "dim = 0", r"tables\.user\.dim: must be in \[1, 65536\], got 0"),
        ("dim = 16", 'dim = "16"', r"tables\.user\.dim: must be an integer"),
        ("dim = 16", "dimm = 16", r"tables\.user\.dimm: unknown field"),
        ("[tables.item]\ndim = 8", "[tables.item]", r"tables\.item\.dim: required field is missing"),
        ('kind = "adagrad"', 'kind = "adagard"', r"tables\.user\.optimizer\.kind: must be one of"),
        ("lr = 0.05", "lr = -1.0", r"tables\.user\.optimizer\.lr: must be > 0"),
        ("capacity = 1000\n", "", r"tables\.user\.eviction\.policy: 'lfu' evicts only when the table is full"),
        ('address = "127.0.0.1:7002"', 'address = "127.0.0.1"', r"shards\[1\]\.address: must be 'host:port'"),
        ('address = "127.0.0.1:7002"', 'address = "127.0.0.1:7001"', r"shards\[1\]\.address: .* also shards\[0\]"),
        ("metrics_port = 9101", "metrics_port = 70000", r"shards\[0\]\.metrics_port: must be in \[0, 65535\]"),
        ('job = "ctr"', 'job = "c t r"', r"job: must be a name"),
        ("message_limit_bytes = 1048576", "message_limit_bytes = 10", r"message_limit_bytes: must be in"),
        # gRPC's size options are C ints, set 64 KiB above the limit: OverflowError at the shard's start before
        (
            "message_limit_bytes = 1048576",
            "message_limit_bytes = 2147418112",
            r"message_limit_bytes: must be in \[65536, 2147418111\]",
        ),
        # math.isfinite raised OverflowError (a traceback) on an integer beyond float's range
        ("lr = 0.05", "lr = 1" + "0" * 400, r"tables\.user\.optimizer\.lr: must be finite, got an integer of 401"),
        ("lookup = 2.5", "lookup = 0", r"deadlines\.lookup: must be a number of seconds in \(0, 86400\]"),
        ("push = 7", "pushh = 7", r"deadlines\.pushh: unknown field"),
        ("[40000, 65536, 1]", "[40001, 65536, 1]", r"sharding\.bucket_ranges\[1\]: ranges must cover"),
        ("[40000, 65536, 1]", "[40000, 65536, 0]", r"sharding\.bucket_ranges: shards \[1\] own no bucket"),
        ('job = "ctr"', 'job = "ctr"\nshard_count = 2', r"shard_count: unknown field"),
        ("[40000, 65536, 1]]", "1]", r"sharding\.bucket_ranges\[1\]: must be \[start, stop, shard\] integers, got 1"),
        ('address = "127.0.0.1:7002"', 'address = "::1"', r"shards\[1\]\.address: .*IPv6 host in brackets"),
        ('address = "127.0.0.1:7002"', 'address = "127.0.0.1:99999"', r"shards\[1\]\.address: must be 'host:port'"),
        (
            "metrics_port = 9101",
            "metrics_port = 7002",
            r"shards\[1\]\.address: '127.0.0.1:7002' is also shards\[0\]\.metrics_port",
        ),
        (
            'address = "127.0.0.1:7002"',
            'address = "127.0.0.1:7002"\nmetrics_port = 9101',
            r"shards\[1\]\.metrics_port: '127.0.0.1:9101' is also shards\[0\]\.metrics_port",
        ),
        ('address = "127.0.0.1:7002"', 'address = "localhost:7001"', r"shards\[1\]\.address: .* also shards\[0\]"),
        ('job = "ctr"', 'job = ".."', r"job: must be a name of letters"),
        ('job = "ctr"', 'job = "' + "j" * 201 + '"', r"job: must be .*at most 200 bytes of UTF-8, got 'jjj"),
        ('job = "ctr"', 'job = "' + "作" * 67 + '"', r"job: must be .*at most 200 bytes"),  # 201 bytes
        ("[tables.item]", '[tables.' + "t" * 201 + ']', r"tables\.t+\.name: must be .*at most 200 bytes"),
        ("[tables.item]", '[tables.".."]', r'tables\."\.\."\.name: must be a name of letters'),
        ("lookup = 2.5", "lookup = 1e10", r"deadlines\.lookup: must be a number of seconds in \(0, 86400\]"),
        ("lookup = 2.5", "lookup = inf", r"deadlines\.lookup: must be a number of seconds in \(0, 86400\]"),
        ('dim = 8', 'dim = 8\n[snapshot]\nuri = "ftp://host/x"', r"snapshot\.uri: unsupported scheme 'ftp'"),
        ('dim = 8', 'dim = 8\n[snapshot]\nuri = "s3://"', r"snapshot\.uri: s3 URIs need a bucket"),
        (
            'dim = 8',
            'dim = 8\n[snapshot]\nuri = "s3://b/p"\nstorage = { request_timeout = inf }',
            r"snapshot\.storage\.request_timeout: must be a number of seconds in \(0, 3600\]",
        ),
    ],
)
def test_errors_name_the_field(old, new, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_job_config(_with(old, new))


@pytest.mark.parametrize(
    "old, new",
    [
        ("dim = 16", 'dim = "16"'),
        ('address = "127.0.0.1:7002"', "address = 7002"),
        ("[deadlines]\nlookup = 2.5\npush = 7", "deadlines = 5"),
        ('job = "ctr"', 'job = "ctr"\nsecurity = "on"'),
        ('job = "ctr"', 'job = "ctr"\narbiter = 1'),
    ],
)
def test_a_wrong_type_is_a_value_error_for_the_command_line(old, new):
    """A wrong type is a ConfigTypeError: a TypeError, and a ValueError that `embps` prints as one
    line (embps.py), not a traceback."""
    with pytest.raises(ConfigTypeError):
        parse_job_config(_with(old, new))
    with pytest.raises(ValueError):
        parse_job_config(_with(old, new))


def test_an_ipv6_address_binds_its_host_without_brackets():
    job = parse_job_config(_with('address = "127.0.0.1:7002"', 'address = "[::1]:7002"'))
    assert (job.shards[1].host, job.shards[1].port) == ("::1", 7002)
    assert job.addresses[1] == "[::1]:7002"  # gRPC's form


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "job.toml"
    path.write_bytes(b"\xff\xfejob = 1\n")
    with pytest.raises(ValueError, match=r"job\.toml: not a UTF-8 text file"):
        load_job_config(path)


def test_missing_shards_and_tables_are_named():
    with pytest.raises(ValueError, match="shards: must be a non-empty array"):
        parse_job_config({"job": "x", "tables": {"t": {"dim": 1}}})
    with pytest.raises(ValueError, match="tables: must declare at least one table"):
        parse_job_config({"job": "x", "shards": [{"address": "h:1"}]})


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("job = \n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_job_config(path)


def test_dump_reads_back_equal_with_quotes_backslashes_newlines_and_non_ascii():
    odd = 'a "quoted" \\ back\\slash\nnew line é 日本'
    text = EXAMPLE.replace('job = "ctr"', 'job = "ctr-é.v2"').replace("[tables.item]", '[tables."item.v2"]')
    job = parse_job_config(tomllib.loads(text))
    storage = StorageConfig(endpoint_override=odd, region=odd, access_key=odd, secret_key=odd)
    job = dataclasses.replace(job, snapshot=SnapshotConfig(uri=f"file:///tmp/{odd}", storage=storage))
    assert parse_job_config(tomllib.loads(dump_job_config(job))) == job


def test_a_file_with_an_integer_beyond_64_bits_names_its_field(tmp_path):
    """Python's tomllib takes integers of any size; TOML's are 64-bit. Such a value reached float()
    and gRPC's C ints as an OverflowError traceback at a process's start."""
    path = tmp_path / "job.toml"
    path.write_text(EXAMPLE.replace("message_limit_bytes = 1048576", "message_limit_bytes = 9223372036854775808"))
    with pytest.raises(ValueError, match=r"job\.toml: message_limit_bytes: TOML integers are 64-bit .*19 digits"):
        load_job_config(path)
    path.write_text(EXAMPLE.replace("[40000, 65536, 1]]", "[40000, 65536, -9223372036854775809]]"))
    with pytest.raises(ValueError, match=r"sharding\.bucket_ranges\[1\]\[2\]: TOML integers are 64-bit"):
        load_job_config(path)


def test_a_table_whose_one_row_does_not_fit_the_message_limit_is_refused_naming_the_dim():
    """No split can send one key's row: such a table passed, then its pushes were refused as a full
    table (gRPC's own size refusal) and its lookups said "at most 0 keys per call"."""
    text = EXAMPLE.replace("message_limit_bytes = 1048576", "message_limit_bytes = 65536")
    text = text.replace("dim = 16", "dim = 16384")
    refused = r"^tables\.user\.dim: one row of dim 16384 \(65,536 bytes .*does not fit message_limit_bytes 65,536"
    with pytest.raises(ValueError, match=refused):
        parse_job_config(tomllib.loads(text))
    assert parse_job_config(tomllib.loads(text.replace("dim = 16384", "dim = 16000"))).tables[0].dim == 16000
