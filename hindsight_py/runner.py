"""One plugin process: the input loop, or the read loops of analysis and output plugins.

A runner talks to the supervisor over one pipe (children write their log lines to stderr
themselves):
  child -> supervisor: ("cp", {key: value}) checkpoints, coalesced (about every CP_SEND_INTERVAL);
                       ("stats", name, dict) a plugin's counters, every STATS_SEND_INTERVAL;
                       ("exit", name, status bits, error or None, final stats dict) a plugin ended;
                       ("done", label) the process is finished (after its last "cp" and "exit"s)
  supervisor -> child: ("drain",) every writer upstream of this process has finished: read the
                       queues to their end, run the shutdown timer_event, exit;
                       ("stop",) stop as soon as possible (inputs: is_running() turns false).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hindsight_py import dead_letters
from hindsight_py.config import HindsightConfig, PluginConfig
from hindsight_py.log import Logger
from hindsight_py.matcher import compile_raw_matcher
from hindsight_py.queue import LOCK_NAME, QueueReader, QueueWriter, format_position, parse_position
from hindsight_py.read_loop import QueueCursor, ReadLoop, Slot
from hindsight_py.sandbox import PluginError, Sandbox, create_sandbox

# Exit status bits, as hindsight_cli: the OR of the types of plugins that failed.
STATUS_BITS = {"input": 2, "analysis": 4, "output": 8}

CP_SEND_INTERVAL = 0.25  # seconds between checkpoint reports to the supervisor
STATS_SEND_INTERVAL = 1.0  # seconds between ("stats", ...) reports (the supervisor's live status line)


@dataclass
class ProcessSpec:
    kind: str  # "input" | "analysis" | "output"
    label: str  # process name, e.g. "input.file" or "analysis0"
    plugins: list[PluginConfig]
    hs: HindsightConfig
    log_level: int
    supervisor_pid: int
    checkpoints: dict[str, Any]
    thread: int = 0


@dataclass
class _Stats:
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


def _die_with_parent(parent_pid: int, label: str) -> None:
    # A kill -9 of the supervisor must take its children along: a surviving child would race the
    # restarted daemon on the same queues and checkpoints.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # name the process after its plugin (ps -o comm, top): 15 bytes at most
        libc.prctl(15, ctypes.c_char_p(label.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class _Channel:
    """The child's end of the supervisor pipe, with checkpoint reports coalesced."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: dict[str, Any] = {}
        self._last_send = 0.0
        self._last_stats = 0.0
        #: the (plugin name, stats) of this process's plugins, reported about once a second
        self.stats_source: Callable[[], list[tuple[str, dict[str, int]]]] | None = None
        self.drain = False
        self.stop = False

    def checkpoint(self, key: str, value: Any, *, now: bool = False) -> None:
        self._pending[key] = value
        t = time.monotonic()
        if now or t - self._last_send >= CP_SEND_INTERVAL:
            self.send_checkpoints()

    def send_checkpoints(self) -> None:
        if self._pending:
            self._conn.send(("cp", self._pending))
            self._pending = {}
        self._last_send = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        if self._pending and now - self._last_send >= CP_SEND_INTERVAL:
            self.send_checkpoints()  # a coalesced checkpoint must not wait for the next one while idle
        if self.stats_source is not None and now - self._last_stats >= STATS_SEND_INTERVAL:
            self._last_stats = now
            for name, stats in self.stats_source():
                self._conn.send(("stats", name, stats))
        while self._conn.poll():
            try:
                msg = self._conn.recv()
            except EOFError:
                self.stop = True
                return
            if msg[0] == "drain":
                self.drain = True
            elif msg[0] == "stop":
                self.stop = True

    def send(self, *msg: Any) -> None:
        self._conn.send(msg)


class _Host:
    """What one sandbox sees of its process (the SandboxHost protocol of sandbox/lua.py)."""

    def __init__(self, runner: _Runner, plugin: PluginConfig) -> None:
        self.runner = runner
        self.plugin = plugin
        self.log_fn = runner.logger.bind(plugin.name)
        self.checkpoint_value: Any = runner.spec.checkpoints.get(plugin.name)
        self.stats = _Stats()
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


class _Runner:
    def __init__(self, spec: ProcessSpec, channel: _Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.hs = spec.hs
        self.logger = Logger(spec.log_level)
        self.output_path = self.hs.output_dir
        self._input_writer: QueueWriter | None = None
        self.writer: QueueWriter  # where this process's plugins inject (outputs have none)
        self._commit_cb: Callable[[], None] = lambda: None
        self.hosts: list[_Host] = []  # every plugin of this process, for the periodic stats

    def input_writer(self) -> QueueWriter:
        if self._input_writer is None:
            self._input_writer = QueueWriter(self.output_path / "input", self.hs.output_size)
        return self._input_writer

    def commit_processed(self) -> None:
        self._commit_cb()

    def make_sandbox(self, plugin: PluginConfig) -> tuple[Sandbox, _Host]:
        host = _Host(self, plugin)
        self.hosts.append(host)
        sandbox = create_sandbox(plugin, self.hs, host, log_level=self.spec.log_level, pid=self.spec.supervisor_pid)
        sandbox.load()
        return sandbox, host

    def terminated(self, plugin: PluginConfig, err: str, host: _Host | None) -> None:
        if host is not None:
            host.settle_refused(None)  # normally written already, when the sandbox flushed
        # The log line says which limit, which record and what to change; the .err file and the
        # exit report keep upstream's text, which tools written for Hindsight may match.
        said = err + _limit_hint(plugin, err, host)
        log = self.logger.bind(plugin.name)
        if plugin.type == "input":
            log(3, f"detaching received: 1 msg: {said}")
        else:
            log(3, f"terminated: {said}")
        _write_err_file(plugin, err)
        self.channel.send_checkpoints()
        self.channel.send("exit", plugin.name, STATUS_BITS[plugin.type], err, _stats_dict(host))
        if plugin.shutdown_on_terminate:
            os.kill(self.spec.supervisor_pid, signal.SIGTERM)


_LIMITS = {"not enough memory": "memory_limit", "instruction_limit exceeded": "instruction_limit"}


def _limit_hint(plugin: PluginConfig, err: str, host: _Host | None) -> str:
    """For a plugin a sandbox limit terminated: which limit, where it was, and what to change."""
    key = next((k for text, k in _LIMITS.items() if err.endswith(text)), None)
    if key is None or plugin.language != "lua":
        return ""
    try:
        cfg = plugin.cfg_path.relative_to(plugin.hs.base_dir)
    except ValueError:
        cfg = plugin.cfg_path
    hint = f": {key} = {getattr(plugin, key)} ({cfg}) was reached"
    if plugin.type == "input":
        cp = host.checkpoint_value if host is not None else None
        hint += (f" on the record at checkpoint {cp!r} (a file input: the record's byte offset)" if cp is not None
                 else " on its first record (no checkpoint yet)")
    return hint + f"; raise {key} in {cfg} to let the plugin through it"


def _write_err_file(plugin: PluginConfig, err: str) -> None:
    path = Path(plugin.cfg_path).with_suffix(".err")
    try:
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "\t" + err + "\n")
    except OSError:
        pass


def _stats_dict(host: _Host | None) -> dict[str, int]:
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


# ------------------------------------------------------------------------------------------------
# input
# ------------------------------------------------------------------------------------------------
def _run_input(r: _Runner) -> None:
    plugin = r.spec.plugins[0]
    r.writer = QueueWriter(r.output_path / "input", r.hs.output_size)
    if r.writer.torn_bytes:
        r.logger.bind(plugin.name)(4, f"cut a torn record of {r.writer.torn_bytes} bytes at the end of the input queue")
    try:
        sandbox, host = r.make_sandbox(plugin)
    except PluginError as e:
        r.terminated(plugin, str(e), None)
        return
    log = host.log_fn
    while True:
        try:
            rc, msg = sandbox.run_input(host.checkpoint_value)
        except PluginError as e:
            r.terminated(plugin, str(e), host)
            return
        if rc > 0:
            r.terminated(plugin, f"process_message() received a termination status code {rc} {msg or ''}".strip(), host)
            return
        if rc < 0 and msg:
            log(4, f"received: {rc} msg: {msg}")
        if plugin.ticker_interval == 0 or r.channel.stop:
            log(6, f"detaching received: {rc} msg: {msg or ''}")
            break
        deadline = time.monotonic() + plugin.ticker_interval
        while time.monotonic() < deadline:
            r.channel.poll()
            if r.channel.stop:
                break
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if r.channel.stop:
            break
    host.settle_refused(None)
    if plugin.preserve_data:  # inputs keep state across clean restarts too (lsb_heka_destroy_sandbox)
        try:
            sandbox.save_state()
        except Exception as e:
            log(3, f"preserve_data failed: {e}")
    r.channel.send_checkpoints()
    r.channel.send("exit", plugin.name, 0, None, _stats_dict(host))


# ------------------------------------------------------------------------------------------------
# analysis and output: the read loop
# ------------------------------------------------------------------------------------------------
def _cursor(r: _Runner, queue: str, key: str) -> QueueCursor:
    """A queue to read from its checkpoint on."""
    pos = r.spec.checkpoints.get(key)
    position = parse_position(pos) if isinstance(pos, str) else None
    directory = r.output_path / queue
    # A queue hindsight-py writes only ever exposes complete appends (its head lives in the lock
    # file), so full validation would only re-check our own encoder at ~3 us a record. Queues
    # left by upstream Hindsight (no lock file) are validated record by record.
    trusted = (directory / LOCK_NAME).exists() or not any(directory.glob("*.log"))
    reader = QueueReader(directory, position, r.hs.max_message_size, validate=not trusted)
    return QueueCursor(queue, key, reader, format_position(reader.position()))


def _read_loop(r: _Runner, cursors: list[QueueCursor], slots: list[Slot], *, is_output: bool) -> None:
    loop = ReadLoop(r.channel, cursors, slots, is_output=is_output,
                    terminated=lambda slot, err: r.terminated(slot.plugin, err, slot.host),
                    log=r.logger.bind(r.spec.label))
    r._commit_cb = loop.commit_processed
    loop.run()


def _run_analysis(r: _Runner) -> None:
    r.writer = QueueWriter(r.output_path / "analysis", r.hs.output_size)
    slots = _load_slots(r)
    if not slots:
        r.channel.send("exit", r.spec.label, 0, None, {})
        return
    reader = _cursor(r, "input", f"input->analysis{r.spec.thread}")
    _read_loop(r, [reader], slots, is_output=False)
    for slot in slots:
        if slot.alive:
            _save_state(slot)
            r.channel.send("exit", slot.plugin.name, 0, None, _stats_dict(slot.host))
    r.channel.send("exit", r.spec.label, 0, None, {})


def _run_output(r: _Runner) -> None:
    plugin = r.spec.plugins[0]
    slots = _load_slots(r)
    if not slots:
        return
    from hindsight_py.outputs.lua_binding import takeover_recover

    takeover_recover(slots[0].host)  # a stop that cuts it short ends the read loop at once
    rq = plugin.read_queue
    readers = []
    if rq in ("both", "input"):
        readers.append(_cursor(r, "input", f"input->{plugin.name}"))
    if rq in ("both", "analysis"):
        readers.append(_cursor(r, "analysis", f"analysis->{plugin.name}"))
    _read_loop(r, readers, slots, is_output=True)
    slot = slots[0]
    if slot.alive:
        _save_state(slot)
        r.channel.send_checkpoints()
        r.channel.send("exit", plugin.name, 0, None, _stats_dict(slot.host))


def _load_slots(r: _Runner) -> list[Slot]:
    slots = []
    for plugin in r.spec.plugins:
        try:
            sandbox, host = r.make_sandbox(plugin)
        except PluginError as e:
            r.terminated(plugin, str(e), None)
            continue
        slots.append(Slot(plugin, sandbox, host))
    return slots


def _save_state(slot: Slot) -> None:
    if slot.plugin.preserve_data:
        try:
            slot.sandbox.save_state()
        except Exception as e:  # a failed save must not pass unnoticed, but must not lose checkpoints
            slot.host.log_fn(3, f"preserve_data failed: {e}")


def run_process(spec: ProcessSpec, conn: Connection) -> None:
    """Entry point of a plugin process (forked by the supervisor)."""
    _die_with_parent(spec.supervisor_pid, spec.label)
    # The terminal's ^C reaches the whole process group; only the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _Channel(conn)
    r = _Runner(spec, channel)
    channel.stats_source = lambda: [(h.plugin.name, _stats_dict(h)) for h in r.hosts]
    # HINDSIGHT_PY_PROFILE=/tmp/p writes /tmp/p-<process>.prof (cProfile) for each plugin process
    profile_prefix = os.environ.get("HINDSIGHT_PY_PROFILE")
    profiler = None
    if profile_prefix:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if spec.kind == "input":
            _run_input(r)
        elif spec.kind == "analysis":
            _run_analysis(r)
        else:
            _run_output(r)
        channel.send_checkpoints()
        channel.send("done", spec.label)
    except Exception as e:  # the supervisor must hear about it; the traceback goes to stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        try:
            channel.send_checkpoints()
            for p in spec.plugins:
                channel.send("exit", p.name, STATUS_BITS[p.type], f"internal error: {e}", {})
            channel.send("done", spec.label)
        except OSError:
            pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_prefix}-{spec.label}.prof")
        sys.stderr.flush()
        os._exit(0)


__all__ = ["ProcessSpec", "run_process", "STATUS_BITS"]
