"""From a plugin's cfg to a bulk sender, and delivery in the background.

Both outputs (the Lua `require "hindsight.elasticsearch"` binding and plugins/elasticsearch_bulk.py)
build their sender here, and both hand their bulk bodies to a :class:`PipelinedSender`: the
request goes out in a thread while the plugin prepares the next one. A PipelinedSender is a
settle/commit ticket counter (outputs/extension.py): the read loop holds back every checkpoint that
depends on a body until that body is delivered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from hindsight_py.outputs import type_conflicts
from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted, SendResult
from hindsight_py.outputs.extension import OutputHost

__all__ = ["PipelinedSender", "background_delivery", "count_result", "sender_from_config", "urls_from_config"]


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
    """Delivers one bulk body in a background thread while the plugin prepares the next.

    The plugin may report its messages done as soon as `submit` returns; the read loop holds such
    commits back until the delivery they depend on has finished (`ticket` / `done`), so a crash
    still re-sends instead of losing. At most one body is in flight: the next `submit` waits for
    it. A failed delivery is reported by the next `submit` or `wait`, and stays reported: its
    documents are not confirmed, so nothing after them may be committed in this run.
    """

    def __init__(self, sender: BulkSender, stats: Any, *, abort: bool, is_running: Callable[[], Any]) -> None:
        self.sender = sender
        self._stats = stats
        self._abort = abort
        self._is_running = is_running  # called while waiting: reads the supervisor pipe, so a stop reaches us
        # One long-lived delivery thread (started with the first body): a thread per request
        # costs more than a small request's own Python time.
        self._thread: threading.Thread | None = None
        self._job: tuple[Any, ...] | None = None
        self._job_ready = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.error: str | None = None
        self.interrupted = False  # the error is a stop request, not a failure
        self.ticket = 0  # the last body handed over
        self.done = 0  # the last body delivered (indexed or dead-lettered)

    def _work(self) -> None:
        while True:
            self._job_ready.wait()
            self._job_ready.clear()
            job, self._job = self._job, None
            try:
                if job is not None:
                    self._deliver(*job)
            finally:
                self._idle.set()

    def _deliver(self, body: bytes, count: int, ticket: int, kwargs: dict[str, Any],
                 on_delivered: Callable[[], None] | None) -> None:
        try:
            result = self.sender.send(body, count, **kwargs)
        except SendInterrupted as e:
            count_result(self._stats, e.result)
            self.interrupted = True
            self.error = "stopped before the batch was delivered; it stays queued for the next run"
            return
        except Exception as e:  # reported to the plugin at its next send: never lost silently
            self.error = f"bulk delivery failed: {type(e).__name__}: {e}"
            return
        count_result(self._stats, result)
        if self._abort and result.dead_lettered > result.set_aside:
            self.error = (f"abort_on_error: {result.dead_lettered - result.set_aside} documents were rejected "
                          f"(see {self.sender.dead_letter_path})")
            return
        if on_delivered is not None:
            on_delivered()
        self.done = ticket

    def wait(self) -> str | None:
        """Wait for the body in flight (watching for a stop meanwhile); the error, if any."""
        while not self._idle.wait(0.05):
            self._is_running()
        return self.error

    def submit(self, body: bytes, count: int, *, on_delivered: Callable[[], None] | None = None,
               **kwargs: Any) -> str | None:
        """Hand over a body of `count` documents (after the previous one is delivered); the error
        of an earlier delivery, if any, instead. `on_delivered` runs in the delivery thread once
        every document is settled; `kwargs` go to BulkSender.send."""
        err = self.wait()
        if err:
            return err
        self.ticket += 1
        self._idle.clear()
        self._job = (body, count, self.ticket, kwargs, on_delivered)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="bulk-delivery", daemon=True)
            self._thread.start()
        self._job_ready.set()
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
