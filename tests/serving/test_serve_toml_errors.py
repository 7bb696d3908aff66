"""serve.toml's bad values end `embps serve` with one line naming the field, exit status 2: values of
the wrong type (ConfigTypeError, not a bare TypeError's traceback), a replica port that one of its
own job's shards serves on the same machine, an export URI the replica could not open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ps.errors import ConfigTypeError
from ps.job_config import ArbiterConfig, JobConfig, ShardConfig, dump_job_config
from ps.table.config import TableConfig
from serving.config import load_serve_config
from tests.helpers.processes import REPO_ROOT

# Fixed ports: nothing binds them, the config is only read.
JOB = JobConfig(
    job="j",
    shards=(
        ShardConfig(address="127.0.0.1:47311", metrics_port=47321),
        ShardConfig(
            address="127.0.0.1:47312", metrics_port=47322, standby="127.0.0.1:47313", standby_metrics_port=47323
        ),
    ),
    tables=(TableConfig("user", dim=4),),
    arbiter=ArbiterConfig("http://127.0.0.1:2379"),
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "job.toml").write_text(dump_job_config(JOB))
    return tmp_path


def serve_toml(folder: Path, text: str) -> Path:
    path = folder / "serve.toml"
    path.write_text(f'job_config = "job.toml"\n{text}\n')
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "127.0.0.1:5000"\ntables = "user"', "tables: must be a non-empty list of table names, got 'user'"),
        ('listen = "127.0.0.1:5000"\ntables = [1]', "tables: must be a non-empty list"),
        ('listen = "127.0.0.1:5000"\nexport = 5', "export: must be a table"),
        ('listen = "127.0.0.1:5000"\n[export]\nuri = "file:///x"\njob = 5', "export.job: must be the job name"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_config_type_error_naming_the_field(folder, text, message):
    with pytest.raises(ConfigTypeError, match=message):
        load_serve_config(serve_toml(folder, text))


def test_job_config_of_the_wrong_type_names_it(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('job_config = 5\nlisten = "127.0.0.1:5000"\n')
    with pytest.raises(ConfigTypeError, match="job_config: must be a path to the job's TOML, got 5"):
        load_serve_config(path)
    path.write_text('job = 5\nlisten = "127.0.0.1:5000"\n')
    with pytest.raises(ConfigTypeError, match="job: must be a table of the job's fields, got 5"):
        load_serve_config(path)
    path.write_text('job_config = "nope.toml"\nlisten = "127.0.0.1:5000"\n')  # named the path, not the field
    with pytest.raises(ValueError, match="job_config: .*nope.toml: no such file"):
        load_serve_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "127.0.0.1:47311"', r"listen: 127.0.0.1:47311 is shards\[0\].address "),
        ('listen = "localhost:47311"', r"listen: localhost:47311 is shards\[0\].address "),
        ('listen = "0.0.0.0:47312"', r"listen: 0.0.0.0:47312 is shards\[1\].address "),
        ('listen = "127.0.0.1:47321"', r"listen: 127.0.0.1:47321 is shards\[0\].metrics_port "),
        ('listen = "127.0.0.1:47313"', r"listen: 127.0.0.1:47313 is shards\[1\].standby "),
        ('listen = "127.0.0.1:47323"', r"listen: 127.0.0.1:47323 is shards\[1\].standby_metrics_port "),
        ('listen = "127.0.0.1:5000"\nmetrics_port = 47313', r"metrics_port: 127.0.0.1:47313 is shards\[1\].standby "),
        ('listen = "127.0.0.1:5000"\nmetrics_port = 5000', "metrics_port: must differ from the port of listen"),
    ],
)
def test_a_replica_port_that_a_shard_of_its_job_serves_is_refused(folder, text, message):
    with pytest.raises(ValueError, match=message):
        load_serve_config(serve_toml(folder, text))


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:47399", "10.1.2.3:47311", "[::1]:47311", "127.0.0.1:0"],
    ids=["free", "remote", "v6", "port-0"],
)
def test_ports_no_shard_of_this_machine_serves_are_taken(folder, listen):
    """Another host, or another address family on loopback, is another socket: no false alarm."""
    config = load_serve_config(serve_toml(folder, f'listen = "{listen}"'))
    assert config.listen == listen


def test_an_export_uri_with_an_unknown_scheme_names_export_uri(folder):
    with pytest.raises(ValueError, match="^export.uri: unsupported scheme 'bogus'"):
        load_serve_config(serve_toml(folder, 'listen = "127.0.0.1:5000"\n[export]\nuri = "bogus://x"'))


def embps_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embps", "serve", "--no-malloc-tuning", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('listen = "127.0.0.1:5000"\ntables = "user"', "tables"),
        ('listen = "127.0.0.1:47311"', "listen"),
        ('listen = "127.0.0.1:5000"\n[export]\nuri = "bogus://x"', "export.uri"),
    ],
    ids=["wrong-type", "shard-address", "export-scheme"],
)
def test_embps_serve_ends_with_one_line_naming_the_field(folder, text, field):
    done = embps_serve("--config", str(serve_toml(folder, text)))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embps serve: {field}: "), done.stderr


@pytest.mark.parametrize("grace", ["nan", "-1", "1e9"])
def test_a_grace_out_of_range_names_the_flag(folder, grace):
    done = embps_serve("--config", str(serve_toml(folder, 'listen = "127.0.0.1:5000"')), f"--grace={grace}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"embps serve: --grace: must be a number of seconds in [0, 86400], got {float(grace)}"
    ], done.stderr
