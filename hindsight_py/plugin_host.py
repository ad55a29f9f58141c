"""What one plugin's sandbox sees of its process: the SandboxHost of sandbox/lua.py and the
host of sandbox/python.py. Messages and checkpoints go to the process; dead letters and refused
messages to the plugin's dead-letter file; counters to its Stats. Outputs reach it only through
their extensions (outputs/extension.py: the OutputHost they see, registered in outputs/registry.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hindsight_py import dead_letters
from hindsight_py.config import PluginConfig
from hindsight_py.matcher import compile_raw_matcher
from hindsight_py.outputs.extension import LuaExtension
from hindsight_py.outputs.registry import output_extensions
from hindsight_py.plugin_stats import PluginTimings


@dataclass
class Stats:
    injected: int = 0
    processed: int = 0
    failures: int = 0
    indexed: int = 0
    dead_lettered: int = 0
    set_aside: int = 0  # not documents at all (text payloads): in the dead-letter file, not a failure
    dropped: int = 0  # refused messages dropped on purpose (refused_messages = "drop")
    retried: int = 0
    moved_aside: int = 0  # documents delivered with mistyped fields moved aside (type_conflicts)
    discarded_bytes: int = 0
    inject_bytes: int = 0
    timings: PluginTimings = field(default_factory=PluginTimings)  # plugins.tsv's columns
    extra: dict[str, int] = field(default_factory=dict)


class PluginHost:
    """What one sandbox sees of its process (the SandboxHost protocol of sandbox/lua.py)."""

    def __init__(self, process: Any, plugin: PluginConfig) -> None:
        self.process = process  # plugin_process.PluginProcess
        self.plugin = plugin
        self.output_path: Path = process.output_path
        self.log_fn = process.logger.bind(plugin.name)
        self.checkpoint_value: Any = process.spec.checkpoints.get(plugin.name)
        self.stats = Stats()
        self.deliveries: list[Any] = []  # read_loop.Delivery: what the read loop waits for (track)
        self.pending_refusal: dict[str, Any] | None = None  # an input's refused message (refused())
        self.extensions = output_extensions(self)
        self.memory_used: Callable[[], int] = lambda: 0  # the sandbox's, once it is made

    # messages and checkpoints
    def write_messages(self, data: bytes, count: int) -> None:
        self.process.writer.append(data)
        self.stats.injected += count
        self.stats.inject_bytes += len(data)

    def checkpoint(self, value: Any) -> None:
        self.checkpoint_value = value
        self.process.channel.checkpoint(self.plugin.name, value)

    def is_running(self) -> bool:
        self.process.channel.poll()
        return not self.process.channel.stop

    def log(self, level: int, text: str) -> None:
        self.log_fn(level, text)

    def inject_input(self, framed: bytes) -> None:
        self.process.input_writer().append(framed)

    def commit_processed(self) -> None:
        self.process.commit_processed()

    def create_matcher(self, expr: str) -> Callable[[bytes], bool] | None:
        return compile_raw_matcher(expr)

    # dead letters: one file per plugin, one schema (hindsight_py/dead_letters.py)
    def _dead_letter_records(self, records: list[dict[str, Any]]) -> None:
        path = self.output_path / "dead_letter" / f"{self.plugin.name}.jsonl"
        dead_letters.dead_letter_file(path).append(records)  # fsync()ed before any checkpoint moves on
        self.stats.dead_lettered += len(records)

    def dead_letter(self, reason: str, data: bytes) -> None:
        """The plugin's own dead_letter(reason, data)."""
        pending = self.pending_refusal
        if pending is not None and dead_letters.data_bytes(pending) == data:
            # the plugin sets aside what the host has just refused (hindsight-py's file.lua does):
            # one record, with the plugin's reason, which says more
            if pending["reason"] not in reason:
                reason = f"{reason} ({pending['reason']})"
            pending["reason"] = reason
            return
        self._dead_letter_records([dead_letters.record("data", reason, data)])

    def refused(self, reason: str, message: Any, offset: Any = None) -> bool:
        """A message the host refused (inject_message/inject_payload: a limit, an invalid message) or
        an output failed (-1): a dict in lua_sandbox's table shape or protobuf bytes. It goes to the
        dead-letter file whatever the plugin does with the error (refused_messages = "drop": it is
        only counted). An input's is held until it moves on (settle_refused), so that the record
        carries the checkpoint that skips it; returns True when it is held."""
        if self.plugin.refused_messages == "drop":
            self.stats.dropped += 1
            return False
        self.settle_refused(None)  # a plugin that ignores one refusal and makes another
        rec = dead_letters.message_record(reason, message, offset=offset)
        if self.plugin.type == "input":
            self.pending_refusal = rec
            return True
        self._dead_letter_records([rec])
        return False

    def settle_refused(self, next_offset: Any) -> None:
        """The input moved on (its next inject, a flush, the end of its call): write what it refused."""
        rec, self.pending_refusal = self.pending_refusal, None
        if rec is not None:
            rec["next_offset"] = dead_letters.jsonable(next_offset)
            self._dead_letter_records([rec])

    # outputs: their extensions (outputs/extension.py) and the deliveries the read loop waits for
    def stop_event(self) -> StopEvent:
        """A stop event a delivery may wait on from any thread: on the main thread it reads the
        supervisor pipe, elsewhere only the flag that reading sets (the pipe has one reader)."""
        main = threading.main_thread()
        channel = self.process.channel

        def running() -> bool:
            return self.is_running() if threading.current_thread() is main else not channel.stop

        return StopEvent(running)

    def track(self, delivery: Any) -> None:
        """A settle/commit ticket counter (read_loop.Delivery): no position made while one of its
        tickets is open is committed before that ticket is settled."""
        self.deliveries.append(delivery)

    def background_delivery(self, sender: Any, *, abort: bool = False) -> Any:
        """Python plugins' deliver_in_background: the bulk sender in a background thread, tracked."""
        from hindsight_py.outputs.delivery import background_delivery  # (urllib3: only where it is used)

        return background_delivery(self, sender, abort=abort)

    def lua_extensions(self) -> list[LuaExtension]:
        return [x for x in (ext.lua_extension() for ext in self.extensions) if x is not None]

    def before_reading(self) -> None:
        for ext in self.extensions:
            ext.before_reading()


class StopEvent:
    """A threading.Event look-alike that checks the supervisor pipe while a delivery waits to retry."""

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


def stats_dict(host: PluginHost | None) -> dict[str, int]:
    if host is None:
        return {}
    s = host.stats
    d = {
        "injected": s.injected,
        "processed": s.processed,
        "failures": s.failures,
        "indexed": s.indexed,
        "dead_lettered": s.dead_lettered,
        "set_aside": s.set_aside,
        "dropped": s.dropped,
        "retried": s.retried,
        "moved_aside": s.moved_aside,
        "discarded_bytes": s.discarded_bytes,
        "inject_bytes": s.inject_bytes,
        **s.timings.as_dict(host.memory_used()),
    }
    d.update(s.extra)
    return d


__all__ = ["PluginHost", "Stats", "StopEvent", "stats_dict"]
