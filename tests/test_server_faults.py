"""Server faults: nothing is dropped while the server is away, refuses, or fails part of a batch.

- A dedicated Elasticsearch 7 (es7, which no other test stops) is stopped for 30 s in the middle of
  a run of the project's run/ and started again: the run waits, retries, resumes, loses nothing.
- A fault-injecting proxy in front of Elasticsearch 8 answers some bulk requests with 429, 503 and
  an HTML 502, lets one time out, drops the connection after forwarding one (the server applied it,
  the client never heard back), and answers one with per-item 429s for half its documents: all are
  retried, with `_id` = eventID nothing is duplicated, nothing is lost.
- Documents the server rejects (a mapping conflict) land in the dead-letter file with the server's
  reason, are counted in the summary line, and make the exit status 16.

Cost: the es7 test about 90-120 s (30 s down, about 30 s for each es7 start); the others a few
seconds each.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from conftest import SEARCH_SERVERS_SCRIPT
from delivery_helpers import (
    Background,
    Index,
    LineFile,
    event_id,
    figures,
    project_workdir,
    record_line,
    run_cli,
    tally,
    wait_until,
)

DOWN_S = 30.0


def _servers(command: str, name: str) -> None:
    result = subprocess.run([sys.executable, str(SEARCH_SERVERS_SCRIPT), command, name], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"search_servers.py {command} {name}:\n{result.stderr[-4000:]}"


def test_a_server_stopped_for_30_s_mid_run_loses_nothing(search_server, scratch_index, tmp_path: Path) -> None:
    es7_url = search_server("es7")
    index = Index(es7_url, scratch_index(es7_url))
    lines = LineFile.write(tmp_path / "lines.json", 100_000)
    wd = project_workdir(tmp_path / "w", lines.path, es7_url, index.name)
    run = Background(wd)
    try:
        wait_until(lambda: index.refreshed_count() >= 5_000, 120, "the first documents in the index")
        _servers("stop", "es7")
        stopped = time.monotonic()
        assert run.process.poll() is None, "the run ended while the server was away"
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped)))
        assert run.process.poll() is None, "the run ended while the server was away"
    finally:
        _servers("start", "es7")
    result = run.wait()
    assert result.returncode == 0, result.tail()
    summary = result.summary()
    outcome = tally(index, lines)
    figures("es7 stopped for 30 s mid-run, 100000 lines", lost=len(outcome.missing),
            duplicates=outcome.duplicates, retried_requests=summary["retried"], dead_lettered=summary["dead"])
    assert outcome.missing == [], outcome.describe()
    assert outcome.strangers == 0, outcome.describe()
    assert summary["dead"] == 0
    assert summary["retried"] >= 1
    assert "bulk request failed" in result.stderr  # the outage is reported, at the default level


# --------------------------------------------------------------------------- a fault-injecting proxy


class FaultProxy:
    """Forwards to a real server; the n-th bulk request (from 1) gets the fault `faults[n]`."""

    def __init__(self, upstream: str, faults: dict[int, str], hang_s: float) -> None:
        self.upstream = urllib3.connection_from_url(upstream, maxsize=4)
        self.faults = faults
        self.hang_s = hang_s
        self.bulk_requests = 0
        self.applied: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                response = proxy.upstream.request("GET", self.path, headers={"Accept": "application/json"})
                self._answer(response.status, response.data, response.headers.get("Content-Type"))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.startswith("/_bulk"):
                    self._forward(body)
                    return
                with proxy._lock:
                    proxy.bulk_requests += 1
                    fault = proxy.faults.get(proxy.bulk_requests)
                    if fault:
                        proxy.applied.append(fault)
                if fault == "429":
                    error = {"type": "es_rejected_execution_exception", "reason": "rejected execution (test)"}
                    self._answer(429, json.dumps({"error": error, "status": 429}).encode())
                elif fault == "503":
                    error = {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}
                    self._answer(503, json.dumps({"error": error, "status": 503}).encode())
                elif fault == "502-html":
                    self._answer(502, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                elif fault == "timeout":
                    time.sleep(proxy.hang_s)  # past the client's timeout: it gives up and sends again
                    self.close_connection = True
                elif fault == "reset-after-apply":
                    self._send_upstream(body)  # the server applies the batch ...
                    self.close_connection = True  # ... and the answer never comes
                elif fault == "items-429":
                    self._half_rejected(body)
                else:
                    self._forward(body)

            def _send_upstream(self, body: bytes) -> urllib3.BaseHTTPResponse:
                return proxy.upstream.urlopen("POST", self.path, body=body,
                                              headers={"Content-Type": "application/x-ndjson"})

            def _forward(self, body: bytes) -> None:
                response = self._send_upstream(body)
                self._answer(response.status, response.data, response.headers.get("Content-Type"))

            def _half_rejected(self, body: bytes) -> None:
                lines = body.rstrip(b"\n").split(b"\n")
                pairs = [lines[i:i + 2] for i in range(0, len(lines), 2)]
                keep = len(pairs) // 2
                first = self._send_upstream(b"".join(a + b"\n" + s + b"\n" for a, s in pairs[:keep]))
                items = json.loads(first.data)["items"]
                error = {"type": "es_rejected_execution_exception", "reason": "rejected execution (test)"}
                items += [{"index": {"status": 429, "error": error}} for _ in pairs[keep:]]
                self._answer(200, json.dumps({"took": 1, "errors": True, "items": items}).encode())

            def _answer(self, status: int, data: bytes, content_type: str | None = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


FAULTS = {2: "429", 4: "503", 6: "timeout", 8: "reset-after-apply", 10: "items-429", 12: "502-html"}


@pytest.fixture
def proxy(es8_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(es8_url, FAULTS, hang_s=3.0) as p:
        yield p


def test_429_5xx_timeouts_and_resets_are_retried_until_delivered(proxy: FaultProxy, es8_url: str, scratch_index,
                                                               tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    lines = LineFile.write(tmp_path / "lines.json", 20_000)
    wd = project_workdir(tmp_path / "w", lines.path, proxy.url, index.name, id_from_json="eventID",
                         timeout="1", flush_count="1000")

    result = run_cli(wd)

    assert result.returncode == 0, result.tail()
    assert sorted(proxy.applied) == sorted(FAULTS.values())
    summary = result.summary()
    outcome = tally(index, lines)
    operations = index.index_operations()
    figures("429/503/502/timeout/reset/item-429 via a proxy, 20000 lines, with _id", lost=len(outcome.missing),
            duplicates=outcome.duplicates, retried_requests=summary["retried"], index_operations=operations)
    assert outcome.missing == [] and outcome.duplicates == 0 and outcome.strangers == 0, outcome.describe()
    assert summary == {**summary, "delivered": lines.count, "dead": 0, "status": 0}
    assert summary["retried"] >= len(FAULTS)
    # the batch the server applied before the connection dropped was sent again: overwritten, not doubled
    assert operations >= lines.count + 1000
    assert "bulk request failed" in result.stderr


REJECTIONS = {
    # a field the index maps as integer gets text; type_conflicts = "dead_letter" turns off the
    # renaming of mistyped fields (outputs/type_conflicts.py), so the server's refusal stands
    "mapping conflict": ({"properties": {"seq": {"type": "integer"}}}, {"type_conflicts": '"dead_letter"'},
                         "failed to parse field [seq]"),
    # a field a strict mapping does not know: no renaming can help, with the default cfg
    "strict mapping": ({"dynamic": "strict", "properties": {"seq": {"type": "keyword"}}}, {},
                       "strict_dynamic_mapping_exception"),
}


@pytest.mark.parametrize("kind", list(REJECTIONS))
def test_rejected_documents_are_dead_lettered_with_the_servers_reason(kind: str, es8_url: str, scratch_index,
                                                                     tmp_path: Path) -> None:
    mappings, cfg, reason = copy.deepcopy(REJECTIONS[kind])
    index = Index(es8_url, scratch_index(es8_url))
    if kind == "strict mapping":
        # every field of a good record is known; a rejected one carries one more
        mappings["properties"].update({k: {"type": "keyword"} for k in json.loads(record_line(0)) if k != "seq"})
    index.create({"mappings": mappings})
    rejected = {7, 123, 500, 998}
    source = tmp_path / "lines.json"
    with source.open("wb") as fh:
        for seq in range(1000):
            line = record_line(seq)
            if seq in rejected:
                line = line.replace(b'"seq":%d}' % seq, b'"seq":"not a number %d"}' % seq) \
                    if kind == "mapping conflict" else line[:-1] + b',"unmapped":%d}' % seq
            fh.write(line + b"\n")
    wd = project_workdir(tmp_path / "w", source, es8_url, index.name, **cfg)

    result = run_cli(wd)

    assert result.returncode == 16, result.tail()  # 16: messages in the dead-letter file, nothing else
    summary = result.summary()
    assert (summary["delivered"], summary["dead"], summary["status"]) == (1000 - len(rejected), len(rejected), 16)
    letters = wd.dead_letters()
    assert len(letters) == len(rejected)
    for letter in letters:
        assert letter["status"] == 400
        assert reason in letter["reason"], letter["reason"]
        assert letter["action"]["index"]["_index"] == index.name
    assert sorted(json.loads(d["data"])["eventID"] for d in letters) == sorted(event_id(s) for s in rejected)
    # reported at the default log level, with the server's reason
    assert any("documents dead-lettered" in line and reason in line for line in result.stderr.splitlines())
    assert index.refreshed_count() == 1000 - len(rejected)
