"""A configuration error ends any `embps` command with one line naming the field and exit status 2,
not a traceback (embps.cli), whichever process reads the file. A shard's own flags, checked before
it binds its port, end it the same way (status 2); a port it cannot bind ends it with status 1 and a
line naming the field."""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ps.job_config import dump_job_config
from ps.table.config import TableConfig
from tests.helpers.processes import REPO_ROOT, make_job

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
    command = "deploy render" if argv[0] == "deploy" else argv[0]  # the command as typed
    assert done.stderr.strip().splitlines() == [f"embps {command}: {path}: No such file or directory"], done.stderr


def test_an_empty_job_file_path_is_one_line(tmp_path: Path) -> None:
    """`--config ""` was read as the folder ".": "embps ps: .: Is a directory"."""
    done = subprocess.run(
        [sys.executable, "-m", "embps", "ps", "--config", "", "--shard", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["embps ps: the job's TOML file: must name a file, got ''"]


@pytest.mark.parametrize(
    "argv",
    [["ps", "--config", "{path}", "--shard", "0"], ["deploy", "render", "{path}", "--out", "{out}"]],
    ids=["ps", "deploy"],
)
def test_a_job_file_nested_too_deep_is_one_line(tmp_path: Path, argv: list[str]) -> None:
    """Arrays nested 5,000 deep raised RecursionError from the TOML parser: ~3,000 lines of traceback."""
    path = tmp_path / "deep.toml"
    path.write_text("job = " + "[" * 5000 + "]" * 5000 + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "embps", *(a.format(path=path, out=tmp_path / "out") for a in argv)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    command = "deploy render" if argv[0] == "deploy" else argv[0]
    assert done.stderr.strip().splitlines() == [f"embps {command}: {path}: not valid TOML: nested too deeply"]


def _shard_job(tmp_path: Path, metrics_port: int | None = None) -> Path:
    """A one-shard job file on free loopback ports (metrics_port: that one instead)."""
    job = make_job([TableConfig(name="t", dim=4)])
    if metrics_port is not None:
        job = dataclasses.replace(job, shards=(dataclasses.replace(job.shards[0], metrics_port=metrics_port),))
    path = tmp_path / "job.toml"
    path.write_text(dump_job_config(job))
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grace", "nan"], "--grace must be a number of seconds in [0, 86400], got nan"),
        (["--grace", "-5"], "--grace must be a number of seconds in [0, 86400], got -5.0"),
        (
            ["--stream-stall-seconds", "inf"],
            "--stream-stall-seconds must be a number of seconds in (0, 86400], got inf",
        ),
        (["--restore-step", "-1"], "--restore-step must be a snapshot step >= 0, got -1"),
        (["--subscribe-memory-bytes", "0"], "--subscribe-memory-bytes must be >= 1, got 0"),
        (["--shard", "1"], "--shard must be in [0, 1) for {path}, got 1"),
    ],
)
def test_a_bad_shard_flag_is_named_before_the_port_is_bound(tmp_path: Path, flags: list[str], message: str) -> None:
    path = _shard_job(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "embps", "ps", "--no-malloc-tuning", "--config", str(path), "--shard", "0", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2  # a usage error's, as `embps serve`'s (it was 1)
    assert done.stderr.strip().splitlines() == [f"embps ps: {message.format(path=path)}"], done.stderr


def test_a_busy_metrics_port_names_the_field_and_ends_the_shard(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _shard_job(tmp_path, metrics_port=port)
        done = subprocess.run(
            [sys.executable, "-m", "embps", "ps", "--no-malloc-tuning", "--config", str(path), "--shard", "0"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"shards[0].metrics_port: cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in done.stderr


def test_ctrl_c_before_a_command_handles_it_is_one_line_and_status_130(monkeypatch, capsys) -> None:
    """Ctrl-C during a command's imports (before its own handler) printed a KeyboardInterrupt traceback."""
    import embps

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(embps, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["embps", "ps", "--config", "job.toml"])
    assert embps.cli() == 130
    assert capsys.readouterr().err == "embps ps: interrupted\n"
