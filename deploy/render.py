"""`embps deploy render job.toml --out DIR`: Kubernetes manifests from the job's own TOML.

    DIR/00-config.yaml                 ConfigMap <job>-config: job.toml (verbatim) + serve.toml
    DIR/10-ps-service.yaml             headless Service <job>-ps: stable names <job>-ps-<i>.<job>-ps
    DIR/11-ps-statefulset.yaml         StatefulSet <job>-ps: pod i runs `embps ps --shard i`
    DIR/12-ps-standby-*.yaml           with [[shards]] standby: headless Service and StatefulSet
                                       <job>-ps-standby, pod i runs `embps ps --shard i --standby`
    DIR/05-etcd-*.yaml                 with [arbiter] endpoints = "http[s]://<job>-etcd:2379" (or
                                       <job>-etcd.<namespace>...): a one-member etcd (Service +
                                       StatefulSet with a volume; over https with client
                                       certificates required); any other endpoint (<job>-etcd of
                                       another namespace too) is an existing etcd: nothing is added
    DIR/20-serving-deployment.yaml     Deployment <job>-serving: `embps serve`
    DIR/21-serving-service.yaml        Service <job>-serving (gRPC)
    DIR/22-serving-hpa.yaml            HorizontalPodAutoscaler on CPU
    DIR/30-workers-*.yaml              the workers as deploy.worker.kind says: a Kubeflow
                                       PyTorchJob, or a headless Service + an Indexed batch/v1 Job
    DIR/alternative/*.yaml             the workers as the other kind

The PS shards bind and the workers dial the addresses of the job file, so `[[shards]]` must name
the StatefulSet's pods: `<job>-ps-<i>.<job>-ps[.<namespace>...]:PORT`, one port for all. Every
server pod has gRPC health probes and Prometheus scrape annotations; every pod gets the
`deploy.secret` Secret as environment (S3 credentials, tokens).

A job with `[security]`: the files it names (certificates, keys, token files) come from the
`deploy.files_secret` Secret, mounted read-only at /etc/embps-secret, so each path must be
/etc/embps-secret/<key>. Each pod gets only the keys its processes read (`pod_security_files`):
a worker pod never holds the servers' private key or another role's token. With TLS the probes
are exec probes running `embps health` (the kubelet's `grpc:` probe speaks plaintext only): they
dial 127.0.0.1 and check the server's certificate against the name clients dial (a shard's host in
[[shards]]; `<job>-serving` for a replica, so the certificate must name it). Without TLS they are
the kubelet's `grpc:` probes.
"""

from __future__ import annotations

import re
import sys
import urllib.parse
from enum import StrEnum
from pathlib import Path

import yaml

from deploy.config import DNS_LABEL, DeployConfig, WorkerKind, parse_deploy_config
from deploy.standby import check_standbys, standby_manifests
from ps import toml_writer
from ps.job_config import ShardConfig
from ps.security import Role, SecurityConfig, ps_port_policy, serving_port_policy
from ps.toml_reader import read_toml_text, toml_path
from worker.train_config import TrainingJob, parse_training_job

CONFIG_DIR = "/etc/embps"
SECRET_DIR = "/etc/embps-secret"  # deploy.files_secret, where the files of [security] must be
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # a Secret's data key
# gRPC health service names the probes ask for (ps.server.SERVICE_NAME, serving.server.SERVICE_NAME)
PS_HEALTH_SERVICE = "embps.v1.ParameterServer"
SERVING_HEALTH_SERVICE = "embps.v1.Serving"
PYTORCHJOB_PORT = 23456  # the training operator's MASTER_PORT when the port is named pytorchjob-port
_MAX_JOB_NAME = 40  # leaves room for "-workers-<i>" and friends in 63-character names


_SHARED_SCHEMES = ("s3", "hdfs")  # snapshot and export storage every pod reaches


def load_deployment(path: str | Path) -> tuple[TrainingJob, DeployConfig, str]:
    """Reads job.toml: (the training job, its [deploy] section, the file's text); errors name the field."""
    path = toml_path(path)
    text, data = read_toml_text(path)
    deploy = parse_deploy_config(data.get("deploy"))
    job = parse_training_job({k: v for k, v in data.items() if k != "deploy"})
    return job, deploy, text


def render(job: TrainingJob, deploy: DeployConfig, job_toml: str) -> dict[str, dict]:
    """Every manifest, keyed by its file name under the output folder."""
    _check_job(job, deploy)
    _check_security_files(job, deploy)
    name = job.ps.job
    worker_files = {
        WorkerKind.PYTORCHJOB: {"30-workers-pytorchjob.yaml": pytorchjob(job, deploy)},
        WorkerKind.INDEXED_JOB: {
            "30-workers-service.yaml": _headless_service(f"{name}-workers", name, "worker", deploy.worker.rdzv_port),
            "31-workers-indexed-job.yaml": indexed_job(job, deploy),
        },
    }
    chosen = deploy.worker.kind
    other = WorkerKind.INDEXED_JOB if chosen == WorkerKind.PYTORCHJOB else WorkerKind.PYTORCHJOB
    manifests = {
        "00-config.yaml": config_map(job, deploy, job_toml),
        "10-ps-service.yaml": _headless_service(f"{name}-ps", name, "ps", job.ps.shards[0].port),
        "11-ps-statefulset.yaml": ps_statefulset(job, deploy),
        **standby_manifests(job, deploy),
        "20-serving-deployment.yaml": serving_deployment(job, deploy),
        "21-serving-service.yaml": serving_service(job, deploy),
        "22-serving-hpa.yaml": serving_hpa(job, deploy),
        **worker_files[chosen],
        **{f"alternative/{file}": manifest for file, manifest in worker_files[other].items()},
    }
    for manifest in manifests.values():
        manifest["metadata"]["namespace"] = deploy.namespace
    return manifests


def write_manifests(manifests: dict[str, dict], out: Path) -> list[Path]:
    """Writes each manifest as YAML under `out` (created); returns the paths in order."""
    paths = []
    for file, manifest in manifests.items():
        path = out / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False))
        paths.append(path)
    return paths


def render_cli(config_path: str, out: str) -> int:
    """`embps deploy render`: exit 0 with the files listed, or 2 with the error on one line of stderr."""
    if not out or (Path(out).exists() and not Path(out).is_dir()):
        print(f"embps deploy render: --out: must name a folder for the manifests, got {out!r}", file=sys.stderr)
        return 2
    try:
        job, deploy, text = load_deployment(config_path)
        manifests = render(job, deploy, text)
    except (ValueError, TypeError) as exc:  # the loaders' message, which names the field, unchanged
        message = str(exc) if str(exc).startswith(f"{config_path}: ") else f"{config_path}: {exc}"  # named once
        print(f"embps deploy render: {message}", file=sys.stderr)
        return 2
    # Manifests of an earlier render that this one does not write (another worker kind, a section
    # since removed) stayed beside the new ones: `kubectl apply -f` of the folder then started both
    # worker groups, pushing the same job twice.
    held = {path.relative_to(out).as_posix() for path in Path(out).rglob("*.y*ml")} if Path(out).is_dir() else set()
    stale = sorted(held - set(manifests))
    if stale:
        print(
            f"embps deploy render: --out: {out} holds manifests this render does not write ({', '.join(stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''}); `kubectl apply -f` would apply them too: use an empty folder",
            file=sys.stderr,
        )
        return 2
    for path in write_manifests(manifests, Path(out)):
        print(path)
    return 0


def _check_job(job: TrainingJob, deploy: DeployConfig) -> None:
    """The parts of the job that Kubernetes constrains: names, shard addresses, world size."""
    name = job.ps.job
    # Services (<job>-ps, <job>-serving, ...) are DNS-1035 labels: a letter first.
    if len(name) > _MAX_JOB_NAME or not DNS_LABEL.fullmatch(name) or not name[0].isalpha():
        raise ValueError(
            f"job: Kubernetes object names need lowercase letters, digits and '-' (at most {_MAX_JOB_NAME} "
            f"characters, starting with a letter and ending alphanumeric), got {name!r}"
        )
    shared = [("snapshot.uri", job.ps.snapshot.uri if job.ps.snapshot is not None else None),
              ("deploy.serving.export_uri", deploy.serving.export_uri if deploy.serving is not None else None)]
    for field, uri in shared:
        # Without "://" storage reads it as a local path, whatever it starts with ("s3:bucket/x").
        if uri is not None and ("://" not in uri or urllib.parse.urlsplit(uri).scheme.lower() not in _SHARED_SCHEMES):
            # Every shard pod writes its own part of a snapshot and rank 0 its manifest: on a
            # pod's own disk, no step could ever be restored (each round said it committed).
            raise ValueError(
                f"{field}: on Kubernetes the shards, the workers and the replicas need storage they share "
                f"({', '.join(f'{s}://' for s in _SHARED_SCHEMES)}); a path on a pod's own disk is not, got {uri!r}"
            )
    storage = job.ps.snapshot.storage if job.ps.snapshot is not None else None
    for field in ("access_key", "secret_key", "session_token"):
        if storage is not None and getattr(storage, field) is not None:
            # job.toml becomes a ConfigMap, which Kubernetes does not keep as it keeps a Secret.
            raise ValueError(
                f"snapshot.storage.{field}: credentials in the job file would land in a ConfigMap; give them "
                "as AWS_* variables in deploy.secret instead"
            )
    first = job.ps.shards[0]
    for i, shard in enumerate(job.ps.shards):
        labels = shard.host.split(".")
        if labels[:2] != [f"{name}-ps-{i}", f"{name}-ps"] or (len(labels) > 2 and labels[2] != deploy.namespace):
            raise ValueError(
                f"shards[{i}].address: on Kubernetes shard {i} is the StatefulSet pod "
                f"'{name}-ps-{i}.{name}-ps[.{deploy.namespace}.svc.cluster.local]:PORT', got {shard.address!r}"
            )
        if shard.port != first.port:
            raise ValueError(f"shards[{i}].address: every shard pod serves one port ({first.port}), got {shard.port}")
        if shard.metrics_port != first.metrics_port or shard.metrics_port in (0, shard.port):
            raise ValueError(
                f"shards[{i}].metrics_port: every shard pod needs the same fixed metrics port, not 0 and not the "
                f"gRPC port, for Prometheus to scrape (shards[0] has {first.metrics_port}), got {shard.metrics_port}"
            )
    check_standbys(job, deploy)
    world_size = deploy.worker.nnodes * job.train.workers
    if job.train.batch_size % world_size:
        raise ValueError(
            f"deploy.worker.nnodes: {deploy.worker.nnodes} nodes x train.workers={job.train.workers} = {world_size} "
            f"workers must divide train.batch_size={job.train.batch_size}"
        )


def security_files(security: SecurityConfig) -> dict[str, str]:
    """The files `[security]` names: {field: path}, e.g. {"security.tls_cert": "/etc/embps-secret/tls.crt"}."""
    files = {
        f"security.{name}": getattr(security, name)
        for name in ("tls_cert", "tls_key", "tls_ca", "client_ca", "client_cert", "client_key")
        if getattr(security, name) is not None
    }
    for role in Role:
        source = getattr(security.tokens, role.value)
        if source is not None and source.file is not None:
            files[f"security.tokens.{role.value}.file"] = source.file
    return files


def arbiter_files(job: TrainingJob, deploy: DeployConfig) -> dict[str, str]:
    """The files of the arbiter's TLS: what shards read (`[arbiter]` tls_ca, client_cert,
    client_key) and the rendered etcd's own certificate and key (deploy.etcd_tls_*): {field: path}."""
    files = {}
    if job.ps.arbiter is not None:
        for name in ("tls_ca", "client_cert", "client_key"):
            if getattr(job.ps.arbiter, name) is not None:
                files[f"arbiter.{name}"] = getattr(job.ps.arbiter, name)
    for name in ("etcd_tls_cert", "etcd_tls_key"):
        if getattr(deploy, name) is not None:
            files[f"deploy.{name}"] = getattr(deploy, name)
    return files


class PodKind(StrEnum):
    PS = "ps"
    SERVING = "serving"
    WORKERS = "workers"


_SERVER_TLS = ("tls_cert", "tls_key", "client_ca")
_CLIENT_TLS = ("tls_ca", "client_cert", "client_key")


def pod_security_files(security: SecurityConfig, kind: PodKind) -> dict[str, str]:
    """The files of `[security]` that the processes of one kind of pod read: {field: path}.

    A server reads its certificate, key and client CA, and the tokens of the roles its port accepts
    (ps.security.server_interceptors: a shard trainer and replica, a replica reader); a client reads
    the CA, its own certificate and key, and its role's token (a replica follows the shards as
    replica, a worker pushes as trainer). The exec probes of server pods are clients without a token.
    tests/security/test_least_privilege.py runs each kind of process with only these files."""
    if kind is PodKind.WORKERS:
        fields, roles = _CLIENT_TLS, {Role.TRAINER}
    elif kind is PodKind.PS:
        fields, roles = _SERVER_TLS + _CLIENT_TLS, {role for roles in ps_port_policy().values() for role in roles}
    else:
        served = {role for roles in serving_port_policy().values() for role in roles}
        fields, roles = _SERVER_TLS + _CLIENT_TLS, served | {Role.REPLICA}
    wanted = {f"security.{name}" for name in fields} | {f"security.tokens.{role.value}.file" for role in roles}
    return {where: path for where, path in security_files(security).items() if where in wanted}


def _files_secret(job: TrainingJob, deploy: DeployConfig) -> str:
    return deploy.files_secret if deploy.files_secret is not None else f"{job.ps.job}-files"


def _check_security_files(job: TrainingJob, deploy: DeployConfig) -> None:
    for role in (Role.TRAINER, Role.REPLICA, Role.SHARD):  # the reader's may reach every pod: it only reads rows
        source = getattr(job.ps.security.tokens, role.value)
        if source is not None and source.env is not None:
            # Every pod gets the whole credentials Secret as its environment: a worker would hold the
            # shards' token, an internet-facing serving pod the trainer's. Files go to each pod alone.
            raise ValueError(
                f"security.tokens.{role.value}.env: on Kubernetes every pod's environment holds the same "
                f"variables, so each role's token would reach every pod; give it as a file of the Secret "
                f"{_files_secret(job, deploy)!r}: tokens.{role.value}.file = '{SECRET_DIR}/<key>'"
            )
    for where, path in {**security_files(job.ps.security), **arbiter_files(job, deploy)}.items():
        directory, _, key = path.rpartition("/")
        if directory != SECRET_DIR or not _SECRET_KEY.fullmatch(key):
            raise ValueError(
                f"{where}: on Kubernetes the files of [{where.split('.')[0]}] come from the Secret "
                f"{_files_secret(job, deploy)!r} "
                f"(deploy.files_secret) mounted at {SECRET_DIR}: write '{SECRET_DIR}/<key>', got {path!r}"
            )


def _labels(job: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "embps",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
    }


def _metadata(name: str, job: str, component: str) -> dict:
    return {"name": name, "labels": _labels(job, component)}


def _scrape(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _resources(resources) -> dict:
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    limits = dict(amounts)
    if resources.gpu:
        limits["nvidia.com/gpu"] = resources.gpu
    return {"requests": amounts, "limits": limits}


def _health_probes(port: int, service: str, security: SecurityConfig, server_name: str, host: str) -> dict:
    """Readiness, liveness and a startup allowance (restoring a snapshot or loading an export).
    Plaintext: the kubelet's `grpc:` probe. TLS: `embps health host:port` with the job's [security],
    checking the certificate against server_name; host is where the server listens (a shard binds
    its own name, not loopback), both shell words that may expand $HOSTNAME. An exec probe is a
    Python process of ~0.14 s CPU, counted in the pod's CPU limit, so those come half as often
    (readiness every 10 s, liveness every 20 s: ~2% of a core)."""
    if security.tls:
        script = (
            f"exec embps health {host}:{port} --config {CONFIG_DIR}/job.toml --service {service} "
            f"--server-name {server_name} --timeout 4"
        )
        check, slower = {"exec": {"command": ["sh", "-c", script]}}, 2
    else:
        check, slower = {"grpc": {"port": port, "service": service}}, 1
    return {
        "startupProbe": {**check, "periodSeconds": 5, "failureThreshold": 120, "timeoutSeconds": 5},
        "readinessProbe": {**check, "periodSeconds": 5 * slower, "failureThreshold": 2, "timeoutSeconds": 5},
        "livenessProbe": {**check, "periodSeconds": 10 * slower, "failureThreshold": 3, "timeoutSeconds": 5},
    }


def _pod_spec(
    job: TrainingJob, deploy: DeployConfig, kind: PodKind, container: dict, restart_policy: str | None = None
) -> dict:
    name = job.ps.job
    secret = deploy.secret if deploy.secret is not None else f"{name}-credentials"
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    files = list(pod_security_files(job.ps.security, kind).values())
    if kind is PodKind.PS:  # a shard of a pair dials the arbiter
        files += [path for where, path in arbiter_files(job, deploy).items() if where.startswith("arbiter.")]
    keys = sorted({path.rpartition("/")[2] for path in files})
    if keys:
        mounts.append({"name": "security", "mountPath": SECRET_DIR, "readOnly": True})
        # Only the keys this pod reads. Kubernetes' default mode (0644): a 0400 file owned by root
        # would be unreadable by a non-root image.
        items = [{"key": key, "path": key} for key in keys]
        volumes.append({"name": "security", "secret": {"secretName": _files_secret(job, deploy), "items": items}})
    container = {
        "image": deploy.image,
        "imagePullPolicy": deploy.image_pull_policy.value,
        **container,
        "envFrom": [{"secretRef": {"name": secret, "optional": True}}],
        "volumeMounts": mounts,
    }
    spec = {
        "containers": [container],
        "volumes": volumes,
    }
    if restart_policy is not None:
        spec["restartPolicy"] = restart_policy
    return spec


def config_map(job: TrainingJob, deploy: DeployConfig, job_toml: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{job.ps.job}-config", job.ps.job, "config"),
        "data": {"job.toml": job_toml, "serve.toml": serve_toml(deploy)},
    }


def serve_toml(deploy: DeployConfig) -> str:
    """The serving replicas' config (serving/config.py), beside job.toml in the ConfigMap."""
    serving = deploy.serving
    top = {"job_config": "job.toml", "listen": f"0.0.0.0:{serving.port}", "metrics_port": serving.metrics_port}
    blocks = [toml_writer.assignments(top)]
    if serving.export_uri is not None:
        blocks.append(toml_writer.table("export", {"uri": serving.export_uri}))
    return toml_writer.document(blocks)


def _headless_service(name: str, job: str, component: str, port: int) -> dict:
    """DNS names for each pod (<pod>.<name>), published before the pods are ready: a shard binds
    its own name, and the workers' rendezvous starts before any probe passes."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, job, component),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _labels(job, component),
            "ports": [{"name": "grpc" if component.startswith("ps") else "rdzv", "port": port, "targetPort": port}],
        },
    }


def ps_statefulset(job: TrainingJob, deploy: DeployConfig, standby: bool = False) -> dict:
    """The shards' StatefulSet <job>-ps, or (standby) their standbys' <job>-ps-standby."""
    name = job.ps.job
    shard = job.ps.shards[0]
    if standby:
        shard = ShardConfig(shard.standby, shard.standby_metrics_port)
    set_name = f"{name}-ps-standby" if standby else f"{name}-ps"
    # The pod's ordinal is its shard index; its DNS record may lag its start by a moment, and the
    # shard binds that name, so it waits for it.
    script = (
        f'until getent hosts "$HOSTNAME.{set_name}" >/dev/null; do sleep 1; done; '
        f'exec embps ps --config {CONFIG_DIR}/job.toml --shard "${{HOSTNAME##*-}}"'
        + (" --standby" if standby else "")
    )
    own_host = f'"$HOSTNAME{shard.host[len(f"{set_name}-0"):]}"'
    container = {
        "name": "ps",
        "command": ["sh", "-c", script],
        "ports": [
            {"name": "grpc", "containerPort": shard.port},
            {"name": "metrics", "containerPort": shard.metrics_port},
        ],
        "resources": _resources(deploy.ps.resources),
        # A shard listens on, and its certificate names, its host in [[shards]]: "$HOSTNAME" plus what
        # follows "<job>-ps-0" there (the headless Service publishes it before the pod is ready).
        **_health_probes(shard.port, PS_HEALTH_SERVICE, job.ps.security, own_host, own_host),
    }
    component = "ps-standby" if standby else "ps"
    pod = _pod_spec(job, deploy, PodKind.PS, container)
    pod["terminationGracePeriodSeconds"] = 30  # `embps ps` drains in-flight calls on SIGTERM
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(set_name, name, component),
        "spec": {
            "serviceName": set_name,
            "replicas": len(job.ps.shards),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _labels(name, component)},
            "template": {
                "metadata": {"labels": _labels(name, component), "annotations": _scrape(shard.metrics_port)},
                "spec": pod,
            },
        },
    }


def serving_deployment(job: TrainingJob, deploy: DeployConfig) -> dict:
    name = job.ps.job
    serving = deploy.serving
    container = {
        "name": "serving",
        "command": ["embps", "serve", "--config", f"{CONFIG_DIR}/serve.toml"],
        "ports": [
            {"name": "grpc", "containerPort": serving.port},
            {"name": "metrics", "containerPort": serving.metrics_port},
        ],
        "resources": _resources(serving.resources),
        **_health_probes(serving.port, SERVING_HEALTH_SERVICE, job.ps.security, f"{name}-serving", "127.0.0.1"),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(f"{name}-serving", name, "serving"),
        "spec": {
            "replicas": serving.min_replicas,
            "selector": {"matchLabels": _labels(name, "serving")},
            "template": {
                "metadata": {"labels": _labels(name, "serving"), "annotations": _scrape(serving.metrics_port)},
                "spec": _pod_spec(job, deploy, PodKind.SERVING, container),
            },
        },
    }


def serving_service(job: TrainingJob, deploy: DeployConfig) -> dict:
    name = job.ps.job
    port = deploy.serving.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(f"{name}-serving", name, "serving"),
        "spec": {
            "selector": _labels(name, "serving"),
            "ports": [{"name": "grpc", "port": port, "targetPort": "grpc", "appProtocol": "grpc"}],
        },
    }


def serving_hpa(job: TrainingJob, deploy: DeployConfig) -> dict:
    name = job.ps.job
    serving = deploy.serving
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(f"{name}-serving", name, "serving"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-serving"},
            "minReplicas": serving.min_replicas,
            "maxReplicas": serving.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": serving.target_cpu_percent},
                    },
                }
            ],
        },
    }


def _launch_command(deploy: DeployConfig, node_rank: str, endpoint: str) -> list[str]:
    """`embps launch` on one worker pod: node 0 (the one at `endpoint`) hosts the c10d store; the
    PS shards run in their StatefulSet, so no pod starts any."""
    return [
        "embps", "launch", f"{CONFIG_DIR}/job.toml",
        "--nnodes", str(deploy.worker.nnodes), "--node-rank", node_rank,
        "--rdzv-endpoint", endpoint, "--local-addr", "$(POD_IP)", "--no-ps",
    ]  # fmt: skip


_POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
_COMPLETION_INDEX = {
    "name": "NODE_RANK",
    "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}},
}


def pytorchjob(job: TrainingJob, deploy: DeployConfig) -> dict:
    """Kubeflow's PyTorchJob (training operator v1): a Master pod and nnodes-1 Worker pods. The
    operator gives each pod RANK (Master 0, Worker i+1) and MASTER_ADDR/MASTER_PORT (the Master)."""
    name = job.ps.job
    container = {
        "name": "pytorch",  # the operator finds its container by this name
        "command": _launch_command(deploy, "$(RANK)", "$(MASTER_ADDR):$(MASTER_PORT)"),
        "env": [_POD_IP],
        "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}],
        "resources": _resources(deploy.worker.resources),
    }

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"labels": _labels(name, "worker")},
                "spec": _pod_spec(job, deploy, PodKind.WORKERS, container),
            },
        }

    specs = {"Master": replica(1)}
    if deploy.worker.nnodes > 1:
        specs["Worker"] = replica(deploy.worker.nnodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(f"{name}-workers", name, "worker"),
        "spec": {"runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"}, "pytorchReplicaSpecs": specs},
    }


def indexed_job(job: TrainingJob, deploy: DeployConfig) -> dict:
    """A plain batch/v1 Job, one pod per node: pod i is `<job>-workers-<i>.<job>-workers` (the
    Job's subdomain), runs node rank = its completion index, and pod 0 hosts the rendezvous."""
    name = job.ps.job
    nnodes = deploy.worker.nnodes
    endpoint = f"{name}-workers-0.{name}-workers:{deploy.worker.rdzv_port}"
    container = {
        "name": "worker",
        "command": _launch_command(deploy, "$(NODE_RANK)", endpoint),
        "env": [_POD_IP, _COMPLETION_INDEX],
        "ports": [{"name": "rdzv", "containerPort": deploy.worker.rdzv_port}],
        "resources": _resources(deploy.worker.resources),
    }
    pod = _pod_spec(job, deploy, PodKind.WORKERS, container, restart_policy="Never")
    pod["subdomain"] = f"{name}-workers"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(f"{name}-workers", name, "worker"),
        "spec": {
            "completionMode": "Indexed",
            "completions": nnodes,
            "parallelism": nnodes,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": _labels(name, "worker")}, "spec": pod},
        },
    }
