"""Shared fixtures: real shard processes on free loopback ports (see tests/helpers/processes.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers.processes import ShardCluster


@pytest.fixture
def start_cluster(tmp_path):
    """start_cluster(job, name=...) -> a running ShardCluster, stopped by pid when the test ends."""
    clusters: list[ShardCluster] = []

    def start(job, name: str = "cluster", env: dict[str, str] | None = None) -> ShardCluster:
        cluster = ShardCluster.start(job, tmp_path / name, env)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package `prometheus`); skips the test where it is absent."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install the Debian package `prometheus` (make system-tools)")
    subprocess.run([path, "--version"], check=True, capture_output=True)
    return path
