"""The bulk sender as Lua plugins see it: `require "hindsight.elasticsearch"` (see sandbox/lua.py).

A Lua output hands over whole bulk bodies; delivery, retries and dead letters are the sender's,
so the Lua plugin and the native Python output share one path to the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from hindsight_py.outputs import type_conflicts
from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted, ServerInfo, bulk_body_count


class ChannelStopEvent:
    """A threading.Event look-alike that checks the supervisor pipe while a sender waits to retry."""

    def __init__(self, is_running: Callable[[], bool]) -> None:
        self._is_running = is_running

    def is_set(self) -> bool:
        return not self._is_running()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self._is_running():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.05, left))


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


def make_lua_sender(cfg: dict[str, Any], host: Any) -> tuple[Callable[..., Any], Callable[[], bool]]:
    """The two functions behind the Lua `sender` object: send(body, n) and accepts_types()."""
    output_dir = host.runner.output_path
    # The Lua plugin forwards the keys it knows; these come from its cfg all the same.
    cfg = {**{k: host.plugin.values.get(k) for k in type_conflicts.CONFIG_KEYS}, **cfg}
    sender = sender_from_config(
        cfg,
        dead_letter_path=output_dir / "dead_letter" / f"{host.plugin.name}.jsonl",
        log=host.log_fn,
        # the sender runs in a thread of its own (PipelinedSender): it reads the stop flag, while
        # the pipe itself is only ever read by the main thread
        stop_event=ChannelStopEvent(lambda: not host.runner.channel.stop),
    )
    abort = bool(cfg.get("abort_on_error"))
    stats = host.stats
    pipe = PipelinedSender(sender, stats, abort, host)
    host.pipelined_senders.append(pipe)

    def send(body: bytes, count: float) -> tuple[Any, ...]:
        err = pipe.submit(body, int(count))
        if err:
            return (False, err.encode())
        return (True, 0, 0)  # the counts arrive with the delivery (stats), not now

    def accepts_types() -> bool:
        info = sender.detect()
        return bool(info and info.accepts_types)

    return send, accepts_types


class PipelinedSender:
    """Delivers one bulk body in a background thread while the plugin encodes the next one.

    The Lua plugin commits its checkpoint as soon as `send` returns; the runner holds such commits
    back until the delivery they depend on has finished (`ticket` / `done`), so a crash still
    re-sends instead of losing. At most one body is in flight: the next `submit` waits for it.
    """

    def __init__(self, sender: BulkSender, stats: Any, abort: bool, host: Any) -> None:
        self._sender = sender
        self._stats = stats
        self._abort = abort
        self._host = host
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.ticket = 0  # the last body handed over
        self.done = 0  # the last body delivered (indexed or dead-lettered)

    def _deliver(self, body: bytes, count: int, ticket: int) -> None:
        try:
            result = self._sender.send(body, count)
        except SendInterrupted as e:
            self._stats.indexed += e.result.indexed
            self._stats.dead_lettered += e.result.dead_lettered
            self._stats.retried += e.result.retried
            self._error = "stopped before the batch was delivered; it stays queued for the next run"
            return
        except Exception as e:  # reported to the plugin at its next send: never lost silently
            self._error = f"bulk delivery failed: {type(e).__name__}: {e}"
            return
        _count(self._stats, result)
        if self._abort and result.dead_lettered:
            self._error = f"abort_on_error: {result.dead_lettered} documents were dead-lettered"
            return
        self.done = ticket

    def wait(self) -> str | None:
        """Wait for the body in flight (watching for a stop meanwhile); its error, if any."""
        t = self._thread
        while t is not None and t.is_alive():
            t.join(0.05)
            self._host.is_running()  # reads the supervisor pipe, so a stop reaches the sender
        self._thread = None
        return self._error

    def submit(self, body: bytes, count: int) -> str | None:
        err = self.wait()
        if err:
            return err
        self.ticket += 1
        self._thread = threading.Thread(target=self._deliver, args=(body, count, self.ticket), daemon=True)
        self._thread.start()
        return None

    @property
    def busy(self) -> bool:
        return self.done != self.ticket


def server_accepts_types(cfg: dict[str, Any], log: Callable[[int, str], None]) -> bool | None:
    """Whether the server an output is configured for takes `_type`; None if it cannot be reached now."""
    probe = BulkSender(urls_from_config(cfg), dead_letter_path="/dev/null", timeout=5, max_retries=0, log=log,
                       username=cfg.get("username"), password=cfg.get("password"), api_key=cfg.get("api_key"),
                       ca_certs=cfg.get("ca_certs"), verify=cfg.get("verify_certs", True) is not False)
    try:
        info: ServerInfo | None = probe.detect()
    finally:
        probe.close()
    return None if info is None else info.accepts_types


def takeover_send(host: Any, address: str, port: int, body: bytes) -> tuple[bool, str | None]:
    """A bulk body an upstream Lua plugin posted through LuaSocket, delivered by the bulk sender."""
    senders = host.__dict__.setdefault("_takeover_senders", {})
    sender = senders.get((address, port))
    if sender is None:
        cfg = dict(host.plugin.values)
        cfg.update(address=address, port=port)
        for key in ("discard_on_error", "abort_on_error"):
            cfg.pop(key, None)  # upstream gives up on these; we retry until delivered or dead-lettered
        sender = senders[(address, port)] = sender_from_config(
            cfg,
            dead_letter_path=host.runner.output_path / "dead_letter" / f"{host.plugin.name}.jsonl",
            log=host.log_fn,
            stop_event=ChannelStopEvent(host.is_running),
        )
    count = bulk_body_count(body)
    try:
        result = sender.send(body, count)
    except SendInterrupted as e:
        host.stats.indexed += e.result.indexed
        host.stats.dead_lettered += e.result.dead_lettered
        host.stats.retried += e.result.retried
        return False, "stopped before the batch was delivered"
    _count(host.stats, result)
    return True, None


def _count(stats: Any, result: Any) -> None:
    stats.indexed += result.indexed
    stats.dead_lettered += result.dead_lettered - result.set_aside
    stats.set_aside += result.set_aside
    stats.retried += result.retried
