"""A shard that restores a snapshot binds its port at once and answers NOT_SERVING (its calls
UNAVAILABLE, saying how far the restore got) until the tables are loaded, with the progress in its
log and metrics. The restore is held up by a real slow storage: the test's S3 server, stopped
(SIGSTOP) until the test has seen the shard answer while it restores."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import wire
from ps.job_config import SnapshotConfig, dump_job_config
from ps.rpc import ps_pb2, ps_pb2_grpc
from ps.shard.server import SERVICE_NAME, bind_shard
from ps.snapshot.ops import ShardSnapshotter
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from tests.helpers.processes import REPO_ROOT, make_job, start_shard, wait_serving
from tests.helpers.waiting import wait_until

TABLE = TableConfig(name="emb", dim=8, init_scale=0.1, optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1))


def health(channel: grpc.Channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
    except grpc.RpcError:
        return None


def test_a_restoring_shard_is_bound_at_once_and_answers_not_serving_with_its_progress(tmp_path, s3):
    uri = s3.fresh_uri()
    job = make_job([TABLE])
    job = replace(job, snapshot=SnapshotConfig(uri, storage=s3.config))
    table = EmbeddingTable(TABLE)
    keys = np.arange(1, 5001, dtype=np.int64)
    table.apply_gradients(keys, np.ones((keys.shape[0], TABLE.dim), dtype=np.float32))
    ShardSnapshotter({"emb": table}, 0).snapshot(uri, job.job, 10, storage_config=s3.config)
    config_path = tmp_path / "job.toml"
    config_path.write_text(dump_job_config(job))
    log_path = tmp_path / "shard.log"
    address = job.shards[0].address
    os.kill(s3.server.proc.pid, signal.SIGSTOP)  # storage stops answering: the restore cannot finish
    proc = start_shard(config_path, 0, log_path, args=("--restore-step", "10"))
    try:
        with grpc.insecure_channel(address) as channel:
            try:
                wait_until(lambda: health(channel) is not None, "the shard's port to answer", timeout=60)
                assert health(channel).status == health_pb2.HealthCheckResponse.NOT_SERVING
                request = ps_pb2.LookupRequest(table="emb", keys=wire.encode_keys(keys[:3]), dim=TABLE.dim)
                with pytest.raises(grpc.RpcError) as refused:
                    ps_pb2_grpc.ParameterServerStub(channel).Lookup(request, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shard 0 is restoring snapshot step 10" in refused.value.details()
            finally:
                os.kill(s3.server.proc.pid, signal.SIGCONT)
            wait_serving(address, proc, log_path=log_path)
            reply = ps_pb2_grpc.ParameterServerStub(channel).Lookup(
                ps_pb2.LookupRequest(table="emb", keys=wire.encode_keys(keys), dim=TABLE.dim), timeout=5
            )
        values = np.frombuffer(reply.values, dtype=np.float32).reshape(-1, TABLE.dim)
        np.testing.assert_array_equal(values, table.lookup(keys).numpy())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{job.shards[0].metrics_port}/metrics").read().decode()
        size = _sample(metrics, 'embps_restore_size_bytes{shard="0"}')
        assert size > 5000 * TABLE.dim * 4
        assert _sample(metrics, 'embps_restore_read_bytes{shard="0"}') == size
        assert _sample(metrics, 'embps_requests_total{code="UNAVAILABLE",method="Lookup",table=""}') == 1
        log = log_path.read_text()
        assert "NOT_SERVING until snapshot step 10 is restored" in log
        assert "restoring snapshot step 10: " in log and "(100%)" in log
        assert "restored snapshot step 10" in log
    finally:
        os.kill(s3.server.proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


def _missing_cuda_device() -> str:
    """A CUDA device this machine lacks: any, without CUDA; one past the last, with it."""
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_a_shard_refuses_at_start_a_table_on_a_device_this_machine_lacks(tmp_path):
    device = _missing_cuda_device()
    job = make_job([TABLE, replace(TABLE, name="gpu_emb", device=device)])
    config_path = tmp_path / "job.toml"
    config_path.write_text(dump_job_config(job))
    done = subprocess.run(
        [sys.executable, "-m", "embps", "ps", "--config", str(config_path), "--shard", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr  # a config error's status (embps.cli)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"embps ps: tables.gpu_emb.device in {config_path}: {device!r} cannot hold rows on this machine: "
    ), done.stderr


def test_a_starting_shard_answers_a_made_up_method_unimplemented_and_counts_only_its_own():
    """Before its services open, a shard answered every "/embps." name UNAVAILABLE and counted it
    under its own method label: series made by any caller, never freed."""

    async def run() -> list[tuple[str, str]]:
        port = await bind_shard(make_job([TABLE]), 0, "127.0.0.1:0")
        await port.server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port.port}") as channel:
                for method in ("/embps.v1.ParameterServer/NoSuchMethod", "/embps.v1.ParameterServer/Stats"):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await channel.unary_unary(method)(b"", timeout=5)
                    codes.append((method, refused.value.code().name))
        finally:
            await port.server.stop(None)
        labels = [s.labels["method"] for m in port.metrics.requests.collect() for s in m.samples]
        return codes, sorted(set(labels))

    codes, methods = asyncio.run(run())
    assert codes == [
        ("/embps.v1.ParameterServer/NoSuchMethod", "UNIMPLEMENTED"), ("/embps.v1.ParameterServer/Stats", "UNAVAILABLE")
    ]
    assert methods == ["Stats"]
