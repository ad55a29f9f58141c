#!/usr/bin/env python3
"""Real Elasticsearch/OpenSearch servers on loopback, for the tests and the demo.

    python scripts/search_servers.py fetch|start|stop|status|url [names...]

Each server is an integ-test-zip from Maven Central (downloaded once with
`mvn dependency:copy`), unpacked under
`${HINDSIGHT_PY_CACHE:-~/.cache/hindsight-py}/servers/<name>-<version>/` next to its data,
logs and pid file, and run detached on a fixed 127.0.0.1 port, so every run reuses the
same download and, while it stays up, the same process.

`start` prints one base URL per line (progress goes to stderr); it is idempotent.
A server counts as running while the process group `start` made for it lives (its pid
file names the group and its leader's start time, so a recycled pid never counts) or
while some process holds a file under its data directory: `start` and `stop` also find
a server whose pid file is gone, say so, and adopt or stop it.

Environment:
  HINDSIGHT_PY_CACHE         cache directory (default ~/.cache/hindsight-py)
  HINDSIGHT_PY_PORT_OFFSET   added to every port (default 0: HTTP 39200-39204, transport
                             39300-39304), to run a second set beside the first
  HINDSIGHT_PY_SERVICE_USER  the account the servers run as when started by root, created
                             on first use (default hsearch): the servers refuse to run as root
  HINDSIGHT_PY_<NAME>_JAVA_HOME  the JDK for server <NAME> (e.g. ES7), instead of the oldest
                             suitable one under /usr/lib/jvm

Standard library only: this runs before the project is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
# Elasticsearch and OpenSearch refuse to run as root.
DEFAULT_SERVICE_USER = "hsearch"
HEAP = "-Xms512m -Xmx512m"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
JVM_ROOT = Path("/usr/lib/jvm")


@dataclass(frozen=True)
class Server:
    name: str
    distribution: str  # "elasticsearch" or "opensearch", as `GET /` reports it
    version: str
    base_http_port: int  # before HINDSIGHT_PY_PORT_OFFSET
    base_transport_port: int
    java_min: int
    java_max: int | None = None

    @property
    def http_port(self) -> int:
        return self.base_http_port + port_offset()

    @property
    def transport_port(self) -> int:
        return self.base_transport_port + port_offset()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def artifact(self) -> str:
        group = "org.elasticsearch" if self.distribution == "elasticsearch" else "org.opensearch"
        return f"{group}.distribution.integ-test-zip:{self.distribution}:{self.version}:zip"

    @property
    def env_prefix(self) -> str:
        return "ES" if self.distribution == "elasticsearch" else "OPENSEARCH"


# Newest integ-test-zips that Maven Central actually serves (its maven-metadata.xml lags:
# 9.x is missing there but downloads).
SERVERS: dict[str, Server] = {
    s.name: s
    for s in (
        Server("es8", "elasticsearch", "8.19.21", 39200, 39300, java_min=17),
        Server("os2", "opensearch", "2.19.6", 39201, 39301, java_min=11),
        Server("es7", "elasticsearch", "7.17.29", 39202, 39302, java_min=11, java_max=17),
        Server("os3", "opensearch", "3.6.0", 39203, 39303, java_min=21),
        Server("es9", "elasticsearch", "9.5.3", 39204, 39304, java_min=21),
    )
}
DEFAULT_NAMES = ("es8", "os2")


class ServerError(RuntimeError):
    pass


def port_offset() -> int:
    """HINDSIGHT_PY_PORT_OFFSET: shifts every port, so a second set of servers (e.g. the
    tests' empty-cache starts) runs beside the usual one."""
    raw = os.environ.get("HINDSIGHT_PY_PORT_OFFSET", "").strip()
    if not raw:
        return 0
    try:
        offset = int(raw)
    except ValueError:
        raise ServerError(f"HINDSIGHT_PY_PORT_OFFSET={raw!r}: expected an integer") from None
    ports = [port for s in SERVERS.values() for port in (s.base_http_port, s.base_transport_port)]
    if min(ports) + offset < 1024 or max(ports) + offset > 65535:
        raise ServerError(
            f"HINDSIGHT_PY_PORT_OFFSET={raw!r}: the ports would leave 1024-65535 "
            f"(they are {min(ports)}-{max(ports)} plus the offset)"
        )
    return offset


def service_user_name() -> str:
    """HINDSIGHT_PY_SERVICE_USER, or hsearch."""
    name = os.environ.get("HINDSIGHT_PY_SERVICE_USER") or DEFAULT_SERVICE_USER
    # useradd's own rule for portable names; checked here so the error names the variable.
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name):
        raise ServerError(
            f"HINDSIGHT_PY_SERVICE_USER={name!r}: not a user name (a lowercase letter or _, then "
            "lowercase letters, digits, _ or -; at most 32 characters)"
        )
    return name


# ---------------------------------------------------------------------------- paths


def cache_root() -> Path:
    base = os.environ.get("HINDSIGHT_PY_CACHE") or str(Path.home() / ".cache" / "hindsight-py")
    # Absolute and without symlinks: the data directory is recognised in /proc/<pid>/fd,
    # where the kernel shows resolved paths.
    return Path(base).expanduser().resolve() / "servers"


def server_dir(server: Server) -> Path:
    return cache_root() / f"{server.name}-{server.version}"


def home_dir(server: Server) -> Path:
    return server_dir(server) / "home"


def data_dir(server: Server) -> Path:
    return server_dir(server) / "data"


def pid_file(server: Server) -> Path:
    """`<process group> <its leader's start time>`, written by `start`."""
    return server_dir(server) / "server.pid"


def console_log(server: Server) -> Path:
    return server_dir(server) / "console.log"


@contextlib.contextmanager
def locked(server: Server) -> Iterator[None]:
    """Serialises fetch/start/stop of one server across processes (pytest + a shell)."""
    directory = server_dir(server)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def log_tail(server: Server, lines: int = 40) -> str:
    try:
        text = console_log(server).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------- fetch


def fetch(server: Server) -> Path:
    """Downloads and unpacks the server once; returns its home directory."""
    home = home_dir(server)
    if (home / "bin").is_dir():
        return home
    directory = server_dir(server)
    archive = directory / f"{server.distribution}-{server.version}.zip"
    if not archive.is_file():
        _download(server, archive)
    log(f"{server.name}: unpacking {archive.name}")
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=directory))
    try:
        _unzip(archive, staging)
        (top,) = staging.iterdir()  # the zip holds a single <distribution>-<version>/ folder
        if server.distribution == "elasticsearch" and not _answers_root(top):
            _build_root_module(server, top, staging)
        top.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return home


def _download(server: Server, archive: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServerError(f"{server.name}: mvn not found (apt-get install -y maven)")
    log(f"{server.name}: downloading {server.artifact} with mvn")
    with tempfile.TemporaryDirectory(prefix=".mvn-", dir=archive.parent) as out:
        result = subprocess.run(
            [mvn, "-q", "-B", "dependency:copy", f"-Dartifact={server.artifact}", f"-DoutputDirectory={out}"],
            cwd=out,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        zips = list(Path(out).glob("*.zip"))
        if result.returncode != 0 or len(zips) != 1:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise ServerError(f"{server.name}: mvn dependency:copy {server.artifact} failed:\n{tail}")
        # Rename last so an interrupted download never looks complete.
        zips[0].rename(archive)


def _unzip(archive: Path, target: Path) -> None:
    # zipfile drops Unix modes; the launch scripts need their exec bits back.
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            path = target / info.filename
            if stat.S_ISLNK(mode):
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(zf.read(info).decode(), path)
                continue
            zf.extract(info, target)
            if mode & 0o7777:
                os.chmod(path, mode & 0o7777)


def _answers_root(home: Path) -> bool:
    """Whether the unpacked distribution has a handler for `GET /`: RestMainAction sits in
    the core jar up to 7.x and in the rest-root module from 8.0, which the integ-test-zips
    of 8+ leave out."""
    for jar in (*home.glob("lib/*.jar"), *home.glob("modules/*/*.jar")):
        with zipfile.ZipFile(jar) as zf:
            if any(name.endswith("/RestMainAction.class") for name in zf.namelist()):
                return True
    return False


# Without RestMainAction, `GET /` (what clients and our output use to tell the product
# and version apart) answers 405. This small module of our own answers it as rest-root
# does; it is compiled against the very jars of the server at fetch time, and uses APIs
# of 8.x and later only (PluginServices, NodeFeature), which is all it is built for.
ROOT_MODULE_SOURCE = """\
package hindsightpy.restroot;

import java.util.Collection;
import java.util.List;
import org.elasticsearch.Build;
import org.elasticsearch.client.internal.node.NodeClient;
import org.elasticsearch.cluster.service.ClusterService;
import org.elasticsearch.plugins.ActionPlugin;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.rest.RestChannel;
import org.elasticsearch.rest.RestHandler;
import org.elasticsearch.rest.RestRequest;
import org.elasticsearch.rest.RestResponse;
import org.elasticsearch.rest.RestStatus;
import org.elasticsearch.xcontent.XContentBuilder;

public class RestRootPlugin extends Plugin implements ActionPlugin {
    private volatile ClusterService clusterService;

    @Override
    public Collection<?> createComponents(PluginServices services) {
        clusterService = services.clusterService();
        return List.of();
    }

    @Override
    public Collection<RestHandler> getRestHandlers(@PARAMETERS@) {
        return List.of(new RootHandler());
    }

    private final class RootHandler implements RestHandler {
        @Override
        public List<Route> routes() {
            return List.of(new Route(RestRequest.Method.GET, "/"), new Route(RestRequest.Method.HEAD, "/"));
        }

        @Override
        public void handleRequest(RestRequest request, RestChannel channel, NodeClient client) throws Exception {
            if (request.method() == RestRequest.Method.HEAD) {
                channel.sendResponse(new RestResponse(RestStatus.OK, "application/json; charset=UTF-8", ""));
                return;
            }
            Build build = Build.current();
            XContentBuilder body = channel.newBuilder();
            body.startObject();
            body.field("name", clusterService.getNodeName());
            body.field("cluster_name", clusterService.getClusterName().value());
            body.field("cluster_uuid", clusterService.state().metadata().clusterUUID());
            body.startObject("version");
            body.field("number", build.qualifiedVersion());
            body.field("build_flavor", "default");
            body.field("build_type", build.type().displayName());
            body.field("build_hash", build.hash());
            body.field("build_date", build.date());
            body.field("build_snapshot", build.isSnapshot());
            body.field("lucene_version", org.apache.lucene.util.Version.LATEST.toString());
            body.field("minimum_wire_compatibility_version", build.minWireCompatVersion());
            body.field("minimum_index_compatibility_version", build.minIndexCompatVersion());
            body.endObject();
            body.field("tagline", "You Know, for Search");
            body.endObject();
            channel.sendResponse(new RestResponse(RestStatus.OK, body));
        }
    }
}
"""
# getRestHandlers took nine arguments until 9.x folded most of them into a record.
ROOT_HANDLER_PARAMETERS_RECORD = (
    "ActionPlugin.RestHandlersServices services,"
    " java.util.function.Supplier<org.elasticsearch.cluster.node.DiscoveryNodes> nodes,"
    " java.util.function.Predicate<org.elasticsearch.features.NodeFeature> features"
)
ROOT_HANDLER_PARAMETERS_LEGACY = (
    "org.elasticsearch.common.settings.Settings settings,"
    " org.elasticsearch.common.io.stream.NamedWriteableRegistry registry,"
    " org.elasticsearch.rest.RestController controller,"
    " org.elasticsearch.common.settings.ClusterSettings clusterSettings,"
    " org.elasticsearch.common.settings.IndexScopedSettings indexScopedSettings,"
    " org.elasticsearch.common.settings.SettingsFilter settingsFilter,"
    " org.elasticsearch.cluster.metadata.IndexNameExpressionResolver resolver,"
    " java.util.function.Supplier<org.elasticsearch.cluster.node.DiscoveryNodes> nodes,"
    " java.util.function.Predicate<org.elasticsearch.features.NodeFeature> features"
)


def _build_root_module(server: Server, home: Path, workdir: Path) -> None:
    log(f"{server.name}: compiling the GET / module")
    server_jar = home / "lib" / f"elasticsearch-{server.version}.jar"
    with zipfile.ZipFile(server_jar) as zf:
        has_record = "org/elasticsearch/plugins/ActionPlugin$RestHandlersServices.class" in zf.namelist()
    parameters = ROOT_HANDLER_PARAMETERS_RECORD if has_record else ROOT_HANDLER_PARAMETERS_LEGACY
    build = workdir / "rest-root-build"
    source = build / "src" / "hindsightpy" / "restroot" / "RestRootPlugin.java"
    source.parent.mkdir(parents=True)
    source.write_text(ROOT_MODULE_SOURCE.replace("@PARAMETERS@", parameters))
    classes = build / "classes"
    jdk = _jdk_for(server, tool="javac")
    result = subprocess.run(
        [
            str(jdk / "bin" / "javac"),
            "--release",
            str(server.java_min),
            "-nowarn",
            "-cp",
            str(home / "lib" / "*"),
            "-d",
            str(classes),
            str(source),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ServerError(
            f"{server.name}: compiling the GET / module failed:\n{result.stdout}{result.stderr}"
        )
    module = home / "modules" / "hindsight-rest-root"
    module.mkdir()
    with zipfile.ZipFile(module / "hindsight-rest-root.jar", "w") as jar:
        for path in sorted(classes.rglob("*.class")):
            jar.write(path, path.relative_to(classes).as_posix())
    (module / "plugin-descriptor.properties").write_text(
        "description=GET / for distributions without the rest-root module (hindsight-py tests)\n"
        f"version={server.version}\nname=hindsight-rest-root\n"
        "classname=hindsightpy.restroot.RestRootPlugin\n"
        f"java.version={server.java_min}\nelasticsearch.version={server.version}\n"
    )


# ---------------------------------------------------------------------------- run


def java_home(server: Server) -> Path:
    """The JDK to run the server with (HINDSIGHT_PY_<NAME>_JAVA_HOME overrides)."""
    override = os.environ.get(f"HINDSIGHT_PY_{server.name.upper()}_JAVA_HOME")
    return Path(override) if override else _jdk_for(server, tool="java")


def _jdk_for(server: Server, tool: str) -> Path:
    """The oldest installed JDK the server supports that has `tool`: old servers are least
    surprised by it, and javac --release covers the rest."""
    candidates: list[tuple[int, Path]] = []
    for release in sorted(JVM_ROOT.glob("*/release")):
        jdk = release.parent
        if jdk.is_symlink() or not (jdk / "bin" / tool).exists():
            continue
        version = _java_major(release)
        if version is None or version < server.java_min:
            continue
        if tool == "java" and server.java_max is not None and version > server.java_max:
            continue
        candidates.append((version, jdk))
    if not candidates:
        bounds = f">= {server.java_min}" + (
            f" and <= {server.java_max}" if server.java_max and tool == "java" else ""
        )
        raise ServerError(f"{server.name}: no JDK {bounds} with bin/{tool} under {JVM_ROOT}")
    return min(candidates)[1]


def _java_major(release: Path) -> int | None:
    for line in release.read_text(errors="replace").splitlines():
        if line.startswith("JAVA_VERSION="):
            version = line.split("=", 1)[1].strip().strip('"')
            head = version.split(".")[0]
            if head == "1":  # 1.8.0_x
                head = version.split(".")[1]
            return int(head) if head.isdigit() else None
    return None


def write_config(server: Server) -> None:
    home = home_dir(server)
    directory = server_dir(server)
    settings: dict[str, object] = {
        "cluster.name": f"hindsight-py-{server.name}",
        "node.name": server.name,
        "network.host": HOST,
        "http.port": server.http_port,
        "transport.port": server.transport_port,
        "discovery.type": "single-node",
        "path.data": str(directory / "data"),
        "path.logs": str(directory / "logs"),
        # The CI disk may be nearly full; watermarks would block shard allocation.
        "cluster.routing.allocation.disk.threshold_enabled": False,
        # Lets tests clean up their date-suffixed indices with one `DELETE name-*`.
        "action.destructive_requires_name": False,
    }
    # Unknown settings abort startup, so only switch off security the zip actually ships.
    if (home / "modules" / "x-pack-security").is_dir():
        settings["xpack.security.enabled"] = False
    if (home / "plugins" / "opensearch-security").is_dir():
        settings["plugins.security.disabled"] = True
    text = "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items())
    (home / "config" / f"{server.distribution}.yml").write_text(
        "# Written by scripts/search_servers.py on every start.\n" + text
    )


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run as, created on first use; None when not root."""
    if os.geteuid() != 0:
        return None
    name = service_user_name()
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    log(f"creating the service user {name}")
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    try:
        # Looked up whatever useradd said: a parallel start may have created it first.
        return pwd.getpwnam(name)
    except KeyError:
        raise ServerError(
            f"useradd {name} (HINDSIGHT_PY_SERVICE_USER) failed: {result.stderr.strip()}"
        ) from None


def _hand_over(server: Server, user: pwd.struct_passwd) -> None:
    directory = server_dir(server)
    for root, dirs, files in os.walk(directory):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            os.lchown(name, user.pw_uid, user.pw_gid)
    # The service user must be able to walk down to the cache (e.g. through a 0700 /root);
    # search permission only, so nothing becomes listable.
    for parent in directory.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, mode | stat.S_IXOTH)


# ---------------------------------------------------------------------------- processes
# What runs a server is told from /proc by facts an exec cannot change: the process group
# `start` made (start_new_session: the launcher's pid is the group id, and setpriv, the
# launch script and java each exec in that same process), the start time of its leader,
# and the files open under the data directory. Never by command line: it is briefly
# empty or someone else's while the launcher execs its way to java.


@dataclass(frozen=True)
class Process:
    pid: int
    pgid: int
    sid: int
    start_time: int  # clock ticks after boot: with the pid, it names one process for good

    @property
    def leads_own_session_group(self) -> bool:
        """True for start_new_session's group: killing all of it spares whoever started it."""
        return self.pgid == self.sid and self.pgid != os.getpgrp()


def _process(pid: int) -> Process | None:
    """The process `pid` from /proc/<pid>/stat; None once it has exited, including as a
    zombie waiting to be reaped."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields 3 on follow its
    # last ')' and a space.
    fields = text[text.rindex(")") + 2 :].split()
    # A zombie leader with other threads left is a process still exiting, its files and
    # ports possibly still open; alone, it holds nothing and only waits for its parent.
    if fields[0] in ("Z", "X") and _thread_count(pid) <= 1:
        return None
    return Process(pid, pgid=int(fields[2]), sid=int(fields[3]), start_time=int(fields[19]))


def _thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _all_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _group(pgid: int) -> list[Process]:
    """The live members of process group `pgid`."""
    return [p for pid in _all_pids() if (p := _process(pid)) is not None and p.pgid == pgid]


def _data_holders(server: Server) -> list[Process]:
    """The processes with a file open under the server's data directory (node.lock among
    them): while one lives, no new server can start there, whoever started it."""
    prefix = f"{data_dir(server)}/"
    holders: list[Process] = []
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's while we are not root
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    if (process := _process(pid)) is not None:
                        holders.append(process)
                    break
    return holders


def _write_pid_file(server: Server, pgid: int) -> None:
    leader = _process(pgid)
    pid_file(server).write_text(f"{pgid} {leader.start_time}\n" if leader else f"{pgid}\n")


def _recorded_group(server: Server) -> int | None:
    """The process group of the pid file if it still runs this server."""
    try:
        text = pid_file(server).read_text()
    except FileNotFoundError:
        return None
    fields = text.split()
    if not 1 <= len(fields) <= 2 or not all(f.isdigit() for f in fields):
        log(f"{server.name}: ignoring {pid_file(server)}: expected '<process group> <start time>', got {text!r}")
        return None
    pgid = int(fields[0])
    leader = _process(pgid)
    if leader is not None and leader.pgid == pgid and fields[1:] == [str(leader.start_time)]:
        return pgid
    # The leader has gone (or its start time was not known when the file was written): the
    # group is still the server while one of its members holds the data directory. A
    # recycled pid leads a group that holds nothing of ours.
    if _group(pgid) and any(p.pgid == pgid for p in _data_holders(server)):
        return pgid
    return None


def _terminate(server: Server, groups: set[int], pids: set[int]) -> None:
    """SIGTERM to whole process groups and to single processes, SIGKILL after
    STOP_TIMEOUT_S; returns once none of them is left."""

    def send(signum: signal.Signals) -> None:
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def alive() -> bool:
        return any(_group(pgid) for pgid in groups) or any(_process(pid) for pid in pids)

    send(signal.SIGTERM)
    # A stopped server (SIGSTOP, ^Z) acts on SIGTERM only once continued.
    send(signal.SIGCONT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    killed = False
    while alive():
        if time.monotonic() > deadline:
            if killed:
                raise ServerError(f"{server.name}: still running 10 s after SIGKILL")
            log(f"{server.name}: still running after {STOP_TIMEOUT_S:.0f} s; sending SIGKILL")
            send(signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 10.0
        time.sleep(0.2)


def _stop_leftovers(server: Server, holders: list[Process], why: str) -> None:
    """Stops the holders of the data directory that no pid file names."""
    for holder in holders:
        log(f"{server.name}: found pid {holder.pid} still holding {data_dir(server)} {why}; stopping it")
    _terminate(
        server,
        groups={h.pgid for h in holders if h.leads_own_session_group},
        pids={h.pid for h in holders if not h.leads_own_session_group},
    )


def spawn(server: Server) -> None:
    home = fetch(server)
    directory = server_dir(server)
    for sub in ("data", "logs", "tmp"):
        (directory / sub).mkdir(exist_ok=True)
    write_config(server)
    jdk = java_home(server)
    prefix = server.env_prefix
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(directory),
        f"{prefix}_JAVA_HOME": str(jdk),
        f"{prefix}_JAVA_OPTS": HEAP,
        f"{prefix}_TMPDIR": str(directory / "tmp"),
    }
    command = [str(home / "bin" / server.distribution)]
    user = _service_user()
    if user is not None:
        _hand_over(server, user)
        command = [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
            *command,
        ]
    as_user = f" as {user.pw_name}" if user is not None else ""
    log(
        f"{server.name}: starting {server.distribution} {server.version}{as_user} "
        f"(java {jdk}) on {server.url}"
    )
    # Truncated per start so a failure shows this run's lines; the server keeps its own
    # rolling logs under logs/.
    with open(console_log(server), "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: `stop` kills launcher and JVM together, and the
            # server outlives this script and pytest.
            start_new_session=True,
        )
    # Popen returns once setpriv runs, so the group and its leader's start time are
    # already those of the server.
    _write_pid_file(server, process.pid)


# The servers are on loopback: an http_proxy from the environment must not reroute them.
_LOOPBACK_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with _LOOPBACK_OPENER.open(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.load(error)
        except ValueError:
            return error.code, {}


def identify(server: Server) -> dict | None:
    """`GET /` of whatever listens on the server's port, or None if nothing answers."""
    try:
        status, body = _get_json(server.url + "/", timeout=3.0)
    except (OSError, ValueError):
        return None
    return body if status == 200 else None


def health(server: Server, wait_s: float = 0.0) -> str | None:
    """The cluster status (green/yellow/red), or None if the server does not answer."""
    query = f"/_cluster/health?wait_for_status=yellow&timeout={max(int(wait_s), 0)}s"
    try:
        _status, body = _get_json(server.url + query, timeout=wait_s + 5.0)
    except (OSError, ValueError):
        return None
    return body.get("status")


def _is_expected(server: Server, root: dict) -> bool:
    version = root.get("version", {})
    distribution = version.get("distribution", "elasticsearch")
    return distribution == server.distribution and version.get("number") == server.version


def start(servers: Iterable[Server]) -> None:
    """Starts every server not already up, then waits for all of them together."""
    pending: list[Server] = []
    for server in servers:
        with locked(server):
            root = identify(server)
            if root is not None and not _is_expected(server, root):
                found = root.get("version", {})
                raise ServerError(
                    f"{server.name}: port {server.http_port} is taken by "
                    f"{found.get('distribution', 'elasticsearch')} {found.get('number')}, "
                    f"expected {server.distribution} {server.version}"
                )
            if _recorded_group(server) is None:
                _start_unrecorded(server, answering=root is not None)
        pending.append(server)
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in pending:
        _wait_healthy(server, deadline)


def _start_unrecorded(server: Server, answering: bool) -> None:
    """No pid file names a live server: adopts the one answering from our data directory,
    stops whatever else holds that directory (a new server would fail on its node lock),
    and starts one unless something answers."""
    holders = _data_holders(server)
    if answering and holders:
        holder = holders[0]
        log(f"{server.name}: found pid {holder.pid} holding {data_dir(server)} without a pid file; adopting it")
        if holder.leads_own_session_group:
            _write_pid_file(server, holder.pgid)
        return
    if holders:
        _stop_leftovers(server, holders, "from an earlier start")
    if answering:
        log(f"{server.name}: {server.url} answers, though no process holds {data_dir(server)}; using it")
        return
    spawn(server)


def _wait_healthy(server: Server, deadline: float) -> None:
    while True:
        status = health(server, wait_s=1.0)
        if status in ("green", "yellow"):
            return
        if _recorded_group(server) is None and identify(server) is None:
            raise ServerError(
                f"{server.name}: the server exited during startup; its log ends:\n{log_tail(server)}"
            )
        if time.monotonic() > deadline:
            raise ServerError(
                f"{server.name}: not healthy after {START_TIMEOUT_S:.0f} s (status {status}); "
                f"its log ends:\n{log_tail(server)}"
            )
        time.sleep(1.0)


def stop(server: Server) -> bool:
    """Stops the server started from this cache, with or without its pid file; True if one
    was running."""
    if not server_dir(server).is_dir():
        return False
    with locked(server):
        recorded = _recorded_group(server)
        if recorded is not None:
            log(f"{server.name}: stopping process group {recorded}")
            _terminate(server, groups={recorded}, pids=set())
        # Also whatever holds the data directory outside that group: left by a start whose
        # pid file was lost or overwritten.
        leftovers = [p for p in _data_holders(server) if p.pgid != recorded]
        if leftovers:
            _stop_leftovers(server, leftovers, "without a pid file")
        pid_file(server).unlink(missing_ok=True)
        return recorded is not None or bool(leftovers)


# ---------------------------------------------------------------------------- CLI


def _select(names: list[str], default: Iterable[str]) -> list[Server]:
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise ServerError(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    return [SERVERS[n] for n in (names or default)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("fetch", "start", "stop", "status", "url"))
    parser.add_argument(
        "names", nargs="*", help=f"servers ({', '.join(SERVERS)}); default {' '.join(DEFAULT_NAMES)}"
    )
    args = parser.parse_args(argv)
    try:
        # Checked first, so a bad value stops the command before it touches anything.
        port_offset()
        if args.command == "start":
            service_user_name()
        if args.command == "fetch":
            for server in _select(args.names, DEFAULT_NAMES):
                with locked(server):
                    print(fetch(server))
        elif args.command == "start":
            servers = _select(args.names, DEFAULT_NAMES)
            start(servers)
            for server in servers:
                print(server.url)
        elif args.command == "stop":
            for server in _select(args.names, SERVERS):
                if not stop(server) and args.names:
                    log(f"{server.name}: not running")
        elif args.command == "status":
            down = 0
            for server in _select(args.names, SERVERS):
                status = health(server) or "down"
                down += status == "down"
                print(f"{server.name}\t{server.distribution} {server.version}\t{server.url}\t{status}")
            return 1 if down and args.names else 0
        else:
            for server in _select(args.names, DEFAULT_NAMES[:1]):
                print(server.url)
    except ServerError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
