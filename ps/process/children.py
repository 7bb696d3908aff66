"""Child processes of any embps command, by pid: started to die with their parent, waited on until
their gRPC health says SERVING, stopped with SIGTERM and then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps.security import SecurityConfig, open_channel

_PR_SET_PDEATHSIG = 1
_HEALTH_POLL_S = 0.05
# The health poll's channel retries a refused connection after 50 ms, not gRPC's default 1 s: a
# process that listens 0.25 s after its start was seen serving 0.9 s after it (every shard, replica
# and standby `embps launch` starts), the rest of the second spent waiting for the channel's backoff.
# A connection attempt may still take up to a second on a busy machine.
POLL_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
)


def die_with_parent() -> None:
    """Get SIGTERM when the parent dies, even by SIGKILL (Linux). Called in the child itself, never
    as a preexec_fn: that makes subprocess fork the parent, and a fork while another thread is inside
    a gRPC call skips grpc's fork handlers, which leaves some children dead before their exec
    (SIGABRT or SIGSEGV; tests/ps/test_children_die_with_parent.py). popen_dying_with_parent
    starts a program that cannot call it itself."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


# Run by a Python of its own, which arranges to die with its parent and then becomes the program
# (the arrangement survives the exec). Without a preexec_fn, subprocess starts it by vfork: no fork
# handler runs and no code of this process runs in the child.
_DIE_WITH_PARENT_THEN_EXEC = """
import ctypes, os, signal, sys
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit("the parent %s died before its child %s started" % (sys.argv[1], os.getpid()))
os.execvp(sys.argv[2], sys.argv[2:])
"""


def popen_dying_with_parent(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen_kwargs) of a process that gets SIGTERM when this one dies,
    even by SIGKILL (Linux), safe while other threads call gRPC (see die_with_parent). The
    signal comes when the thread that called this ends, as with any parent-death signal."""
    if "preexec_fn" in popen_kwargs:
        raise ValueError("popen_dying_with_parent: preexec_fn would fork this process")
    trampoline = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT_THEN_EXEC, str(os.getpid())]
    return subprocess.Popen([*trampoline, *argv], **popen_kwargs)


# The pid of `embps launch`, in the environment of every process it starts. Each child arranges to
# die with it (die_with_launcher) as its first step: the launcher starts new standbys and restarted
# replicas from threads while others call shards over gRPC, so it cannot do that in a preexec_fn.
LAUNCHER_PID_ENV = "EMBPS_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a process started by `embps launch` (a shard, a replica, a worker): SIGTERM when the
    launcher dies (even by SIGKILL), and exit now if it is already gone. Does nothing in a process
    started otherwise. The signal comes when the launcher's thread that started this process ends,
    so the launcher starts children from threads that live as long as the children."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None:
        return
    die_with_parent()
    if os.getppid() != int(launcher):  # it died before the prctl: no signal will come
        raise SystemExit(f"embps: the launcher (pid {launcher}) is gone")


def wait_serving(
    address: str,
    proc: subprocess.Popen,
    name: str,
    timeout: float = 90.0,
    security: SecurityConfig | None = None,
    service: str = "",
    progress: Callable[[], object] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Polls the gRPC health of `service` ("": the whole server) at `address` (over TLS when
    `security` has it; health needs no token) until SERVING; RuntimeError naming `name` if the
    process exits first or `cancelled()` turns true (its caller is stopping: a launcher's Ctrl-C
    waited out the whole timeout behind a replica's restart), TimeoutError if the timeout passes first.

    With `progress` (a function whose value changes while the process makes headway, e.g. the size
    of its log while it restores a snapshot) the timeout counts from the last change instead: a
    start that takes an hour is waited for as long as it moves, one that stalls fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last = progress() if progress is not None else None
    with open_channel(address, security or SecurityConfig(), role=None, options=POLL_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting")
            if cancelled is not None and cancelled():
                raise RuntimeError(f"{name}: its start was cancelled")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if progress is not None and (now := progress()) != last:
                last, deadline = now, time.monotonic() + timeout
            time.sleep(_HEALTH_POLL_S)
    stalled = " (no progress for that long)" if progress is not None else ""
    raise TimeoutError(f"{name} at {address} was not serving after {timeout:.0f} s{stalled}")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """stop() for many at once: SIGTERM to each, then the waits, so they drain in parallel."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_children(argv: list[str], timeout: float = 15.0) -> list[int]:
    """Stops every live child of this process whose command line is `argv`, one this process holds
    no Popen of: SIGTERM to each, then SIGKILL to any still alive after `timeout`; returns their pids.

    For children another library started and lost track of (torch's elastic agent records its
    workers only once all of them started). Each is held by a pidfd from before its command line is
    checked until it is reaped, so a pid reused meanwhile is never signalled (Linux /proc)."""
    wanted, me = [os.fsencode(arg) for arg in argv], os.getpid()
    held: dict[int, int] = {}
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or _parent(entry.name) != me:
                continue
            try:
                fd = os.pidfd_open(int(entry.name))
            except ProcessLookupError:
                continue
            try:  # read after the pidfd is open: it is this process's, not a reuse of its pid
                same = _parent(entry.name) == me and _cmdline(entry.name) == wanted
            except OSError:
                same = False
            if same:
                held[int(entry.name)] = fd
            else:
                os.close(fd)
        for fd in held.values():
            _pidfd_signal(fd, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for fd in held.values():
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                _pidfd_signal(fd, signal.SIGKILL)
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED)
            except ChildProcessError:  # reaped already (subprocess reaps a Popen it lost, later)
                pass
    finally:
        for fd in held.values():
            os.close(fd)
    return list(held)


def _parent(pid: str) -> int | None:
    """The parent pid of process `pid` (its /proc stat; the name in parentheses may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: str) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[:-1]


def _pidfd_signal(fd: int, signum: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(fd, signum)
    except ProcessLookupError:  # it exited already
        pass


def describe_exit(returncode: int) -> str:
    """How a child ended, from its Popen return code: 'killed by SIGKILL' or 'code 1'."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
