"""The real search servers behind the integration tests (scripts/search_servers.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
import requests
from conftest import SEARCH_SERVERS_SCRIPT

# name -> (distribution as `GET /` reports it, major version, port)
DEFAULT_SERVERS = {
    "es8": ("elasticsearch", 8, 39200),
    "os2": ("opensearch", 2, 39201),
}


def load_search_servers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("search_servers", SEARCH_SERVERS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules.setdefault("search_servers", module)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SEARCH_SERVERS_SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("name", DEFAULT_SERVERS)
def test_root_reports_distribution_and_major_version(search_server: Callable[[str], str], name: str) -> None:
    distribution, major, port = DEFAULT_SERVERS[name]
    url = search_server(name)
    assert url == f"http://127.0.0.1:{port}"

    response = requests.get(url + "/", timeout=30)

    assert response.status_code == 200, response.text
    version = response.json()["version"]
    # Elasticsearch has no "distribution" field; OpenSearch says "opensearch".
    assert version.get("distribution", "elasticsearch") == distribution
    assert int(version["number"].split(".")[0]) == major
    if distribution == "elasticsearch":
        # The header elasticsearch-py checks before it trusts a server.
        assert response.headers["X-Elastic-Product"] == "Elasticsearch"


@pytest.mark.parametrize("name", DEFAULT_SERVERS)
def test_indexed_document_is_counted_after_refresh(
    search_server: Callable[[str], str], scratch_index: Callable[[str], str], name: str
) -> None:
    url = search_server(name)
    index = scratch_index(url)
    document = {"eventName": "ConsoleLogin", "awsRegion": "eu-west-1", "n": 7}

    created = requests.put(f"{url}/{index}/_doc/1", json=document, timeout=30)
    assert created.status_code == 201, created.text
    requests.post(f"{url}/{index}/_refresh", timeout=30).raise_for_status()

    count = requests.get(f"{url}/{index}/_count", timeout=30)
    assert count.status_code == 200, count.text
    assert count.json()["count"] == 1
    stored = requests.get(f"{url}/{index}/_doc/1", timeout=30).json()
    assert stored["_source"] == document


def test_scratch_index_names_are_unique_and_valid(scratch_index: Callable[[str], str], es8_url: str) -> None:
    first, second = scratch_index(es8_url), scratch_index(es8_url)

    assert first != second
    # Index names must be lowercase and must not start with _, - or +.
    assert first == first.lower() and first[0].isalpha()


def test_url_prints_the_fixed_loopback_address() -> None:
    result = run_script("url", "os2")

    assert result.returncode == 0, result.stderr
    assert result.stdout == "http://127.0.0.1:39201\n"


def test_status_reports_a_healthy_server(es8_url: str) -> None:
    result = run_script("status", "es8")

    assert result.returncode == 0, result.stderr
    name, product, url, health = result.stdout.rstrip("\n").split("\t")
    assert (name, url) == ("es8", es8_url)
    assert product.startswith("elasticsearch 8.")
    assert health in ("green", "yellow")


def test_start_is_idempotent(es8_url: str) -> None:
    pid_before = _pid_file_text("es8")

    result = run_script("start", "es8")

    assert result.returncode == 0, result.stderr
    assert result.stdout == es8_url + "\n"
    assert _pid_file_text("es8") == pid_before


def test_unknown_server_is_an_error() -> None:
    result = run_script("start", "es1")

    assert result.returncode == 1
    assert "unknown server(s) es1" in result.stderr


def _pid_file_text(name: str) -> str:
    module = load_search_servers()
    path = module.pid_file(module.SERVERS[name])
    return path.read_text() if path.exists() else ""
