"""Children started by the bench and the tests keep the PYTHONPATH they inherit (behind the repo
root): a package installed with `pip --target` and put on PYTHONPATH stays importable in them."""

import os
import subprocess
import sys

from ps.process.children import python_path
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
