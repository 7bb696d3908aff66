"""tune_malloc_here: a process that frees and allocates the same large buffers again (a worker's
step) stops page-faulting them in each time (ps/process/malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ps.process.python_command import python_path
from tests.helpers.processes import REPO_ROOT

# 40 MB: above the largest threshold glibc's own adjustment reaches (32 MB), so without the settings
# every one is mmapped, faulted in again (numpy asks for huge pages: ~530 faults each here) and
# unmapped.
_STEPS = """
import json, resource, sys
import numpy as np
from ps.process.malloc import tune_malloc_here
tuned = tune_malloc_here()
np.ones(40 << 18, np.float32)  # the first allocation faults in either case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buffer = np.ones(40 << 18, np.float32)
    del buffer
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(disabled: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": python_path(str(REPO_ROOT))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if disabled:
        env["EMBPS_MALLOC_TUNING"] = "0"
    else:
        env.pop("EMBPS_MALLOC_TUNING", None)
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_freed_buffers_are_not_faulted_in_again():
    tuned = _run(disabled=False)
    untuned = _run(disabled=True)
    assert tuned["tuned"] and not untuned["tuned"]
    pages = 20 * (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert tuned["faults"] < pages // 100, tuned
    assert untuned["faults"] > 10 * (tuned["faults"] + 1), (tuned, untuned)
