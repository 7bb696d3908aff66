"""Transport security and bearer tokens for every gRPC port of a job (`[security]` of the job TOML).

    [security]
    tls_cert = "certs/server.pem"          # server certificate chain (PEM): TLS on every gRPC port
    tls_key = "certs/server.key"           # its private key (PEM); required with tls_cert
    tls_ca = "certs/ca.pem"                # CA bundle clients check server certificates against
                                           # (default: gRPC's built-in public roots)
    client_ca = "certs/client-ca.pem"      # mutual TLS: servers require a client certificate signed by it
    client_cert = "certs/client.pem"       # mutual TLS: what this process presents as a client
    client_key = "certs/client.key"
    tokens.trainer = { file = "secrets/trainer.token" }   # or { env = "EMBPS_TRAINER_TOKEN" }
    tokens.replica = { file = "secrets/replica.token" }
    tokens.reader = { env = "EMBPS_READER_TOKEN" }
    tokens.shard = { file = "secrets/shard.token" }       # jobs with standbys: required with tokens

Relative paths are relative to the job TOML. Tokens are read from files or environment variables,
never written in the TOML, so a config dump or a log line cannot carry one; a string where a
token source belongs is refused without being echoed.

One TOML serves every process of a job, and each process holds only its own secrets: paths are
checked when the process that needs them loads them (a shard its key and the tokens it accepts, a
worker its trainer token), with errors naming the field, e.g.
`security.tls_key: file not found: /etc/embps/server.key`. On Kubernetes (`embps deploy render`)
the files come from one Secret mounted at /etc/embps-secret in every pod.

Roles (who may call what; health checks are open to all, for probes):

    trainer   PS port: every ParameterServer method (Lookup, Push, LookupBatch, PushBatch, Stats,
              Subscribe, ...) and SnapshotControl
    replica   PS port: the read-only methods a serving replica's followers need (Subscribe,
              SubscribeTables, Lookup, LookupBatch, Stats)
    reader    serving port: Lookup, Status
    shard     PS port: Replicate alone, the stream a primary sends its state and pushes to its
              standby on. Only shard processes hold this token, so a worker, which may push, still
              cannot take a standby's stream from its primary (which would leave the pair without
              failover cover); a job with standbys and tokens must configure it.

A missing or unknown token answers UNAUTHENTICATED; a valid token of a role that may not call the
method answers PERMISSION_DENIED. Reflection needs a token of any role the port accepts: the proto
files are public, but an anonymous caller has no business on the port beyond its health.
When no token is configured, auth is off; when any is, every port requires one (a port whose roles
have no token configured refuses every call but health). Tokens are compared with
hmac.compare_digest. Prometheus /metrics ports stay plain HTTP.

Rotation without a restart (what cert-manager and a Kubernetes Secret update do: new files at the
same paths): a server reads its certificate, key and client CA again for the next connection after
they change (connections already open keep theirs); a client's CA, certificate and key are
checked when it makes a call, at most once a second, and after a change its calls go through a new
channel (ps/security/rotating_channel.py); token files are read again at most once a second after they
change, by the servers checking them and by the clients sending them. A new file that does not
load (a key that does not match the certificate, a token too short) is logged, without its
content, and the previous one stays in use. Not rotated: tokens from environment variables.

Modules: config (the `[security]` table and its parsing), certificates (TLS files, checked and
re-read), tokens (bearer tokens, re-read), server_auth (who may call what; TokenAuth), channels
(client channels with TLS and a token), rotating_channel (a channel whose credentials change).
Everything public is imported here: `from ps.security import open_channel`.
"""

from ps.security.certificates import ClientCertificates, FileStamps, ServerCertificates, ServerPem, load_server_pem
from ps.security.channels import RECONNECT_OPTIONS, open_aio_channel, open_channel
from ps.security.config import (
    RELOAD_CHECK_S,
    Role,
    SecurityConfig,
    Tokens,
    TokenSource,
    dump_security,
    parse_security,
)
from ps.security.server_auth import (
    Policy,
    TokenAuth,
    add_port,
    ps_port_policy,
    server_interceptors,
    serving_port_policy,
)
from ps.security.tokens import LiveToken

__all__ = [
    "RECONNECT_OPTIONS",
    "RELOAD_CHECK_S",
    "ClientCertificates",
    "FileStamps",
    "LiveToken",
    "Policy",
    "Role",
    "SecurityConfig",
    "ServerCertificates",
    "ServerPem",
    "TokenAuth",
    "TokenSource",
    "Tokens",
    "add_port",
    "dump_security",
    "load_server_pem",
    "open_aio_channel",
    "open_channel",
    "parse_security",
    "ps_port_policy",
    "server_interceptors",
    "serving_port_policy",
]
