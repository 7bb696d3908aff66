"""The replica's public port: a native gate (csrc/serving_gate.h) in this process.

Why a gate: the replica's gRPC server is Python (grpc.aio), and every call it touches costs
~0.2 ms of interpreter time, answered or refused. Offered a few times its capacity, it cannot
even refuse what it cannot answer: calls pile up in gRPC's core, whose default transport can
only refuse its backlog with CANCELLED (serving/shedding.py). The gate is a grpc++ server on the
public port, on threads of its own: it admits at most `max_queue` Lookups (Lookup and LookupMany
calls, one bound for both) from their request's arrival to reply (a call whose request has not come
holds no place, and is cancelled after `client_stall_seconds`) and answers one more
RESOURCE_EXHAUSTED at once, before reading it when `max_queue` were admitted as it came, in
microseconds. It also bounds
the bytes the admitted Lookups hold (request, then reply, until sent) by `max_queue_bytes`: a
Lookup read while they hold more is answered RESOURCE_EXHAUSTED too (one is always admitted).

An admitted Lookup is answered by `lookup` on one of the gate's `threads` threads (they share one
completion queue, which one of them at a time polls; see csrc/serving_gate.h), after the events
already waiting there, a NativeLookups (csrc/serving_lookup.h, built by `native_lookups`): it checks the token, parses,
reads the rows from the native store of serving/store.py and encodes the reply in C++, without
the GIL, with the codes, messages and metrics of the Lookup RPC (serving/metrics.py exports its
counts). Every other call (Status, health, reflection) goes byte for
byte with its metadata and deadline to the replica's grpc.aio server on a Unix socket in a
private directory, which checks tokens and answers as before; replies, statuses and trailing
metadata come back unchanged.

TLS (and mutual TLS) end at the gate. Rotation: GateIdentity checks the `[security]` files every
RELOAD_CHECK_S as the Python servers do (the key must match the certificate, the client CA must
parse; a set that does not load is logged and the current one kept) and writes the checked set
into the gate's private directory, key and certificate in one file so they change together;
the gate re-reads those copies every second. The directory is on /dev/shm where there is one (the
copy of the key stays in memory), mode 0700, removed when the replica stops. The Unix socket
behind the gate is plaintext, in that directory, and its server still demands the tokens.

The gate needs grpc++ at build time (Debian's libgrpc++-dev; `make install` installs it where it
can). Without the module, or with EMBPS_SERVING_GATE=0 in the environment, the replica listens
itself and sheds as serving/shedding.py describes (CANCELLED from gRPC's core under overload).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ps.security import RELOAD_CHECK_S, FileStamps, SecurityConfig, ServerPem, load_server_pem

log = logging.getLogger("embps.serving")

DISABLE_VARIABLE = "EMBPS_SERVING_GATE"

try:
    import _embps_gate
except ImportError:
    _embps_gate = None


def unavailable_reason() -> str | None:
    """Why this process serves without the gate, or None when it uses one."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip() == "0":
        return f"{DISABLE_VARIABLE}=0 in the environment"
    if _embps_gate is None:
        return "embps was built without grpc++ (install libgrpc++-dev and reinstall)"
    return None


@dataclass(frozen=True)
class GateStats:
    """Counts of Lookups (bounded) and of the other calls (forwarded)."""

    in_flight: int
    queued_bytes: int  # request and reply bytes the admitted Lookups hold
    admitted: int
    shed: int
    forwarded: int
    stalled: int  # calls cancelled because their client stopped sending or reading (client_stall_seconds)


class GateDirectory:
    """A new directory only this user can open (on /dev/shm where there is one), holding the Unix
    socket of the replica's server and the gate's copies of the TLS files; `close()` removes it.
    Its name holds the replica's pid: a replica that was killed cannot remove its own, so each new
    one removes those of this user whose replica is gone."""

    def __init__(self) -> None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
        _remove_orphans(base)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))  # mode 0700
        self.upstream = f"unix:{self.path}/upstream.sock"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_PREFIX = "embps-serving-"


def _remove_orphans(base: Path) -> None:
    """Removes this user's gate directories in `base` whose replica process no longer runs."""
    for path in base.glob(f"{_PREFIX}*-*"):
        pid = path.name[len(_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # gone meanwhile, or a process of another user: not ours to judge


class GateIdentity:
    """The serving port's TLS files as the gate reads them: checked copies, refreshed in a thread
    every RELOAD_CHECK_S after the `[security]` files change (see the module docstring)."""

    def __init__(self, security: SecurityConfig, directory: Path) -> None:
        self.security = security
        self.identity = directory / "identity.pem"  # key, then certificate chain
        self.client_ca = directory / "client-ca.pem" if security.client_ca else None
        paths = [security.tls_cert, security.tls_key, *([security.client_ca] if security.client_ca else [])]
        self._stamps = FileStamps(paths)  # taken before the files are read: a change in between is seen
        self._write(load_server_pem(security))
        self._write_failed = False  # the last copy of changed files could not be written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="embps-gate-identity", daemon=True)
        self._thread.start()

    def _write(self, pem: ServerPem) -> None:
        _replace(self.identity, pem.key.rstrip(b"\n") + b"\n" + pem.cert)
        if self.client_ca is not None and pem.client_ca is not None:
            _replace(self.client_ca, pem.client_ca)

    def check(self) -> None:
        """Copies the files for the gate when they changed and load; logs and keeps the current
        copies when they do not."""
        stamps = self._stamps.changed()
        if stamps is None:
            return
        try:
            pem = load_server_pem(self.security)
        except ValueError as exc:
            log.warning("TLS files changed but do not load (%s); keeping the current certificate", exc)
            self._stamps.last = stamps  # tried: wait for the next change
            return
        if self._stamps.now() != stamps:
            return  # changed again while being read: take the next version
        try:
            self._write(pem)
        except OSError as exc:  # a full disk: tried again at the next check, logged once
            if not self._write_failed:
                log.warning("TLS files changed, but the serving gate's copy cannot be written (%s); the gate "
                            "keeps the current certificate, and the copy is tried again every %g s", exc,
                            RELOAD_CHECK_S)
            self._write_failed = True
            return
        self._write_failed = False
        self._stamps.last = stamps
        log.info("TLS certificate reloaded from %s (the serving gate takes it within a second)", self.security.tls_cert)

    def _watch(self) -> None:
        """check() every RELOAD_CHECK_S; it raises nothing (an OSError from the copy ended this
        thread, silently, and the gate's certificate never rotated again)."""
        while not self._stop.wait(RELOAD_CHECK_S):
            self.check()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _replace(path: Path, data: bytes) -> None:
    """Writes `path` atomically (readers see the old file or the new one), readable by this user only."""
    staged = path.with_name(f".{path.name}.new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(staged, path)


NativeLookups = Any  # _embps_gate.NativeLookups: the Lookup handler in C++ (csrc/serving_lookup.h)


def native_lookups(
    tables: Sequence[Any],
    latency_buckets: Sequence[float],
    stale_after_seconds: float,
    auth: bool,
    max_reply_bytes: int = 0,
) -> NativeLookups:
    """The gate's Lookup handler over `tables` (TableReplica.native of serving/store.py): request
    durations in histograms of `latency_buckets`; auth: calls need a token set by set_tokens;
    max_reply_bytes: a call whose reply would be larger is refused RESOURCE_EXHAUSTED before any
    row is read (0: no bound)."""
    if _embps_gate is None:
        raise RuntimeError(unavailable_reason())
    return _embps_gate.NativeLookups(
        list(tables), [float(b) for b in latency_buckets], stale_after_seconds, auth, max_reply_bytes
    )


class ServingGate:
    """A running gate on `listen`; `port` is the bound public port. Calls of `lookup_methods` are
    bounded by max_queue (and their bytes by max_queue_bytes; 0: no bound) and answered by
    `lookup` on `threads` threads over one completion queue, polled by one of them at a time (0: one
    per core), the others forwarded to `upstream`. A Lookup whose client has not sent its whole
    request client_stall_seconds after it was taken, or a call whose client has not taken its reply
    that long after it was sent, is cancelled (0: never).
    identity: the gate's TLS files (None: plaintext)."""

    def __init__(
        self,
        listen: str,
        upstream: str,
        lookup_methods: Sequence[str],
        lookup: NativeLookups,
        max_queue: int,
        max_message_bytes: int,
        identity: GateIdentity | None,
        max_queue_bytes: int = 0,
        threads: int = 0,
        client_stall_seconds: float = 0.0,
    ) -> None:
        if _embps_gate is None:
            raise RuntimeError(unavailable_reason())
        files = {}
        if identity is not None:
            files = {
                "tls_cert": str(identity.identity),
                "tls_key": str(identity.identity),
                "client_ca": str(identity.client_ca or ""),
            }
        try:
            self._gate = _embps_gate.ServingGate(
                listen, upstream, list(lookup_methods), lookup, max_queue, max_message_bytes, **files,
                max_queue_bytes=max_queue_bytes, workers=threads, client_stall_seconds=client_stall_seconds,
            )
        except RuntimeError as exc:
            raise OSError(str(exc)) from exc
        self.port: int = self._gate.port

    def stats(self) -> GateStats:
        return GateStats(**self._gate.stats())

    def ended(self) -> list[tuple[str, int, int]]:
        """(method, status code, count) of the calls the gate ended itself: refused by a bound, at
        the drain, without a request, cancelled or past their deadline before their lookup ran."""
        return [tuple(row) for row in self._gate.ended()]

    def shutdown(self, grace_seconds: float) -> None:
        """Stops taking calls; calls in flight get `grace_seconds`, then are cancelled. Blocks."""
        self._gate.shutdown(grace_seconds)


class GateCounts:
    """Prometheus collector: the gate's queue and shed counts, read at each scrape."""

    def __init__(self, gate: ServingGate) -> None:
        self._gate = gate

    def collect(self) -> Iterator:
        stats = self._gate.stats()
        queue = GaugeMetricFamily(
            "embps_serving_lookup_queue", "Lookups admitted and not yet answered (the load-shedding queue)"
        )
        queue.add_metric([], stats.in_flight)
        queue_bytes = GaugeMetricFamily(
            "embps_serving_lookup_queue_bytes", "Request and reply bytes the admitted Lookups hold (max_queue_bytes)"
        )
        queue_bytes.add_metric([], stats.queued_bytes)
        shed = CounterMetricFamily(
            "embps_serving_shed_lookups",
            "Lookups answered RESOURCE_EXHAUSTED because max_queue (or max_queue_bytes) were already waiting",
        )
        shed.add_metric([], stats.shed)
        admitted = CounterMetricFamily("embps_serving_admitted_lookups", "Lookups admitted by the gate")
        admitted.add_metric([], stats.admitted)
        forwarded = CounterMetricFamily(
            "embps_serving_gate_forwarded_calls", "Calls other than Lookup the gate forwarded to the replica's server"
        )
        forwarded.add_metric([], stats.forwarded)
        stalled = CounterMetricFamily(
            "embps_serving_stalled_calls",
            "Calls cancelled because their client sent no whole Lookup or took no reply in client_stall_seconds",
        )
        stalled.add_metric([], stats.stalled)
        yield from (queue, queue_bytes, shed, admitted, forwarded, stalled)
