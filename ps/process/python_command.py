"""How a child Python is started: the command, and the PYTHONPATH that finds this code."""

from __future__ import annotations

import os
import sys


def python_path(*first: str) -> str:
    """A child's PYTHONPATH: `first` (e.g. the repository root), then the one this process got.

    Replacing the inherited value would hide packages installed with `pip --target` and put on
    PYTHONPATH (a machine's own site, a separate peer's folder) from the child alone.
    """
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (*first, inherited) if p)


# The folder that holds this code's packages (ps/, worker/, serving/ and embps.py): the repository
# root, or site-packages for an installed copy.
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_module(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of a child Python that runs `python -m module args` from this code.

    `-P`: the working directory is not put first on sys.path, where a user's ps.py, serving.py or
    worker.py there was imported instead of this package (and its top-level code run). The code
    root goes on PYTHONPATH instead, so a child finds the same code as this process, installed or
    run from a checkout; an installed copy's site-packages is on the path already."""
    env = dict(os.environ)
    if os.path.basename(CODE_ROOT) not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = python_path(CODE_ROOT)
    return [sys.executable, "-P", "-m", module, *args], env
