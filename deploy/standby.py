"""What `embps deploy render` adds for shard standbys ([[shards]] standby, [arbiter]).

    12-ps-standby-service.yaml      headless Service <job>-ps-standby: <job>-ps-standby-<i>.<job>-ps-standby
    13-ps-standby-statefulset.yaml  StatefulSet <job>-ps-standby: pod i runs `embps ps --shard i --standby`
    05-etcd-service.yaml            Service <job>-etcd (client port 2379)      } only when [arbiter]
    06-etcd-statefulset.yaml        StatefulSet <job>-etcd: one etcd member,    } endpoints names
                                    its data on a volume (leases survive a pod  } http[s]://<job>-etcd
                                    restart); over https it requires client     } [.<namespace>...];
                                                                                } else etcd exists
                                    certificates of [arbiter] tls_ca, and its own
                                    certificate is deploy.etcd_tls_cert / _key
A shard pod restarted after its standby took over finds that primary alive in etcd and becomes its
standby (ps/shard/replication.py), so the StatefulSets' own restarts bring each pair back to two.
"""

from __future__ import annotations

from urllib.parse import urlparse

ETCD_CLIENT_PORT = 2379
_ETCD_PEER_PORT = 2380
_ETCD_HEALTH_PORT = 2381  # --listen-metrics-urls: /health and /metrics in plain http


def check_standbys(job, deploy) -> None:
    """Standby addresses must name the standby StatefulSet's pods, on one port, like the shards'."""
    name = job.ps.job
    shards = job.ps.shards
    if not any(s.standby for s in shards):
        return
    first = shards[0]
    for i, shard in enumerate(shards):
        if not shard.standby:
            raise ValueError(f"shards[{i}].standby: on Kubernetes every shard has a standby or none does")
        host, _, port = shard.standby.rpartition(":")
        labels = host.split(".")
        if labels[:2] != [f"{name}-ps-standby-{i}", f"{name}-ps-standby"] or (
            len(labels) > 2 and labels[2] != deploy.namespace
        ):
            raise ValueError(
                f"shards[{i}].standby: on Kubernetes standby {i} is the StatefulSet pod "
                f"'{name}-ps-standby-{i}.{name}-ps-standby[.{deploy.namespace}.svc.cluster.local]:PORT', "
                f"got {shard.standby!r}"
            )
        if port != first.standby.rpartition(":")[2]:
            raise ValueError(f"shards[{i}].standby: every standby pod serves one port, got {shard.standby!r}")
        if shard.standby_metrics_port != first.standby_metrics_port or shard.standby_metrics_port in (0, int(port)):
            raise ValueError(
                f"shards[{i}].standby_metrics_port: every standby pod needs the same fixed metrics port, not 0 "
                f"and not the gRPC port, got {shard.standby_metrics_port}"
            )


def _renders_etcd(job, deploy) -> bool:
    """Whether [arbiter] names the etcd this renders (`http[s]://<job>-etcd[.<namespace>...]:2379`,
    deploy.namespace; a <job>-etcd of another namespace is an existing one); ValueError naming
    arbiter.endpoints when it names that host with another port, which the rendered etcd would not
    serve (the shards would dial a port nothing listens on, and failover never work), and naming
    the missing field when https lacks the files its TLS needs."""
    arbiter = job.ps.arbiter
    if arbiter is None:
        return False
    endpoint = urlparse(arbiter.endpoints.split(",")[0].strip())
    labels = (endpoint.hostname or "").split(".")
    if labels[0] != f"{job.ps.job}-etcd" or (len(labels) > 1 and labels[1] != deploy.namespace):
        return False
    if (endpoint.port or ETCD_CLIENT_PORT) != ETCD_CLIENT_PORT:
        raise ValueError(
            f"arbiter.endpoints: the etcd rendered for this job serves port {ETCD_CLIENT_PORT}, got "
            f"{arbiter.endpoints!r}; name http[s]://{job.ps.job}-etcd:{ETCD_CLIENT_PORT}, or an etcd of your own"
        )
    if endpoint.scheme == "https":
        # Over https it requires client certificates: of the CA that checks its own (one CA for etcd).
        for where, value in (
            ("arbiter.tls_ca", arbiter.tls_ca),
            ("arbiter.client_cert", arbiter.client_cert),
            ("deploy.etcd_tls_cert", deploy.etcd_tls_cert),
        ):
            if value is None:
                raise ValueError(
                    f"{where}: required by the etcd rendered at {arbiter.endpoints!r} (https, client certificates "
                    "required: [arbiter] tls_ca, client_cert, client_key and deploy.etcd_tls_cert, etcd_tls_key)"
                )
    elif deploy.etcd_tls_cert is not None:
        raise ValueError(
            f"deploy.etcd_tls_cert: the etcd rendered at {arbiter.endpoints!r} serves http; name "
            f"https://{job.ps.job}-etcd:{ETCD_CLIENT_PORT} for TLS"
        )
    return True


def standby_manifests(job, deploy) -> dict[str, dict]:
    from deploy.render import SECRET_DIR, _files_secret, _headless_service, _labels, _metadata, ps_statefulset

    if not any(s.standby for s in job.ps.shards):
        return {}
    name = job.ps.job
    port = int(job.ps.shards[0].standby.rpartition(":")[2])
    manifests = {
        "12-ps-standby-service.yaml": _headless_service(f"{name}-ps-standby", name, "ps-standby", port),
        "13-ps-standby-statefulset.yaml": ps_statefulset(job, deploy, standby=True),
    }
    if _renders_etcd(job, deploy):
        etcd = f"{name}-etcd"
        tls = urlparse(job.ps.arbiter.endpoints.strip()).scheme == "https"
        scheme = "https" if tls else "http"
        manifests["05-etcd-service.yaml"] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(etcd, name, "etcd"),
            "spec": {
                "selector": _labels(name, "etcd"),
                "ports": [{"name": "client", "port": ETCD_CLIENT_PORT, "targetPort": ETCD_CLIENT_PORT}],
            },
        }
        command = [
            "etcd", "--name", "etcd", "--data-dir", "/var/lib/etcd",
            "--listen-client-urls", f"{scheme}://0.0.0.0:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"{scheme}://{etcd}:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://127.0.0.1:{_ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{_ETCD_PEER_PORT}",
            "--initial-cluster", f"etcd=http://127.0.0.1:{_ETCD_PEER_PORT}",
            # /health without a client certificate, for the kubelet's probes: it says nothing else.
            "--listen-metrics-urls", f"http://0.0.0.0:{_ETCD_HEALTH_PORT}",
        ]
        mounts = [{"name": "data", "mountPath": "/var/lib/etcd"}]
        volumes = []
        if tls:
            command += [
                "--cert-file", deploy.etcd_tls_cert, "--key-file", deploy.etcd_tls_key,
                "--client-cert-auth", "--trusted-ca-file", job.ps.arbiter.tls_ca,
            ]
            files = (deploy.etcd_tls_cert, deploy.etcd_tls_key, job.ps.arbiter.tls_ca)
            items = [{"key": key, "path": key} for key in sorted({path.rpartition("/")[2] for path in files})]
            mounts.append({"name": "tls", "mountPath": SECRET_DIR, "readOnly": True})
            volumes.append({"name": "tls", "secret": {"secretName": _files_secret(job, deploy), "items": items}})
        probe = {"httpGet": {"path": "/health", "port": _ETCD_HEALTH_PORT}, "periodSeconds": 5, "failureThreshold": 3}
        manifests["06-etcd-statefulset.yaml"] = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _metadata(etcd, name, "etcd"),
            "spec": {
                "serviceName": etcd,
                "replicas": 1,
                "selector": {"matchLabels": _labels(name, "etcd")},
                "template": {
                    "metadata": {"labels": _labels(name, "etcd")},
                    "spec": {
                        "containers": [
                            {
                                "name": "etcd",
                                "image": deploy.etcd_image,
                                "imagePullPolicy": deploy.image_pull_policy.value,
                                "command": command,
                                "ports": [{"name": "client", "containerPort": ETCD_CLIENT_PORT}],
                                "readinessProbe": probe,
                                "livenessProbe": probe,
                                "volumeMounts": mounts,
                            }
                        ],
                        **({"volumes": volumes} if volumes else {}),
                    },
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                    }
                ],
            },
        }
    return manifests
