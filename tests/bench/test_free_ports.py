import subprocess
import sys
from pathlib import Path

from bench.ports import free_ports

REPO = Path(__file__).resolve().parents[2]


def test_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [p for _ in range(50) for p in free_ports(4)]
    assert len(set(ports)) == len(ports) == 200
    assert not any(low <= p <= high for p in ports)
    assert all(1024 < p < 65536 for p in ports)


_HOLD = "import sys; from bench.ports import free_ports; print(*free_ports(300), flush=True); sys.stdin.read()"
_FORK = """
import os
from bench.ports import free_ports
free_ports(10)  # the parent's first block: the child inherits what is left of it
ports_read, ports_write = os.pipe()
done_read, done_write = os.pipe()
if os.fork() == 0:
    os.write(ports_write, " ".join(map(str, free_ports(100))).encode() + b"\\n")
    os.read(done_read, 1)  # alive until the parent has drawn: a dead child's blocks are free again
    os._exit(0)
os.close(ports_write)
with os.fdopen(ports_read) as pipe:
    print(pipe.readline().strip())
print(*free_ports(100))
os.write(done_write, b"x")
os.wait()
"""


def test_two_live_processes_never_hand_out_the_same_port() -> None:
    """The suite's parallel workers and the benches they start each draw ports: a port one of them
    handed out is never handed out by another while the first lives."""
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        theirs = set(map(int, other.stdout.readline().split()))
        mine = set(free_ports(300))
        assert len(theirs) == len(mine) == 300
        assert not theirs & mine
    finally:
        other.stdin.close()
        other.wait(timeout=30)


def test_a_forked_child_does_not_hand_out_its_parents_ports() -> None:
    run = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    child, parent = (set(map(int, line.split())) for line in lines)
    assert len(child) == len(parent) == 100
    assert not child & parent
