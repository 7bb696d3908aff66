"""Children that die with the process that started them (ps/process/children.py
popen_dying_with_parent): started without forking that process, so other threads may be inside gRPC
calls meanwhile, and still sent SIGTERM when it dies, even by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from ps.process import children
from tests.helpers.waiting import eventually

REPO = Path(__file__).resolve().parents[2]


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


@pytest.mark.processes
def test_children_start_while_other_threads_are_inside_grpc_calls():
    """A preexec_fn made subprocess fork this process; with calls in flight on other threads grpc
    skipped its fork handlers and some children died before their exec (1-3 of these 150 in each
    of 4 runs, by SIGABRT or SIGSEGV)."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {"Call": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/t.Echo/Call")
    stop = threading.Event()
    calls = [0]

    def caller() -> None:
        while not stop.is_set():
            call(b"", timeout=10)
            calls[0] += 1

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        codes = []
        for _ in range(150):
            child = children.popen_dying_with_parent(["sh", "-c", "exit 7"], stderr=subprocess.DEVNULL)
            codes.append(child.wait(timeout=30))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        channel.close()
        server.stop(None)
    assert calls[0] > 0, "no gRPC call was in flight while the children started"
    assert codes == [7] * 150, f"{sum(c != 7 for c in codes)} children died before running: {set(codes)}"


_MIDDLE = """
import sys
from ps.process import children
child = children.popen_dying_with_parent(["sleep", "120"])
print(child.pid, flush=True)
sys.stdin.read()
"""


def test_a_child_gets_sigterm_when_its_parent_is_killed():
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)  # fmt: skip
    pid = 0
    try:
        pid = int(middle.stdout.readline())
        # The pid is the program's: the trampoline that arranged the signal became it by exec.
        assert eventually(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"), 10)
        middle.kill()
        middle.wait()
        assert eventually(lambda: _state(pid) in ("gone", "Z"), 10), f"child {pid} outlived its SIGKILLed parent"
    finally:
        middle.kill()
        middle.wait()
        if pid and _state(pid) not in ("gone", "Z"):
            os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_preexec_fn_is_refused():
    with pytest.raises(ValueError, match="preexec_fn would fork this process"):
        children.popen_dying_with_parent(["true"], preexec_fn=os.getpid)
