"""Fixtures of the security tests: a throwaway PKI and one token file per role, for the session."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from ps.security import Role
from tests.security.certs import Pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> dict[Role, str]:
    """A fresh random token per role."""
    return {role: secrets.token_urlsafe(32) for role in Role}


@pytest.fixture(scope="session")
def token_files(tmp_path_factory, tokens) -> dict[Role, Path]:
    directory = tmp_path_factory.mktemp("tokens")
    paths = {}
    for role, token in tokens.items():
        path = directory / f"{role.value}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        paths[role] = path
    return paths

