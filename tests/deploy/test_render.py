"""`embps deploy render`: every manifest passes kubernetes-validate (strict, Kubernetes 1.37), the
PyTorchJob passes a structural check of the fields it uses, and bad configs fail naming the field."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import embps
from deploy.render import load_deployment, render, write_manifests
from ps.job_config import load_job_config
from ps.shard.server import SERVICE_NAME as PS_SERVICE
from serving.config import load_serve_config
from serving.server import SERVICE_NAME as SERVING_SERVICE
from tests.helpers.processes import REPO_ROOT
from worker.launcher import LaunchOptions
from worker.train_config import load_training_job

EXAMPLE = REPO_ROOT / "examples" / "cluster.toml"
K8S_VERSION = kubernetes_validate.latest_version()


def rendered(tmp_path: Path, toml: str | None = None) -> dict[str, dict]:
    """Renders `toml` (default: examples/cluster.toml) into tmp_path/k8s; returns {relative path:
    manifest} read back from the written files."""
    path = EXAMPLE
    if toml is not None:
        path = tmp_path / "job.toml"
        path.write_text(toml)
    out = tmp_path / "k8s"
    written = write_manifests(render(*load_deployment(path)), out)
    files = sorted(out.rglob("*.yaml"))
    assert files == sorted(written)
    return {str(f.relative_to(out)): yaml.safe_load(f.read_text()) for f in files}


def edited(**replacements: str) -> str:
    """examples/cluster.toml with each `old` text (keyword: a label) replaced: {label: "old=>new"}."""
    text = EXAMPLE.read_text()
    for change in replacements.values():
        old, new = change.split("=>")
        assert text.count(old) >= 1, old
        text = text.replace(old, new)
    return text


def by_kind(manifests: dict[str, dict]) -> dict[str, dict]:
    return {f"{m['kind']}/{m['metadata']['name']}": m for file, m in manifests.items() if "/" not in file}


def check_pytorchjob(job: dict) -> None:
    """The PyTorchJob fields we use, as the Kubeflow training operator (kubeflow.org/v1) reads them;
    each pod template must be a valid core/v1 PodTemplateSpec."""
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert set(spec) <= {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
    assert set(spec["runPolicy"]) <= {"backoffLimit", "cleanPodPolicy", "ttlSecondsAfterFinished"}
    assert spec["runPolicy"].get("cleanPodPolicy", "None") in ("None", "Running", "All")
    assert isinstance(spec["runPolicy"].get("backoffLimit", 0), int)
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and "Master" in replicas
    assert replicas["Master"]["replicas"] == 1, "exactly one Master: it hosts MASTER_ADDR"
    for role, replica in replicas.items():
        assert set(replica) == {"replicas", "restartPolicy", "template"}, role
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1, role
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode"), role
        containers = replica["template"]["spec"]["containers"]
        assert [c["name"] for c in containers][:1] == ["pytorch"], "the operator looks for the container 'pytorch'"
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
            "template": replica["template"],
        }
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_every_manifest_validates_against_the_kubernetes_schema(tmp_path):
    manifests = rendered(tmp_path)
    kinds = sorted(f"{m['apiVersion']}/{m['kind']}" for m in manifests.values())
    assert kinds == sorted(
        [
            "v1/ConfigMap", "v1/Service", "apps/v1/StatefulSet", "apps/v1/Deployment", "v1/Service",
            "autoscaling/v2/HorizontalPodAutoscaler", "kubeflow.org/v1/PyTorchJob", "v1/Service", "batch/v1/Job",
        ]
    )  # fmt: skip
    for file, manifest in manifests.items():
        if manifest["kind"] == "PyTorchJob":
            check_pytorchjob(manifest)
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        assert manifest["metadata"]["namespace"] == "default", file


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    """The schema check above is not vacuous: a misspelt field and a wrong type both fail."""
    statefulset = rendered(tmp_path)["11-ps-statefulset.yaml"]
    statefulset["spec"]["replica"] = statefulset["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)
    job = rendered(tmp_path)["30-workers-pytorchjob.yaml"]
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        check_pytorchjob(job)


def test_ps_shards_are_a_statefulset_with_stable_names_and_grpc_probes(tmp_path):
    objects = by_kind(rendered(tmp_path))
    service, statefulset = objects["Service/demo-ps"], objects["StatefulSet/demo-ps"]
    job = load_job_config(EXAMPLE)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["serviceName"] == "demo-ps" and statefulset["spec"]["replicas"] == len(job.shards)
    assert [s.host for s in job.shards] == [f"demo-ps-{i}.demo-ps" for i in range(len(job.shards))]
    template = statefulset["spec"]["template"]
    assert template["metadata"]["labels"].items() <= statefulset["spec"]["selector"]["matchLabels"].items()
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    container = template["spec"]["containers"][0]
    script = container["command"][-1]
    assert '--shard "${HOSTNAME##*-}"' in script and "/etc/embps/job.toml" in script
    # the shell takes the shard index from the pod's ordinal
    ordinal = subprocess.run(
        ["sh", "-c", 'echo "${HOSTNAME##*-}"'], env={"HOSTNAME": "demo-ps-12"}, capture_output=True
    )
    assert ordinal.stdout == b"12\n"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": job.shards[0].port, "service": PS_SERVICE}, probe
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(job.shards[0].metrics_port)
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert container["envFrom"] == [{"secretRef": {"name": "demo-credentials", "optional": True}}]


def test_config_map_holds_the_job_file_and_a_serve_config_that_loads(tmp_path):
    objects = by_kind(rendered(tmp_path))
    data = objects["ConfigMap/demo-config"]["data"]
    assert data["job.toml"] == EXAMPLE.read_text()
    mounted = tmp_path / "etc-embps"
    mounted.mkdir()
    for name, text in data.items():
        (mounted / name).write_text(text)
    serve = load_serve_config(mounted / "serve.toml")
    assert serve.listen == "0.0.0.0:50200" and serve.metrics_port == 9200
    assert serve.export is not None and serve.export.uri == "s3://embps/exports"
    assert serve.job.addresses == ["demo-ps-0.demo-ps:50051", "demo-ps-1.demo-ps:50051"]
    assert load_training_job(mounted / "job.toml").train.workers == 2  # [deploy] is ignored by the workers


def test_serving_scales_with_an_hpa_behind_a_service(tmp_path):
    objects = by_kind(rendered(tmp_path))
    deployment, service, hpa = (
        objects[f"{k}/demo-serving"] for k in ("Deployment", "Service", "HorizontalPodAutoscaler")
    )
    assert deployment["spec"]["replicas"] == 2
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 8
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-serving"}
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["embps", "serve", "--config", "/etc/embps/serve.toml"]
    assert container["readinessProbe"]["grpc"] == {"port": 50200, "service": SERVING_SERVICE}
    assert container["livenessProbe"]["grpc"] == {"port": 50200, "service": SERVING_SERVICE}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9200"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 50200


def worker_command(container: dict, env: dict[str, str]) -> LaunchOptions:
    """The pod's `embps launch` command with $(VAR) filled in as the kubelet would, parsed by the
    real command line into the real LaunchOptions."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"]]
    assert argv[:2] == ["embps", "launch"], shlex.join(argv)
    args = embps._parser().parse_args(argv[1:])
    return LaunchOptions(
        config_path=args.config,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        start_ps=False if args.no_ps else None,
        local_addr=args.local_addr,
    )


def test_workers_run_embps_launch_on_every_node_with_gpus_from_the_config(tmp_path):
    toml = edited(gpu="gpu = 0=>gpu = 1", nnodes="nnodes = 2=>nnodes = 4")
    manifests = rendered(tmp_path, toml)
    job = manifests["30-workers-pytorchjob.yaml"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    options = worker_command(container, {"RANK": "2", "MASTER_ADDR": "demo-workers-master-0", "MASTER_PORT": "23456",
                                         "POD_IP": "10.1.2.3"})  # fmt: skip
    assert (options.nnodes, options.node_rank, options.start_ps) == (4, 2, False)
    assert options.rdzv_endpoint == "demo-workers-master-0:23456" and options.local_addr == "10.1.2.3"
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]

    indexed = manifests["alternative/31-workers-indexed-job.yaml"]
    assert indexed["spec"]["completionMode"] == "Indexed" and indexed["spec"]["completions"] == 4
    pod = indexed["spec"]["template"]["spec"]
    assert pod["subdomain"] == manifests["alternative/30-workers-service.yaml"]["metadata"]["name"] == "demo-workers"
    options = worker_command(pod["containers"][0], {"NODE_RANK": "0", "POD_IP": "10.1.2.4"})
    assert options.rdzv_endpoint == "demo-workers-0.demo-workers:29400" and options.node_rank == 0
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_worker_kind_indexed_job_swaps_which_one_kubectl_applies(tmp_path):
    manifests = rendered(tmp_path, edited(kind='kind = "pytorchjob"=>kind = "indexed-job"'))
    assert "31-workers-indexed-job.yaml" in manifests and "alternative/30-workers-pytorchjob.yaml" in manifests
    assert "30-workers-pytorchjob.yaml" not in manifests


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("min_replicas = 2=>min_replicas = -1", "deploy.serving.min_replicas: must be >= 1, got -1"),
        ("max_replicas = 8=>max_replicas = 1", "deploy.serving.max_replicas: must be >= 2, got 1"),
        ("nnodes = 2=>nnodes = 0", "deploy.worker.nnodes: must be >= 1, got 0"),
        # int32 in the API: rendered, then refused by the API server at apply.
        ("max_replicas = 8=>max_replicas = 2147483648", "deploy.serving.max_replicas: must be <= 2147483647"),
        ("min_replicas = 2=>min_replicas = 2147483648", "deploy.serving.min_replicas: must be <= 2147483647"),
        # Applied, and every pod stuck in InvalidImageName: the path of a reference is lowercase.
        ('image = "registry.example.com/embps:0.1.0"=>image = "registry.example.com/Team/embps:0.1.0"',
         "deploy.image: must be a container image reference"),
        ('image = "registry.example.com/embps:0.1.0"=>image = "registry.example.com/embps:"',
         "deploy.image: must be a container image reference"),
        ('image = "registry.example.com/embps:0.1.0"=>image = "registry.example.com/embps:0.1.0"\n'
         'etcd_image = "etcd@sha256:abc"', "deploy.etcd_image: must be a container image reference"),
        ("gpu = 0=>tpu = 1", "deploy.worker.resources.tpu: unknown resource"),
        ('memory = "2Gi"=>memory = "2 GB"', "deploy.serving.resources.memory: must be a Kubernetes quantity"),
        ('cpu = "1"=>cpu = "1\\n"', "deploy.serving.resources.cpu: must be a Kubernetes quantity"),
        ('memory = "4Gi"=>memory = "512m"', "deploy.ps.resources.memory: '512m' is a fraction of a byte"),
        ('cpu = "1"=>cpu = "0"', "deploy.serving.resources.cpu: must be > 0"),
        ("gpu = 0=>gpu = -2", "deploy.worker.resources.gpu: must be an integer >= 0"),
        ('kind = "pytorchjob"=>kind = "mpijob"', "deploy.worker.kind: must be one of"),
        ('secret = "demo-credentials"=>secret = "Bad_Name"', "deploy.secret: must be a Kubernetes name"),
        ("target_cpu_percent = 70=>target_cpu_percent = 0", "deploy.serving.target_cpu_percent"),
        ("port = 50200=>port = 9200", "deploy.serving.metrics_port: must differ"),
        ("demo-ps-1.demo-ps:50051=>10.0.0.7:50051", "shards[1].address: on Kubernetes shard 1 is the StatefulSet"),
        ("demo-ps-1.demo-ps:50051=>demo-ps-1.demo-ps:50052", "shards[1].address: every shard pod serves one port"),
        ("workers = 2 =>workers = 3 ", "train.batch_size: must be divisible by train.workers=3"),
        ("batch_size = 1024=>batch_size = 1022", "deploy.worker.nnodes: 2 nodes x train.workers=2 = 4"),
        ('job = "demo"=>job = "Demo_Job"', "job: Kubernetes object names need lowercase"),
        # Services are DNS-1035 labels: "1demo-ps" was rendered, and refused by the API server.
        ('job = "demo"=>job = "1demo"', "starting with a letter"),
        # "$" let a final newline by; the manifests then named namespace "default\n".
        ('namespace = "default"=>namespace = "default\\n"', "deploy.namespace: must be a Kubernetes name"),
        # job.toml becomes a ConfigMap: no credentials in it.
        ("every_steps = 100=>every_steps = 100\nstorage = { access_key = \"AKIAEXAMPLE\", secret_key = \"s3cr3t\" }",
         "snapshot.storage.access_key: credentials in the job file would land in a ConfigMap"),
        ('image = "registry.example.com/embps:0.1.0"=>image = " "', "deploy.image: must name a container image"),
        # Each shard pod wrote its part of a snapshot on its own disk, rank 0 the manifest on its
        # own: every round said it committed, and no step could ever be restored.
        ('uri = "s3://embps/snapshots"=>uri = "/data/snapshots"', "snapshot.uri: on Kubernetes the shards"),
        ('uri = "s3://embps/snapshots"=>uri = "file:///data/snapshots"', "snapshot.uri: on Kubernetes the shards"),
        ('uri = "s3://embps/snapshots"=>uri = "s3:embps/snapshots"', "snapshot.uri: on Kubernetes the shards"),
        ('export_uri = "s3://embps/exports"=>export_uri = "file:///exports"',
         "deploy.serving.export_uri: on Kubernetes"),
    ],
)
def test_impossible_values_fail_at_render_time_naming_the_field(tmp_path, change, field):
    path = tmp_path / "job.toml"
    path.write_text(edited(change=change))
    with pytest.raises((ValueError, TypeError)) as error:
        render(*load_deployment(path))
    assert field in str(error.value)


def run_cli(path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embps", "deploy", "render", str(path), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_the_manifests_or_reports_the_field(tmp_path):
    result = run_cli(EXAMPLE, tmp_path / "k8s")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = sorted(Path(line) for line in result.stdout.split())
    assert listed == sorted((tmp_path / "k8s").rglob("*.yaml")) and len(listed) == 9

    path = tmp_path / "job.toml"
    path.write_text(edited(change="min_replicas = 2=>min_replicas = -3"))
    result = run_cli(path, tmp_path / "bad")
    assert result.returncode == 2
    assert "deploy.serving.min_replicas: must be >= 1, got -3" in result.stderr
    assert not (tmp_path / "bad").exists()

    # The same render again into its folder: the same files. Another worker kind into it: refused,
    # naming the manifest it would leave (kubectl apply -f of the folder started both worker groups).
    again = run_cli(EXAMPLE, tmp_path / "k8s")
    assert again.returncode == 0 and sorted(Path(line) for line in again.stdout.split()) == listed
    path.write_text(edited(change='kind = "pytorchjob"=>kind = "indexed-job"'))
    other = run_cli(path, tmp_path / "k8s")
    assert other.returncode == 2, other.stdout + other.stderr
    assert "--out: " in other.stderr and "30-workers-pytorchjob.yaml" in other.stderr and "empty folder" in other.stderr
    assert sorted((tmp_path / "k8s").rglob("*.yaml")) == listed  # nothing written


def test_a_job_file_without_deploy_section_says_what_is_missing(tmp_path):
    path = tmp_path / "job.toml"
    text = EXAMPLE.read_text()
    path.write_text(text[: text.index("[deploy]")])
    assert "deploy" not in tomllib.loads(path.read_text())
    with pytest.raises(ValueError, match=r"deploy: the job has no \[deploy\] section"):
        load_deployment(path)


SECURED = """
[security]
tls_cert = "/etc/embps-secret/tls.crt"
tls_key = "/etc/embps-secret/tls.key"
tls_ca = "/etc/embps-secret/ca.crt"
client_ca = "/etc/embps-secret/client-ca.crt"
client_cert = "/etc/embps-secret/client.crt"
client_key = "/etc/embps-secret/client.key"
tokens.trainer = { file = "/etc/embps-secret/trainer.token" }
tokens.replica = { file = "/etc/embps-secret/replica.token" }
tokens.reader = { env = "EMBPS_READER_TOKEN" }
"""
# The Secret's keys each kind of pod mounts: what its processes read (tests/security/
# test_least_privilege.py runs them with only these). Servers: their certificate, key and client
# CA, the tokens they check; clients (probes included): the CA, the client certificate, their token.
SERVER_FILES = {"tls.crt", "tls.key", "client-ca.crt"}
CLIENT_FILES = {"ca.crt", "client.crt", "client.key"}
POD_KEYS = {
    "ps": SERVER_FILES | CLIENT_FILES | {"trainer.token", "replica.token"},
    "serving": SERVER_FILES | CLIENT_FILES | {"replica.token"},  # the reader's token comes from the environment
    "workers": CLIENT_FILES | {"trainer.token"},
}


def pod_specs(manifests: dict[str, dict]) -> dict[str, dict]:
    """Every pod template's spec, by file (the PyTorchJob's per replica type)."""
    specs = {}
    for file, m in manifests.items():
        if m["kind"] == "PyTorchJob":
            for kind, replica in m["spec"]["pytorchReplicaSpecs"].items():
                specs[f"{file}:{kind}"] = replica["template"]["spec"]
        elif "template" in m.get("spec", {}):
            specs[file] = m["spec"]["template"]["spec"]
    return specs


def test_a_tls_job_gets_exec_probes_and_its_files_from_a_secret(tmp_path):
    """The kubelet's grpc probe cannot speak TLS: a TLS job's shards and replicas are probed with
    `embps health` (tests/security/test_health_probe.py runs these commands against a real shard),
    and every pod mounts the files of [security] its processes read, and no other. Without
    [security] none of this is there."""
    manifests = rendered(tmp_path, EXAMPLE.read_text() + SECURED)
    for manifest in manifests.values():
        if manifest["kind"] == "PyTorchJob":
            check_pytorchjob(manifest)
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    specs = pod_specs(manifests)
    assert len(specs) == 5, sorted(specs)  # shards, serving, the PyTorchJob's replicas, the Indexed Job
    for where, spec in specs.items():
        kind = "ps" if "ps-statefulset" in where else "serving" if "serving" in where else "workers"
        volume = next(v for v in spec["volumes"] if v["name"] == "security")
        assert volume["secret"]["secretName"] == "demo-files", where
        items = volume["secret"]["items"]
        assert all(item["key"] == item["path"] for item in items), where
        assert {item["key"] for item in items} == POD_KEYS[kind], where
        assert {"name": "security", "mountPath": "/etc/embps-secret", "readOnly": True} in spec["containers"][0][
            "volumeMounts"
        ], where
    objects = by_kind(manifests)
    ps = objects["StatefulSet/demo-ps"]["spec"]["template"]["spec"]["containers"][0]
    serving = objects["Deployment/demo-serving"]["spec"]["template"]["spec"]["containers"][0]
    # A shard binds its own name (its [[shards]] host), not loopback: the probe dials that name
    # (before: 127.0.0.1, where nothing listens on a pod, so TLS shards never became ready).
    probed = (
        (ps, PS_SERVICE, '"$HOSTNAME.demo-ps"', '"$HOSTNAME.demo-ps"'),
        (serving, SERVING_SERVICE, "demo-serving", "127.0.0.1"),  # a replica listens on 0.0.0.0
    )
    for container, service, name, host in probed:
        port = container["ports"][0]["containerPort"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert "grpc" not in container[probe]
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["sh", "-c"]
            assert shlex.split(command[2])[:3] == ["exec", "embps", "health"]
            assert command[2] == (
                f"exec embps health {host}:{port} --config /etc/embps/job.toml --service {service} "
                f"--server-name {name} --timeout 4"
            )
            assert container[probe]["timeoutSeconds"] > 4  # the kubelet must not kill the probe first

    plain = pod_specs(rendered(tmp_path / "plain"))
    assert all(len(spec["volumes"]) == 1 for spec in plain.values())  # only the config map


@pytest.mark.parametrize(
    "line, field",
    [
        ('tls_cert = "/etc/embps-secret/tls.crt"=>tls_cert = "certs/tls.crt"', "security.tls_cert"),
        ('client_key = "/etc/embps-secret/client.key"=>client_key = "/etc/embps-secret/sub/client.key"',
         "security.client_key"),
        ('{ file = "/etc/embps-secret/trainer.token" }=>{ file = "/run/trainer.token" }',
         "security.tokens.trainer.file"),
    ],
)  # fmt: skip
def test_security_files_outside_the_mounted_secret_fail_naming_the_field(tmp_path, line, field):
    old, new = line.split("=>")
    path = tmp_path / "job.toml"
    path.write_text(EXAMPLE.read_text() + SECURED.replace(old, new))
    with pytest.raises(ValueError) as error:
        render(*load_deployment(path))
    assert f"{field}: on Kubernetes the files of [security] come from the Secret 'demo-files'" in str(error.value)
    assert "/etc/embps-secret/<key>" in str(error.value)


def test_a_token_from_an_environment_variable_is_refused_naming_the_role(tmp_path):
    """Every pod gets the credentials Secret as its environment: a token given as a variable
    reached every pod (the trainer's in the internet-facing serving pods, the shards' in workers)."""
    path = tmp_path / "job.toml"
    path.write_text(EXAMPLE.read_text() + SECURED.replace('{ file = "/etc/embps-secret/trainer.token" }',
                                                          '{ env = "EMBPS_TRAINER_TOKEN" }'))
    with pytest.raises(ValueError) as error:
        render(*load_deployment(path))
    assert str(error.value).startswith("security.tokens.trainer.env: on Kubernetes every pod's environment")
    assert "tokens.trainer.file = '/etc/embps-secret/<key>'" in str(error.value)


def with_standbys(endpoint: str) -> str:
    text = edited(
        s0='metrics_port = 9100\n\n[[shards]]\naddress = "demo-ps-1=>'
        'metrics_port = 9100\nstandby = "demo-ps-standby-0.demo-ps-standby:50051"\nstandby_metrics_port = 9100\n\n'
        '[[shards]]\naddress = "demo-ps-1',
        s1='address = "demo-ps-1.demo-ps:50051"\nmetrics_port = 9100\n=>'
        'address = "demo-ps-1.demo-ps:50051"\nmetrics_port = 9100\n'
        'standby = "demo-ps-standby-1.demo-ps-standby:50051"\nstandby_metrics_port = 9100\n',
    )
    return text.replace("[tables.emb]", f'[arbiter]\nendpoints = "{endpoint}"\n\n[tables.emb]', 1)


@pytest.mark.parametrize(
    ("endpoint", "added"),
    [
        ("http://demo-etcd:2379", True),
        ("http://demo-etcd.default.svc.cluster.local:2379", True),  # deploy.namespace = "default"
        ("http://etcd.infra:2379", False),
        ("http://etcd.infra.svc.cluster.local:2379", False),
        # An etcd named like the rendered one, in another namespace: it was rendered in the job's
        # namespace beside it, and that etcd's rules (port 2379, its TLS files) refused the job.
        ("http://demo-etcd.infra.svc:2379", False),
        ("http://demo-etcd.infra:12379", False),
        ("https://demo-etcd.infra.svc.cluster.local:2379", False),
    ],
)
def test_standbys_get_a_statefulset_and_etcd_is_added_or_taken(tmp_path, endpoint, added):
    manifests = rendered(tmp_path, with_standbys(endpoint))
    for manifest in manifests.values():
        if manifest["kind"] != "PyTorchJob":
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    objects = by_kind(manifests)
    standby = objects["StatefulSet/demo-ps-standby"]
    script = standby["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert script.endswith('--shard "${HOSTNAME##*-}" --standby') and "demo-ps-standby" in script
    assert objects["Service/demo-ps-standby"]["spec"]["clusterIP"] == "None"
    assert standby["spec"]["selector"] != objects["StatefulSet/demo-ps"]["spec"]["selector"]
    assert ("StatefulSet/demo-etcd" in objects, "Service/demo-etcd" in objects) == (added, added)
    if added:
        command = objects["StatefulSet/demo-etcd"]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--advertise-client-urls") + 1] == "http://demo-etcd:2379"
    wrong = with_standbys("http://demo-etcd:2379").replace("demo-ps-standby-1.demo-ps-standby", "elsewhere-1.x")
    with pytest.raises(ValueError, match=r"shards\[1\]\.standby: on Kubernetes standby 1 is the StatefulSet pod"):
        rendered(tmp_path, wrong)


def test_the_rendered_etcd_s_name_with_another_port_or_without_its_tls_files_is_refused(tmp_path):
    """The etcd rendered for the job serves 2379: an endpoint naming its host with another port was
    rendered all the same, and the shards dialled what nothing served. Over https it needs the
    files of its TLS, each named when missing."""
    with pytest.raises(ValueError, match=r"arbiter\.endpoints: the etcd rendered for this job serves port 2379"):
        rendered(tmp_path, with_standbys("http://demo-etcd:12379"))
    with pytest.raises(ValueError, match=r"arbiter\.tls_ca: required by the etcd rendered at 'https://demo-etcd:2379'"):
        rendered(tmp_path, with_standbys("https://demo-etcd:2379"))
    with pytest.raises(ValueError, match=r"deploy\.etcd_tls_cert: required by the etcd rendered"):
        rendered(tmp_path, with_arbiter_tls(with_standbys("https://demo-etcd:2379")))
    with pytest.raises(ValueError, match=r"deploy\.etcd_tls_cert: the etcd rendered at '\S+' serves http"):
        rendered(tmp_path, with_etcd_tls(with_standbys("http://demo-etcd:2379")))


ARBITER_TLS = (
    'tls_ca = "/etc/embps-secret/etcd-ca.crt"\n'
    'client_cert = "/etc/embps-secret/etcd-client.crt"\nclient_key = "/etc/embps-secret/etcd-client.key"\n\n'
)


def with_arbiter_tls(toml: str) -> str:
    return toml.replace("[tables.emb]", ARBITER_TLS + "[tables.emb]", 1)


def with_etcd_tls(toml: str) -> str:
    files = 'etcd_tls_cert = "/etc/embps-secret/etcd.crt"\netcd_tls_key = "/etc/embps-secret/etcd.key"\n'
    return toml.replace("[deploy]\n", "[deploy]\n" + files, 1)


def test_an_https_arbiter_renders_etcd_requiring_client_certificates_and_mounts_them_in_shard_pods(tmp_path):
    """Whoever writes etcd's membership records chooses each shard's primary: the rendered etcd
    was plain http, writable by any pod of the cluster. Over https it requires client
    certificates of [arbiter] tls_ca; both shard StatefulSets mount the shards' client certificate,
    no other pod does, and the kubelet's probes read /health on etcd's plain metrics port."""
    toml = with_etcd_tls(with_arbiter_tls(with_standbys("https://demo-etcd:2379")))
    manifests = rendered(tmp_path, toml)
    for manifest in manifests.values():
        if manifest["kind"] != "PyTorchJob":
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    objects = by_kind(manifests)
    etcd = objects["StatefulSet/demo-etcd"]["spec"]["template"]["spec"]
    command = etcd["containers"][0]["command"]
    arg = lambda flag: command[command.index(flag) + 1]  # noqa: E731
    assert arg("--listen-client-urls") == "https://0.0.0.0:2379"
    assert arg("--advertise-client-urls") == "https://demo-etcd:2379"
    assert "--client-cert-auth" in command and arg("--trusted-ca-file") == "/etc/embps-secret/etcd-ca.crt"
    assert (arg("--cert-file"), arg("--key-file")) == ("/etc/embps-secret/etcd.crt", "/etc/embps-secret/etcd.key")
    health_port = int(arg("--listen-metrics-urls").rsplit(":", 1)[1])
    assert etcd["containers"][0]["readinessProbe"]["httpGet"]["port"] == health_port
    etcd_keys = {item["key"] for item in etcd["volumes"][0]["secret"]["items"]}
    assert etcd_keys == {"etcd.crt", "etcd.key", "etcd-ca.crt"}
    client = {"etcd-ca.crt", "etcd-client.crt", "etcd-client.key"}
    for where, spec in pod_specs(manifests).items():
        if "etcd" in where:
            continue
        volumes = [v for v in spec["volumes"] if v["name"] == "security"]
        keys = {item["key"] for item in volumes[0]["secret"]["items"]} if volumes else set()
        shard = "ps-statefulset" in where or "ps-standby-statefulset" in where
        assert (keys == client) == shard, (where, keys)
    outside = toml.replace('client_key = "/etc/embps-secret/etcd-client.key"', 'client_key = "/tmp/etcd-client.key"')
    with pytest.raises(ValueError, match=r"arbiter\.client_key: on Kubernetes the files of \[arbiter\] come from"):
        rendered(tmp_path, outside)


def test_a_secured_job_with_standbys_needs_the_shard_token_and_mounts_it_in_shard_pods_alone(tmp_path):
    """The shard role's token opens Replication on a shard's port (ps/security/server_auth.py):
    both StatefulSets of shards (primaries and standbys) mount it, no worker or replica does, and a
    secured job with standbys and no such token is refused naming the field."""
    toml = with_standbys("http://demo-etcd:2379") + SECURED
    with pytest.raises(ValueError, match=r"security\.tokens\.shard: a job with standbys and tokens needs"):
        rendered(tmp_path, toml)
    manifests = rendered(tmp_path, toml + 'tokens.shard = { file = "/etc/embps-secret/shard.token" }\n')
    specs = pod_specs(manifests)
    shard_pods = [where for where in specs if "ps-statefulset" in where or "ps-standby-statefulset" in where]
    assert len(shard_pods) == 2, sorted(specs)
    for where, spec in specs.items():
        if "etcd" in where:
            continue
        volume = next(v for v in spec["volumes"] if v["name"] == "security")
        keys = {item["key"] for item in volume["secret"]["items"]}
        assert ("shard.token" in keys) == (where in shard_pods), (where, keys)
