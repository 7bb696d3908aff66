"""Layout rules of DESIGN section 5: ps/ is the core and imports neither worker/ nor serving/."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "ps").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_ps_imports_neither_worker_nor_serving(path):
    forbidden = imported_modules(path) & {"worker", "serving", "bench"}
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


def test_layout_has_the_design_folders():
    for name in ("ps", "worker", "serving", "proto", "csrc", "tests", "bench", ".ci"):
        assert (ROOT / name).is_dir(), f"missing folder {name}/"
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "embps.py"):
        assert (ROOT / name).is_file(), f"missing file {name}"


def test_native_core_does_not_link_torch():
    import _embps_native

    so = pathlib.Path(_embps_native.__file__)
    assert b"libtorch" not in so.read_bytes(), "the C++ core must not link torch's C++ library"


def test_console_script_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "embps", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bench" in out.stdout
