"""The client side: channels to an embps port with TLS and the caller's bearer token.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import grpc

from ps.security.certificates import ClientCertificates
from ps.security.config import Role, SecurityConfig
from ps.security.rotating_channel import RotatingAioChannel, RotatingChannel
from ps.security.tokens import LiveToken

# Channel options of every long-lived client channel to a process that may restart (a worker's to
# its shards, a replica's followers, ServingClient's to replicas): a refused or dropped connection
# is tried again within a second. gRPC's default backoff starts at 1 s and grows 1.6x per failure
# up to 2 minutes, while calls fail at once: a client whose server was down for 20 s got its first
# answer 7.2 s after the server was back (0.15 s with these), and after a longer outage it would
# wait up to 2 minutes more. min_reconnect_backoff_ms is gRPC's shortest time for one connection
# attempt (TCP, TLS, the server's HTTP/2 settings), not a backoff: at 100 ms a server more than a
# few tens of ms of round trips away (another zone or region, TLS) was never reached in time, each
# attempt cut before its settings arrived, the first calls failing; past the backoff's 1 s cap it
# was never reached at all. A refused connection still fails at once and is tried again in 0.1 s.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: LiveToken) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        d = details
        metadata = (*(d.metadata or ()), ("authorization", f"Bearer {self._token.current()}"))
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _AioBearerToken:
    """Adds `authorization: Bearer <token>` to the calls of a grpc.aio channel. grpc.aio files an
    interceptor under the first call kind it is an instance of, so each kind gets its own class."""

    def __init__(self, token: LiveToken) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        header = ("authorization", f"Bearer {self._token.current()}")
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), header))


class _AioUnaryUnary(_AioBearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioBearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioBearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioBearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _client_token(security: SecurityConfig, role: Role | None) -> LiveToken | None:
    if role is None or not security.auth:
        return None
    token = LiveToken.of(security, role)
    if token is None:
        raise ValueError(
            f"security.tokens.{role.value}: auth is on (tokens are configured) but this role, which this "
            f"process calls as, has no token"
        )
    return token


def open_channel(
    address: str,
    security: SecurityConfig,
    role: Role | None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A blocking channel to an embps port: TLS when the job has it, and `role`'s token (if auth is
    on and role is not None) on every call. role None: health checks only."""
    options = list(options)
    token = _client_token(security, role)

    def with_token(channel: grpc.Channel) -> grpc.Channel:
        return grpc.intercept_channel(channel, _BearerToken(token)) if token is not None else channel

    if security.tls:  # a new channel when the client certificate or CA changes
        return RotatingChannel(
            ClientCertificates(security),
            lambda credentials: with_token(grpc.secure_channel(address, credentials, options=options)),
        )
    return with_token(grpc.insecure_channel(address, options=options))


def open_aio_channel(
    address: str,
    security: SecurityConfig,
    role: Role | None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """As open_channel, for grpc.aio."""
    options = list(options)
    token = _client_token(security, role)
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    interceptors = [kind(token) for kind in kinds] if token is not None else None
    if security.tls:  # a new channel when the client certificate or CA changes
        return RotatingAioChannel(
            ClientCertificates(security),
            lambda credentials: grpc.aio.secure_channel(
                address, credentials, options=options, interceptors=interceptors
            ),
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
