"""What every embps gRPC server does with a call's errors: one mapping from domain errors to
status codes, and INVALID_ARGUMENT for request bytes that do not parse.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from ps.errors import CapacityError, EmbpsError, LogGapError, UnknownTableError, WrongShardError
from ps.snapshot.manifest import SnapshotError


class ShuttingDownError(EmbpsError):
    """The shard is draining and takes no new calls (gRPC UNAVAILABLE)."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from domain errors to gRPC status codes (and the message sent)."""
    if isinstance(exc, ShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, UnknownTableError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (WrongShardError, LogGapError, SnapshotError)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the traceback is in the server's log"


class _Undecodable:
    """What a request that is not a valid protobuf message deserializes to (see UndecodableRequests)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Answers request bytes that do not parse as the method's message with INVALID_ARGUMENT.

    grpc.aio answers a request deserializer's exception with UNKNOWN, before any handler runs;
    here the deserializer of every unary-request embps method returns the error instead, and the
    method answers it through `status_of` like any other bad request.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or not method.startswith("/embps."):
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                return _Undecodable(exc)

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            code, message = status_of(ValueError(f"request: not a valid message for {method}: {request.error}"))
            await context.abort(code, message)

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for reply in behavior(request, context):
                    yield reply

            return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await behavior(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
