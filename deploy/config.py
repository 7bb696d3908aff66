"""The `[deploy]` section of a job's TOML: how `embps deploy render` lays the job out on Kubernetes.

    [deploy]
    image = "registry.example.com/embps:0.1.0"   # required: an image with `embps` installed
    namespace = "default"
    image_pull_policy = "IfNotPresent"           # "Always" | "IfNotPresent" | "Never"
    secret = "ctr-credentials"                   # Secret whose keys become every pod's environment
                                                 # (AWS_* for S3, tokens); default "<job>-credentials"
    etcd_image = "gcr.io/etcd-development/etcd:v3.5.17"  # the etcd render adds for [arbiter]
    etcd_tls_cert = "/etc/embps-secret/etcd.crt" # with [arbiter] endpoints "https://<job>-etcd:2379":
    etcd_tls_key = "/etc/embps-secret/etcd.key"  # that etcd's certificate (for <job>-etcd, localhost
                                                 # and 127.0.0.1, server and client use) and key, keys
                                                 # of files_secret; it requires client certificates of
                                                 # [arbiter] tls_ca
    files_secret = "ctr-files"                   # Secret mounted at /etc/embps-secret when [security]
                                                 # names files (certificates, keys, token files), each
                                                 # as /etc/embps-secret/<key>; default "<job>-files"

    [deploy.ps.resources]                        # per PS shard pod (StatefulSet <job>-ps)
    cpu = "2"                                    # Kubernetes quantities: "500m", "2", 1.5
    memory = "8Gi"
    gpu = 0                                      # nvidia.com/gpu

    [deploy.worker]                              # training workers (PyTorchJob <job>-workers)
    nnodes = 2                                   # pods; each runs train.workers processes
    rdzv_port = 29400                            # c10d rendezvous port on node 0
    kind = "pytorchjob"                          # "pytorchjob" (Kubeflow) | "indexed-job" (plain
                                                 # batch/v1); the other one is written to DIR/alternative/
    [deploy.worker.resources]
    cpu = "4"
    memory = "8Gi"
    gpu = 1

    [deploy.serving]                             # Deployment + Service + HorizontalPodAutoscaler
    port = 50200                                 # gRPC Serving (and health) port
    metrics_port = 9200                          # Prometheus /metrics
    min_replicas = 2
    max_replicas = 8
    target_cpu_percent = 70                      # the HPA adds replicas above this CPU use
    export_uri = "s3://bucket/exports"           # optional: replicas start from its LATEST export
    [deploy.serving.resources]
    cpu = "1"
    memory = "2Gi"

Every error names the field and the rule, e.g. `deploy.serving.min_replicas: must be >= 1, got -1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from ps.errors import ConfigTypeError
from ps.job_config import build_config
from ps.snapshot.storage import check_uri

# Kubernetes' resource.Quantity: a decimal number and an optional binary or decimal suffix.
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RESOURCE_NAMES = ("cpu", "memory", "gpu")
# A container image reference as the container runtimes parse it (the distribution project's
# grammar): [host[:port]/]path[:tag][@digest], each path component lowercase. The API server
# takes any image without surrounding whitespace; a malformed one renders, applies, and leaves
# every pod in InvalidImageName.
_IMAGE_HOST_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_IMAGE_HOST = rf"(?:{_IMAGE_HOST_LABEL}(?:\.{_IMAGE_HOST_LABEL})*|\[[0-9a-fA-F:]+\])"
_IMAGE_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_REFERENCE = re.compile(
    rf"(?:{_IMAGE_HOST}(?::[0-9]+)?/)?{_IMAGE_PATH_COMPONENT}(?:/{_IMAGE_PATH_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
_IMAGE_NAME_MAX = 255  # the name's characters (before the tag and digest)
INT32_MAX = 2**31 - 1  # replicas and HPA bounds are int32 in the Kubernetes API


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class WorkerKind(StrEnum):
    PYTORCHJOB = "pytorchjob"  # Kubeflow training operator's PyTorchJob
    INDEXED_JOB = "indexed-job"  # plain batch/v1 Job, completionMode Indexed


@dataclass(frozen=True)
class Resources:
    """Requests (= limits) of one pod: `cpu` and `memory` as Kubernetes quantities, `gpu` as a
    count of nvidia.com/gpu (limits only, as Kubernetes wants for extended resources)."""

    cpu: str = "1"
    memory: str = "2Gi"
    gpu: int = 0


@dataclass(frozen=True)
class PSDeploy:
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class WorkerDeploy:
    nnodes: int = 1
    rdzv_port: int = 29400
    kind: WorkerKind = WorkerKind.PYTORCHJOB
    resources: Resources = field(default_factory=lambda: Resources(cpu="2", memory="4Gi"))


@dataclass(frozen=True)
class ServingDeploy:
    port: int = 50200
    metrics_port: int = 9200
    min_replicas: int = 1
    max_replicas: int = 4
    target_cpu_percent: int = 70
    export_uri: str | None = None
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class DeployConfig:
    image: str
    namespace: str = "default"
    image_pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    secret: str | None = None  # None: "<job>-credentials"
    files_secret: str | None = None  # None: "<job>-files"
    ps: PSDeploy = field(default_factory=PSDeploy)
    worker: WorkerDeploy = field(default_factory=WorkerDeploy)
    serving: ServingDeploy = field(default_factory=ServingDeploy)
    etcd_image: str = "gcr.io/etcd-development/etcd:v3.5.17"  # the arbiter render adds ([arbiter], deploy/standby.py)
    etcd_tls_cert: str | None = None  # the rendered etcd's certificate over https (deploy/standby.py)
    etcd_tls_key: str | None = None


def parse_deploy_config(raw: object) -> DeployConfig:
    """The job TOML's `[deploy]` table (a dict) -> a validated DeployConfig; errors name the field."""
    if raw is None:
        raise ValueError("deploy: the job has no [deploy] section; it needs at least deploy.image")
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"deploy: must be a table ([deploy]), got {raw!r}")
    raw = _numbers_as_quantities(raw)
    config = build_config(DeployConfig, raw, "deploy")
    if not config.image.strip():
        raise ValueError("deploy.image: must name a container image with embps installed, got ''")
    if any(c.isspace() for c in config.image):
        raise ValueError(f"deploy.image: a container image reference has no spaces, got {config.image!r}")
    _check_image("deploy.image", config.image)
    if not isinstance(config.etcd_image, str) or not config.etcd_image.strip():
        raise ValueError(f"deploy.etcd_image: must name a container image with etcd, got {config.etcd_image!r}")
    _check_image("deploy.etcd_image", config.etcd_image)
    if (config.etcd_tls_cert is None) != (config.etcd_tls_key is None):
        given, missing = ("etcd_tls_cert", "etcd_tls_key")[:: 1 if config.etcd_tls_cert is not None else -1]
        raise ValueError(f"deploy.{missing}: required with deploy.{given}")
    _check_name("deploy.namespace", config.namespace, DNS_LABEL, 63)
    for name in ("secret", "files_secret"):
        if getattr(config, name) is not None:
            _check_name(f"deploy.{name}", getattr(config, name), _DNS_SUBDOMAIN, 253)
    for role in ("ps", "worker", "serving"):
        _check_resources(f"deploy.{role}.resources", getattr(config, role).resources)
    _in_int32("deploy.worker.nnodes", config.worker.nnodes, 1)
    _port("deploy.worker.rdzv_port", config.worker.rdzv_port)
    serving = config.serving
    _port("deploy.serving.port", serving.port)
    _port("deploy.serving.metrics_port", serving.metrics_port)
    if serving.port == serving.metrics_port:
        raise ValueError(f"deploy.serving.metrics_port: must differ from deploy.serving.port ({serving.port})")
    _in_int32("deploy.serving.min_replicas", serving.min_replicas, 1)
    _in_int32("deploy.serving.max_replicas", serving.max_replicas, serving.min_replicas)
    if not 1 <= serving.target_cpu_percent <= 100:
        raise ValueError(f"deploy.serving.target_cpu_percent: must be in [1, 100], got {serving.target_cpu_percent}")
    if serving.export_uri is not None:
        # the replicas' serve.toml holds it as export.uri: the same check here, not crash-looping pods
        if "://" not in serving.export_uri:
            raise ValueError(
                "deploy.serving.export_uri: must be a URI (s3://, hdfs://, file://) or left out, "
                f"got {serving.export_uri!r}"
            )
        check_uri(serving.export_uri, "deploy.serving.export_uri")
    return config


def _numbers_as_quantities(raw: dict) -> dict:
    """`cpu = 2` and `cpu = "2"` mean the same; unknown resource names are refused here, with the
    list of the ones Kubernetes gets from us."""
    raw = dict(raw)
    for role in ("ps", "worker", "serving"):
        section = raw.get(role)
        if not isinstance(section, dict) or not isinstance(section.get("resources"), dict):
            continue
        resources = dict(section["resources"])
        for name, value in resources.items():
            if name not in RESOURCE_NAMES:
                raise ValueError(
                    f"deploy.{role}.resources.{name}: unknown resource; known: {', '.join(RESOURCE_NAMES)} "
                    "(gpu is nvidia.com/gpu)"
                )
            if name != "gpu" and isinstance(value, (int, float)) and not isinstance(value, bool):
                resources[name] = str(value)
        raw[role] = {**section, "resources": resources}
    return raw


def _check_resources(where: str, resources: Resources) -> None:
    for name in ("cpu", "memory"):
        value = getattr(resources, name)
        match = _QUANTITY.fullmatch(value)  # match's $ takes a final newline, which Kubernetes refuses
        if match is None:
            raise ValueError(f"{where}.{name}: must be a Kubernetes quantity ('500m', '2', '4Gi'), got {value!r}")
        if float(match["number"]) <= 0:
            raise ValueError(f"{where}.{name}: must be > 0, got {value!r}")
        if name == "memory" and match["suffix"] in ("n", "u", "m"):
            raise ValueError(f"{where}.memory: {value!r} is a fraction of a byte; write Mi or Gi (e.g. '512Mi')")
    if isinstance(resources.gpu, bool) or not isinstance(resources.gpu, int) or resources.gpu < 0:
        raise ValueError(f"{where}.gpu: must be an integer >= 0 (nvidia.com/gpu), got {resources.gpu!r}")


def _check_name(where: str, value: str, pattern: re.Pattern, max_len: int) -> None:
    if len(value) > max_len or not pattern.fullmatch(value):  # fullmatch: "$" would let a final "\n" by
        raise ValueError(
            f"{where}: must be a Kubernetes name (lowercase letters, digits, '-', at most {max_len} characters), "
            f"got {value!r}"
        )


def _at_least(where: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{where}: must be >= {low}, got {value}")


def _in_int32(where: str, value: int, low: int) -> None:
    """A count Kubernetes holds as an int32 (replicas, an HPA's bounds): past it the API server
    refuses the manifest at apply, after render said nothing."""
    _at_least(where, value, low)
    if value > INT32_MAX:
        raise ValueError(f"{where}: must be <= {INT32_MAX} (an int32 in Kubernetes), got {value}")


def _check_image(where: str, image: str) -> None:
    """`image` is a reference a container runtime can pull: pods of a malformed one never start."""
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    if len(name) > _IMAGE_NAME_MAX or not _IMAGE_REFERENCE.fullmatch(image):
        raise ValueError(
            f"{where}: must be a container image reference, [host[:port]/]path[:tag][@digest] with a lowercase path "
            f"of at most {_IMAGE_NAME_MAX} characters (e.g. 'registry.example.com/team/embps:0.1.0'), got {image!r}"
        )


def _port(where: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"{where}: must be a port in [1, 65535], got {value}")
