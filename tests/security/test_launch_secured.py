"""`embps launch` of a whole job under mutual TLS with a token per role: shards, a worker and a
serving replica started by the launcher all find their certificates and tokens through the job
TOML, the job trains to the end, the replica follows the shards with the replica token, and no
token or private key reaches any log the job writes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from bench.ports import free_ports
from ps.security import Role
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from tests.helpers.processes import REPO_ROOT, make_job
from tests.security.certs import Pki, secured
from tests.worker.training_jobs import training_toml

TABLE = TableConfig(
    "emb", dim=8, init_scale=0.05, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.05)
)
STEPS = 20


def test_a_secured_job_trains_and_serves_end_to_end(tmp_path: Path, pki: Pki, tokens, token_files) -> None:
    out = tmp_path / "out"
    job = dataclasses.replace(make_job([TABLE], num_shards=1), security=secured(pki, token_files, mutual=True))
    train = {"workers": 1, "steps": STEPS, "batch_size": 256, "tables": ["emb"], "output_dir": str(out)}
    synthetic = {"num_dense": 4, "num_sparse": 4, "num_keys": 500, "num_batches": 1000, "num_eval_batches": 2}
    listen_port, metrics_port = free_ports(2)
    launch = f'[launch]\n[[launch.serving]]\nlisten = "127.0.0.1:{listen_port}"\nmetrics_port = {metrics_port}\n'
    path = tmp_path / "job.toml"
    path.write_text(
        training_toml(job, train, {"bottom_sizes": [8], "top_sizes": [8]}, {"source": "synthetic"}, synthetic)
        + launch
    )
    assert "[security]" in path.read_text() and "client_ca" in path.read_text()

    done = subprocess.run(
        [sys.executable, "-m", "embps", "launch", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS

    logs = {p: p.read_text(errors="replace") for p in (out / "logs").glob("*.log")}
    serve_logs = [text for p, text in logs.items() if p.name.startswith("serve-")]
    # "fresh": the replica's follower got the shard's update stream, through TLS with the replica token.
    assert serve_logs and all("mutual TLS" in t and "shard 0 is fresh" in t for t in serve_logs), serve_logs
    everything = "\n".join([done.stdout, done.stderr, *logs.values()])
    for role in Role:
        assert tokens[role] not in everything, f"the {role.value} token is in a log"
    for key in (pki.server_key, pki.client_key):
        body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
        assert not any(line in everything for line in body), f"a line of {key.name} is in a log"
    for refused in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert refused not in everything, f"{refused} in the job's logs: a process lacks its credentials"
