"""children.stop_children: the children of one command line stopped by pid, with no Popen of them."""

from __future__ import annotations

import subprocess
import sys

from ps.process import children

IGNORES_SIGTERM = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n" \
    "time.sleep(300)\n"


def test_only_the_children_of_that_command_line_are_stopped_and_one_that_ignores_sigterm_is_killed():
    argv = [sys.executable, "-c", IGNORES_SIGTERM]
    wanted = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        for proc in wanted:
            assert proc.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
        stopped = children.stop_children(argv, timeout=0.5)
        assert sorted(stopped) == sorted(p.pid for p in wanted)
        assert other.poll() is None
        for proc in wanted:  # reaped by stop_children: the Popen reads its exit back as code 0
            assert proc.poll() is not None
        assert children.stop_children(argv) == []
    finally:
        for proc in (*wanted, other):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
