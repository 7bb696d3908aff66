"""Children started by the bench and the tests keep the PYTHONPATH they inherit (behind the repo
root): a package installed with `pip --target` and put on PYTHONPATH stays importable in them."""

import os
import subprocess
import sys

from ps.process.python_command import python_module, python_path
from tests.helpers.processes import REPO_ROOT


def test_a_child_imports_a_package_only_the_inherited_pythonpath_holds(tmp_path, monkeypatch):
    (tmp_path / "only_on_pythonpath.py").write_text("WHERE = 'inherited'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    path = python_path(str(REPO_ROOT))
    assert path.split(os.pathsep) == [str(REPO_ROOT), str(tmp_path)]
    child = subprocess.run(
        [sys.executable, "-c", "import only_on_pythonpath, ps; print(only_on_pythonpath.WHERE)"],
        env={**os.environ, "PYTHONPATH": path}, cwd=tmp_path.parent, capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "inherited"


def test_no_empty_entries_when_nothing_is_inherited(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert python_path("/a", "", "/b") == f"/a{os.pathsep}/b"


def test_a_child_runs_this_code_whatever_files_its_working_directory_holds(tmp_path):
    """Children (`embps launch`'s shards, replicas and workers, the malloc re-exec of ps and serve)
    ran `python -m`, which puts the working directory first on sys.path: a user's ps.py, serving.py
    or worker.py there was imported instead of this code, its top-level code run."""
    for name in ("ps", "serving", "worker", "embps"):
        (tmp_path / f"{name}.py").write_text("import sys; print('SHADOWED'); sys.exit(3)\n")
    argv, env = python_module("embps", "ps", "--help")
    child = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "SHADOWED" not in child.stdout and "--shard" in child.stdout
