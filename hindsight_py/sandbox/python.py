"""Python plugins: a `.py` file with the same callbacks and return codes as a Lua plugin.

The plugin calls the API in hindsight_py.plugin; this module is what those calls reach. Lua's
memory and instruction limits have no Python equivalent and are not enforced here; an exception
terminates the plugin exactly as a Lua error does.

preserve_data: a plugin that defines `save_state()` has its return value (anything JSON can hold)
written to `<output_path>/<name>.data` at a clean stop, and handed to its `restore_state(value)`
after the module is loaded on the next start.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hindsight_py import framing, message_dict, peek
from hindsight_py import message as hmsg
from hindsight_py import plugin as api
from hindsight_py.json_records import frame_json_records
from hindsight_py.matcher import MatcherError, compile_matcher
from hindsight_py.sandbox.base import BatchResult, PluginError

FLUSH_COUNT = 1000
FLUSH_BYTES = 1 << 20


class _Matcher:
    def __init__(self, sandbox: PythonSandbox, expression: str) -> None:
        self._sandbox = sandbox
        self._m = compile_matcher(expression)

    def __call__(self, msg: hmsg.Message) -> bool:
        return self._m(msg)

    def eval(self) -> bool:
        msg = self._sandbox.current_message()
        if msg is None:
            raise RuntimeError("no active message")
        return self._m(msg)


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


class PythonSandbox:
    def __init__(self, plugin: Any, hs: Any, host: Any, *, log_level: int, pid: int) -> None:
        self.plugin = plugin
        self._hs = hs
        self.name = plugin.name
        self.plugin_type = plugin.type
        self._host = host
        self._log_level = log_level
        self.config = plugin.runtime_values()
        self._module: Any = None
        self._batch_fn: Any = None
        self._ticker = 0
        self._timer_limit = -1
        self._next_due: int | None = None
        self._data_now = 0
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
        self._current: bytes | None = None
        self._current_msg: hmsg.Message | None = None
        self._inject_budget = -1
        self._budget = ("process_message_inject_limit", -1)  # the limit _inject_budget started from
        self._seq = 0
        self._cur_index = 0
        self._commit_index = 0
        self._batching = False
        self._acks: list[int] = []
        self._failures = 0
        # refused messages (docs/delivery.md): the host keeps them unless refused_messages = "drop"
        self._host_refused = getattr(host, "refused", None)
        self._take_refused = self._host_refused is not None and plugin.refused_messages != "drop"
        self._refusal_pending = False
        self._last_cp: Any = None  # an input's checkpoint: the one it was started with, then its latest
        self._dead_lettered = False  # the plugin called dead_letter() in the current call (outputs' -1)
        self._fatal: str | None = None  # the host could not keep a refused message: the call fails

    # -- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        path = self.plugin.source_path
        spec = importlib.util.spec_from_file_location(f"hindsight_plugin_{self.name.replace('.', '_')}", path)
        if spec is None or spec.loader is None:
            raise PluginError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            self._call(spec.loader.exec_module, module)
        except Exception as e:
            raise PluginError(f"{path}: {type(e).__name__}: {e}") from None
        batch_fn = getattr(module, "process_messages", None)
        if not callable(getattr(module, "process_message", None)) and not callable(batch_fn):
            raise PluginError("process_message() function was not found")
        self._module = module
        self._batch_fn = batch_fn if callable(batch_fn) and self.plugin_type != "input" else None
        state = self._state_path()
        restore = getattr(module, "restore_state", None)
        if state is not None and state.exists() and callable(restore):
            try:
                self._call(restore, json.loads(state.read_text()))
            except Exception as e:  # upstream: the state is removed and the plugin starts without it
                self.log(3, f"restore_global_data {type(e).__name__}: {e}; {state.name} removed")
                state.unlink(missing_ok=True)

    def _call(self, fn: Any, *args: Any) -> Any:
        token = api.enter(self)
        try:
            return fn(*args)
        finally:
            api.leave(token)

    def run_input(self, checkpoint: Any) -> tuple[int, str | None]:
        self._last_cp = checkpoint
        try:
            result = self._call(self._module.process_message, checkpoint)
        except _ShuttingDown:
            result = 0
        except (Exception, _HostFailure) as e:
            self._flush()
            raise PluginError(f"process_message() {type(e).__name__}: {e}") from None
        self._flush()
        if self._fatal:  # the plugin caught it
            raise PluginError(f"process_message() {self._fatal}")
        rc, msg = _split_result(result)
        return rc, msg

    def run_batch(self, raws: Sequence[bytes], inject_limit: int = -1) -> BatchResult:
        if self._batch_fn is not None:
            return self._run_whole_batch(raws, inject_limit)
        pm = self._module.process_message
        is_output = self.plugin_type == "output"
        budget = ("process_message_inject_limit", inject_limit)
        self._commit_index = 0
        fails_before = self._failures
        token = api.enter(self)
        try:
            for i, raw in enumerate(raws, 1):
                self._current = raw
                self._current_msg = None
                self._cur_index = i
                self._inject_budget = inject_limit
                self._budget = budget
                self._seq += 1
                self._dead_lettered = False
                try:
                    # analysis plugins take no argument; outputs get the sequence id (as upstream)
                    rc, msg = _split_result(pm(self._seq) if is_output else pm())
                    if self._fatal:  # the plugin caught it
                        raise _HostFailure(self._fatal)
                except (Exception, _HostFailure) as e:
                    self._flush()
                    err = str(e) if isinstance(e, PluginError) else f"process_message() {type(e).__name__}: {e}"
                    return BatchResult(i - 1, "terminate", err, self._commit_index, self._failures - fails_before,
                                       self._batching)
                if rc == 0:
                    self._batching = False
                    self._commit_index = i
                elif rc in (-1, -2):
                    if rc == -1:
                        self._failures += 1
                        if msg:
                            self.log(4, f"received: {rc} msg: {msg}")
                        if is_output and not self._dead_lettered:  # not delivered: the host keeps it
                            self._refuse(raw, _failed_reason("process_message", msg))
                    if not self._batching and not self.plugin.async_buffer_size:
                        self._commit_index = i
                elif rc == -3:
                    self._flush()
                    return BatchResult(i - 1, "retry", msg, self._commit_index, self._failures - fails_before,
                                       self._batching)
                elif rc == -4:
                    self._batching = True
                elif rc == -5:
                    if not self.plugin.async_buffer_size:
                        return BatchResult(i - 1, "terminate",
                                           "cannot use async checkpointing without a configured buffer",
                                           self._commit_index, self._failures - fails_before, self._batching)
                elif rc > 0:
                    self._flush()
                    return BatchResult(i - 1, "terminate", "process_message() received a termination status code",
                                       self._commit_index, self._failures - fails_before, self._batching)
                if self._ticker:
                    err = self._data_timer(raw, i)
                    if err:
                        return BatchResult(i, "terminate", err, self._commit_index, self._failures - fails_before,
                                           self._batching)
        finally:
            api.leave(token)
            self._current = None
            self._current_msg = None
            self._cur_index = 0
        self._flush()
        return BatchResult(len(raws), "ok", None, self._commit_index, self._failures - fails_before, self._batching)

    def _run_whole_batch(self, raws: Sequence[bytes], inject_limit: int) -> BatchResult:
        """`process_messages(raws)`: a plugin that takes the whole batch in one call (the fast path).

        Its return code applies to the batch as process_message's applies to one message: 0 commits
        the batch, -4 holds it (commit later with update_checkpoint()), -3 offers it again, -1/-2
        skip it, > 0 terminates."""
        self._inject_budget = inject_limit
        self._budget = ("process_message_inject_limit", inject_limit)
        self._seq += len(raws)
        self._dead_lettered = False
        try:
            rc, msg = _split_result(self._call(self._batch_fn, raws))
            if self._fatal:  # the plugin caught it
                raise _HostFailure(self._fatal)
        except (Exception, _HostFailure) as e:
            self._flush()
            err = str(e) if isinstance(e, PluginError) else f"process_messages() {type(e).__name__}: {e}"
            return BatchResult(0, "terminate", err, 0, 0, self._batching)
        self._flush()
        n = len(raws)
        if self._ticker and rc <= 0 and raws:
            err = self._data_timer(raws[-1], n)
            if err:
                return BatchResult(n, "terminate", err, 0, 0, self._batching)
        if rc == 0:
            self._batching = False
            return BatchResult(n, "ok", None, n, 0, False)
        if rc == -4:
            self._batching = True
            return BatchResult(n, "ok", None, 0, 0, True)
        if rc == -3:
            return BatchResult(0, "retry", msg, 0, 0, self._batching)
        if rc in (-1, -2):
            if msg:
                self.log(4, f"received: {rc} msg: {msg}")
            failed = n if rc == -1 else 0
            if failed and self.plugin_type == "output" and not self._dead_lettered:
                for raw in raws:  # a batch the output failed is not delivered: the host keeps it
                    self._refuse(raw, _failed_reason("process_messages", msg))
            return BatchResult(n, "ok", None, 0 if self._batching else n, failed, self._batching)
        if rc > 0:
            return BatchResult(0, "terminate", "process_messages() received a termination status code", 0, 0,
                               self._batching)
        return BatchResult(n, "ok", None, 0 if self._batching else n, 0, self._batching)

    def run_timer(self, ns: int, shutdown: bool, inject_limit: int = -1) -> None:
        te = getattr(self._module, "timer_event", None)
        if te is None:
            raise PluginError("timer_event() function was not found")
        self._inject_budget = inject_limit
        self._budget = ("timer_event_inject_limit", inject_limit)
        try:
            self._call(te, ns, shutdown)
            if self._fatal:  # the plugin caught it
                raise _HostFailure(self._fatal)
        except (Exception, _HostFailure) as e:
            raise PluginError(f"timer_event() {type(e).__name__}: {e}") from None
        finally:
            self._flush()

    def set_ticker(self, seconds: int, inject_limit: int = -1) -> None:
        """Fire timer_event on data time inside batches (hindsight_cli's semantics)."""
        self._ticker = seconds
        self._timer_limit = inject_limit

    def data_now(self) -> int:
        return self._data_now

    def _data_timer(self, raw: bytes, index: int) -> str | None:
        """After a message: the timer, if due on data time. An error text terminates the plugin."""
        try:
            secs = peek.timestamp_of(raw) // 1_000_000_000
        except hmsg.DecodeError:
            secs = self._data_now
        if secs > self._data_now:
            self._data_now = secs
        if self._next_due is None or self._data_now >= self._next_due:
            self._next_due = self._data_now + self._ticker
            saved = self._cur_index
            self._cur_index = index
            try:
                self.run_timer(self._data_now * 1_000_000_000, False, self._timer_limit)
            except PluginError as e:
                return str(e)
            finally:
                self._cur_index = saved
        return None

    def take_acks(self) -> list[int]:
        acks, self._acks = self._acks, []
        return acks

    def seq_counter(self) -> int:
        return self._seq

    def _state_path(self) -> Any:
        if not getattr(self.plugin, "preserve_data", False):
            return None
        return self._hs.output_dir / f"{self.name}.data"

    def save_state(self) -> None:
        """preserve_data: the plugin's save_state() value, as JSON (removed when it cannot be written)."""
        state = self._state_path()
        save = getattr(self._module, "save_state", None)
        if state is None or not callable(save):
            return
        try:
            text = json.dumps(self._call(save))
        except Exception as e:
            state.unlink(missing_ok=True)
            raise PluginError(f"save_state() {type(e).__name__}: {e}") from None
        tmp = state.with_suffix(".data.tmp")
        tmp.write_text(text)
        os.replace(tmp, state)

    # -- the API (hindsight_py.plugin) --------------------------------------------------------
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
                raise _ShuttingDown()

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
        head, tail = framing._payload_message_parts(self._logger, self._hostname, self._pid, 0, type_)
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
        raise _HostFailure(self._fatal) from None

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

    def read_message(self, name: str, fi: int = 0, ai: int = 0) -> Any:
        raw = self._current
        if raw is None:
            return None
        if name == "Payload":
            p = peek.payload_of(raw)
            return None if p is None else p.decode("utf-8", "surrogateescape")
        if name == "raw":
            return raw
        if name == "framed":
            return framing.frame(raw)
        if name == "size":
            return len(raw)
        msg = self.current_message()
        assert msg is not None
        if name.startswith("Fields[") and name.endswith("]"):
            if fi < 0 or ai < 0:
                raise ValueError("read_message() field index and array index must be >= 0")
            return msg.field_value(name[7:-1], fi, ai)
        attr = _HEADERS.get(name)
        if attr is None:
            raise ValueError(f"heka_read_message() field: '{name}' not supported/recognized")
        if attr == "severity":
            return msg.effective_severity
        return getattr(msg, attr)

    def current_message(self) -> hmsg.Message | None:
        if self._current is None:
            return None
        if self._current_msg is None:
            self._current_msg = hmsg.decode(self._current)
        return self._current_msg

    def encode(self, msg: Any, framed: bool) -> bytes:
        raw = self._encode(msg)
        return framing.frame(raw) if framed else raw

    def update_checkpoint(self, seq: int | None, failures: int) -> None:
        if seq is None:
            if self._batching:
                self._batching = False
                if self._cur_index:
                    self._commit_index = self._cur_index
                else:
                    self._host.commit_processed()
            return
        self._acks.append(int(seq))
        self._failures += int(failures)

    def create_matcher(self, expression: str) -> _Matcher:
        try:
            return _Matcher(self, expression)
        except MatcherError:
            raise ValueError("invalid message matcher expression") from None

    def dead_letter(self, reason: str, data: bytes | str) -> None:
        self._dead_lettered = True
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self._host.dead_letter(reason, data)

    def log(self, level: int, text: str) -> None:
        self._host.log(level, text)

    def count_delivery(self, indexed: int, dead_lettered: int, set_aside: int, retried: int) -> None:
        stats = getattr(self._host, "stats", None)  # hosts without counters (tests) ignore this
        if stats is not None:
            stats.indexed += indexed
            stats.dead_lettered += dead_lettered
            stats.set_aside += set_aside
            stats.retried += retried

    def background_delivery(self, sender: Any, abort: bool) -> Any:
        return self._host.background_delivery(sender, abort=abort)


class _HostFailure(BaseException):
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


def _failed_reason(callback: str, msg: str | None) -> str:
    return f"{callback}() returned -1: {msg}" if msg else f"{callback}() returned -1"


class _ShuttingDown(Exception):
    """inject_message(None, cp) after a stop request: ends an input's run cleanly, as upstream."""


_HEADERS = {
    "Uuid": "uuid",
    "Type": "type",
    "Logger": "logger",
    "EnvVersion": "env_version",
    "Hostname": "hostname",
    "Timestamp": "timestamp",
    "Severity": "severity",
    "Pid": "pid",
}


def _split_result(result: Any) -> tuple[int, str | None]:
    if isinstance(result, tuple):
        rc = result[0]
        msg = result[1] if len(result) > 1 else None
    else:
        rc, msg = result, None
    if not isinstance(rc, (int, float)) or isinstance(rc, bool):
        raise PluginError("process_message() must return a numeric status code")
    if msg is not None and not isinstance(msg, str):
        raise PluginError("process_message() must return a nil or string error message")
    return int(rc), msg
