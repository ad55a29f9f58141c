"""What a Python plugin injects: messages, payloads, lines and records, framed and queued, then
handed to the host in batches with the checkpoint that follows them; a message the sandbox
refuses goes to the host (refused_messages, docs/delivery.md) before the plugin hears of it.

The injecting half of PythonSandbox (sandbox/python.py), which drives the plugin's callbacks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from hindsight_py import framing, message_dict
from hindsight_py import message as hmsg
from hindsight_py.json_records import frame_json_records

__all__ = ["FLUSH_BYTES", "FLUSH_COUNT", "HostFailure", "Injection", "ShuttingDown"]

FLUSH_COUNT = 1000
FLUSH_BYTES = 1 << 20


class Injection:
    """The injection state of one plugin: framed messages not yet handed to the host, the
    checkpoint that follows them, analysis plugins' payload buffer and injection budget."""

    def __init__(self, plugin: Any, hs: Any, host: Any, pid: int) -> None:
        self.plugin = plugin
        self.plugin_type = plugin.type
        self._host = host
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_count = 0  # messages in _out (one entry may hold many)
        self._out_time = time.monotonic()
        self._cp: Any = None
        self._has_cp = False
        self._running = True
        self._restricted = plugin.restricted_headers
        self._logger = plugin.name
        self._hostname = hs.hostname
        self._pid = pid
        self._max_message_size = hs.max_message_size
        self._output_limit = plugin.output_limit
        self._payload: list[str] = []
        self._payload_len = 0
        self._inject_budget = -1
        self._budget = ("process_message_inject_limit", -1)  # the limit _inject_budget started from
        # refused messages (docs/delivery.md): the host keeps them unless refused_messages = "drop"
        self._host_refused = getattr(host, "refused", None)
        self._take_refused = self._host_refused is not None and plugin.refused_messages != "drop"
        self._refusal_pending = False
        self._last_cp: Any = None  # an input's checkpoint: the one it was started with, then its latest
        self._fatal: str | None = None  # the host could not keep a refused message: the call fails

    def inject(self, msg: Any, checkpoint: Any) -> None:
        if checkpoint is not None:
            if self.plugin_type != "input":
                self._refuse(msg, "inject_message() checkpoints are for input plugins")
                raise ValueError("inject_message() checkpoints are for input plugins")
            if not isinstance(checkpoint, (int, float, str)) or isinstance(checkpoint, bool):
                err = f"inject_message() unsupported checkpoint type: {type(checkpoint).__name__}"
                self._refuse(msg, err)
                raise TypeError(err)
            if isinstance(checkpoint, str) and len(checkpoint.encode()) >= 8192:
                self._refuse(msg, "inject_message() failed: checkpoint update (8192 bytes or more)")
                raise ValueError("inject_message() failed: checkpoint update")
        if self._refusal_pending:
            self._settle(checkpoint)  # the plugin moved on: this checkpoint is the one that skips it
        if msg is None:
            if checkpoint is None or self.plugin_type != "input":
                raise ValueError("inject_message() message cannot be nil without a checkpoint update")
        else:
            if self.plugin_type == "analysis":
                if self._inject_budget == 0:
                    self._refuse(msg, "inject_message() failed: injection limit exceeded ({} = {})".format(*self._budget))
                    raise RuntimeError("inject_message() failed: injection limit exceeded")
                if self._inject_budget > 0:
                    self._inject_budget -= 1
            try:
                raw = self._encode(msg)
            except Exception as e:
                self._refuse(msg, str(e) if str(e).startswith("inject_message()") else f"inject_message() failed: {e}")
                raise
            if len(raw) > self._max_message_size:
                self._refuse(raw, f"inject_message() failed: exceeded max_message_size (the message is {len(raw)} "
                                  f"bytes, max_message_size = {self._max_message_size})")
                raise ValueError("inject_message() failed: exceeded max_message_size")
            framed = framing.frame(raw)
            if self.plugin_type == "output":
                self._host.inject_input(framed)
            else:
                self._out.append(framed)
                self._out_bytes += len(framed)
                self._out_count += 1
        if checkpoint is not None:
            self._cp = checkpoint
            self._has_cp = True
            self._last_cp = checkpoint
        if self._out_count >= FLUSH_COUNT or self._out_bytes >= FLUSH_BYTES:
            self._flush()
        elif self._has_cp and time.monotonic() - self._out_time >= 1.0:
            self._flush()
        if msg is None:  # a shutdown sync point, as upstream's inject_message(nil, cp)
            if not self._out:
                self._running = self._host.is_running()
            if not self._running:
                raise ShuttingDown()

    def inject_payloads(self, payloads: list[bytes], checkpoint: Any, type_: str | None) -> None:
        if self.plugin_type != "input":
            raise RuntimeError("inject_payloads() is for input plugins")
        if payloads:
            limit = self._max_message_size - 200  # room for the headers
            if max(map(len, payloads)) > limit:
                big = [i for i, p in enumerate(payloads) if len(p) > limit]
                for i in big:  # the host keeps them (refused_messages = "drop": counts them)
                    self._refuse(self._payload_message(payloads[i], type_), f"inject_payloads() failed: payload {i} "
                                 f"({len(payloads[i])} bytes) exceeds max_message_size ({self._max_message_size})")
                if self._take_refused:  # and queues the others, so that none is lost if the plugin carries on
                    self.inject_payloads([p for p in payloads if len(p) <= limit], checkpoint, type_)
                raise ValueError(f"inject_payloads() failed: payload {big[0]} exceeds max_message_size")
            framed = framing.encode_payloads(payloads, logger=self._logger, hostname=self._hostname, pid=self._pid,
                                          now_ns=time.time_ns(), type=type_)
            self._queue(framed, len(payloads))
        self._end_injection(checkpoint)

    def inject_records(self, payloads: list[bytes], stamps: list[int], fields: dict[str, list[str | None]],
                       checkpoint: Any, type_: str | None) -> None:
        if self.plugin_type != "input":
            raise RuntimeError("inject_records() is for input plugins")
        if payloads:
            if self._restricted:
                stamps = [time.time_ns()] * len(payloads)
            framed = framing.encode_records(payloads, stamps, fields, logger=self._logger, hostname=self._hostname,
                                         pid=self._pid, type=type_)
            self._queue(framed, len(payloads))
        self._end_injection(checkpoint)

    def inject_json_records(self, data: bytes, pos: int, max_records: int, fields: tuple[str, ...],
                            stamp_key: str | None, type_: str | None) -> tuple[int, int, int, int] | None:
        if self.plugin_type != "input":
            raise RuntimeError("inject_json_records() is for input plugins")
        if self._restricted:
            return None  # the Timestamps would be the clock's: the caller builds the messages
        head, tail = framing.payload_message_parts(self._logger, self._hostname, self._pid, 0, type_)
        names = [name.encode() for name in fields]
        if any(json.dumps(name)[1:-1] != name for name in fields):
            raise ValueError("inject_json_records(): field names must be plain ASCII")
        key = b"" if stamp_key is None else json.dumps(stamp_key, ensure_ascii=False).encode(
            "utf-8", "surrogateescape")[1:-1]
        framed, count, pos, status, odd_end = frame_json_records(
            data, pos, max_records, hmsg.random_uuids(max_records), head[2:], tail, names, key,
            self._max_message_size)
        if count:
            self._queue(framed, count)
            self._maybe_flush()
        return count, pos, status, odd_end

    def inject_lines(self, data: bytes, checkpoint: Any, end: int | None, type_: str | None,
                     too_long: Any) -> int:
        if self.plugin_type != "input":
            raise RuntimeError("inject_lines() is for input plugins")
        end = len(data) if end is None else min(end, len(data))
        limit = self._max_message_size - 200  # room for the headers
        now_ns = time.time_ns()
        parts: list[bytes] = []
        count = pos = 0
        refused: ValueError | None = None  # the first too long line, without a too_long callback
        while pos < end:
            framed, n, stop = framing.encode_lines(data, pos, end, limit, logger=self._logger, hostname=self._hostname,
                                                pid=self._pid, now_ns=now_ns, type=type_)
            if n:
                parts.append(framed)
                count += n
            if stop >= end:
                break
            nl = data.find(b"\n", stop, end)
            line_end = end if nl < 0 else nl
            if too_long is not None:
                too_long(data[stop:line_end], stop)
            else:
                err = f"the line at byte {stop} ({line_end - stop} bytes) exceeds max_message_size"
                # the host keeps it; refused_messages = "drop": nothing is queued
                self._refuse(self._payload_message(data[stop:line_end], type_),
                             f"inject_lines() failed: {err} ({self._max_message_size})")
                refused = refused or ValueError(f"inject_lines() failed: {err}")
                if not self._take_refused:
                    raise refused
            pos = line_end + 1
        for framed in parts:
            self._out.append(framed)
            self._out_bytes += len(framed)
        self._out_count += count
        self._end_injection(checkpoint)
        if refused is not None:  # raised once the other lines are queued
            raise refused
        return count

    @staticmethod
    def _payload_message(payload: bytes, type_: str | None) -> dict[str, Any]:
        return {"Payload": payload} if type_ is None else {"Type": type_, "Payload": payload}

    def _queue(self, framed: bytes, count: int) -> None:
        """Queue ``count`` framed messages (an input's, flushed with the next checkpoint or when due)."""
        self._out.append(framed)
        self._out_bytes += len(framed)
        self._out_count += count

    def _end_injection(self, checkpoint: Any) -> None:
        """After a batch of messages: record the checkpoint (flushing when due, honouring a stop
        request), or only flush when due."""
        if checkpoint is not None:
            self.inject(None, checkpoint)
        else:
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._out_count >= FLUSH_COUNT or self._out_bytes >= FLUSH_BYTES:
            self._flush()

    def _encode(self, msg: Any) -> bytes:
        if isinstance(msg, bytes):
            if not hmsg.is_valid(msg):
                raise ValueError("inject_message() attempted to inject a invalid protobuf string")
            return msg
        if isinstance(msg, hmsg.Message):
            if self._restricted:
                msg = message_dict.from_dict(msg.to_dict(), restricted=True, logger=self._logger, hostname=self._hostname,
                                     pid=self._pid, now_ns=time.time_ns())
            return hmsg.encode(msg)
        if isinstance(msg, dict):
            m = message_dict.from_dict(msg, restricted=self._restricted, logger=self._logger, hostname=self._hostname,
                               pid=self._pid, now_ns=time.time_ns())
            return hmsg.encode(m)
        raise TypeError("inject_message() unsupported message type")

    def _refuse(self, msg: Any, reason: str) -> None:
        """Hand a refused message to the host before the error is raised (it dead-letters it)."""
        if self._host_refused is None or msg is None:
            return
        if isinstance(msg, hmsg.Message):
            msg = msg.to_dict()
        try:
            pending = self._host_refused(reason, msg, self._last_cp)
        except Exception as e:  # not something the plugin may catch and carry on from
            self._host_failure(e)
        if pending:
            self._refusal_pending = True

    def _settle(self, next_cp: Any) -> None:
        self._refusal_pending = False
        try:
            self._host.settle_refused(next_cp)
        except Exception as e:
            self._host_failure(e)

    def _host_failure(self, e: Exception) -> None:
        self._fatal = f"failed to write a refused message to the dead-letter file: {e}"
        raise HostFailure(self._fatal) from None

    def _flush(self) -> None:
        if self._refusal_pending:
            self._settle(None)
        if self._out:
            data = b"".join(self._out)
            count = self._out_count
            self._out = []
            self._out_bytes = 0
            self._out_count = 0
            self._host.write_messages(data, count)
        if self._has_cp:
            self._has_cp = False
            self._host.checkpoint(self._cp)
        self._out_time = time.monotonic()
        if self.plugin_type == "input":
            self._running = self._host.is_running()

    def is_running(self) -> bool:
        if not self._out:
            self._running = self._host.is_running()
        return self._running

    def add_to_payload(self, parts: Sequence[Any], overflow: Any = None) -> None:
        """overflow(i): inject_payload's, called before the output_limit error (parts[i] did not fit)."""
        if self.plugin_type != "analysis":
            raise RuntimeError("add_to_payload() is only available to analysis plugins")
        if not parts:
            raise ValueError("add_to_payload() must have at least one argument")
        for i, v in enumerate(parts):
            s = _payload_text(v)
            if s is None:
                raise TypeError("add_to_payload() unsupported type")
            self._payload_len += len(s)
            if self._output_limit and self._payload_len > self._output_limit:
                if overflow is not None:
                    overflow(i)
                raise ValueError("output_limit exceeded")
            self._payload.append(s)

    def inject_payload(self, payload_type: str, payload_name: str | None, parts: Sequence[Any]) -> None:
        fields: dict[str, Any] = {"payload_type": payload_type or "txt"}
        if payload_name:
            fields["payload_name"] = payload_name

        def overflow(i: int) -> None:
            # the payload the host was handed goes to the dead-letter file whole: the buffer and every part
            rest = (repr(v) if t is None else t for v in parts[i:] for t in (_payload_text(v),))
            whole = "".join(self._payload) + "".join(rest)
            self._refuse({"Type": "inject_payload", "Payload": whole, "Fields": fields},
                         f"inject_payload() output_limit exceeded (output_limit = {self._output_limit})")
            if self._take_refused:  # the host has it: it is not sent later
                self._payload, self._payload_len = [], 0

        if parts:
            self.add_to_payload(parts, overflow)
        if not self._payload_len:
            return
        payload = "".join(self._payload)
        self._payload, self._payload_len = [], 0
        self.inject({"Type": "inject_payload", "Payload": payload, "Fields": fields}, None)


class HostFailure(BaseException):
    """The host could not keep a refused message: the call fails, even where the plugin catches errors."""


def _payload_text(v: Any) -> str | None:
    """A part of add_to_payload as text (None: a type it refuses)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return _format_number(float(v))
    if v is None:
        return "nil"
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return None


class ShuttingDown(Exception):
    """inject_message(None, cp) after a stop request: ends an input's run cleanly, as upstream."""


def _format_number(x: float) -> str:
    # add_to_payload's number format (lua_sandbox): integers plain, fractions to 8 places
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and -2147483648 <= x <= 2147483647:
        return str(int(x))
    if abs(x) > 2147483647:
        return f"{x:.17g}"
    return f"{x:.8f}".rstrip("0").rstrip(".")
