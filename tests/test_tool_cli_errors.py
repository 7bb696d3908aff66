"""The operator tools (`embps health`, `deploy render`, `snapshot`, `bench report`) end a bad
argument or input file with one line on stderr naming it and exit status 2: never a traceback, a
gRPC error that reads like a server down (exit 1), or a silent success."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from tests.helpers.processes import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "cluster.toml"


def embps(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python -m embps ARGS` on this checkout (PYTHONPATH: also from another working directory)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "embps", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def refused(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The one stderr line of a command that refused its input with exit status 2."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), done.stderr
    return lines[0]


# --- embps health ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:112847", "address: the port must be an integer in [1, 65535]"),  # gRPC: port 47311
        ("1.2.3.4:99999", "address: the port must be an integer in [1, 65535]"),
        ("127.0.0.1:0", "address: the port must be an integer in [1, 65535]"),
        ("127.0.0.1:abc", "address: the port must be an integer in [1, 65535]"),
        (":0", "address: must be HOST:PORT"),
        ("::1:50100", "address: must be HOST:PORT (an IPv6 host in brackets"),
        ("no-port-here", "address: must be HOST:PORT"),
    ],
)
def test_health_refuses_a_bad_address_naming_it(address, message):
    line = refused(embps("health", address, "--timeout", "1"), "embps health: ")
    assert message in line and repr(address) in line, line


@pytest.mark.parametrize("timeout", ["1e10", "3601", "0", "nan", "inf"])
def test_health_refuses_a_timeout_out_of_range_naming_the_flag(timeout):
    line = refused(embps("health", "127.0.0.1:50100", "--timeout", timeout), "embps health: --timeout: ")
    assert "must be in (0, 3600] seconds" in line, line


def test_health_refuses_an_empty_config_naming_the_flag():
    line = refused(embps("health", "127.0.0.1:50100", "--config", ""), "embps health: --config: ")
    assert line == "embps health: --config: must name the job's TOML or be left out, got ''", line


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def health_server() -> Iterator[dict[str, int]]:
    """A gRPC server with only the health service, SERVING, on loopback in both families (IPv4
    only on a machine without an IPv6 loopback)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    ports = {"v4": server.add_insecure_port("127.0.0.1:0")}
    if _has_ipv6_loopback():
        ports["v6"] = server.add_insecure_port("[::1]:0")
    server.start()
    yield ports
    server.stop(None)


def test_health_answers_serving_up_to_the_largest_timeout_and_over_ipv6(health_server):
    v4 = health_server["v4"]
    probes = [(f"127.0.0.1:{v4}", "3600"), (f"localhost:{v4}", "2")]
    if "v6" in health_server:
        probes.append((f"[::1]:{health_server['v6']}", "2"))
    for address, timeout in probes:
        done = embps("health", address, "--timeout", timeout)
        assert done.returncode == 0 and "SERVING" in done.stdout, (address, done.stdout, done.stderr)
    # 1e10 s used to reach gRPC, which failed it at once: DEADLINE_EXCEEDED, exit 1, a false alarm.
    refused(embps("health", f"127.0.0.1:{v4}", "--timeout", "1e10"), "embps health: --timeout: ")


# --- embps deploy render --------------------------------------------------------------------------


def test_deploy_render_refuses_an_empty_out_and_writes_nothing(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    line = refused(embps("deploy", "render", str(EXAMPLE), "--out", "", cwd=work), "embps deploy render: --out: ")
    assert "got ''" in line, line
    assert list(work.iterdir()) == []  # not the manifests in the working directory
    afile = tmp_path / "afile"
    afile.write_text("")
    refused(embps("deploy", "render", str(EXAMPLE), "--out", str(afile)), "embps deploy render: --out: ")


def _edited_example(tmp_path: Path, before: str = "", after: str = "", drop: str = "") -> Path:
    text = EXAMPLE.read_text()
    assert drop in text
    path = tmp_path / "job.toml"
    path.write_text(before + text.replace(drop, "") + after)
    return path


DATA = '[data]\nsource = "synthetic"\n\n[data.synthetic]\nnum_keys = 20000\nnum_batches = 400\nnum_eval_batches = 4\n'


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"after": '\n[deploy.worker]\nnnodes = "2"\n'}, None),  # a duplicate table: not TOML
        ({"after": "\n[sharding]\nbucket_ranges = [1, 2, 3]\n"}, "sharding"),
        ({"before": "data = 5\n", "drop": DATA}, "data: must be a table"),
        ({"before": 'data = "x"\n', "drop": DATA}, "data: must be a table"),
        ({"after": "\n[deploy.serving.x]\n"}, "deploy.serving.x"),
    ],
    ids=["not-toml", "sharding-flat", "data-int", "data-str", "unknown-field"],
)
def test_deploy_render_errors_are_one_line_on_stderr(tmp_path, edit, field):
    """The loader's message passes through unchanged after the file's path; nothing on stdout."""
    path = _edited_example(tmp_path, **edit)
    done = embps("deploy", "render", str(path), "--out", str(tmp_path / "out"))
    line = refused(done, f"embps deploy render: {path}: ")
    assert done.stdout == "" and not (tmp_path / "out").exists(), done.stdout
    if field is not None:
        assert line.startswith(f"embps deploy render: {path}: {field}"), line


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"s3://embps/exports"', '"bogus://x"', "deploy.serving.export_uri: unsupported scheme 'bogus'"),
        ('"s3://embps/exports"', '"exports"', "deploy.serving.export_uri: must be a URI"),
        ('"registry.example.com/embps:0.1.0"', '"embps 0.1"', "deploy.image: a container image reference has no"),
    ],
    ids=["export-scheme", "export-no-scheme", "image-space"],
)
def test_deploy_render_checks_what_the_pods_would_fail_on(tmp_path, old, new, message):
    """The replicas read export_uri as serve.toml's export.uri; Kubernetes pulls the image."""
    path = tmp_path / "job.toml"
    path.write_text(EXAMPLE.read_text().replace(old, new))
    assert message in refused(embps("deploy", "render", str(path), "--out", str(tmp_path / "out")), "embps deploy")


# --- embps snapshot -------------------------------------------------------------------------------


def test_snapshot_list_of_a_missing_path_or_a_file_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    line = refused(embps("snapshot", "list", missing, "--job", "j"), "embps snapshot list: uri: ")
    assert repr(missing) in line and "does not exist" in line, line
    line = refused(embps("snapshot", "list", f"file://{missing}", "--job", "j"), "embps snapshot list: uri: ")
    assert "does not exist" in line, line
    afile = tmp_path / "hostname"
    afile.write_text("x\n")
    line = refused(embps("snapshot", "list", str(afile), "--job", "j"), "embps snapshot list: uri: ")
    assert repr(str(afile)) in line and "is not a folder" in line, line


def test_snapshot_list_of_an_empty_folder_says_none(tmp_path):
    done = embps("snapshot", "list", str(tmp_path), "--job", "j")
    assert done.returncode == 0 and "no committed snapshot of job j" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["gc", "{root}", "--keep", "0"], "embps snapshot gc: --keep: must be an integer >= 1"),
        (["gc", "{root}"], "embps snapshot gc: --keep: required"),
        (["export", "{root}"], "embps snapshot export: --dst: required"),
        (["export", "{root}", "--dst", "bogus://x"], "embps snapshot export: --dst: unsupported scheme"),
        (["inspect", "{root}", "--step", "-1"], "embps snapshot inspect: --step: must be"),
        (["list", "bogus://x"], "embps snapshot list: uri: unsupported scheme"),
        (["export", "{root}", "--dst", "file://{root}/"], "embps snapshot export: --dst: must differ from the uri"),
        (["export", "{root}", "--dst", "{root}/sub/.."], "embps snapshot export: --dst: must differ from the uri"),
        # Under the job's folder its gc (snapshot.keep, `embps snapshot gc`) deleted the export.
        (["export", "{root}", "--dst", "file://{root}/j/7"], "embps snapshot export: --dst: the export would go to"),
    ],
    ids=["keep-0", "keep-missing", "dst-missing", "dst-scheme", "step-negative", "uri-scheme", "dst-same",
         "dst-same-by-dots", "dst-in-job"],
)
def test_snapshot_flags_are_named(tmp_path, argv, prefix):
    line = refused(embps("snapshot", *(a.format(root=tmp_path) for a in argv), "--job", "j"), "embps snapshot ")
    assert line.startswith(prefix), line


# --- embps bench report ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", 'it has no "bench" field'),
        ('{"results": 5}', 'it has no "bench" field'),
        ("[1, 2]", "expected a JSON object"),
        ("not json", "not JSON"),
        ('{"bench": "ps", "config": []}', "not an `embps bench ps` result (a field of the wrong shape"),
    ],
    ids=["empty-object", "no-bench", "array", "not-json", "wrong-shape"],
)
def test_bench_report_refuses_a_file_that_is_no_bench_result(tmp_path, content, message):
    path = tmp_path / "result.json"
    path.write_text(content)
    done = embps("bench", "report", str(path))
    line = refused(done, f"embps bench report: {path}: ")
    assert message in line and done.stdout == "", (line, done.stdout)


def test_bench_report_of_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "missing.json"
    assert refused(embps("bench", "report", str(missing)), "embps bench report: ") == (
        f"embps bench report: {missing}: No such file or directory"
    )


def test_bench_report_still_renders_a_result(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"bench": "other", "config": {"n": 3}, "rate": 5.0}))
    done = embps("bench", "report", str(path))
    assert done.returncode == 0 and "| `embps bench other` | n 3 | rate 5 |" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(
    "argv, line",
    [
        (["cut", "--changed", "2"], "embps bench cut: --changed must be in [0, 1], got 2.0"),
        (["soak", "--pushes", "5"], "embps bench soak: --pushes must be >= 10, got 5"),
        (["data", "--workers", "0"], "embps bench data: --workers: need counts >= 1, got '0'"),
    ],
)
def test_bench_flags_checked_after_parsing_are_usage_errors(argv, line):
    """These ended with status 1 (SystemExit), the other benches' flag errors with 2."""
    assert refused(embps("bench", *argv), "embps bench ") == line
