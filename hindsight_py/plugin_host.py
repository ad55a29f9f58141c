"""What one plugin's sandbox sees of its process: the SandboxHost of sandbox/lua.py and the
host of sandbox/python.py. Messages and checkpoints go to the process; dead letters and refused
messages to the plugin's dead-letter file; counters to its Stats."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hindsight_py import dead_letters
from hindsight_py.config import PluginConfig
from hindsight_py.matcher import compile_raw_matcher


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
    discarded_bytes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class PluginHost:
    """What one sandbox sees of its process (the SandboxHost protocol of sandbox/lua.py)."""

    def __init__(self, runner: Any, plugin: PluginConfig) -> None:
        self.runner = runner
        self.plugin = plugin
        self.log_fn = runner.logger.bind(plugin.name)
        self.checkpoint_value: Any = runner.spec.checkpoints.get(plugin.name)
        self.stats = Stats()
        self._es_types: bool | None = None
        self.deliveries: list[Any] = []  # outputs/delivery.PipelinedSender
        self.pending_refusal: dict[str, Any] | None = None  # an input's refused message (refused())

    # messages and checkpoints
    def write_messages(self, data: bytes, count: int) -> None:
        self.runner.writer.append(data)
        self.stats.injected += count

    def checkpoint(self, value: Any) -> None:
        self.checkpoint_value = value
        self.runner.channel.checkpoint(self.plugin.name, value)

    def is_running(self) -> bool:
        self.runner.channel.poll()
        return not self.runner.channel.stop

    def log(self, level: int, text: str) -> None:
        self.log_fn(level, text)

    def inject_input(self, framed: bytes) -> None:
        self.runner.input_writer().append(framed)

    def commit_processed(self) -> None:
        self.runner.commit_processed()

    def create_matcher(self, expr: str) -> Callable[[bytes], bool] | None:
        return compile_raw_matcher(expr)

    # dead letters: one file per plugin, one schema (hindsight_py/dead_letters.py)
    def _dead_letter_records(self, records: list[dict[str, Any]]) -> None:
        path = self.runner.output_path / "dead_letter" / f"{self.plugin.name}.jsonl"
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

    # Elasticsearch
    def new_es_sender(self, cfg: dict) -> tuple[Callable[..., Any], Callable[[], bool]]:
        from hindsight_py.outputs.lua_binding import make_lua_sender

        return make_lua_sender(cfg, self)

    def stop_event(self) -> Any:
        """A stop event a bulk sender may wait on from any thread: on the main thread it reads the
        supervisor pipe, elsewhere only the flag that reading sets (the pipe has one reader)."""
        from hindsight_py.outputs.delivery import ChannelStopEvent

        main = threading.main_thread()

        def running() -> bool:
            return self.is_running() if threading.current_thread() is main else not self.runner.channel.stop

        return ChannelStopEvent(running)

    def background_delivery(self, sender: Any, *, abort: bool = False) -> Any:
        """A PipelinedSender for `sender`: the read loop commits nothing past a body in flight."""
        from hindsight_py.outputs.delivery import PipelinedSender

        sender.stop_event = self.stop_event()  # it now waits in the delivery thread too
        pipe = PipelinedSender(sender, self.stats, abort=abort, is_running=self.is_running)
        self.deliveries.append(pipe)
        return pipe

    def bulk_takeover(self, host: str, port: int, body: bytes) -> tuple[bool, str | None]:
        from hindsight_py.outputs.lua_binding import takeover_send

        return takeover_send(self, host, port, body)

    def drop_es_types(self) -> bool:
        if self._es_types is None:
            from hindsight_py.outputs.lua_binding import server_accepts_types

            accepts = server_accepts_types(self.plugin.values, self.log_fn)
            if accepts is None:
                # unknown (no answer from the server): leave `_type` out, as modern servers want.
                # _es_types stays unset, but env.lua's hook keeps this first answer for the run.
                return True
            self._es_types = accepts
            if not accepts:
                self.log_fn(6, "the server does not accept mapping types: `_type` is left out of action lines")
        return not self._es_types


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
        "discarded_bytes": s.discarded_bytes,
    }
    d.update(s.extra)
    return d


__all__ = ["PluginHost", "Stats", "stats_dict"]
