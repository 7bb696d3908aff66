"""serve.toml: round trip, and every error names its field."""

from __future__ import annotations

import dataclasses

import pytest

from ps.job_config import dump_job_config
from ps.table.config import TableConfig
from serving.config import Consistency, DefaultRow, ExportSource, StorageDType, dump_serve_config, load_serve_config
from tests.helpers.processes import make_job


@pytest.fixture
def job_path(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(dump_job_config(make_job([TableConfig("user", dim=4), TableConfig("item", dim=2)], 2)))
    return path


def write(tmp_path, text: str):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def test_round_trip(tmp_path, job_path):
    text = (
        'job_config = "job.toml"\nlisten = "127.0.0.1:5000"\ntables = ["item"]\ndefault = "init"\n'
        'storage_dtype = "float16"\nstale_after_seconds = 0.5\nmax_queue = 7\nlookup_threads = 3\n'
        "client_stall_seconds = 2.5\n"
        'consistency = "latest"\nmax_waiting_bytes = 4096\n[export]\nuri = "file:///tmp/x"\n'
    )
    config = load_serve_config(write(tmp_path, text))
    assert config.tables == ("item",) and config.default == DefaultRow.INIT
    assert config.consistency == Consistency.LATEST and config.max_waiting_bytes == 4096
    default = load_serve_config(write(tmp_path, text.replace('consistency = "latest"\n', "")))
    assert default.consistency == Consistency.STEP  # one model version per reply unless told otherwise
    assert config.max_queue == 7 and config.lookup_threads == 3 and config.client_stall_seconds == 2.5
    assert config.storage_dtype == StorageDType.FLOAT16 and config.export == ExportSource("file:///tmp/x", "test")
    int8 = load_serve_config(write(tmp_path, text.replace('"float16"', '"int8"')))
    assert int8.storage_dtype == StorageDType.INT8
    assert len(config.job.shards) == 2
    assert load_serve_config(write(tmp_path, dump_serve_config(config, str(job_path)))) == config


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('listen = "nohost"', "listen: must be 'host:port'"),
        ('listen = "127.0.0.1:5000"\ntables = ["nope"]', "tables: 'nope' is not a table"),
        ('listen = "127.0.0.1:5000"\ndefault = "random"', "default: must be one of 'zeros', 'init'"),
        ('listen = "127.0.0.1:5000"\nstorage_dtype = "int4"', "storage_dtype: must be one of"),
        ('listen = "127.0.0.1:5000"\nstale_after_seconds = 0', "stale_after_seconds: must be"),
        ('listen = "127.0.0.1:5000"\nmetrics_port = 70000', "metrics_port: must be"),
        ('listen = "127.0.0.1:5000"\nmax_queue = -1', r"max_queue: must be an integer in \[0, 2147483647\]"),
        ('listen = "127.0.0.1:5000"\nmax_queue = 2.5', r"max_queue: must be an integer in \[0, 2147483647\]"),
        # gRPC's backlog option (no gate) is a C int, the gate's bounds int64: tracebacks at start before
        ('listen = "127.0.0.1:5000"\nmax_queue = 2147483648', r"max_queue: must be an integer in \[0, 21474"),
        ('listen = "127.0.0.1:5000"\nmax_queue_bytes = 9223372036854775808', r"max_queue_bytes: TOML integers are"),
        ('listen = "127.0.0.1:5000"\nmax_queue_bytes = -1', r"max_queue_bytes: must be an integer in \[0, 2\*\*63"),
        ('listen = "127.0.0.1:\u00b2"', r"listen: must be 'host:port' with a port in \[0, 65535\]"),  # int('²') raised
        ('listen = "127.0.0.1:\u0665\u0660"', r"listen: must be 'host:port'"),  # Arabic-Indic digits were taken
        ('listen = "::1:5000"', r"listen: .*IPv6 host in brackets"),
        ('listen = "127.0.0.1:5000"\nlookup_threads = -1', "lookup_threads: must be an integer in"),
        ('listen = "127.0.0.1:5000"\nlookup_threads = "4"', "lookup_threads: must be an integer in"),
        ('listen = "127.0.0.1:5000"\ncolour = 1', "colour: unknown field"),
        ('listen = "127.0.0.1:5000"\nconsistency = "eventual"', "consistency: must be one of 'step', 'latest'"),
        ('listen = "127.0.0.1:5000"\nmax_waiting_bytes = 0', "max_waiting_bytes: must be an integer >= 1"),
        ('listen = "127.0.0.1:5000"\nclient_stall_seconds = -1', "client_stall_seconds: must be a number of seconds"),
        ('listen = "127.0.0.1:5000"\nclient_stall_seconds = "10"', "client_stall_seconds: must be a number of seconds"),
        ('listen = "127.0.0.1:5000"\n[export]\nuri = "/no/scheme"', "export.uri: must be a URI"),
    ],
)
def test_errors_name_the_field(tmp_path, job_path, line, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_serve_config(write(tmp_path, f'job_config = "job.toml"\n{line}\n'))


def test_job_is_required_once(tmp_path):
    with pytest.raises(ValueError, match="job_config: give exactly one"):
        load_serve_config(write(tmp_path, 'listen = "127.0.0.1:5000"\n'))


def test_round_trip_with_quotes_backslashes_newlines_and_non_ascii(tmp_path):
    odd = 'a "quoted" \\ back\\slash\nnew line é 日本'
    folder = tmp_path / odd
    folder.mkdir()
    job_path = folder / "job.toml"
    job_path.write_text(dump_job_config(make_job([TableConfig("user", dim=4)], 1)))
    text = 'job_config = "job.toml"\nlisten = "127.0.0.1:5000"\n[export]\nuri = "file:///tmp/x"\njob = "test"\n'
    config = dataclasses.replace(
        load_serve_config(write(folder, text)), export=ExportSource(f"file:///{odd}/exports", odd)
    )
    assert load_serve_config(write(tmp_path, dump_serve_config(config, str(job_path)))) == config


def test_an_ipv6_listen_address_gives_its_host_without_brackets(tmp_path, job_path):
    """The host (where /metrics is served too) kept the brackets of '[::1]:5000': getaddrinfo refused
    '[::1]' and the replica exited, "cannot serve /metrics" (a review)."""
    config = load_serve_config(write(tmp_path, 'job_config = "job.toml"\nlisten = "[::1]:5000"\n'))
    assert config.host == "::1" and config.listen == "[::1]:5000"
    assert load_serve_config(write(tmp_path, 'job_config = "job.toml"\nlisten = "127.0.0.1:0"\n')).host == "127.0.0.1"
