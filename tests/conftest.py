"""Shared paths and the real Elasticsearch/OpenSearch servers for the tests.

Servers come from scripts/search_servers.py: started on first use in a session (or found
already running) and left running afterwards, so the next session starts in no time.
A server that cannot start fails the tests that need it, with its log: CI must prove the
integration, never skip it.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
# Real CloudTrail records (third-party data, tests/data/cloudtrail/README.md)
CLOUDTRAIL_DATA = REPO_ROOT / "tests" / "data" / "cloudtrail"
CLOUDTRAIL_NDJSON = CLOUDTRAIL_DATA / "stratus-red-team.ndjson"  # the 310 records, one a line
CLOUDTRAIL_ARRAYS = CLOUDTRAIL_DATA / "stratus-red-team-arrays"  # the same, as CloudTrail's files
# The project's generator of synthetic CloudTrail lines (also run by benchmarks/run.py)
CLOUDTRAIL_GENERATOR = REPO_ROOT / "tests" / "cloudtrail_gen.py"
SEARCH_SERVERS_SCRIPT = REPO_ROOT / "scripts" / "search_servers.py"

# Fixtures that reach a real server; tests using them get the `servers` marker.
SERVER_FIXTURES = frozenset({"search_server", "es8_url", "os2_url", "scratch_index"})

_server_urls: dict[str, str] = {}
_server_failures: dict[str, str] = {}


def start_search_server(name: str) -> str:
    """The base URL of server `name` (es8, os2, es7, os3, es9), starting it if needed."""
    if name in _server_urls:
        return _server_urls[name]
    if name not in _server_failures:
        result = subprocess.run(
            [sys.executable, str(SEARCH_SERVERS_SCRIPT), "start", name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            _server_urls[name] = result.stdout.split()[-1]
            return _server_urls[name]
        # Remembered so every later test fails at once instead of waiting for it again.
        _server_failures[name] = result.stderr[-8000:]
    pytest.fail(f"search server {name} did not start:\n{_server_failures[name]}", pytrace=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from hindsight_py._lupa import FLAVOUR

    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        if FLAVOUR != "lua51" and item.get_closest_marker("lua51"):
            # scripts/test.sh runs these again under HINDSIGHT_PY_LUA=lua51
            item.add_marker(pytest.mark.skip(reason="expects PUC Lua 5.1 byte for byte; runs under "
                                                    "HINDSIGHT_PY_LUA=lua51"))


@pytest.fixture(scope="session")
def search_server() -> Callable[[str], str]:
    """`search_server("os3")` -> base URL, for the servers without a fixture of their own."""
    return start_search_server


@pytest.fixture(scope="session")
def es8_url() -> str:
    return start_search_server("es8")


@pytest.fixture(scope="session")
def os2_url() -> str:
    return start_search_server("os2")


@pytest.fixture
def scratch_index() -> Iterator[Callable[[str], str]]:
    """`scratch_index(base_url)` -> a fresh index name, deleted after the test together with
    every index that starts with it (`<name>-2024.01.01` and the like)."""
    created: list[tuple[str, str]] = []

    def make(base_url: str) -> str:
        name = f"hsp-test-{uuid.uuid4().hex[:12]}"
        created.append((base_url, name))
        return name

    yield make
    for base_url, name in created:
        response = requests.delete(
            f"{base_url}/{name},{name}-*",
            params={"expand_wildcards": "all", "ignore_unavailable": "true"},
            timeout=60,
        )
        assert response.status_code == 200, f"cleanup of {name} on {base_url}: {response.text}"


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (for connection-refused cases)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
