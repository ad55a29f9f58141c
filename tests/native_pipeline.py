"""A native pipeline in a tmp dir for the output tests: plugins/flat_file.py -> plugins/elasticsearch_bulk.py.

`NativePipeline(root, data, output_keys)` lays out hindsight.cfg and run/ as a user would, with
the output cfg written from a dict of keys (Lua literals), and runs `hindsight_cli` on it, in the
foreground or in the background. Helpers read what a run left: the summary line, the committed
checkpoints, the dead letters, and what a real server holds.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

RUN_TIMEOUT = 300  # a hung run must fail its test, not the CI job

SUMMARY = re.compile(
    r"hindsight summary: read (?P<read>\d+) messages, delivered (?P<delivered>\d+) documents, "
    r"dead-lettered (?P<dead>\d+)"
)

HINDSIGHT_CFG = """
output_path            = "output"
output_size            = 64 * 1024 * 1024
sandbox_load_path      = ""
sandbox_run_path       = "run"
sandbox_install_path   = "/nonexistent"
analysis_threads       = 1
analysis_lua_path      = "/nonexistent/?.lua"
analysis_lua_cpath     = "/nonexistent/?.so"
io_lua_path            = analysis_lua_path
io_lua_cpath           = analysis_lua_cpath
max_message_size       = 1024 * 1024
input_defaults         = {}
analysis_defaults      = {}
output_defaults        = {}
"""


def lua(value: Any) -> str:
    """A Lua literal for a str, bool, number, list or dict."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for what tests use
    if isinstance(value, list):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


class NativePipeline:
    def __init__(self, root: Path, data: Path | Iterable[bytes], output: dict[str, Any],
                 *, input_plugin: str | None = None) -> None:
        self.root = root
        for kind in ("input", "analysis", "output"):
            (root / "run" / kind).mkdir(parents=True, exist_ok=True)
        (root / "hindsight.cfg").write_text(HINDSIGHT_CFG)
        if input_plugin is not None:
            # a test's own input plugin (run/input/source.py) that injects special messages
            (root / "run" / "input" / "source.py").write_text(input_plugin)
            (root / "run" / "input" / "source.cfg").write_text('filename = "source.py"\nticker_interval = 0\n')
        else:
            if not isinstance(data, Path):
                path = root / "data.ndjson"
                path.write_bytes(b"".join(line + b"\n" for line in data))
                data = path
            (root / "run" / "input" / "file.cfg").write_text(
                f'filename = "flat_file.py"\ninput_filename = {lua(str(data))}\n'
            )
        self.output = output
        self.write_output(output)
        self.stderr = ""

    def write_output(self, keys: dict[str, Any]) -> None:
        body = {"filename": "elasticsearch_bulk.py", "message_matcher": "TRUE", "read_queue": "input",
                "ticker_interval": 1, **keys}
        (self.root / "run" / "output" / "es.cfg").write_text(
            "".join(f"{k} = {lua(v)}\n" for k, v in body.items())
        )

    # -- running ------------------------------------------------------------------------------
    def run(self, timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "hindsight_py.cli", "hindsight.cfg", "7"], cwd=self.root, capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
        self.stderr = result.stderr
        return result

    def start(self) -> subprocess.Popen[str]:
        """A run in the background; its SIGTERM shutdown gives the output 2 s to drain, then stops it."""
        self._log = open(self.root / "hindsight.log", "w")
        return subprocess.Popen(
            [sys.executable, "-m", "hindsight_py.cli", "hindsight.cfg", "7"], cwd=self.root, stdout=self._log,
            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "HINDSIGHT_PY_SHUTDOWN_TIMEOUT": "2"},
        )

    def log_text(self) -> str:
        path = self.root / "hindsight.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, pattern: str, proc: subprocess.Popen[str], timeout: float = 60, count: int = 1) -> str:
        """Wait until `pattern` appears `count` times in the background run's log; returns the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if len(re.findall(pattern, text)) >= count:
                return text
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} x{count} not in the log within {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self, proc: subprocess.Popen[str], timeout: float = 60) -> int:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        finally:
            self._log.close()

    # -- what a run left ----------------------------------------------------------------------
    def summary(self, text: str | None = None) -> dict[str, int]:
        match = SUMMARY.search(self.stderr if text is None else text)
        assert match, f"no summary line in:\n{(self.stderr if text is None else text)[-4000:]}"
        return {k: int(v) for k, v in match.groupdict().items()}

    def checkpoint(self, key: str = "input->output.es") -> str | None:
        """The committed position of `key` in hindsight.cp, or None."""
        path = self.root / "output" / "hindsight.cp"
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            match = re.match(r"_G\['(.*)'\] = '?(.*?)'?$", line)
            if match and match.group(1) == key:
                return match.group(2)
        return None

    def dead_letters(self) -> list[dict[str, Any]]:
        directory = self.root / "output" / "dead_letter"
        records = []
        for path in sorted(directory.glob("*.jsonl")) if directory.exists() else []:
            records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return records


def documents(base_url: str, index: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every document of `index` (refreshed first), as (_id, _source) dicts; [] if it does not exist."""
    http = requests.Session()
    refreshed = http.post(f"{base_url}/{index}/_refresh", timeout=60, **kwargs)
    if refreshed.status_code == 404:
        return []
    refreshed.raise_for_status()
    found = http.post(f"{base_url}/{index}/_search", params={"size": 10000},
                      json={"query": {"match_all": {}}, "sort": ["_doc"]}, timeout=60, **kwargs)
    found.raise_for_status()
    return [{"_id": h["_id"], **h["_source"]} for h in found.json()["hits"]["hits"]]


def count(base_url: str, index: str, **kwargs: Any) -> int:
    http = requests.Session()
    if http.post(f"{base_url}/{index}/_refresh", timeout=60, **kwargs).status_code == 404:
        return 0
    response = http.get(f"{base_url}/{index}/_count", timeout=60, **kwargs)
    response.raise_for_status()
    return int(response.json()["count"])


# -- a fake cluster -------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    wire_body: bytes  # as received
    body: bytes  # decompressed when it was gzipped

    def pairs(self) -> list[tuple[dict[str, Any], bytes]]:
        """A bulk body's (action, source line) pairs."""
        lines = self.body.split(b"\n")
        assert lines[-1] == b"", "a bulk body ends with a newline"
        lines = lines[:-1]
        assert len(lines) % 2 == 0, f"odd number of lines: {lines[:4]}"
        return [(json.loads(a), s) for a, s in zip(lines[0::2], lines[1::2], strict=True)]


# (request) -> (status, body) to answer instead of the cluster, or None to go on
Gate = Callable[[Request], "tuple[int, bytes] | None"]
# (action, source) -> (status, error) to reject one document, or None to index it
Rejecter = Callable[[dict[str, Any], bytes], "tuple[int, dict[str, Any]] | None"]


class FakeCluster:
    """Answers GET / as the given server version and indexes every bulk item, recording requests."""

    def __init__(self, version: str = "8.19.0", distribution: str = "elasticsearch", *, gate: Gate | None = None,
                 reject: Rejecter | None = None) -> None:
        self.requests: list[Request] = []
        owner = self
        root = json.dumps({"name": "fake", "version": {"number": version, "distribution": distribution},
                           "tagline": "You Know, for Search"}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                wire = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = gzip.decompress(wire) if self.headers.get("Content-Encoding") == "gzip" else wire
                request = Request(self.command, self.path, dict(self.headers.items()), wire, body)
                owner.requests.append(request)
                answer = gate(request) if gate else None
                if answer is None:
                    answer = (200, root) if self.command == "GET" else owner._bulk(request)
                status, data = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = handle_one

        self._reject = reject
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _bulk(self, request: Request) -> tuple[int, bytes]:
        items = []
        errors = False
        for action, source in request.pairs():
            op = next(iter(action))
            refused = self._reject(action, source) if self._reject else None
            if refused is None:
                items.append({op: {"status": 201}})
            else:
                errors = True
                items.append({op: {"status": refused[0], "error": refused[1]}})
        return 200, json.dumps({"took": 1, "errors": errors, "items": items}).encode()

    def bulks(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and "/_bulk" in r.path]

    def sources(self) -> list[bytes]:
        return [source for r in self.bulks() for _, source in r.pairs()]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
