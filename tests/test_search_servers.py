"""The real search servers behind the integration tests (scripts/search_servers.py)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import requests
from conftest import SEARCH_SERVERS_SCRIPT

# The whole run's servers may be shifted (a second set beside the first, as on a shared machine).
ENV_PORT_OFFSET = int(os.environ.get("HINDSIGHT_PY_PORT_OFFSET") or 0)

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


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SEARCH_SERVERS_SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize("name", DEFAULT_SERVERS)
def test_root_reports_distribution_and_major_version(search_server: Callable[[str], str], name: str) -> None:
    distribution, major, port = DEFAULT_SERVERS[name]
    url = search_server(name)
    assert url == f"http://127.0.0.1:{port + ENV_PORT_OFFSET}"

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
    assert result.stdout == f"http://127.0.0.1:{39201 + ENV_PORT_OFFSET}\n"


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


def test_port_offset_shifts_every_url() -> None:
    result = run_script("url", "os2", "es7", env={"HINDSIGHT_PY_PORT_OFFSET": "1000"})

    assert result.returncode == 0, result.stderr
    assert result.stdout == "http://127.0.0.1:40201\nhttp://127.0.0.1:40202\n"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("HINDSIGHT_PY_PORT_OFFSET", "ten", "HINDSIGHT_PY_PORT_OFFSET='ten': expected an integer"),
        ("HINDSIGHT_PY_PORT_OFFSET", "30000", "HINDSIGHT_PY_PORT_OFFSET='30000': the ports would leave"),
        ("HINDSIGHT_PY_SERVICE_USER", "Search User", "HINDSIGHT_PY_SERVICE_USER='Search User': not a user name"),
    ],
)
def test_bad_environment_is_an_error_naming_the_variable(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    # An empty cache: the error must come before anything is fetched or started.
    result = run_script("start", "es8", env={"HINDSIGHT_PY_CACHE": str(tmp_path), variable: value})

    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert not (tmp_path / "servers").exists()


# ---------------------------------------------------------------------------- empty cache
# Each server started the way a fresh machine starts it: nothing unpacked, a service user
# that does not exist yet. Own cache and ports (HINDSIGHT_PY_PORT_OFFSET), so the servers
# the other tests use keep running. mvn keeps the zips in ~/.m2; unpacking, building the
# GET / module and starting happen every time (about 15-40 s a server on 2 cores).

FRESH_SERVERS = ("es7", "es8", "es9", "os2", "os3")


@dataclass
class FreshCache:
    module: ModuleType
    cache: Path
    offset: int
    user: str | None  # None when not root: the servers then run as the current user

    @property
    def env(self) -> dict[str, str]:
        env = {"HINDSIGHT_PY_CACHE": str(self.cache), "HINDSIGHT_PY_PORT_OFFSET": str(self.offset)}
        if self.user is not None:
            env["HINDSIGHT_PY_SERVICE_USER"] = self.user
        return env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_script(*args, env=self.env)

    def server(self, name: str):  # -> search_servers.Server
        return self.module.SERVERS[name]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server(name).base_http_port + self.offset}"

    def ports(self, name: str) -> tuple[int, int]:
        server = self.server(name)
        return server.base_http_port + self.offset, server.base_transport_port + self.offset

    def pid_file(self, name: str) -> Path:
        server = self.server(name)
        return self.cache / "servers" / f"{server.name}-{server.version}" / "server.pid"

    def recorded_group(self, name: str) -> int:
        return int(self.pid_file(name).read_text().split()[0])


@pytest.fixture
def fresh() -> Iterator[FreshCache]:
    module = load_search_servers()
    user = None
    if os.geteuid() == 0:
        user = f"hst{uuid.uuid4().hex[:10]}"
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
    elif os.environ.get("CI") == "true":
        pytest.fail("CI must run the tests as root: the servers' service user is created only by root")
    else:
        warnings.warn("not root: the service user part of the empty-cache starts is not tested", stacklevel=1)
    base_ports = [p for s in module.SERVERS.values() for p in (s.base_http_port, s.base_transport_port)]
    offset = next((o for o in range(1000, 20000, 100) if all(_port_free(p + o) for p in base_ports)), None)
    assert offset is not None, "no free set of ports for the empty-cache servers"
    # Not under tmp_path: every pytest session on the machine resets /tmp/pytest-of-<user> to
    # 0700 and prunes old runs, which would cut the service user off from its server's files
    # mid-test.
    state = FreshCache(module, Path(tempfile.mkdtemp(prefix="hindsight-py-servers-")), offset, user)
    try:
        yield state
    finally:
        # Whatever a failed test left running, then the user (userdel refuses while it runs
        # anything; exit 6: it never existed).
        stopped = state.run("stop")
        shutil.rmtree(state.cache, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        if user is not None:
            removed = subprocess.run(["userdel", user], capture_output=True, text=True)
            assert removed.returncode in (0, 6), removed.stderr


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (SO_REUSEADDR: connections in TIME_WAIT don't count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def _group_members(pgid: int) -> dict[int, int]:
    """pid -> uid of the processes in group `pgid`, leaving out zombies: an exited launcher
    lingers as one until init reaps it, holding nothing."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            uid = entry.stat().st_uid
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members[int(entry.name)] = uid
    return members


def _assert_serves(fresh: FreshCache, name: str) -> None:
    url, server = fresh.url(name), fresh.server(name)
    health = requests.get(f"{url}/_cluster/health", timeout=30)
    assert health.status_code == 200, health.text
    assert health.json()["status"] in ("green", "yellow")
    root = requests.get(f"{url}/", timeout=30)
    assert root.status_code == 200, root.text
    version = root.json()["version"]
    assert (version.get("distribution", "elasticsearch"), version["number"]) == (server.distribution, server.version)


def _assert_gone(fresh: FreshCache, name: str, pgid: int) -> None:
    assert _group_members(pgid) == {}
    for port in fresh.ports(name):
        assert _port_free(port), f"{name}: port {port} still taken after stop"


@pytest.mark.servers
@pytest.mark.parametrize("name", FRESH_SERVERS)
def test_starts_from_an_empty_cache_as_a_new_service_user(fresh: FreshCache, name: str) -> None:
    started = fresh.run("start", name)

    assert started.returncode == 0, started.stderr
    assert started.stdout == fresh.url(name) + "\n"
    _assert_serves(fresh, name)
    pgid = fresh.recorded_group(name)
    members = _group_members(pgid)
    assert members, f"{name}: nothing runs in the recorded process group {pgid}"
    if fresh.user is not None:
        assert f"creating the service user {fresh.user}" in started.stderr
        assert set(members.values()) == {pwd.getpwnam(fresh.user).pw_uid}

    stopped = fresh.run("stop", name)

    assert stopped.returncode == 0, stopped.stderr
    assert f"{name}: stopping process group {pgid}" in stopped.stderr
    _assert_gone(fresh, name, pgid)


@pytest.mark.servers
def test_a_server_left_without_its_pid_file_is_adopted_replaced_or_stopped(fresh: FreshCache) -> None:
    started = fresh.run("start", "es8")
    assert started.returncode == 0, started.stderr
    first = fresh.recorded_group("es8")

    # Up and answering: start takes it over as it is.
    fresh.pid_file("es8").unlink()
    adopted = fresh.run("start", "es8")

    assert adopted.returncode == 0, adopted.stderr
    assert "without a pid file; adopting it" in adopted.stderr
    assert fresh.recorded_group("es8") == first

    # Frozen: it holds its node lock but answers nothing, like a server an earlier start gave
    # up on. A new server would fail on that lock; start stops the old one first.
    fresh.pid_file("es8").unlink()
    os.killpg(first, signal.SIGSTOP)
    replaced = fresh.run("start", "es8")

    assert replaced.returncode == 0, replaced.stderr
    assert "from an earlier start; stopping it" in replaced.stderr
    assert _group_members(first) == {}
    second = fresh.recorded_group("es8")
    assert second != first
    _assert_serves(fresh, "es8")

    # Running, but no pid file: stop finds it by its data directory.
    fresh.pid_file("es8").unlink()
    stopped = fresh.run("stop", "es8")

    assert stopped.returncode == 0, stopped.stderr
    assert "without a pid file; stopping it" in stopped.stderr
    _assert_gone(fresh, "es8", second)
    again = fresh.run("stop", "es8")
    assert (again.returncode, again.stderr) == (0, "es8: not running\n")
