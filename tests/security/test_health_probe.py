"""`embps health` against a real shard under mutual TLS, and the exec probes `embps deploy render`
writes for a TLS job, run as the kubelet would run them (sh -c, $HOSTNAME set), against that shard.

What must hold: SERVING gives exit 0; a certificate that does not name the server name, a
plaintext probe, an unknown health service and a closed port give exit 1 with one line saying
why, within the timeout; a bad address or a broken config gives exit 2 naming it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.ports import free_ports
from deploy.render import load_deployment, render
from ps.job_config import dump_job_config
from ps.shard.server import SERVICE_NAME as PS_SERVICE
from ps.table.config import TableConfig
from tests.helpers.processes import REPO_ROOT, ShardCluster, make_job
from tests.security.certs import secured

_EXAMPLE = REPO_ROOT / "examples" / "cluster.toml"


@pytest.fixture(scope="module")
def cluster(pki, tmp_path_factory):
    job = dataclasses.replace(make_job([TableConfig("user", dim=4)]), security=secured(pki, mutual=True))
    with ShardCluster.start(job, tmp_path_factory.mktemp("probe")) as cluster:
        yield cluster


def health(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "embps", "health", *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env=env,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def test_health_exit_status_says_serving_or_why_not(cluster, pki, tmp_path):
    address, config = cluster.job.shards[0].address, str(cluster.config_path)
    code, out, _ = health(address, "--config", config, "--service", PS_SERVICE, "--server-name", "probe-serving")
    assert code == 0 and "SERVING" in out, out
    code, out, _ = health(address, "--config", config)  # "": the whole server
    assert code == 0, out

    code, out, _ = health(address, "--config", config, "--server-name", "elsewhere.example", "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in out, out  # the certificate does not name it
    code, out, _ = health(address, "--timeout", "2")  # plaintext against a TLS port
    assert code == 1 and "UNAVAILABLE" in out, out
    plain_tls = dataclasses.replace(cluster.job, security=secured(pki, mutual=False))  # no client certificate
    (tmp_path / "no-client-cert.toml").write_text(dump_job_config(plain_tls))
    code, out, _ = health(address, "--config", str(tmp_path / "no-client-cert.toml"), "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in out, out
    code, out, _ = health(address, "--config", config, "--service", "no.such.Service")
    assert code == 1 and "NOT_FOUND" in out, out
    (closed,) = free_ports(1)
    code, out, elapsed = health(f"127.0.0.1:{closed}", "--config", config, "--timeout", "1")
    assert code == 1 and "127.0.0.1" in out and elapsed < 20, (out, elapsed)

    code, out, _ = health("no-port-here")
    assert code == 2 and "address" in out, out
    code, out, _ = health(address, "--timeout", "0")
    assert code == 2 and "timeout" in out, out
    code, out, _ = health(address, "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in out, out
    code, out, _ = health(address, "--server-name", "probe-serving")  # a TLS name without TLS
    assert code == 2 and "server_name" in out, out


def test_the_rendered_exec_probes_pass_against_a_mutual_tls_shard(cluster, tmp_path):
    """Renders a TLS job named "probe", then runs each PS probe's command as the kubelet would: in
    the pod, $HOSTNAME is the StatefulSet pod's name and /etc/embps/job.toml the job file; here the
    job file is the running shard's and the port its port."""
    port = cluster.job.shards[0].port
    text = _EXAMPLE.read_text().replace('job = "demo"', 'job = "probe"').replace("demo-ps-", "probe-ps-")
    text = text.replace(".demo-ps:", ".probe-ps:")
    text += (
        '\n[security]\ntls_cert = "/etc/embps-secret/tls.crt"\ntls_key = "/etc/embps-secret/tls.key"\n'
        'tls_ca = "/etc/embps-secret/ca.crt"\nclient_ca = "/etc/embps-secret/client-ca.crt"\n'
        'client_cert = "/etc/embps-secret/client.crt"\nclient_key = "/etc/embps-secret/client.key"\n'
    )
    job_path = tmp_path / "job.toml"
    job_path.write_text(text)
    manifests = render(*load_deployment(job_path))
    container = manifests["11-ps-statefulset.yaml"]["spec"]["template"]["spec"]["containers"][0]
    rendered_port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        shell, flag, script = container[probe]["exec"]["command"]
        assert (shell, flag) == ("sh", "-c")
        # The probe dials the name the shard binds in the pod (its [[shards]] host), which the
        # pod's DNS resolves; this shard listens on loopback: the address stands in for that name.
        dialed = f'"$HOSTNAME.probe-ps":{rendered_port}'
        assert f"exec embps health {dialed} " in script, script
        local = script.replace(dialed, f"127.0.0.1:{port}")
        local = local.replace("/etc/embps/job.toml", str(cluster.config_path))
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOSTNAME": "probe-ps-0"}
        done = subprocess.run(["sh", "-c", local], capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)
        assert done.returncode == 0, (probe, local, done.stdout, done.stderr)
        assert "SERVING" in done.stdout
    # The serving replica's probe checks the certificate against "<job>-serving".
    serving = manifests["20-serving-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert "--server-name probe-serving" in serving["readinessProbe"]["exec"]["command"][2]
