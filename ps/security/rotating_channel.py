"""Client channels whose TLS credentials may change while the process runs.

gRPC Python fixes a channel's credentials when the channel is made, so a rotated client
certificate or CA (a Secret update) would otherwise be used only after a restart. These wrappers
hold the channel of the current credentials and open a new one when the credentials change:
calls made after the change go through the new channel (a new connection, a new handshake);
calls already running on the old channel go on, and the old channel is closed RETIRE_S later
(its calls still running then are cancelled, and a client retries them as any CANCELLED).

Stubs are built on the wrapper once, as on any channel; each call asks for the current channel,
which while nothing changes costs a clock read and two comparisons, ~0.75 us (the credentials,
ps.security.ClientCertificates, look at their files at most once a second). Connectivity
subscriptions follow the channel of the moment they are made.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc

RETIRE_S = 60.0  # how long a replaced channel stays open for the calls already on it


class RotatingCredentials(Protocol):
    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """(generation, credentials): the generation grows by one at each change."""


class _Method:
    """A multicallable that runs on the owner's current channel (sync or aio)."""

    def __init__(self, owner: RotatingChannel | RotatingAioChannel, kind: str, args: tuple, kwargs: dict) -> None:
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs
        self._cached: tuple[int, Any] = (-1, None)

    def _current(self) -> Any:
        generation, channel = self._owner.current()
        cached_generation, method = self._cached
        if cached_generation != generation:
            method = getattr(channel, self._kind)(*self._args, **self._kwargs)
            self._cached = (generation, method)
        return method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # with_call, future
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._current(), name)


class _Rotation:
    """The channel of the current credentials; shared by the sync and aio wrappers."""

    def __init__(
        self,
        credentials: RotatingCredentials,
        open_channel: Callable[[grpc.ChannelCredentials], Any],
        retire: Callable[[Any], None],
    ) -> None:
        self._credentials = credentials
        self._open = open_channel
        self._retire = retire  # closes a replaced channel once its calls have had RETIRE_S
        self._lock = threading.Lock()
        generation, first = credentials.current()
        self._state = (generation, open_channel(first))
        self._closed = False

    def current(self) -> tuple[int, Any]:
        generation, credentials = self._credentials.current()
        state = self._state
        if generation == state[0] or self._closed:
            return state
        with self._lock:
            if generation != self._state[0] and not self._closed:
                old = self._state[1]
                self._state = (generation, self._open(credentials))
                self._retire(old)
            return self._state

    def unary_unary(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _Method:
        return _Method(self, "stream_stream", args, kwargs)


class RotatingChannel(_Rotation, grpc.Channel):
    """A blocking channel (grpc.Channel) that follows its credentials; see the module docstring."""

    def __init__(
        self, credentials: RotatingCredentials, open_channel: Callable[[grpc.ChannelCredentials], Any]
    ) -> None:
        self._retiring: list[tuple[threading.Timer, grpc.Channel]] = []
        super().__init__(credentials, open_channel, self._close_later)

    def _close_later(self, channel: grpc.Channel) -> None:
        def close() -> None:
            with self._lock:
                self._retiring = [(t, c) for t, c in self._retiring if c is not channel]
            channel.close()

        timer = threading.Timer(RETIRE_S, close)
        timer.daemon = True
        timer.start()
        self._retiring.append((timer, channel))

    def subscribe(self, callback: Callable, try_to_connect: bool = False) -> None:
        self.current()[1].subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable) -> None:
        for channel in [self._state[1], *(c for _, c in self._retiring)]:
            channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            retiring, self._retiring = self._retiring, []
        for timer, channel in retiring:
            timer.cancel()
            channel.close()
        self._state[1].close()

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False


class RotatingAioChannel(_Rotation, grpc.aio.Channel):
    """A grpc.aio channel that follows its credentials; see the module docstring. Credentials are
    checked when a call is made, on the event loop."""

    def __init__(
        self, credentials: RotatingCredentials, open_channel: Callable[[grpc.ChannelCredentials], Any]
    ) -> None:
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}
        super().__init__(credentials, open_channel, self._close_later)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=RETIRE_S))
        self._retiring[task] = channel
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def close(self, grace: float | None = None) -> None:
        with self._lock:
            self._closed = True
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await asyncio.gather(*(channel.close(grace) for channel in [*retiring.values(), self._state[1]]))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current()[1].get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current()[1].wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current()[1].channel_ready()

    async def __aenter__(self) -> RotatingAioChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)
