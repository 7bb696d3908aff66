"""`embps launch` across two nodes: network namespaces act as machines, no cluster needed.

    namespace 1 (node 0): embps launch --nnodes 2 --node-rank 0 --no-ps   1 worker, hosts the c10d store
    namespace 2 (node 1): embps launch --nnodes 2 --node-rank 1 --no-ps   1 worker
    namespace 3 (PS):     embps ps --shard 0, embps ps --shard 1            at the job file's addresses

The sync result (dense model and every touched row) must equal a single-node run of the same
job (2 workers on one node) within 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ps.client import PSClient
from ps.job_config import JobConfig, ShardConfig
from ps.process.malloc import MALLOC_TUNING
from ps.process.python_command import python_path
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.netns import Host, HostNetwork, host_network, remaining, unavailable_reason
from tests.helpers.processes import REPO_ROOT, ShardCluster, make_job, stop_pid, wait_serving
from tests.worker.test_training_sync import train_reference_keys
from tests.worker.training_jobs import OPTIMIZER_TABLES, training_toml
from worker.launcher import LaunchOptions
from worker.train_config import load_training_job

STEPS = 12
SYNTHETIC = {"num_dense": 3, "num_sparse": 5, "num_keys": 300, "num_batches": STEPS, "num_eval_batches": 2, "seed": 7}
TRAIN = {
    "steps": STEPS,
    "batch_size": 64,
    "mode": "sync",
    "dense_optimizer": "adam",
    "dense_lr": 0.01,
    "tables": [t.name for t in OPTIMIZER_TABLES],
    "eval_batches": 2,
}
MODEL = {"bottom_sizes": [8], "top_sizes": [16]}
RDZV_PORT = 29411


def write_job(path: Path, ps: JobConfig, workers: int, out: Path) -> Path:
    train = TRAIN | {"workers": workers, "output_dir": str(out)}
    path.write_text(training_toml(ps, train, MODEL, {"source": "synthetic"}, SYNTHETIC))
    return path


def read_rows(job: JobConfig, seen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with PSClient.from_job(job) as client:
        return {name: client.lookup(name, keys) for name, keys in seen.items()}


def single_node_run(tmp_path: Path) -> dict:
    """The same job on one node: 2 workers under `embps launch --no-ps`, shards on loopback."""
    ps = make_job(tables=OPTIMIZER_TABLES, num_shards=2, job="multinode")
    out = tmp_path / "single-out"
    path = write_job(tmp_path / "single.toml", ps, workers=2, out=out)
    seen = train_reference_keys(load_training_job(path))[2]
    with ShardCluster.start(ps, tmp_path / "single-shards"):
        result = subprocess.run(
            [sys.executable, "-m", "embps", "launch", str(path), "--no-ps"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        rows = read_rows(ps, seen)
    return {"dense": torch.load(out / "dense.pt"), "rows": rows, "seen": seen}


def start_node(host: Host, config: Path, node_rank: int, endpoint: str, log: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "embps", "launch", str(config),
        "--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-endpoint", endpoint,
        "--local-addr", host.address, "--no-ps",
    ]  # fmt: skip
    # gloo binds the interface named here; the namespace's host name resolves to no address of it
    env = {"PYTHONPATH": python_path(str(REPO_ROOT)), "GLOO_SOCKET_IFNAME": host.ifname}
    with open(log, "wb") as f:
        return host.popen(argv, env=env, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)


def two_node_run(tmp_path: Path, seen: dict[str, np.ndarray]) -> dict:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"two-node test needs network namespaces: {reason}")
    with host_network(3) as net:
        result = _run_on(net, tmp_path, seen)
    assert not remaining(net), f"network pieces left behind: {remaining(net)}"
    return result


def _run_on(net: HostNetwork, tmp_path: Path, seen: dict[str, np.ndarray]) -> dict:
    node0, node1, ps_host = net.hosts
    shards = tuple(ShardConfig(address=f"{ps_host.address}:{50061 + i}", metrics_port=9171 + i) for i in range(2))
    ps = replace(make_job(tables=OPTIMIZER_TABLES, num_shards=2, job="multinode"), shards=shards)
    outs = [tmp_path / f"node{r}-out" for r in range(2)]
    # Identical jobs but for train.output_dir: on real machines each node has its own disk.
    configs = [write_job(tmp_path / f"node{r}.toml", ps, workers=1, out=outs[r]) for r in range(2)]
    shard_logs = [tmp_path / f"shard-{i}.log" for i in range(2)]
    node_logs = [tmp_path / f"node{r}.log" for r in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(2):
            argv = [sys.executable, "-m", "embps", "ps", "--config", str(configs[0]), "--shard", str(i)]
            with open(shard_logs[i], "wb") as f:
                env = {"PYTHONPATH": python_path(str(REPO_ROOT)), **MALLOC_TUNING}
                procs.append(ps_host.popen(argv, env=env, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT))
        for i, shard in enumerate(shards):
            wait_serving(shard.address, procs[i], log_path=shard_logs[i])
        endpoint = f"{node0.address}:{RDZV_PORT}"
        nodes = [start_node(h, configs[r], r, endpoint, node_logs[r]) for r, h in enumerate((node0, node1))]
        procs += nodes
        for r, proc in enumerate(nodes):
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"node {r} did not finish:\n{node_logs[r].read_text()[-4000:]}")
            assert proc.returncode == 0, f"node {r}:\n{node_logs[r].read_text()[-6000:]}"
        rows = read_rows(ps, seen)
    finally:
        for proc in reversed(procs):
            stop_pid(proc)
    dense_files = [out / "dense.pt" for out in outs if (out / "dense.pt").exists()]
    assert len(dense_files) == 1, f"exactly one node runs global rank 0, found {dense_files}"
    summary = json.loads((dense_files[0].parent / "summary.json").read_text())
    return {"dense": torch.load(dense_files[0]), "rows": rows, "summary": summary}


@pytest.mark.slow
def test_two_nodes_in_namespaces_equal_a_single_node_run(tmp_path):
    single = single_node_run(tmp_path)
    multi = two_node_run(tmp_path, single["seen"])
    assert multi["summary"]["world_size"] == 2 and multi["summary"]["steps"] == STEPS, multi["summary"]
    for name, value in single["dense"].items():
        diff = (multi["dense"][name] - value).abs().max().item()
        assert diff <= 1e-5, f"dense parameter {name}: max abs diff {diff}"
    assert set(multi["rows"]) == {t.name for t in OPTIMIZER_TABLES}
    for config in OPTIMIZER_TABLES:
        keys, values = single["seen"][config.name], multi["rows"][config.name]
        diff = np.abs(values - single["rows"][config.name]).max()
        assert diff <= 1e-5, f"table {config.name}: max abs diff {diff} between two nodes and one"
        init = np.asarray(EmbeddingTable(config).lookup(keys))
        assert np.abs(values - init).max() > 1e-3, f"table {config.name} did not train"


def connect_from(host: Host, address: str, port: int) -> subprocess.CompletedProcess:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1.5).close()"
    return host.run([sys.executable, "-c", code], timeout=30)


def test_host_network_links_can_be_cut_and_restored_and_leave_nothing_behind():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with host_network(2, subnet="10.200.1") as net:
        client, server = net.hosts
        code = f"import socket, time; s = socket.create_server(({server.address!r}, 7000)); time.sleep(60)"
        listener = server.popen([sys.executable, "-c", code])
        try:
            for _ in range(50):
                if connect_from(client, server.address, 7000).returncode == 0:
                    break
            assert connect_from(client, server.address, 7000).returncode == 0
            net.cut(server)
            assert connect_from(client, server.address, 7000).returncode != 0, "the cut link still carries traffic"
            net.restore(server)
            assert connect_from(client, server.address, 7000).returncode == 0
        finally:
            stop_pid(listener)
        assert sorted(remaining(net)) == sorted(
            [net.bridge, *(h.namespace for h in net.hosts), *(h.veth for h in net.hosts)]
        )
    assert remaining(net) == []


def test_launch_options_refuse_a_multi_node_job_without_an_endpoint():
    with pytest.raises(ValueError, match="--rdzv-endpoint: a job on several nodes"):
        LaunchOptions(config_path="job.toml", nnodes=2, node_rank=1)
    with pytest.raises(ValueError, match=r"--node-rank: must be in \[0, 2\), got 2"):
        LaunchOptions(config_path="job.toml", nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29400")
