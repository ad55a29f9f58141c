"""Several bulk requests in flight (outputs/delivery.py PipelinedSender, `max_in_flight`).

A PipelinedSender keeps up to its sender's `connections` bodies on their way; they may finish in
any order, and `done` (what the read loop commits behind) is the last ticket with every ticket
before it settled: never past a body still on its way, never past a failed one. Checked here with
a sender whose requests finish only when the test says, with the read loop's own commit queue
(read_loop.Commits), with a BulkSender against a server that holds requests, and end to end with
both outputs and a window of 4.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bulk_sink import bulk_answer
from delivery_helpers import LineFile, project_workdir, run_cli, wait_until

from hindsight_py.outputs.delivery import (
    DEFAULT_MAX_IN_FLIGHT,
    PipelinedSender,
    max_in_flight,
    sender_from_config,
)
from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted, SendResult
from hindsight_py.read_loop import Commits


class HeldSender:
    """A BulkSender stand-in whose sends return only once `finish(body)` is called."""

    dead_letter_path = Path("/dev/null")

    def __init__(self, connections: int) -> None:
        self.connections = connections
        self._lock = threading.Lock()
        self._gates: dict[bytes, threading.Event] = {}
        self._outcomes: dict[bytes, Exception | SendResult] = {}
        self.on_the_way: list[bytes] = []  # bodies inside send() now
        self.most_at_once = 0

    def _gate(self, body: bytes) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(body, threading.Event())

    def finish(self, body: bytes, outcome: Exception | SendResult | None = None) -> None:
        if outcome is not None:
            self._outcomes[body] = outcome
        self._gate(body).set()

    def send(self, body: bytes, count: int, **kwargs: Any) -> SendResult:
        with self._lock:
            self.on_the_way.append(body)
            self.most_at_once = max(self.most_at_once, len(self.on_the_way))
        try:
            assert self._gate(body).wait(30), f"{body!r} was never finished"
            outcome = self._outcomes.get(body, SendResult(indexed=count))
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        finally:
            with self._lock:
                self.on_the_way.remove(body)


def stats() -> SimpleNamespace:
    return SimpleNamespace(indexed=0, dead_lettered=0, set_aside=0, retried=0, moved_aside=0)


def pipe_of(sender: HeldSender, *, abort: bool = False) -> tuple[PipelinedSender, SimpleNamespace]:
    counts = stats()
    return PipelinedSender(sender, counts, abort=abort, is_running=lambda: True), counts  # type: ignore[arg-type]


def body(n: int) -> bytes:
    return b"body-%d" % n


def test_four_bodies_go_out_at_once_and_the_fifth_waits_for_room() -> None:
    sender = HeldSender(connections=4)
    pipe, counts = pipe_of(sender)
    for n in range(1, 5):
        assert pipe.submit(body(n), 10) is None  # at once: the window has room
    wait_until(lambda: len(sender.on_the_way) == 4, 10, "four requests on their way")

    fifth = threading.Thread(target=pipe.submit, args=(body(5), 10))
    fifth.start()
    fifth.join(0.3)
    assert fifth.is_alive() and pipe.ticket == 4  # the window is full: it waits
    sender.finish(body(2))
    fifth.join(10)
    assert not fifth.is_alive() and pipe.ticket == 5
    for n in (1, 3, 4, 5):
        sender.finish(body(n))
    assert pipe.wait() is None
    assert (pipe.done, pipe.busy, sender.most_at_once, counts.indexed) == (5, False, 4, 50)


def test_bodies_finishing_out_of_order_move_done_only_over_what_is_settled() -> None:
    sender = HeldSender(connections=4)
    pipe, _ = pipe_of(sender)
    delivered: list[int] = []
    for n in range(1, 5):
        assert pipe.submit(body(n), 1, on_delivered=lambda n=n: delivered.append(n)) is None
    wait_until(lambda: len(sender.on_the_way) == 4, 10, "four requests on their way")

    sender.finish(body(3))
    wait_until(lambda: delivered == [3], 10, "body 3 delivered")
    assert (pipe.done, pipe.busy) == (0, True)  # 1 and 2 are still on their way
    sender.finish(body(1))
    wait_until(lambda: pipe.done == 1, 10, "done at 1")
    sender.finish(body(2))
    wait_until(lambda: pipe.done == 3, 10, "done past 2 and the settled 3")
    sender.finish(body(4))
    assert pipe.wait() is None
    assert (pipe.done, delivered) == (4, [3, 1, 2, 4])  # each body's callback once, as it finished


def test_a_failed_body_holds_done_for_the_rest_of_the_run() -> None:
    sender = HeldSender(connections=3)
    pipe, counts = pipe_of(sender)
    for n in range(1, 4):
        pipe.submit(body(n), 5)
    wait_until(lambda: len(sender.on_the_way) == 3, 10, "three requests on their way")
    sender.finish(body(2), RuntimeError("the server went mad"))
    sender.finish(body(3))
    sender.finish(body(1))

    err = pipe.wait()
    assert err == "bulk delivery failed: RuntimeError: the server went mad"
    assert (pipe.done, pipe.busy, pipe.interrupted, counts.indexed) == (1, True, False, 10)
    assert pipe.submit(body(4), 5) == err  # reported again, and nothing more handed over
    assert pipe.ticket == 3


def test_a_stop_during_one_body_is_an_interruption_and_a_failure_outranks_it() -> None:
    sender = HeldSender(connections=2)
    pipe, counts = pipe_of(sender)
    pipe.submit(body(1), 5)
    pipe.submit(body(2), 5)
    sender.finish(body(1), SendInterrupted("stopped", SendResult(indexed=2)))
    wait_until(lambda: pipe.error is not None, 10, "the interruption reported")
    assert pipe.interrupted and "stays queued" in (pipe.error or "")
    sender.finish(body(2), RuntimeError("broken"))
    pipe.wait()
    assert (pipe.interrupted, pipe.error, pipe.done) == (False, "bulk delivery failed: RuntimeError: broken", 0)
    assert counts.indexed == 2  # what the interrupted send settled is counted


def test_abort_on_error_fails_the_body_that_dead_lettered() -> None:
    sender = HeldSender(connections=2)
    pipe, counts = pipe_of(sender, abort=True)
    pipe.submit(body(1), 5)
    pipe.submit(body(2), 5)
    sender.finish(body(2), SendResult(indexed=4, dead_lettered=1))
    sender.finish(body(1))
    assert (pipe.wait() or "").startswith("abort_on_error: 1 documents were rejected")
    assert (pipe.done, counts.indexed, counts.dead_lettered) == (1, 9, 1)


def test_the_read_loop_commits_each_position_only_once_every_body_before_it_is_settled() -> None:
    sender = HeldSender(connections=4)
    pipe, _ = pipe_of(sender)
    sent: list[str] = []
    commits = Commits(lambda: [pipe], lambda key, value: sent.append(value))
    cursor = SimpleNamespace(key="input->output.es", committed="")
    for n in range(1, 5):  # a position after each body, as the plugin reports its messages done
        pipe.submit(body(n), 1)
        commits.commit(cursor, (0, n * 100))
    for n in (4, 2):
        sender.finish(body(n))
    wait_until(lambda: not {body(4), body(2)} & set(sender.on_the_way), 10, "bodies 4 and 2 answered")
    commits.settle()
    assert sent == []  # body 1 is still on its way: no position may pass it
    sender.finish(body(1))
    wait_until(lambda: pipe.done == 2, 10, "done at 2")
    commits.settle()
    assert sent == ["0:100", "0:200"]
    sender.finish(body(3))
    pipe.wait()
    commits.settle()
    assert sent == ["0:100", "0:200", "0:300", "0:400"]


def test_max_in_flight_is_read_from_the_cfg() -> None:
    assert max_in_flight({}) == DEFAULT_MAX_IN_FLIGHT
    assert max_in_flight({"max_in_flight": 4.0}) == 4
    for wrong in (0, -1, 1.5, "4", True):
        with pytest.raises(ValueError, match="max_in_flight must be a whole number"):
            max_in_flight({"max_in_flight": wrong})
    sender = sender_from_config({"max_in_flight": 3, "type_conflicts": "dead_letter"},
                                dead_letter_path="/dev/null", log=lambda level, text: None)
    assert sender.connections == 3
    assert PipelinedSender(sender, stats(), abort=False, is_running=lambda: True).window == 3
    sender.close()


# -- one BulkSender, several threads ---------------------------------------------------------------


class HoldingServer(ThreadingHTTPServer):
    """Holds bulk requests until `hold` of them have been open at once (or `patience` seconds
    passed), then answers like a server that indexed them; records the connections they came on,
    the documents, and the order of everything."""

    daemon_threads = True

    def __init__(self, hold: int, patience: float = 10) -> None:
        super().__init__(("127.0.0.1", 0), _HoldingHandler)
        self.hold = hold
        self.patience = patience
        self.changed = threading.Condition()
        self.open = 0
        self.most_open = 0
        self.ports: set[int] = set()
        self.events: list[str] = []
        self.sources: list[bytes] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HoldingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HoldingServer

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(b'{"version":{"number":"8.19.0"}}')

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.changed:
            self.server.events.append("template")
        self._answer(b'{"acknowledged":true}')

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        with server.changed:
            server.events.append("bulk")
            server.ports.add(self.client_address[1])
            server.sources += data.split(b"\n")[1::2]
            server.open += 1
            server.most_open = max(server.most_open, server.open)
            server.changed.notify_all()
            server.changed.wait_for(lambda: server.most_open >= server.hold, server.patience)
        self._answer(bulk_answer(data)[1])
        with server.changed:
            server.open -= 1


def test_one_sender_sends_from_four_threads_at_once_with_the_template_first(tmp_path: Path) -> None:
    server = HoldingServer(hold=4)
    prepared: list[int] = []

    def prepare(sender: BulkSender) -> str | None:
        prepared.append(1)
        server.events.append("prepare")
        return None

    sender = BulkSender(server.url, dead_letter_path=tmp_path / "dead.jsonl", connections=4, prepare=prepare)
    results: list[SendResult] = []
    docs = [b'{"index":{}}\n{"n":%d}\n' % (10 * t + i) for t in range(4) for i in range(10)]

    def send(t: int) -> None:
        results.append(sender.send(b"".join(docs[10 * t:10 * t + 10]), 10))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sender.close()
    server.shutdown()
    assert sum(r.indexed for r in results) == 40 and len(results) == 4
    assert server.most_open == 4 and len(server.ports) == 4  # four connections, all busy at once
    assert prepared == [1] and server.events[0] == "prepare"  # once, before any bulk request


# -- end to end: both outputs with a window of 4 --------------------------------------------------

LINES = 20_000


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    return LineFile.write(tmp_path_factory.mktemp("window") / "cloudtrail.json", LINES)


def queue_end(output: Path) -> str:
    logs = sorted((output / "input").glob("*.log"), key=lambda p: int(p.stem))
    return f"{logs[-1].stem}:{logs[-1].stat().st_size}"


@pytest.mark.parametrize("pipeline", ["native", "lua"])
def test_a_window_of_four_delivers_every_document_once_and_commits_the_queue_end(pipeline: str, lines: LineFile,
                                                                                 tmp_path: Path) -> None:
    # each request is held (a second at most) until four have been open at once: the output must
    # have four on their way for the run to go fast
    server = HoldingServer(hold=4, patience=1.0)
    try:
        if pipeline == "lua":
            wd = project_workdir(tmp_path / "w", lines.path, server.url, "cloudtrail", flush_count="500",
                                 max_in_flight="4")
            key = "input->output.elasticsearch_bulk_api"
        else:
            from test_background_delivery import native_workdir

            wd = native_workdir(tmp_path / "w", lines.path, str(server.server_address[1]), "cloudtrail")
            wd.edit(wd.path / "run" / "output" / "elasticsearch_bulk.cfg", flush_count="500", max_in_flight="4")
            key = "input->output.elasticsearch_bulk"
        run = run_cli(wd)
        assert run.returncode == 0, run.tail()
        assert len(server.sources) == lines.count
        assert sorted(server.sources) == sorted(lines.path.read_bytes().splitlines())  # each once
        assert server.most_open == 4 and len(server.ports) == 4
        assert wd.checkpoints()[key] == queue_end(wd.output)
    finally:
        server.shutdown()
        server.server_close()


def test_spools_left_by_a_run_are_delivered_oldest_first(tmp_path: Path) -> None:
    from bulk_sink import BulkSink

    from hindsight_py.outputs.elasticsearch_lua import ElasticsearchLua, left_spools

    sink = BulkSink(record=True).start()
    try:
        host = SimpleNamespace(output_path=tmp_path, plugin=SimpleNamespace(name="output.es", values={}),
                               stats=stats(), stop_event=lambda: None, log_fn=lambda level, text: None)
        for name, n in (("output.es.bulk.10", 10), ("output.es.bulk.2", 2), ("output.es.bulk", 0)):
            (tmp_path / name).write_bytes(b'127.0.0.1 %d\n{"index":{}}\n{"n":%d}\n' % (sink.port, n))
        (tmp_path / "output.es.bulk.11.tmp").write_bytes(b"torn: the plugin never heard back about it")

        ElasticsearchLua(host).recover()  # type: ignore[arg-type]

        assert sink.sources() == [b'{"n":0}', b'{"n":2}', b'{"n":10}']  # the order they were handed over
        assert left_spools(host) == [] and host.stats.indexed == 3
    finally:
        sink.close()
