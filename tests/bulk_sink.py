#!/usr/bin/env python3
"""A fake Elasticsearch bulk endpoint: fast enough that a shipper measured against it is the
bottleneck, and answering like a server that indexed every document.

    python3 tests/bulk_sink.py [--port 0] [--version 8.19.0] [--distribution elasticsearch]

prints its base URL (`http://127.0.0.1:<port>`) on a line of its own once it listens, then serves
until it is stopped. Used by benchmarks/run.py as a process of its own, and by tests in-process
(`BulkSink(...).start()`), which can also keep every request to look at.

- `GET /` (and `HEAD /`): the root document of the given server version and distribution;
- `POST|PUT [/<index>]/_bulk`: 200 with `"errors":false` and one `{"<op>":{"status":201}}` item per
  action line, as a server answers a request filtered to statuses; a gzip body is inflated first;
- `GET /_sink_stats`: `{"requests", "docs", "bytes"}` counted over the bulk requests (bytes as sent);
- anything else: 200 `{"acknowledged":true}` (index creation and deletion, refreshes).
Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ACKNOWLEDGED = b'{"acknowledged":true}'


@dataclass(frozen=True)
class BulkRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # inflated when it came gzipped

    def pairs(self) -> list[tuple[dict[str, Any], bytes]]:
        """(action, source line) pairs; every action of a bulk request from a shipper has a source."""
        lines = self.body.split(b"\n")
        assert lines[-1] == b"", f"a bulk body ends with a newline: {self.body[-80:]!r}"
        assert len(lines) % 2 == 1, f"an action without its source: {self.body[:300]!r}"
        return [(json.loads(lines[i]), lines[i + 1]) for i in range(0, len(lines) - 1, 2)]


def _item(action: bytes) -> bytes:
    # {"index":{...}}: the operation is the first key
    start = action.find(b'"') + 1
    return b'{"%s":{"status":201}}' % action[start:action.find(b'"', start)]


def _actions_like(body: bytes, prefix: bytes) -> tuple[int, int]:
    """(action lines, those of them that start with `prefix`): every other line, found by
    searching from one line feed to the next, nothing copied."""
    find, starts = body.find, body.startswith
    actions = alike = pos = 0
    while (end := find(b"\n", pos)) >= 0:
        actions += 1
        alike += starts(prefix, pos)
        pos = find(b"\n", end + 1) + 1  # after the source line
        if not pos:
            break
    return actions, alike


def bulk_answer(body: bytes) -> tuple[int, bytes]:
    """(documents, response body) for a bulk body of action and source line pairs."""
    first = body[:body.find(b"\n")]
    start = first.find(b'"') + 1
    end = first.find(b'"', start)
    actions, alike = _actions_like(body, first[:end + 1]) if start and end > 0 else (-1, 0)
    if alike == actions:
        # a shipper repeats one operation: every action line names the first one's, so every item
        # is the first one's. Splitting the body and formatting an item per line, as below, costs
        # three times as much: this process, not a shipper measured against it, would be the limit.
        items = [_item(first)] * actions
    else:
        items = [_item(action) for action in body.split(b"\n")[0:body.count(b"\n"):2]]
    return len(items), b'{"took":1,"errors":false,"items":[' + b",".join(items) + b"]}"


class BulkSink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, *, version: str = "8.19.0", distribution: str = "elasticsearch",
                 record: bool = False) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        # as each distribution words it: only OpenSearch names itself
        opensearch = distribution == "opensearch"
        self.root = json.dumps({
            "name": "bulk-sink", "cluster_name": "bulk-sink",
            "version": {"distribution": "opensearch", "number": version} if opensearch else
                       {"number": version, "build_flavor": "default"},
            "tagline": "The OpenSearch Project: https://opensearch.org/" if opensearch else "You Know, for Search",
        }).encode()
        self.record = record
        self.requests: list[BulkRequest] = []  # bulk requests, when recording
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "docs": 0, "bytes": 0}
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def sources(self) -> list[bytes]:
        """The source lines received, in order (when recording)."""
        return [source for request in self.requests for _, source in request.pairs()]

    def start(self) -> BulkSink:
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        if self.thread:
            self.shutdown()
        self.server_close()

    def count(self, method: str, path: str, headers: dict[str, str], wire: bytes, body: bytes) -> bytes:
        docs, answer = bulk_answer(body)
        with self.lock:
            self.counts["requests"] += 1
            self.counts["docs"] += docs
            self.counts["bytes"] += len(wire)
            if self.record:
                self.requests.append(BulkRequest(method, path, headers, body))
        return answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls on small answers
    server: BulkSink

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # buffered with the status line: one write for the whole answer
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/_sink_stats"):
            self._answer(json.dumps(self.server.stats()).encode())
        elif self.path.split("?")[0] == "/":
            self._answer(self.server.root)
        else:
            self._answer(ACKNOWLEDGED)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        wire = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0].endswith("/_bulk"):
            body = gzip.decompress(wire) if self.headers.get("Content-Encoding") == "gzip" else wire
            self._answer(self.server.count(self.command, self.path, dict(self.headers.items()), wire, body))
        else:
            self._answer(ACKNOWLEDGED)

    do_PUT = do_DELETE = do_POST


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--version", default="8.19.0", help="the server version GET / reports")
    parser.add_argument("--distribution", default="elasticsearch", help="elasticsearch or opensearch")
    args = parser.parse_args(argv)
    sink = BulkSink(args.port, version=args.version, distribution=args.distribution)
    print(sink.url, flush=True)
    try:
        sink.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sink.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
