"""Each kind of process runs with only the files of `[security]` that `embps deploy render` mounts
in its pod (deploy.render.pod_security_files), under mutual TLS with a token file per role: a
shard, a serving replica following it, their `embps health` probes, and a worker that trains
against the shard. Each gets a directory holding its own files only, and a job TOML whose
[security] names every file in that directory, so a process that read a file its pod does not
get would fail to find it. The workers' files cannot start a shard: they hold neither the tokens
a shard checks nor its certificate and key."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from deploy.render import PodKind, pod_security_files
from ps.job_config import JobConfig, dump_job_config
from ps.security import Role, SecurityConfig, Tokens, TokenSource
from ps.shard.server import SERVICE_NAME as PS_SERVICE
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from serving.server import SERVICE_NAME as SERVING_SERVICE
from tests.helpers.processes import REPO_ROOT, ShardCluster, make_job
from tests.security.certs import Pki, secured
from tests.serving.replicas import ServingReplica
from tests.worker.training_jobs import training_toml

TABLE = TableConfig("emb", dim=8, init_scale=0.05, optimizer=OptimizerConfig(kind=OptimizerKind.SGD, lr=0.05))
STEPS = 6
# What each kind of pod must hold, written out here rather than taken from the function under test.
SERVER = {"tls_cert", "tls_key", "client_ca"}
CLIENT = {"tls_ca", "client_cert", "client_key"}
EXPECTED = {
    PodKind.PS: SERVER | CLIENT | {"tokens.trainer.file", "tokens.replica.file", "tokens.shard.file"},
    PodKind.SERVING: SERVER | CLIENT | {"tokens.reader.file", "tokens.replica.file"},
    PodKind.WORKERS: CLIENT | {"tokens.trainer.file"},
}
TLS_FIELDS = ("tls_cert", "tls_key", "tls_ca", "client_ca", "client_cert", "client_key")


def pod_view(security: SecurityConfig, kind: PodKind, directory: Path) -> SecurityConfig:
    """`security` as a pod of `kind` sees it: every path in `directory`, which holds that pod's files only."""
    directory.mkdir(parents=True)
    for where, path in pod_security_files(security, kind).items():
        shutil.copyfile(path, directory / where)
    moved = {name: str(directory / f"security.{name}") for name in TLS_FIELDS if getattr(security, name) is not None}
    tokens = Tokens(**{
        role.value: TokenSource(file=str(directory / f"security.tokens.{role.value}.file"))
        for role in Role
        if getattr(security.tokens, role.value) is not None
    })
    return dataclasses.replace(security, tokens=tokens, **moved)


def health(address: str, config: Path, service: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embps", "health", address, "--config", str(config), "--service", service],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )


def test_each_process_runs_with_only_its_pods_files(tmp_path: Path, pki: Pki, tokens, token_files) -> None:
    security = secured(pki, token_files, mutual=True)
    for kind, fields in EXPECTED.items():
        assert set(pod_security_files(security, kind)) == {f"security.{f}" for f in fields}, kind
    job: JobConfig = make_job([TABLE], num_shards=1)
    views = {kind: pod_view(security, kind, tmp_path / f"{kind}-files") for kind in PodKind}

    ps_job = dataclasses.replace(job, security=views[PodKind.PS])
    with ShardCluster.start(ps_job, tmp_path / "ps") as cluster:
        address = job.shards[0].address
        probe = health(address, cluster.config_path, PS_SERVICE)
        assert probe.returncode == 0, probe.stdout + probe.stderr

        serving_job = dataclasses.replace(job, security=views[PodKind.SERVING])
        serving_config = tmp_path / "serving-job.toml"
        serving_config.write_text(dump_job_config(serving_job))
        serving_view = dataclasses.replace(cluster, job=serving_job, config_path=serving_config, procs=[])
        with ServingReplica.start(serving_view, tmp_path / "serving") as replica:
            probe = health(replica.config.listen, serving_config, SERVING_SERVICE)
            assert probe.returncode == 0, probe.stdout + probe.stderr

            out = tmp_path / "out"
            worker_job = dataclasses.replace(job, security=views[PodKind.WORKERS])
            train = {"workers": 1, "steps": STEPS, "batch_size": 64, "tables": ["emb"], "output_dir": str(out)}
            synthetic = {"num_dense": 4, "num_sparse": 4, "num_keys": 200, "num_batches": 100, "num_eval_batches": 1}
            worker_config = tmp_path / "worker-job.toml"
            worker_config.write_text(
                training_toml(worker_job, train, {"bottom_sizes": [8], "top_sizes": [8]}, {"source": "synthetic"},
                              synthetic)
            )
            done = subprocess.run(
                [sys.executable, "-m", "embps", "launch", str(worker_config), "--no-ps"],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert json.loads((out / "summary.json").read_text())["steps"] == STEPS

            # The replica followed the shard's pushes with the replica token from its own files,
            # and answers lookups with the reader's token.
            replica.wait_version("emb", 0, STEPS)
            (shard_status,) = replica.status().shards
            assert shard_status.connected and shard_status.rows > 0, shard_status
            values, _, _ = replica.lookup("emb", np.arange(1, 50, dtype=np.int64))
            assert values.shape == (49, 8)
            log = replica.log() + cluster.log(0)
            assert "UNAUTHENTICATED" not in log and "PERMISSION_DENIED" not in log

    # The workers' files start no shard; the command says which file is missing, without a traceback.
    shard = subprocess.run(
        [sys.executable, "-m", "embps", "ps", "--config", str(worker_config), "--shard", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert shard.returncode == 2, shard.stderr
    assert "file not found" in shard.stderr and "Traceback" not in shard.stderr, shard.stderr
