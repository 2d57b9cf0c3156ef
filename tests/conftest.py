"""Fixtures shared by the test modules; the servers themselves live in tests/support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support


@pytest.fixture(scope="session")
def corpus() -> Path:
    """../shared/corpus: real photographs and edge cases (read-only)."""
    if not (support.CORPUS / "MANIFEST.tsv").exists():
        pytest.fail(f"test corpus not found at {support.CORPUS} (set PHIZER_CORPUS)")
    return support.CORPUS


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def s3_endpoint(logs: Path) -> Iterator[str]:
    """A real S3 API (moto_server) over HTTP, shared by the session."""
    with support.moto_s3(logs) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def memcached_server(logs: Path) -> Iterator[str]:
    """A real memcached shared by the session (``host:port``)."""
    with support.memcached(logs) as (_, address):
        yield address
