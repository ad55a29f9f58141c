"""From a plugin's cfg to a bulk sender, and delivery in the background.

Both outputs (the Lua `require "hindsight.elasticsearch"` binding and plugins/elasticsearch_bulk.py)
build their sender here, and both hand their bulk bodies to a :class:`PipelinedSender`: up to
`max_in_flight` requests go out from background threads while the plugin prepares the next ones.
A PipelinedSender is a settle/commit ticket counter (outputs/extension.py): the read loop holds
back every checkpoint that depends on a body until that body, and every body before it, is
delivered.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from hindsight_py.outputs import type_conflicts
from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted, SendResult
from hindsight_py.outputs.extension import OutputHost

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "PipelinedSender", "background_delivery", "count_result", "max_in_flight",
           "sender_from_config", "urls_from_config"]


#: Bulk requests an output keeps in flight unless its cfg says otherwise (`max_in_flight`): see
#: docs/performance.md for the measurements behind it.
DEFAULT_MAX_IN_FLIGHT = 2


def max_in_flight(cfg: dict[str, Any]) -> int:
    """`max_in_flight`: how many bulk requests may be on their way at once (1: one at a time)."""
    value = cfg.get("max_in_flight")
    if value is None:
        return DEFAULT_MAX_IN_FLIGHT
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ValueError(f"max_in_flight must be a whole number of requests, 1 or more, not {value!r}")
    return int(value)


def urls_from_config(cfg: dict[str, Any]) -> list[str]:
    """`url`/`urls` (hindsight-py), else upstream's `address` and `port`."""
    urls = cfg.get("urls") or cfg.get("url")
    if isinstance(urls, str):
        return [urls]
    if isinstance(urls, list) and urls:
        return [str(u) for u in urls]
    address = cfg.get("address") or "127.0.0.1"
    port = int(cfg.get("port") or 9200)
    return [f"http://{address}:{port}"]


def sender_from_config(cfg: dict[str, Any], *, dead_letter_path: Any, log: Callable[[int, str], None],
                       stop_event: Any = None) -> BulkSender:
    """A BulkSender for an elasticsearch_bulk_api-style cfg.

    Upstream gives up after `max_retry` when `discard_on_error` or `abort_on_error` is set (and then
    loses the batch); hindsight-py retries forever by default, and with either key set it retries
    `max_retry` times and then dead-letters the batch instead of discarding it.
    """
    gives_up = bool(cfg.get("discard_on_error") or cfg.get("abort_on_error"))
    sender = BulkSender(
        urls_from_config(cfg),
        dead_letter_path=dead_letter_path,
        timeout=float(cfg.get("timeout") or 10),
        username=cfg.get("username"),
        password=cfg.get("password"),
        api_key=cfg.get("api_key"),
        ca_certs=cfg.get("ca_certs"),
        verify=cfg.get("verify_certs", True) is not False,
        client_cert=cfg.get("client_cert"),
        client_key=cfg.get("client_key"),
        gzip=bool(cfg.get("gzip")),
        max_retries=int(cfg.get("max_retry") or 0) if gives_up else None,
        log=log,
        stop_event=stop_event,
        connections=max_in_flight(cfg),
    )
    # type_conflicts (default: rename mistyped fields and send again) and index_template
    type_conflicts.configure(sender, cfg, log)
    return sender


def count_result(stats: Any, result: SendResult) -> None:
    """Add a delivery's outcome to a plugin's run counters (documents set aside are not failures)."""
    stats.indexed += result.indexed
    stats.dead_lettered += result.dead_lettered - result.set_aside
    stats.set_aside += result.set_aside
    stats.retried += result.retried
    stats.moved_aside += result.moved_aside


class PipelinedSender:
    """Delivers bulk bodies in background threads, up to the sender's ``connections`` at once,
    while the plugin prepares the next ones.

    The plugin may report its messages done as soon as `submit` returns; the read loop holds such
    commits back until the deliveries they depend on have finished (`ticket` / `done`), so a
    crash still re-sends instead of losing. Bodies may finish in any order: `done` is the last
    ticket such that it and every ticket before it are settled, so a commit never passes a body
    still on its way. When the window is full, `submit` waits for a body to finish. A failed
    delivery is reported by the next `submit` or `wait`, and stays reported: its documents are not
    confirmed, so `done` never passes it, and nothing after it may be committed in this run.
    """

    def __init__(self, sender: BulkSender, stats: Any, *, abort: bool, is_running: Callable[[], Any]) -> None:
        self.sender = sender
        self.window = sender.connections  # bodies in flight at most: a connection each
        self._stats = stats
        self._abort = abort
        self._is_running = is_running  # called while waiting: reads the supervisor pipe, so a stop reaches us
        # Long-lived delivery threads, started as the window first fills: a thread per request
        # costs more than a small request's own Python time.
        self._threads: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._changed = threading.Condition()  # guards what follows, and the stats; notified as bodies finish
        self._in_flight = 0
        self._settled: set[int] = set()  # tickets settled past `done` (finished out of order)
        self.error: str | None = None
        self.interrupted = False  # the error is a stop request, not a failure
        self.ticket = 0  # the last body handed over
        self.done = 0  # the last body such that it and every body before it are delivered (indexed or dead-lettered)

    def _work(self) -> None:
        while True:
            body, count, ticket, kwargs, on_delivered = self._jobs.get()
            delivered = False
            try:
                delivered = self._deliver(body, count, kwargs, on_delivered)
            finally:
                with self._changed:
                    self._in_flight -= 1
                    if delivered:
                        self._settle(ticket)
                    self._changed.notify_all()

    def _settle(self, ticket: int) -> None:
        self._settled.add(ticket)
        while self.done + 1 in self._settled:
            self._settled.remove(self.done + 1)
            self.done += 1

    def _deliver(self, body: bytes, count: int, kwargs: dict[str, Any],
                 on_delivered: Callable[[], None] | None) -> bool:
        """Send one body; True once its documents are all settled (and `on_delivered` has run)."""
        try:
            result = self.sender.send(body, count, **kwargs)
        except SendInterrupted as e:
            self._failed("stopped before the batch was delivered; it stays queued for the next run", e.result,
                         interrupted=True)
            return False
        except Exception as e:  # reported to the plugin at its next send: never lost silently
            self._failed(f"bulk delivery failed: {type(e).__name__}: {e}", None)
            return False
        if self._abort and result.dead_lettered > result.set_aside:
            self._failed(f"abort_on_error: {result.dead_lettered - result.set_aside} documents were rejected "
                         f"(see {self.sender.dead_letter_path})", result)
            return False
        with self._changed:
            count_result(self._stats, result)
        if on_delivered is not None:
            try:
                on_delivered()
            except Exception as e:  # (the thread lives on for the next body)
                self._failed(f"after a delivery: {type(e).__name__}: {e}", None)
                return False
        return True

    def _failed(self, error: str, result: SendResult | None, *, interrupted: bool = False) -> None:
        with self._changed:
            if result is not None:
                count_result(self._stats, result)
            if self.error is None or (self.interrupted and not interrupted):  # a failure outranks a stop
                self.error = error
                self.interrupted = interrupted

    def _wait_below(self, limit: int) -> str | None:
        """Wait until fewer than `limit` bodies are in flight or one failed (watching for a stop
        meanwhile); the error, if any."""
        while True:
            with self._changed:
                if self.error is not None or self._in_flight < limit:
                    return self.error
                self._changed.wait(0.05)
            self._is_running()

    def wait(self) -> str | None:
        """Wait for every body in flight (watching for a stop meanwhile); the error, if any."""
        while True:
            with self._changed:
                if self._in_flight == 0:
                    return self.error
                self._changed.wait(0.05)
            self._is_running()

    def submit(self, body: bytes, count: int, *, on_delivered: Callable[[], None] | None = None,
               **kwargs: Any) -> str | None:
        """Hand over a body of `count` documents (once there is room in the window); the error of
        an earlier delivery, if any, instead. `on_delivered` runs in a delivery thread once every
        document of this body is settled, in whatever order the bodies finish; `kwargs` go to
        BulkSender.send."""
        err = self._wait_below(self.window)
        if err:
            return err
        with self._changed:
            self.ticket += 1
            self._in_flight += 1
            job = (body, count, self.ticket, kwargs, on_delivered)
        if len(self._threads) < min(self.window, self._in_flight):
            thread = threading.Thread(target=self._work, name=f"bulk-delivery-{len(self._threads) + 1}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._jobs.put(job)
        return None

    @property
    def busy(self) -> bool:
        return self.done != self.ticket


def background_delivery(host: OutputHost, sender: BulkSender, *, abort: bool = False) -> PipelinedSender:
    """A PipelinedSender for `sender`, tracked by the plugin's host: the read loop commits nothing
    past a body in flight."""
    sender.stop_event = host.stop_event()  # it now waits in the delivery thread too
    pipe = PipelinedSender(sender, host.stats, abort=abort, is_running=host.is_running)
    host.track(pipe)
    return pipe
