"""The bulk sender: every document ends indexed or dead-lettered, and is counted.

Transport faults are injected by a small HTTP peer on 127.0.0.1 (port 0) that answers from
a script; server behaviour (mapping conflicts, `_type` rejection) is checked against the
real Elasticsearch 8 / OpenSearch 2 servers from scripts/search_servers.py.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3

from hindsight_py.outputs import elasticsearch as es_module
from hindsight_py.outputs.elasticsearch import (
    BulkSender,
    SendInterrupted,
    ServerInfo,
    bulk_body_count,
)

# -- a scriptable HTTP peer ------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # decompressed if it was sent gzipped


# A responder gets the request and returns (status, body), or "close" to drop the
# connection without an answer, or ("hang", seconds) to answer only after that long.
Responder = Callable[[Request], object]


def pairs(body: bytes) -> list[tuple[bytes, bytes]]:
    lines = body.rstrip(b"\n").split(b"\n")
    return list(zip(lines[0::2], lines[1::2], strict=True))


def accepted(body: bytes) -> tuple[int, bytes]:
    items = [{"index": {"status": 201}} for _ in pairs(body)]
    return 200, json.dumps({"errors": False, "items": items}).encode()


class FaultServer:
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[Request] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real cluster

            def log_message(self, *args: object) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = Request(self.command, self.path, dict(self.headers.items()), body)
                owner.requests.append(request)
                answer = owner.responder(request)
                if answer == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(answer, tuple) and answer[0] == "hang":
                    time.sleep(answer[1])
                    answer = accepted(body)
                status, data = answer
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    self.close_connection = True  # the client gave up (timeout test)

            do_GET = do_POST = handle_one

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Responder], FaultServer]]:
    servers: list[FaultServer] = []

    def start(responder: Responder) -> FaultServer:
        server = FaultServer(responder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def script(*answers: object) -> Responder:
    """Answer with each of `answers` in turn, then accept everything."""
    queue = list(answers)

    def respond(request: Request) -> object:
        return queue.pop(0) if queue else accepted(request.body)

    return respond


@pytest.fixture
def dead_port() -> int:
    """A loopback port nobody listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Log(list):
    def __call__(self, level: int, text: str) -> None:
        self.append((level, text))

    def warnings(self) -> list[str]:
        return [text for level, text in self if level == es_module.LOG_WARNING]


def make_sender(
    urls: str | list[str], tmp_path: Path, **kwargs: object
) -> tuple[BulkSender, Log, list[float]]:
    """A sender whose waits are recorded (and skipped) and whose jitter is 1.0, so each
    recorded delay is the backoff cap itself."""
    log = Log()
    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 1.0)
    sender = BulkSender(urls, dead_letter_path=tmp_path / "dlq" / "dead.jsonl", log=log, **kwargs)
    delays: list[float] = []
    sender._jitter = lambda: 1.0
    real_pause = sender._pause
    sender._pause = lambda seconds, result: (delays.append(seconds), real_pause(0, result))  # type: ignore[method-assign]
    return sender, log, delays


def body_of(*sources: dict | str, action: bytes = b'{"index":{"_index":"t"}}') -> bytes:
    out = b""
    for source in sources:
        line = source if isinstance(source, str) else json.dumps(source)
        out += action + b"\n" + line.encode() + b"\n"
    return out


def dead_letters(sender: BulkSender) -> list[dict]:
    if not sender.dead_letter_path.exists():
        return []
    return [json.loads(line) for line in sender.dead_letter_path.read_text().splitlines()]


# -- the happy path and the request itself -----------------------------------------------


def test_success_counts_every_document_and_posts_the_body_verbatim(serve, tmp_path):
    server = serve(script())
    sender, log, delays = make_sender(server.url, tmp_path)
    body = body_of({"a": 1}, {"a": 2}, {"a": 3})

    result = sender.send(body, 3)

    assert (result.indexed, result.dead_lettered, result.retried) == (3, 0, 0)
    [request] = server.requests
    assert request.method == "POST"
    assert request.path.startswith("/_bulk?")
    assert request.headers["Content-Type"] == "application/x-ndjson"
    assert request.body == body
    assert not sender.dead_letter_path.exists()
    assert delays == []


def test_keeps_one_connection_alive_across_sends(serve, tmp_path):
    ports: list[int] = []

    def respond(request: Request) -> object:
        return accepted(request.body)

    server = serve(respond)
    sender, _, _ = make_sender(server.url, tmp_path)
    original = server.httpd.RequestHandlerClass.handle_one

    def tracking(handler):
        ports.append(handler.client_address[1])
        return original(handler)

    server.httpd.RequestHandlerClass.do_POST = tracking
    for n in range(3):
        sender.send(body_of({"n": n}), 1)
    assert len(ports) == 3 and len(set(ports)) == 1


def test_url_path_prefix_and_gzip_and_basic_auth_from_url(serve, tmp_path):
    server = serve(script())
    url = server.url.replace("http://", "http://elastic:s%3Acret@") + "/es/"
    sender, _, _ = make_sender(url, tmp_path, gzip=True)
    body = body_of({"a": "x" * 1000})

    assert sender.send(body, 1).indexed == 1
    [request] = server.requests
    assert request.path.startswith("/es/_bulk?")
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.body == body  # the peer decompressed it
    assert (
        request.headers["Authorization"] == urllib3.make_headers(basic_auth="elastic:s:cret")["authorization"]
    )


def test_api_key_header(serve, tmp_path):
    server = serve(script())
    sender, _, _ = make_sender(server.url, tmp_path, api_key="a2V5OnNlY3JldA==")
    sender.send(body_of({"a": 1}), 1)
    assert server.requests[0].headers["Authorization"] == "ApiKey a2V5OnNlY3JldA=="


# -- whole-request failures: retried ---------------------------------------------------------


def test_503_twice_then_success_retries_the_same_body_with_growing_delays(serve, tmp_path):
    unavailable = (503, b'{"error":{"type":"unavailable","reason":"no master"},"status":503}')
    server = serve(script(unavailable, unavailable))
    sender, log, delays = make_sender(server.url, tmp_path)
    body = body_of({"a": 1}, {"a": 2})

    result = sender.send(body, 2)

    assert (result.indexed, result.dead_lettered, result.retried) == (2, 0, 2)
    assert [r.body for r in server.requests] == [body, body, body]
    assert delays == [0.01, 0.02]
    assert "HTTP 503: unavailable: no master" in log.warnings()[0]


def test_backoff_doubles_up_to_its_cap(serve, tmp_path):
    server = serve(script(*[(502, b"bad gateway")] * 6))
    sender, _, delays = make_sender(server.url, tmp_path, backoff_initial=0.01, backoff_max=0.04)

    assert sender.send(body_of({"a": 1}), 1).indexed == 1
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]
    assert len(server.requests) == 7


def test_retrying_forever_stays_at_the_cap(tmp_path):
    # Thousands of attempts (hours of an outage) must not overflow the backoff arithmetic.
    sender, _, delays = make_sender("http://127.0.0.1:9", tmp_path, backoff_max=30)
    sender._wait_before_retry(5000, "still down", es_module.SendResult())
    assert delays == [30]


def test_full_jitter_draws_below_the_cap(serve, tmp_path):
    server = serve(script((503, b""), (503, b"")))
    sender, _, delays = make_sender(server.url, tmp_path, backoff_initial=0.08)
    draws = iter([0.5, 0.25])
    sender._jitter = lambda: next(draws)
    sender.send(body_of({"a": 1}), 1)
    assert delays == [0.04, 0.04]  # 0.08 * 0.5, then 0.16 * 0.25


def test_429_and_auth_failures_are_waited_out_not_dead_lettered(serve, tmp_path):
    server = serve(script((429, b'{"error":"too many"}'), (401, b'{"error":{"type":"security_exception"}}')))
    sender, _, delays = make_sender(server.url, tmp_path)
    assert sender.send(body_of({"a": 1}), 1).indexed == 1
    assert len(server.requests) == 3 and len(delays) == 2
    assert dead_letters(sender) == []


def test_connection_refused_moves_to_the_next_url(serve, tmp_path, dead_port):
    server = serve(script())
    sender, log, delays = make_sender([f"http://127.0.0.1:{dead_port}", server.url], tmp_path)

    result = sender.send(body_of({"a": 1}), 1)

    assert (result.indexed, result.retried) == (1, 1)
    assert len(server.requests) == 1
    assert len(delays) == 1
    assert f"127.0.0.1:{dead_port}" in log.warnings()[0]


def test_dropped_connection_is_retried(serve, tmp_path):
    server = serve(script("close"))
    sender, _, delays = make_sender(server.url, tmp_path)
    assert sender.send(body_of({"a": 1}), 1).indexed == 1
    assert len(server.requests) == 2 and len(delays) == 1


def test_read_timeout_is_retried(serve, tmp_path):
    server = serve(script(("hang", 2.0)))
    sender, log, delays = make_sender(server.url, tmp_path, timeout=0.2)

    result = sender.send(body_of({"a": 1}), 1)

    assert (result.indexed, result.retried) == (1, 1)
    assert len(server.requests) == 2
    assert "timed out" in log.warnings()[0].lower()


def test_unreadable_2xx_answer_is_retried_not_trusted(serve, tmp_path):
    server = serve(script((200, b"<html>proxy says hi</html>")))
    sender, _, delays = make_sender(server.url, tmp_path)
    assert sender.send(body_of({"a": 1}), 1).indexed == 1
    assert len(server.requests) == 2 and len(delays) == 1


def test_max_retries_dead_letters_with_the_last_reason(tmp_path, dead_port):
    sender, _, delays = make_sender(f"http://127.0.0.1:{dead_port}", tmp_path, max_retries=2)
    body = body_of({"a": 1}, {"a": 2})

    result = sender.send(body, 2)

    assert (result.indexed, result.dead_lettered, result.retried) == (0, 2, 2)
    assert delays == [0.01, 0.02]
    letters = dead_letters(sender)
    assert [d["data"] for d in letters] == ['{"a": 1}', '{"a": 2}']
    assert letters[0]["status"] is None
    assert letters[0]["reason"].startswith("gave up after 2 retries: ")
    assert "refused" in letters[0]["reason"].lower()


def test_stop_event_interrupts_the_wait(tmp_path, dead_port):
    stop = threading.Event()
    log = Log()

    def log_and_stop(level: int, text: str) -> None:
        log(level, text)
        stop.set()  # as if the supervisor asked to stop while we wait

    # A long backoff and one retry: without the interruption this would dead-letter.
    sender = BulkSender(
        [f"http://127.0.0.1:{dead_port}"],
        dead_letter_path=tmp_path / "dead.jsonl",
        backoff_initial=2,
        max_retries=1,
        log=log_and_stop,
        stop_event=stop,
    )
    with pytest.raises(SendInterrupted) as caught:
        sender.send(body_of({"a": 1}), 1)
    assert caught.value.result.indexed == 0 and caught.value.result.dead_lettered == 0
    assert not sender.dead_letter_path.exists()


def test_stop_event_does_not_prevent_a_final_flush(serve, tmp_path):
    server = serve(script())
    stop = threading.Event()
    stop.set()
    sender, _, _ = make_sender(server.url, tmp_path, stop_event=stop)
    assert sender.send(body_of({"a": 1}), 1).indexed == 1


def test_retry_warnings_are_rate_limited(serve, tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(es_module.time, "monotonic", lambda: clock[0])
    server = serve(script(*[(503, b"")] * 5))
    sender, log, _ = make_sender(server.url, tmp_path)
    sender.send(body_of({"a": 1}), 1)
    assert len(log.warnings()) == 1

    server.responder = script((503, b""), (503, b""))
    clock[0] += 11
    sender.send(body_of({"a": 1}), 1)
    warnings = log.warnings()
    assert len(warnings) == 2
    assert "(4 more failures since the last report)" in warnings[1]


# -- whole-request failures: split or dead-lettered ------------------------------------------


def test_413_splits_by_documents_until_accepted(serve, tmp_path):
    received: list[bytes] = []

    def respond(request: Request) -> object:
        if len(pairs(request.body)) > 2:
            return 413, b""
        received.extend(source for _, source in pairs(request.body))
        return accepted(request.body)

    server = serve(respond)
    sender, _, delays = make_sender(server.url, tmp_path)

    result = sender.send(body_of(*[{"n": n} for n in range(5)]), 5)

    assert (result.indexed, result.dead_lettered) == (5, 0)
    assert received == [json.dumps({"n": n}).encode() for n in range(5)]
    assert delays == []


def test_413_on_a_single_document_dead_letters_it(serve, tmp_path):
    server = serve(lambda request: (413, b"request entity too large"))
    sender, _, _ = make_sender(server.url, tmp_path)

    result = sender.send(body_of({"a": 1}, {"a": 2}), 2)

    assert (result.indexed, result.dead_lettered) == (0, 2)
    assert len(server.requests) == 3
    assert [(d["status"], d["data"]) for d in dead_letters(sender)] == [
        (413, '{"a": 1}'),
        (413, '{"a": 2}'),
    ]


def test_400_for_the_request_dead_letters_every_document_with_the_reason(serve, tmp_path):
    error = {
        "type": "illegal_argument_exception",
        "reason": "Action/metadata line [1] contains an unknown parameter [_type]",
    }
    server = serve(script((400, json.dumps({"error": error, "status": 400}).encode())))
    sender, log, delays = make_sender(server.url, tmp_path)
    action = b'{"index":{"_index":"t","_type":"doc"}}'
    body = body_of({"a": 1}, {"b": 2}, action=action)

    result = sender.send(body, 2)

    assert (result.indexed, result.dead_lettered, result.retried) == (0, 2, 0)
    assert len(server.requests) == 1 and delays == []
    letters = dead_letters(sender)
    assert [d["data"] for d in letters] == ['{"a": 1}', '{"b": 2}']
    assert letters[0]["status"] == 400
    assert letters[0]["error"] == error
    assert letters[0]["action"] == {"index": {"_index": "t", "_type": "doc"}}
    assert "unknown parameter [_type]" in letters[0]["reason"]
    assert letters[0]["time"].endswith("Z")
    assert "2 documents dead-lettered" in log.warnings()[0]


# -- per-item results ----------------------------------------------------------------------


def test_items_429_are_retried_alone_and_items_400_dead_lettered(serve, tmp_path):
    rejected = {"type": "es_rejected_execution_exception", "reason": "queue full"}
    mapping = {
        "type": "mapper_parsing_exception",
        "reason": "failed to parse field [x]",
        "caused_by": {"type": "illegal_argument_exception", "reason": "not an object"},
    }
    first = {
        "errors": True,
        "items": [
            {"index": {"status": 201}},
            {"index": {"status": 429, "error": rejected}},
            {"index": {"status": 400, "error": mapping}},
        ],
    }
    server = serve(script((200, json.dumps(first).encode())))
    sender, log, delays = make_sender(server.url, tmp_path)
    body = body_of({"n": 1}, {"n": 2}, {"x": "three"})

    result = sender.send(body, 3)

    assert (result.indexed, result.dead_lettered, result.retried) == (2, 1, 1)
    assert server.requests[1].body == body_of({"n": 2})
    assert delays == [0.01]
    [letter] = dead_letters(sender)
    assert letter["status"] == 400
    assert letter["data"] == '{"x": "three"}'
    assert letter["error"] == mapping
    assert letter["reason"] == (
        "mapper_parsing_exception: failed to parse field [x] (caused by illegal_argument_exception: not an object)"
    )
    assert "es_rejected_execution_exception" in log.warnings()[-1] or any(
        "es_rejected_execution_exception" in w for w in log.warnings()
    )


def test_items_5xx_retried_until_max_retries_then_dead_lettered(serve, tmp_path):
    def respond(request: Request) -> object:
        items = [{"create": {"status": 503, "error": {"type": "unavailable_shards_exception"}}}]
        return 200, json.dumps({"errors": True, "items": items * len(pairs(request.body))}).encode()

    server = serve(respond)
    sender, _, delays = make_sender(server.url, tmp_path, max_retries=3)

    result = sender.send(body_of({"a": 1}), 1)

    assert (result.indexed, result.dead_lettered, result.retried) == (0, 1, 3)
    assert len(server.requests) == 4
    [letter] = dead_letters(sender)
    assert letter["status"] == 503 and "unavailable_shards_exception" in letter["reason"]


def test_items_map_to_documents_even_with_a_delete_action(serve, tmp_path):
    items = [
        {"delete": {"status": 404, "result": "not_found"}},  # not a failure: no "error"
        {"index": {"status": 201}},
        {
            "index": {
                "status": 409,
                "error": {"type": "version_conflict_engine_exception", "reason": "exists"},
            }
        },
    ]
    server = serve(script((200, json.dumps({"errors": True, "items": items}).encode())))
    sender, _, _ = make_sender(server.url, tmp_path)
    body = b'{"delete":{"_index":"t","_id":"1"}}\n' + body_of({"b": 2}, {"c": 3})

    result = sender.send(body, 3)

    assert (result.indexed, result.dead_lettered) == (2, 1)
    [letter] = dead_letters(sender)
    assert (letter["status"], letter["data"]) == (409, '{"c": 3}')


def test_documents_without_an_item_are_dead_lettered_not_assumed_indexed(serve, tmp_path):
    short = {"errors": True, "items": [{"index": {"status": 400, "error": {"type": "x", "reason": "y"}}}]}
    server = serve(script((200, json.dumps(short).encode())))
    sender, log, _ = make_sender(server.url, tmp_path)

    result = sender.send(body_of({"a": 1}, {"a": 2}), 2)

    assert (result.indexed, result.dead_lettered) == (0, 2)
    assert [d["status"] for d in dead_letters(sender)] == [400, 0]
    assert any(level == es_module.LOG_ERR for level, _ in log)


def test_errors_false_without_filter_path_order_is_still_the_fast_path(serve, tmp_path):
    answer = b'{"took":3,"ingest_took":0,"errors":false,"items":[{"index":{"status":201}}]}'
    server = serve(script((200, answer)))
    sender, _, _ = make_sender(server.url, tmp_path)
    assert sender.send(body_of({"a": 1}), 1).indexed == 1


def test_pretty_printed_answer_falls_back_to_parsing(serve, tmp_path):
    answer = json.dumps(
        {"took": 1, "errors": True, "items": [{"index": {"status": 400, "error": {"type": "t"}}}]}, indent=2
    )
    server = serve(script((200, answer.encode())))
    sender, _, _ = make_sender(server.url, tmp_path)
    assert sender.send(body_of({"a": 1}), 1).dead_lettered == 1


def test_dead_letter_keeps_invalid_utf8_recoverable(serve, tmp_path):
    server = serve(script((400, b'{"error":{"type":"parse_exception","reason":"bad"}}')))
    sender, _, _ = make_sender(server.url, tmp_path)
    source = b'{"a":"\xff\xfe"}'
    sender.send(b'{"index":{}}\n' + source + b"\n", 1)
    [letter] = dead_letters(sender)
    assert letter["data"].encode("utf-8", "surrogateescape") == source


# -- detection and helpers -----------------------------------------------------------------


def test_detect_reads_the_root_document_once(serve, tmp_path):
    root = {
        "version": {"distribution": "opensearch", "number": "2.19.1"},
        "tagline": "The OpenSearch Project",
    }
    server = serve(lambda request: (200, json.dumps(root).encode()))
    sender, _, _ = make_sender(server.url, tmp_path)

    info = sender.detect()

    assert info == ServerInfo("opensearch", "2.19.1", 2)
    assert info.accepts_types is False
    assert sender.detect() is info
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/")]


def test_detect_unreachable_returns_none_and_warns(tmp_path, dead_port):
    sender, log, _ = make_sender(f"http://127.0.0.1:{dead_port}", tmp_path)
    assert sender.detect() is None
    assert f"127.0.0.1:{dead_port}" in log.warnings()[0]


@pytest.mark.parametrize(
    "root, accepts",
    [
        ({"version": {"number": "6.8.23"}}, True),
        ({"version": {"number": "5.6.16"}}, True),
        ({"version": {"number": "7.17.0"}}, False),
        ({"version": {"number": "8.19.2", "build_flavor": "default"}}, False),
        ({"version": {"distribution": "opensearch", "number": "1.3.20"}}, False),
        ({"version": {"distribution": "opensearch", "number": "2.19.1"}}, False),
    ],
)
def test_accepts_types(root, accepts):
    assert ServerInfo.from_root(root).accepts_types is accepts


def test_bulk_body_count():
    body = b'{"delete":{"_id":"1"}}\n{"index":{}}\n{"a":1}\n{"create":{}}\n{"b":2}\n'
    assert bulk_body_count(body) == 3
    assert bulk_body_count(b"") == 0
    # one repeated action line: counted as pairs, including a source that looks like the action
    a = b'{"index":{"_index":"x"}}'
    assert bulk_body_count(a + b"\n{}\n" + a + b"\n" + a + b"\n" + a + b"\n\n") == 3
    # pairs that do not line up (a blank line where an action is expected) are cut up as the server does
    assert bulk_body_count(a + b"\n{}\n\n" + a + b"\n{}\n") == 2
    assert bulk_body_count(a + b"\n{}\n" + b'{"delete":{"_id":"1"}}\n' + a + b"\n{}\n") == 3


def test_empty_body_sends_nothing(serve, tmp_path):
    server = serve(script())
    sender, _, _ = make_sender(server.url, tmp_path)
    assert sender.send(b"", 0) == es_module.SendResult()
    assert server.requests == []


# -- real servers --------------------------------------------------------------------------


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = urllib3.PoolManager()
        self.index = f"hs-bulk-{uuid.uuid4().hex[:10]}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        response = self.http.request(
            method, self.url + path, body=data, headers={"Content-Type": "application/json"}
        )
        return json.loads(response.data)

    def count(self) -> int:
        self.call("POST", f"/{self.index}/_refresh")
        return self.call("GET", f"/{self.index}/_count")["count"]

    def action(self, op: str = "index", **extra: str) -> bytes:
        return json.dumps({op: {"_index": self.index, **extra}}).encode()


@pytest.fixture(params=["es8_url", "os2_url"])
def cluster(request) -> Iterator[Cluster]:
    cluster = Cluster(request.getfixturevalue(request.param))
    yield cluster
    cluster.call("DELETE", f"/{cluster.index}")


@pytest.mark.servers
def test_real_server_detect(cluster, tmp_path):
    sender, _, _ = make_sender(cluster.url, tmp_path)
    info = sender.detect()
    assert info is not None
    assert info.distribution in ("elasticsearch", "opensearch")
    assert info.major >= 2 and info.accepts_types is False


@pytest.mark.servers
def test_real_server_indexes_everything(cluster, tmp_path):
    sender, _, _ = make_sender(cluster.url, tmp_path)
    body = body_of(*[{"n": n, "msg": "x" * 100} for n in range(200)], action=cluster.action())

    result = sender.send(body, 200)

    assert (result.indexed, result.dead_lettered, result.retried) == (200, 0, 0)
    assert cluster.count() == 200


@pytest.mark.servers
def test_real_server_mapping_conflict_is_dead_lettered_with_its_reason(cluster, tmp_path):
    sender, _, _ = make_sender(cluster.url, tmp_path)
    body = body_of({"x": {"inner": 1}}, {"x": "a string"}, action=cluster.action())

    result = sender.send(body, 2)

    assert (result.indexed, result.dead_lettered, result.retried) == (1, 1, 0)
    assert cluster.count() == 1
    [letter] = dead_letters(sender)
    assert letter["status"] == 400
    assert letter["data"] == '{"x": "a string"}'
    assert letter["action"] == {"index": {"_index": cluster.index}}
    assert letter["error"]["type"] in ("document_parsing_exception", "mapper_parsing_exception")
    assert "[x]" in letter["reason"]


@pytest.mark.servers
def test_real_server_create_conflict_is_dead_lettered(cluster, tmp_path):
    sender, _, _ = make_sender(cluster.url, tmp_path)
    action = cluster.action("create", _id="same")
    result = sender.send(body_of({"a": 1}, {"a": 2}, action=action), 2)
    assert (result.indexed, result.dead_lettered) == (1, 1)
    [letter] = dead_letters(sender)
    assert letter["status"] == 409
    assert letter["error"]["type"] == "version_conflict_engine_exception"


@pytest.mark.servers
def test_real_server_rejects_type_and_nothing_is_silent(cluster, tmp_path):
    sender, _, delays = make_sender(cluster.url, tmp_path)
    action = cluster.action(_type="doc")

    result = sender.send(body_of({"a": 1}, {"a": 2}, action=action), 2)

    assert (result.indexed, result.dead_lettered, result.retried) == (0, 2, 0)
    assert delays == []
    letters = dead_letters(sender)
    assert [d["status"] for d in letters] == [400, 400]
    assert "_type" in letters[0]["reason"]
    assert letters[0]["action"]["index"]["_type"] == "doc"


def test_sources_that_are_not_json_objects_are_set_aside_without_being_sent(serve, tmp_path):
    server = serve(script((200, b'{"took":1,"errors":false,"items":[{"index":{"status":201}}]}')))
    sender, log, delays = make_sender(server.url, tmp_path)
    body = body_of({"a": 1}, "1000 message analysed")

    result = sender.send(body, 2)

    assert (result.indexed, result.dead_lettered, result.set_aside) == (1, 1, 1)
    assert len(server.requests) == 1
    assert b"message analysed" not in server.requests[0].body
    letters = dead_letters(sender)
    assert [d["data"] for d in letters] == ["1000 message analysed"]
    assert "not a JSON object" in letters[0]["reason"]
