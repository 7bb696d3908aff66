"""`embps serve` on a port that is taken (its listen port, with or without the gate, or its
metrics port) exits 1 with one line naming the field, as `embps ps` does; it ended in a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ps.job_config import dump_job_config
from ps.process.python_command import python_path
from ps.table.config import TableConfig
from serving.config import dump_serve_config
from tests.helpers.processes import REPO_ROOT, make_job
from tests.serving.replicas import serve_config


@pytest.mark.parametrize("gate", ["1", "0"], ids=["gate", "no-gate"])
@pytest.mark.parametrize("taken", ["listen", "metrics_port"])
def test_a_taken_port_is_one_line_naming_the_field(tmp_path: Path, taken: str, gate: str):
    job = make_job([TableConfig("user", dim=4)], num_shards=1)
    job_path = tmp_path / "job.toml"
    job_path.write_text(dump_job_config(job))
    config = serve_config(SimpleNamespace(job=job))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        port = int(config.listen.rsplit(":", 1)[1]) if taken == "listen" else config.metrics_port
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        config_path = tmp_path / "serve.toml"
        config_path.write_text(dump_serve_config(config, str(job_path)))
        env = {**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT)), "EMBPS_SERVING_GATE": gate}
        done = subprocess.run([sys.executable, "-m", "embps", "serve", "--config", str(config_path)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    expected = f"listen: cannot bind {config.listen}" if taken == "listen" else "metrics_port: cannot serve /metrics"
    assert expected in output, output
