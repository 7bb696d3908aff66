"""Layout rules of DESIGN section 5 and the import rules of the processes.

- ps/ is the core and imports neither worker/ nor serving/ nor bench/;
- serving/ does not import the shard server (ps.shard);
- a serving replica, `embps snapshot` and `embps health` never import torch: checked in real
  processes, by their sys.modules at exit (lazy imports included) and a running replica's
  /proc/<pid>/maps (libtorch).
"""

import ast
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from ps.process.python_command import python_path

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_names(path: pathlib.Path) -> set[str]:
    """Every dotted module name a file imports (`from a.b import c` gives a.b and a.b.c)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: pathlib.Path) -> set[str]:
    """The top-level packages a file imports."""
    return {name.split(".")[0] for name in imported_names(path)}


def in_package(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def python_files(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def relative(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", python_files("ps"), ids=relative)
def test_ps_imports_neither_worker_nor_serving(path):
    forbidden = imported_modules(path) & {"worker", "serving", "bench"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize("path", python_files("serving"), ids=relative)
def test_serving_does_not_import_the_shard_server(path):
    forbidden = in_package(imported_names(path), "ps.shard")
    assert not forbidden, f"{relative(path)} imports {sorted(forbidden)}: a replica is not a shard"


def test_layout_has_the_design_folders():
    for name in ("ps", "worker", "serving", "proto", "csrc", "tests", "bench", ".ci"):
        assert (ROOT / name).is_dir(), f"missing folder {name}/"
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "embps.py"):
        assert (ROOT / name).is_file(), f"missing file {name}"


def test_native_core_does_not_link_torch():
    import _embps_native

    so = pathlib.Path(_embps_native.__file__)
    assert b"libtorch" not in so.read_bytes(), "the C++ core must not link torch's C++ library"


def test_console_script_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "embps", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bench" in out.stdout


# Installed as sitecustomize.py of a child process: at exit, it writes the names of every module the
# process imported (however: import statements, importlib, plugins) to $EMBPS_TEST_MODULES_OUT.
_MODULES_AT_EXIT = """import atexit, os, sys

def _write_modules(path=os.environ["EMBPS_TEST_MODULES_OUT"]):
    with open(path, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))

atexit.register(_write_modules)
"""


def modules_at_exit_env(tmp_path: pathlib.Path) -> tuple[dict[str, str], pathlib.Path]:
    """(environment for a child process, the file that lists its modules once it has exited)."""
    hook = tmp_path / "modules-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_MODULES_AT_EXIT)
    listing = tmp_path / "modules.txt"
    env = {"PYTHONPATH": python_path(str(ROOT), str(hook)), "EMBPS_TEST_MODULES_OUT": str(listing)}
    return env, listing


def run_embps(tmp_path: pathlib.Path, *argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs `python -m embps argv...` from the repo root: (the finished process, its modules)."""
    env, listing = modules_at_exit_env(tmp_path)
    listing.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-m", "embps", *argv], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    return out, set(listing.read_text().split())


def assert_no_torch(modules: set[str], process: str, must_have: set[str]) -> None:
    missing = must_have - modules
    assert not missing, f"{process}: the module list lacks {sorted(missing)}; did the exit hook run?"
    torch = in_package(modules, "torch")
    assert not torch, f"{process} imported torch ({len(torch)} modules, e.g. {sorted(torch)[:3]})"


def test_snapshot_cli_does_not_import_torch(tmp_path):
    from ps.snapshot.ops import ShardSnapshotter
    from ps.table.config import TableConfig
    from ps.table.embedding_table import EmbeddingTable

    table = EmbeddingTable(TableConfig("user", dim=4))
    table.apply_gradients(np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32))
    ShardSnapshotter({"user": table}, shard=0).snapshot(f"file://{tmp_path}/snap", "j", step=3)
    snap = f"file://{tmp_path}/snap"
    actions = {
        "list": (["list", snap], "<- LATEST"),
        "export": (["export", snap, "--dst", f"file://{tmp_path}/out"], "exported step 3 of job j"),
    }
    for action, (argv, expected) in actions.items():
        out, modules = run_embps(tmp_path, "snapshot", *argv, "--job", "j")
        assert out.returncode == 0 and expected in out.stdout, out.stdout + out.stderr[-2000:]
        assert_no_torch(modules, f"embps snapshot {action}", {"ps.snapshot.cli", "pyarrow"})


def test_health_probe_does_not_import_torch(tmp_path):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        out, modules = run_embps(tmp_path, "health", f"127.0.0.1:{closed.getsockname()[1]}", "--timeout", "2")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stdout, out.stdout + out.stderr[-2000:]
    assert_no_torch(modules, "embps health", {"ps.process.health", "grpc"})


def test_a_cpu_shard_imports_no_torch(start_cluster, tmp_path):
    """Torch is the workers' dependency: a CPU shard (native kernels) serves lookups and pushes of
    every optimizer, float16 and int8 rows, admission and eviction without it, so it starts in
    a third of the time and holds none of torch's memory."""
    from ps.client import PSClient
    from ps.table.config import (
        AdmissionConfig,
        AdmissionKind,
        EvictionConfig,
        OptimizerConfig,
        OptimizerKind,
        Storage,
        TableConfig,
    )
    from tests.helpers.processes import make_job

    tables = [TableConfig(kind.value, dim=4, optimizer=OptimizerConfig(kind)) for kind in OptimizerKind]
    tables += [
        TableConfig("half", dim=4, storage=Storage.FLOAT16, eviction=EvictionConfig(ttl_steps=2)),
        TableConfig(
            "int8", dim=4, storage=Storage.INT8, admission=AdmissionConfig(kind=AdmissionKind.COUNT, min_count=2)
        ),
    ]
    job = make_job(tables, num_shards=1)
    env, listing = modules_at_exit_env(tmp_path)
    cluster = start_cluster(job, env=env)
    keys = np.arange(50, dtype=np.int64)
    names = [t.name for t in tables]
    with PSClient.from_job(cluster.job) as client:
        for _ in range(3):
            for name in names:
                client.push(name, keys, np.ones((50, 4), np.float32))
        before = client.lookup("sgd", keys)
        multi = client.lookup_multi(names, np.tile(keys, len(names)), np.arange(len(names) + 1) * 50)
    assert multi.shape == (len(names) * 50 * 4,) and np.array_equal(multi[: 50 * 4], before.reshape(-1))
    maps = pathlib.Path(f"/proc/{cluster.procs[0].pid}/maps").read_text()
    assert "_embps_native" in maps, "the shard's memory map does not show the native core"
    assert "libtorch" not in maps, "the running shard has libtorch mapped"
    assert cluster.stop() == [0]
    assert_no_torch(set(listing.read_text().split()), "embps ps", {"ps.shard.server", "ps.table.embedding_table"})


def test_serving_replica_imports_neither_torch_nor_the_shard_server(start_cluster, tmp_path):
    """A replica that loads an export, then follows a live shard, and answers lookups."""
    from ps.client import PSClient
    from ps.snapshot.ops import ShardSnapshotter, export_for_serving
    from ps.table.config import TableConfig
    from ps.table.embedding_table import EmbeddingTable
    from serving.config import ExportSource
    from tests.helpers.processes import make_job
    from tests.serving.replicas import ServingReplica

    user = TableConfig("user", dim=4)
    job = make_job([user], num_shards=1)
    exported = EmbeddingTable(user)
    exported.apply_gradients(np.arange(20, dtype=np.int64), np.ones((20, 4), np.float32))
    ShardSnapshotter({"user": exported}, shard=0).snapshot(f"file://{tmp_path}/snap", job.job, step=1)
    export_for_serving(f"file://{tmp_path}/snap", job.job, None, f"file://{tmp_path}/export")
    cluster = start_cluster(job)
    export = ExportSource(f"file://{tmp_path}/export", job.job)
    env, listing = modules_at_exit_env(tmp_path)
    replica = ServingReplica.start(cluster, tmp_path, env=env, export=export)
    try:
        keys = np.arange(100, 110, dtype=np.int64)
        with PSClient.from_job(cluster.job) as client:
            version = client.push("user", keys, np.ones((10, 4), np.float32)).versions[0]
            expected = client.lookup("user", keys)
        replica.wait_version("user", 0, version)
        values, found, _ = replica.lookup("user", keys)
        assert found.all()
        np.testing.assert_array_equal(values, expected)
        maps = pathlib.Path(f"/proc/{replica.proc.pid}/maps").read_text()
        assert "_embps_native" in maps, "the replica's memory map does not show the native core"
        assert "libtorch" not in maps, "the running replica has libtorch mapped"
    finally:
        assert replica.stop() == 0
    modules = set(listing.read_text().split())
    assert_no_torch(modules, "embps serve", {"serving.server", "serving.export_load", "serving.follower"})
    shard = in_package(modules, "ps.shard")
    assert not shard, f"embps serve imported the shard server's modules {sorted(shard)}"
