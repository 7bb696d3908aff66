"""A configuration error ends any `embps` command with one line naming the field and exit status 2,
not a traceback (embps.cli), whichever process reads the file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import REPO_ROOT

BAD = '[job]\nname = "x"\n'  # `job` must be a name, not a table


@pytest.mark.parametrize(
    "argv",
    [["ps", "--config", "{path}", "--shard", "0"], ["serve", "--config", "{path}"], ["launch", "{path}"]],
    ids=["ps", "serve", "launch"],
)
def test_a_bad_job_file_is_one_line_naming_the_field(tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "job.toml"
    path.write_text(BAD)
    done = subprocess.run(
        [sys.executable, "-m", "embps", *(a.format(path=path) for a in argv)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(rf"embps {argv[0]}: (job|name): ", lines[0]), lines[0]  # the command, then the field


@pytest.mark.parametrize(
    "argv",
    [
        ["ps", "--config", "{path}", "--shard", "0"],
        ["serve", "--config", "{path}"],
        ["launch", "{path}"],
        ["deploy", "render", "{path}", "--out", "{out}"],
    ],
    ids=["ps", "serve", "launch", "deploy"],
)
def test_a_missing_job_file_is_one_line_naming_the_file(tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "missing.toml"
    done = subprocess.run(
        [sys.executable, "-m", "embps", *(a.format(path=path, out=tmp_path / "out") for a in argv)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"embps {argv[0]}: {path}: No such file or directory"], done.stderr
