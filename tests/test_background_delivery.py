"""kill -9 while bulk bodies are on their way to the server loses nothing.

The native output (plugins/elasticsearch_bulk.py) hands each bulk body to a delivery thread and
goes on reading the queue: the runner must not commit past a body that is still on its way.
CloudTracker's unmodified elasticsearch_bulk_api.lua reports its messages done once they are in
its batch file, and empties the file when its request returns: the LuaSocket takeover must keep
the body on disk (its spool) until the server took it (a background takeover without the spool
lost 5,000 of 30,000 lines here). Each pipeline ships the lines into Elasticsearch 8, through a proxy that holds
every bulk request a moment before passing it on (so that a body is on its way most of the time),
while hindsight_cli is killed (SIGKILL) several times, each time once the index holds a larger
share of the lines, and then runs to the end. Every line must then be in the index (no `_id`: duplicates are allowed) or, for
upstream's plugin killed while writing its batch file, in the dead-letter file; none may be lost.
The project's own Lua output has the same check, at a larger scale, in test_crash_safety.py.
"""

from __future__ import annotations

import json
import random
import select
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
from delivery_helpers import (
    Background,
    Index,
    LineFile,
    Workdir,
    event_id,
    figures,
    run_cli,
    tally,
    wait_until,
)
from upstream_files import (
    CLOUDTRACKER,
    LUA_SANDBOX_EXTENSIONS,
    cloudtracker_run,
    extension_modules,
    lua_string,
    replace_once,
    source,
)

PROJECT_RUN = Path(__file__).resolve().parents[1] / "run"
LINE_COUNT = 30_000
KILLS = 6
# How long the proxy holds each bulk request before the server sees it: longer than the checkpoint
# cadence (reported and written every 0.25 s), so that a checkpoint run ahead of a body in flight
# would reach hindsight.cp before the body reaches the index.
HOLD_S = 1.0
FLUSH_COUNT = 3000
# Bulk requests each output keeps on their way at once: several, so that bodies finish out of order
# and a kill finds more than one in the proxy.
MAX_IN_FLIGHT = 4


@pytest.fixture
def slow_proxy(es8_url: str) -> Iterator[str]:
    """A URL that reaches `es8_url`, bulk requests HOLD_S late (and not at all once their sender is gone)."""
    upstream = urllib3.connection_from_url(es8_url, maxsize=8)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self, method: str, body: bytes | None) -> None:
            if "/_bulk" in self.path:
                time.sleep(HOLD_S)
                if self._client_gone():
                    return  # a killed sender's request never reaches the server, as with a real network
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            response = upstream.request(method, self.path, body=body, headers=headers, retries=False)
            self.send_response(response.status)
            self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(response.data)))
            self.end_headers()
            self.wfile.write(response.data)

        def _client_gone(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_GET(self) -> None:
            self._forward("GET", None)

        def do_POST(self) -> None:
            self._forward("POST", self.rfile.read(int(self.headers.get("Content-Length", 0))))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    return LineFile.write(tmp_path_factory.mktemp("background") / "cloudtrail.json", LINE_COUNT)


def native_workdir(path: Path, data: Path, port: str, index: str) -> Workdir:
    for kind in ("input", "analysis", "output"):
        (path / "run" / kind).mkdir(parents=True)
    shutil.copy(PROJECT_RUN / "hindsight.cfg", path / "hindsight.cfg")
    (path / "run" / "input" / "flat_file.cfg").write_text(
        f'filename = "flat_file.py"\ninput_filename = {lua_string(str(data))}\n')
    (path / "run" / "output" / "elasticsearch_bulk.cfg").write_text(
        'filename = "elasticsearch_bulk.py"\nmessage_matcher = "TRUE"\naddress = "127.0.0.1"\n'
        f"port = {port}\nflush_count = {FLUSH_COUNT}\nticker_interval = 1\nmax_in_flight = {MAX_IN_FLIGHT}\n"
        f"encoders_elasticsearch_common = {{ index = {lua_string(index)}, type_name = \"doc\" }}\n")
    return Workdir(path)


def upstream_workdir(path: Path, data: Path, port: str, index: str) -> Workdir:
    source(CLOUDTRACKER), source(LUA_SANDBOX_EXTENSIONS)  # skip (fail in CI) before any work if not fetched
    path.mkdir(parents=True)
    run = cloudtracker_run(path, input_filename=data, port=int(port), index=index)
    es_cfg = run / "output" / "elasticsearch_bulk_api.cfg"
    es_cfg.write_text(replace_once(es_cfg.read_text(), r"^(?P<keep>flush_count\s*=\s*)\d+", str(FLUSH_COUNT),
                                   "flush_count") + f"\nmax_in_flight = {MAX_IN_FLIGHT}\n")
    modules, io_modules = extension_modules(path / "luasandbox")
    text = (PROJECT_RUN / "hindsight.cfg").read_text()
    text = replace_once(text, r"^analysis_lua_path\s*=.*$", f"analysis_lua_path = {lua_string(f'{modules}/?.lua')}",
                        "analysis_lua_path")
    text = replace_once(text, r"^io_lua_path\s*=.*$", f"io_lua_path = {lua_string(f'{modules}/?.lua;{io_modules}/?.lua')}",
                        "io_lua_path")
    (path / "hindsight.cfg").write_text(text)
    return Workdir(path)


@pytest.mark.parametrize("pipeline", ["native", pytest.param("upstream", marks=pytest.mark.upstream)])
def test_kill_9_during_background_delivery_loses_nothing(pipeline: str, lines: LineFile, es8_url: str,
                                                         slow_proxy: str, scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    index.create({})  # so that counting it while the first run starts finds its shard
    port = slow_proxy.rsplit(":", 1)[1]
    make = native_workdir if pipeline == "native" else upstream_workdir
    wd = make(tmp_path / "w", lines.path, port, index.name)
    rng = random.Random(20241128)
    shares = sorted(rng.uniform(0.05, 0.85) for _ in range(KILLS))
    for share in shares:
        run = Background(wd)
        wait_until(lambda run=run, share=share: index.count() >= share * lines.count or run.process.poll() is not None,
                   120, f"{share:.0%} of the lines in the index", interval=0.05)
        # a body was just delivered and the next one handed over: kill once a checkpoint run ahead
        # of it would have been written, while the proxy still holds it
        time.sleep(rng.uniform(0.6, 0.9) * HOLD_S)
        assert run.process.poll() is None, run.wait(60).tail()  # the run must not be over yet
        run.signal(signal.SIGKILL)
        assert run.wait(60).returncode == -signal.SIGKILL
    final = run_cli(wd)
    assert final.returncode in (0, 16), final.tail()  # 16: documents dead-lettered (upstream's torn batch file)

    result = tally(index, lines)
    wanted = {event_id(seq) for seq in result.missing}
    dead = set()
    for record in wd.dead_letters():
        # a document the sender set aside, or a message payload the runner kept: both in "data"
        for line in str(record.get("data") or "").splitlines():
            try:
                dead.add(json.loads(line).get("eventID"))
            except (ValueError, AttributeError):
                continue
    lost = wanted - dead
    figures(f"{pipeline}: kill -9 x{KILLS}, {lines.count} lines", lost=len(lost),
            dead_lettered=len(wanted & dead), duplicates=result.duplicates)
    assert not lost, f"{len(lost)} lines neither indexed nor dead-lettered; {result.describe()}"
    assert result.strangers == 0, result.describe()
    if pipeline == "native":
        assert result.missing == [], result.describe()  # nothing of it is ever set aside


def test_a_bulk_request_left_in_the_spool_is_delivered_before_anything_else(lines: LineFile, es8_url: str,
                                                                            scratch_index, tmp_path: Path) -> None:
    # What a kill leaves when upstream's plugin had handed a request over (outputs/elasticsearch_lua.py, ElasticsearchLua.takeover)
    index = Index(es8_url, scratch_index(es8_url))
    port = es8_url.rsplit(":", 1)[1].rstrip("/")
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    wd = native_workdir(tmp_path / "w", empty, port, index.name)
    spool = wd.output / "output.elasticsearch_bulk.bulk"  # as a run before there were several
    spool.parent.mkdir(parents=True)
    action = json.dumps({"index": {"_index": index.name}}).encode()
    body = b"".join(action + b"\n" + json.dumps({"eventID": f"spooled-{i}"}).encode() + b"\n" for i in range(3))
    spool.write_bytes(f"127.0.0.1 {port}\n".encode() + body)

    run = run_cli(wd)

    assert run.returncode == 0, run.tail()
    assert "delivering the bulk request the last run left" in run.stderr
    assert not spool.exists()
    assert index.refreshed_count() == 3
    assert sorted(d["eventID"] for d in index.sources()) == ["spooled-0", "spooled-1", "spooled-2"]


def test_a_spool_that_is_not_ours_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from hindsight_py.outputs.elasticsearch_lua import ElasticsearchLua

    (tmp_path / "output.es.bulk").write_bytes(b"garbage without a port\n{}\n")
    host = SimpleNamespace(output_path=tmp_path, plugin=SimpleNamespace(name="output.es"))
    with pytest.raises(ValueError, match=r"output\.es\.bulk: not a bulk request spooled by hindsight-py .*"
                                         r"'garbage without a port'"):
        ElasticsearchLua(host).recover()  # type: ignore[arg-type]
    assert (tmp_path / "output.es.bulk").exists()  # left for the user to look at, not dropped
