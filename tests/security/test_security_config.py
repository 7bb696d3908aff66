"""[security] of the job TOML: parsing, errors that name the field, secrets read only from files or
variables (and never echoed), the roles' policy, and the token check in process."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import tomllib

import grpc
import pytest

from ps.job_config import dump_job_config, load_job_config, parse_job_config
from ps.rpc import ps_pb2, replication_pb2, snapshot_pb2
from ps.security import (
    Role,
    SecurityConfig,
    TokenAuth,
    Tokens,
    TokenSource,
    open_channel,
    parse_security,
    ps_port_policy,
    server_interceptors,
    serving_port_policy,
)
from tests.security.certs import secured

JOB = """
job = "j"
[[shards]]
address = "127.0.0.1:50051"
[tables.user]
dim = 4
"""


def test_relative_paths_resolve_against_the_toml_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "job.toml"
    path.write_text(
        JOB + '[security]\ntls_cert = "certs/s.pem"\ntls_key = "/abs/s.key"\n'
        'tokens.trainer = { file = "t.token" }\ntokens.reader = { env = "EMBPS_READER_TOKEN" }\n'
    )
    security = load_job_config(path).security
    assert security.tls_cert == str(tmp_path / "conf" / "certs" / "s.pem")
    assert security.tls_key == "/abs/s.key"
    assert security.tokens == Tokens(
        trainer=TokenSource(file=str(tmp_path / "conf" / "t.token")), reader=TokenSource(env="EMBPS_READER_TOKEN")
    )
    assert security.tls and security.auth and not security.mutual_tls


def test_dump_reads_back(pki, token_files):
    job = parse_job_config(tomllib.loads(JOB))
    by_env = SecurityConfig(tokens=Tokens(replica=TokenSource(env="X")))
    for security in (secured(pki, token_files, mutual=True), by_env):
        job = dataclasses.replace(job, security=security)
        assert parse_job_config(tomllib.loads(dump_job_config(job))).security == security
    assert "[security]" not in dump_job_config(parse_job_config(tomllib.loads(JOB)))


def test_dump_reads_back_paths_with_quotes_backslashes_newlines_and_non_ascii():
    odd = '/etc/a "quoted" \\ back\\slash\nnew line é 日本'
    paths = {f.name: f"{odd}/{f.name}.pem" for f in dataclasses.fields(SecurityConfig) if f.name != "tokens"}
    security = SecurityConfig(
        **paths,
        tokens=Tokens(trainer=TokenSource(file=f"{odd}/trainer.token"), reader=TokenSource(env="EMBPS_READER_TOKEN")),
    )
    job = dataclasses.replace(parse_job_config(tomllib.loads(JOB)), security=security)
    assert parse_job_config(tomllib.loads(dump_job_config(job))).security == security


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tls_cert": "a.pem"}, "security.tls_key: required with security.tls_cert"),
        ({"tls_key": "a.key"}, "security.tls_cert: required with security.tls_key"),
        ({"tls_ca": "ca.pem"}, "security.tls_ca: needs TLS"),
        ({"tls_cert": "a", "tls_key": "b", "client_ca": "c"}, "security.client_cert: required with security.client_ca"),
        ({"tls_cert": "a", "tls_key": "b", "client_cert": "c"}, "security.client_key: required with"),
        ({"tls_cert": 3, "tls_key": "b"}, "security.tls_cert: must be a non-empty path"),
        ({"require_client_cert": True}, "security.require_client_cert: unknown field"),
        ({"tokens": {"admin": {"file": "x"}}}, "security.tokens.admin: unknown role"),
        ({"tokens": {"trainer": {"env": ""}}}, "security.tokens.trainer.env: must be the name"),
        ({"tokens": {"trainer": {"file": "a", "env": "B"}}}, "security.tokens.trainer: must be { file"),
    ],
)
def test_errors_name_the_field(raw, message):
    with pytest.raises((ValueError, TypeError)) as info:
        parse_security(raw)
    assert message in str(info.value)


def test_an_inline_token_is_refused_without_being_echoed():
    token = secrets.token_urlsafe(32)
    pasted = {"tokens": {"trainer": {"env": f"EMBPS_TRAINER_TOKEN={token}"}}}  # echoed before
    for raw in ({"tokens": {"trainer": token}}, {"tokens": token}, {"tokens": {"trainer": {"file": 7}}}, pasted):
        with pytest.raises(TypeError) as info:
            parse_security(raw)
        assert "security.tokens" in str(info.value)
        assert token not in str(info.value)


def test_files_are_read_by_the_process_that_needs_them(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.pem")
    security = SecurityConfig(tls_cert=missing, tls_key=missing, tokens=Tokens(trainer=TokenSource(file=missing)))
    with pytest.raises(ValueError, match=r"security\.tls_key: file not found: .*missing\.pem"):
        security.server_credentials()
    with pytest.raises(ValueError, match=r"security\.tokens\.trainer\.file: file not found"):
        security.token(Role.TRAINER)
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match=r"security\.tls_ca: not a PEM file: .*cert\.txt"):
        SecurityConfig(tls_cert="s.pem", tls_key="s.key", tls_ca=str(not_pem)).channel_credentials()
    monkeypatch.delenv("EMBPS_TEST_TOKEN", raising=False)
    by_env = SecurityConfig(tokens=Tokens(reader=TokenSource(env="EMBPS_TEST_TOKEN")))
    with pytest.raises(ValueError, match="security.tokens.reader.env: environment variable EMBPS_TEST_TOKEN is not"):
        by_env.token(Role.READER)
    weak = "short-token"
    monkeypatch.setenv("EMBPS_TEST_TOKEN", weak)
    with pytest.raises(ValueError, match="security.tokens.reader: a token must be 16 to 4096") as info:
        by_env.token(Role.READER)
    assert weak not in str(info.value)
    # gRPC refuses metadata past 16 KiB (and drops calls at random past 8 KiB): such a token was
    # accepted, and then every call failed, read by the client as a full table.
    monkeypatch.setenv("EMBPS_TEST_TOKEN", "x" * 20000)
    with pytest.raises(ValueError, match="security.tokens.reader: a token must be 16 to 4096 .* got 20000 characters"):
        by_env.token(Role.READER)
    strong = secrets.token_urlsafe(24)
    monkeypatch.setenv("EMBPS_TEST_TOKEN", f" {strong}\n")
    assert by_env.token(Role.READER) == strong
    assert by_env.token(Role.TRAINER) is None
    # A client whose role has no token while auth is on is a configuration error, not a silent refusal.
    with pytest.raises(ValueError, match="security.tokens.trainer: auth is on"):
        open_channel("127.0.0.1:1", by_env, Role.TRAINER)


def test_the_roles_policy():
    ps_policy = ps_port_policy()
    service = ps_pb2.DESCRIPTOR.services_by_name["ParameterServer"]
    snapshot = snapshot_pb2.DESCRIPTOR.services_by_name["SnapshotControl"]
    replication = replication_pb2.DESCRIPTOR.services_by_name["Replication"]
    # Every method of the PS port has an entry (a method without one would be refused to everyone).
    assert set(ps_policy) == {f"/{s.full_name}/{m.name}" for s in (service, snapshot, replication) for m in s.methods}
    replicate = "/embps.v1.Replication/Replicate"
    # The shard role opens Replicate alone (no worker holds its token); the trainer everything else.
    assert ps_policy[replicate] == frozenset({Role.SHARD})
    others = [roles for path, roles in ps_policy.items() if path != replicate]
    assert all(Role.TRAINER in roles and not {Role.READER, Role.SHARD} & roles for roles in others)
    replica = {path.rsplit("/", 1)[1] for path, roles in ps_policy.items() if Role.REPLICA in roles}
    assert replica == {"Lookup", "LookupBatch", "Stats", "Subscribe", "SubscribeTables"}
    assert serving_port_policy() == {
        "/embps.v1.Serving/Lookup": frozenset({Role.READER}),
        "/embps.v1.Serving/LookupMany": frozenset({Role.READER}),
        "/embps.v1.Serving/Status": frozenset({Role.READER}),
        "/embps.v1.Serving/DenseModel": frozenset({Role.READER}),
    }


def test_auth_is_off_without_tokens(pki):
    security = secured(pki)
    assert security.tls and not security.auth
    assert server_interceptors(security, ps_port_policy()) == []
    assert security.describe() == "TLS, no tokens (auth off)"


class _Details:
    def __init__(self, method: str, metadata: tuple) -> None:
        self.method = method
        self.invocation_metadata = metadata


def test_token_check_in_process():
    """TokenAuth on its own: which role a header names, and what reaches the servicer."""
    trainer, replica = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    denied = []
    tokens = {Role.TRAINER: trainer, Role.REPLICA: replica}
    auth = TokenAuth(tokens, ps_port_policy(), lambda method, code: denied.append((method, code)))
    assert auth.role_of((("authorization", f"Bearer {trainer}"),)) == Role.TRAINER
    assert auth.role_of((("authorization", f"BEARER {replica}"),)) == Role.REPLICA
    assert auth.role_of((("authorization", f"Bearer {trainer}x"),)) is None
    assert auth.role_of((("authorization", b"Bearer " + trainer.encode()),)) is None
    assert auth.role_of(None) is None
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "reached")

    async def continuation(details):
        return handler

    def intercept(method: str, token: str | None):
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return asyncio.run(auth.intercept_service(continuation, _Details(method, metadata)))

    assert intercept("/embps.v1.ParameterServer/Push", trainer) is handler
    assert intercept("/embps.v1.ParameterServer/Lookup", replica) is handler
    assert intercept("/grpc.health.v1.Health/Check", None) is handler
    assert intercept("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", replica) is handler
    refused = intercept("/embps.v1.ParameterServer/Push", replica)
    assert refused is not handler and refused.request_deserializer(b"\xff garbage") is None
    assert intercept("/embps.v1.ParameterServer/Lookup", None) is not handler
    assert intercept("/embps.v1.Unknown/Method", trainer) is not handler
    assert denied == [
        ("Push", grpc.StatusCode.PERMISSION_DENIED),
        ("Lookup", grpc.StatusCode.UNAUTHENTICATED),
        ("Method", grpc.StatusCode.PERMISSION_DENIED),
    ]


def test_one_token_for_two_roles_is_refused_naming_both(tokens):
    """A caller with a token two roles share was taken for the last of them and refused what only
    the other may call (a trainer sharing the shards' token could not Push)."""
    shared = tokens[Role.TRAINER]
    with pytest.raises(ValueError, match=r"security\.tokens\.trainer and security\.tokens\.shard: the same token"):
        TokenAuth({Role.TRAINER: shared, Role.SHARD: shared}, ps_port_policy())


def test_a_port_refuses_a_token_it_shares_with_a_role_of_another_port(tmp_path, tokens):
    """Each port compared only its own roles' tokens: a reader token equal to the trainer's started
    every port, and any inference client could Push and WriteSnapshot on the PS."""
    shared, own = tmp_path / "shared.token", tmp_path / "replica.token"
    shared.write_text(tokens[Role.TRAINER])
    own.write_text(tokens[Role.REPLICA])
    security = SecurityConfig(
        tokens=Tokens(
            trainer=TokenSource(file=str(shared)),
            replica=TokenSource(file=str(own)),
            reader=TokenSource(file=str(shared)),
            shard=TokenSource(file=str(tmp_path / "held-by-the-shards-only.token")),
        )
    )
    reader_too = r"security\.tokens\.(trainer|reader) and security\.tokens\.(reader|trainer): the same token"
    with pytest.raises(ValueError, match=reader_too):
        server_interceptors(security, serving_port_policy())
    (tmp_path / "held-by-the-shards-only.token").write_text(tokens[Role.SHARD])  # the PS port needs it
    with pytest.raises(ValueError, match=reader_too):
        server_interceptors(security, ps_port_policy())
    # Its own token: both ports start; a role whose file this host does not hold is skipped.
    own_reader = tmp_path / "reader.token"
    own_reader.write_text(tokens[Role.READER])
    own_tokens = dataclasses.replace(security.tokens, reader=TokenSource(file=str(own_reader)))
    apart = dataclasses.replace(security, tokens=own_tokens)
    assert len(server_interceptors(apart, ps_port_policy())) == 1
    (tmp_path / "held-by-the-shards-only.token").unlink()
    assert len(server_interceptors(apart, serving_port_policy())) == 1


def test_a_key_that_is_not_the_certificate_s_is_named_when_the_server_starts(pki):
    """gRPC said only that the port could not be bound."""
    mismatched = SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key))
    with pytest.raises(ValueError, match=r"security\.tls_cert, security\.tls_key: do not load as a pair"):
        mismatched.server_credentials()


def test_a_token_file_rotated_to_another_role_s_token_is_refused(tmp_path, tokens):
    """Two roles with one token are refused at start, but a token file was read again after a
    change without that check: a trainer's file rotated to the shard's token made every worker a
    shard (which may Replicate), and on the PS host rotated to the reader's (a role the PS port does
    not accept) it let every inference client push (a review's repro). A token two roles share is
    no role's now."""
    from ps.security import RELOAD_CHECK_S
    from tests.helpers.waiting import wait_until

    files = {role: tmp_path / f"{role.value}.token" for role in Role}
    for role, path in files.items():
        path.write_text(tokens[role])
    security = SecurityConfig(tokens=Tokens(**{r.value: TokenSource(file=str(p)) for r, p in files.items()}))
    (auth,) = server_interceptors(security, ps_port_policy())
    bearer = {role: (("authorization", f"Bearer {tokens[role]}"),) for role in Role}
    replicate = "/embps.v1.Replication/Replicate"
    assert auth.role_of(bearer[Role.SHARD]) is Role.SHARD
    assert auth.refusal(replicate, bearer[Role.TRAINER])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.role_of(bearer[Role.READER]) is None  # not a role of the PS port
    files[Role.TRAINER].write_text(tokens[Role.SHARD])
    wait_until(lambda: auth.role_of(bearer[Role.SHARD]) is None, "the trainer file read again", 10 * RELOAD_CHECK_S)
    assert auth.refusal(replicate, bearer[Role.SHARD])[0] == grpc.StatusCode.UNAUTHENTICATED
    files[Role.TRAINER].write_text(tokens[Role.READER])
    wait_until(lambda: auth.role_of(bearer[Role.SHARD]) is Role.SHARD, "the next rotation", 10 * RELOAD_CHECK_S)
    assert auth.role_of(bearer[Role.READER]) is None, "the reader's token is the trainer's now: no role's"
    assert auth.refusal("/embps.v1.ParameterServer/Push", bearer[Role.READER])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert auth.tokens_for(["/embps.v1.ParameterServer/Push"]) == []
