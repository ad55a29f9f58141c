"""Python plugins: a `.py` file with the same callbacks and return codes as a Lua plugin.

The plugin calls the API in hindsight_py.plugin; this module is what those calls reach (what the
plugin injects is handled by its base class, sandbox/python_inject's Injection). Lua's
memory and instruction limits have no Python equivalent and are not enforced here; an exception
terminates the plugin exactly as a Lua error does.

preserve_data: a plugin that defines `save_state()` has its return value (anything JSON can hold)
written to `<output_path>/<name>.data` at a clean stop, and handed to its `restore_state(value)`
after the module is loaded on the next start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from hindsight_py import framing, peek
from hindsight_py import message as hmsg
from hindsight_py import plugin as api
from hindsight_py.matcher import MatcherError, compile_matcher
from hindsight_py.sandbox.base import BatchResult, PluginError
from hindsight_py.sandbox.python_inject import HostFailure, Injection, ShuttingDown


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


class PythonSandbox(Injection):
    """A Python plugin's sandbox: loads the module, drives its callbacks (batches, timers, an
    input's run) and answers hindsight_py.plugin's calls; what the plugin injects is Injection's."""

    def __init__(self, plugin: Any, hs: Any, host: Any, *, log_level: int, pid: int) -> None:
        # log_level is the Lua sandboxes' (their cfg's); a Python plugin's log() goes to the host,
        # which filters by level
        super().__init__(plugin, hs, host, pid)
        self._hs = hs
        self.name = plugin.name
        self.config = plugin.runtime_values()
        self._module: Any = None
        self._batch_fn: Any = None
        self._ticker = 0
        self._timer_limit = -1
        self._next_due: int | None = None
        self._data_now = 0
        self._current: bytes | None = None
        self._current_msg: hmsg.Message | None = None
        self._seq = 0
        self._cur_index = 0
        self._commit_index = 0
        self._batching = False
        self._acks: list[int] = []
        self._failures = 0
        self._dead_lettered = False  # the plugin called dead_letter() in the current call (outputs' -1)

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
        except ShuttingDown:
            result = 0
        except (Exception, HostFailure) as e:
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
                        raise HostFailure(self._fatal)
                except (Exception, HostFailure) as e:
                    self._flush()
                    err = str(e) if isinstance(e, PluginError) else f"process_message() {type(e).__name__}: {e}"
                    return self._batch_result(i - 1, "terminate", err, fails_before)
                stop = self._settle_return(i, raw, rc, msg, is_output)
                if stop is not None:
                    return self._batch_result(i - 1, *stop, fails_before)
                if self._ticker:
                    err = self._data_timer(raw, i)
                    if err:
                        return self._batch_result(i, "terminate", err, fails_before)
        finally:
            api.leave(token)
            self._current = None
            self._current_msg = None
            self._cur_index = 0
        self._flush()
        return self._batch_result(len(raws), "ok", None, fails_before)

    def _settle_return(self, i: int, raw: bytes, rc: int, msg: str | None,
                       is_output: bool) -> tuple[str, str | None] | None:
        """What process_message's return code for message `i` of the batch means: None to go on
        with the next message, else the batch's status and error (it ends before message `i`)."""
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
            return "retry", msg
        elif rc == -4:
            self._batching = True
        elif rc == -5:
            if not self.plugin.async_buffer_size:
                return "terminate", "cannot use async checkpointing without a configured buffer"
        elif rc > 0:
            self._flush()
            return "terminate", "process_message() received a termination status code"
        return None

    def _batch_result(self, processed: int, status: str, error: str | None, fails_before: int) -> BatchResult:
        return BatchResult(processed, status, error, self._commit_index, self._failures - fails_before,
                           self._batching)

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
                raise HostFailure(self._fatal)
        except (Exception, HostFailure) as e:
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
                raise HostFailure(self._fatal)
        except (Exception, HostFailure) as e:
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

    def track_delivery(self, delivery: Any) -> None:
        self._host.track(delivery)


def _failed_reason(callback: str, msg: str | None) -> str:
    return f"{callback}() returned -1: {msg}" if msg else f"{callback}() returned -1"


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
