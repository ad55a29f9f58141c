"""A plugin process's side of the supervisor pipe, and what its plugin hosts share: the queue
writers, the plugins' sandboxes, termination reports, and the read loop's queues and slots.

A plugin process talks to the supervisor over one pipe (children write their log lines to stderr
themselves):
  child -> supervisor: ("cp", {key: value}) checkpoints, coalesced (about every CP_SEND_INTERVAL);
                       ("stats", name, dict) a plugin's counters, every STATS_SEND_INTERVAL;
                       ("exit", name, status bits, error or None, final stats dict) a plugin ended;
                       ("drained",) an output read its queues to their end after a drain, and waits
                       for ("finish",) before its shutdown timer_event;
                       ("done", label) the process is finished (after its last "cp" and "exit"s)
  supervisor -> child: ("drain",) every writer upstream of this process has finished: read the
                       queues to their end, run the shutdown timer_event, exit;
                       ("finish",) every output has read its queues to their end (or ended): an
                       output may run its shutdown timer_event;
                       ("stop",) stop as soon as possible (inputs: is_running() turns false).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hindsight_py.config import HindsightConfig, PluginConfig
from hindsight_py.log import Logger
from hindsight_py.plugin_host import PluginHost, stats_dict
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


class Channel:
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
        self.finish = False

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
            elif msg[0] == "finish":
                self.finish = True

    def outputs_drained(self) -> None:
        """The shutdown barrier of outputs: say this one has read its queues to their end, and wait
        until every output has (or a stop). No output's shutdown timer_event then runs while another
        output still processes messages: one may read what another writes (a dashboard file)."""
        self._conn.send(("drained",))
        while not (self.finish or self.stop):
            self.poll()
            if not (self.finish or self.stop):
                self._conn.poll(CP_SEND_INTERVAL)  # returns as soon as the supervisor answers

    def wait(self, timeout: float) -> None:
        """poll(), after up to `timeout` seconds of waiting for the supervisor to say something: an
        idle process hears "drain" or "stop" as soon as it is sent, not at the end of a sleep."""
        if timeout > 0:
            self._conn.poll(timeout)
        self.poll()

    def send(self, *msg: Any) -> None:
        self._conn.send(msg)


class PluginProcess:
    """One plugin process: its spec, its pipe, its queue writers and the hosts of its plugins."""

    def __init__(self, spec: ProcessSpec, channel: Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.hs = spec.hs
        self.logger = Logger(spec.log_level)
        self.output_path = self.hs.output_dir
        self._input_writer: QueueWriter | None = None
        self.writer: QueueWriter  # where this process's plugins inject (outputs have none)
        self._commit_cb: Callable[[], None] = lambda: None
        self.hosts: list[PluginHost] = []  # every plugin of this process, for the periodic stats

    def input_writer(self) -> QueueWriter:
        if self._input_writer is None:
            self._input_writer = QueueWriter(self.output_path / "input", self.hs.output_size)
        return self._input_writer

    def commit_processed(self) -> None:
        self._commit_cb()

    def make_sandbox(self, plugin: PluginConfig) -> tuple[Sandbox, PluginHost]:
        host = PluginHost(self, plugin)
        self.hosts.append(host)
        sandbox = create_sandbox(plugin, self.hs, host, log_level=self.spec.log_level, pid=self.spec.supervisor_pid)
        host.memory_used = getattr(sandbox, "memory_used", host.memory_used)
        sandbox.load()
        return sandbox, host

    def terminated(self, plugin: PluginConfig, err: str, host: PluginHost | None) -> None:
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
        self.channel.send("exit", plugin.name, STATUS_BITS[plugin.type], err, stats_dict(host))
        if plugin.shutdown_on_terminate:
            os.kill(self.spec.supervisor_pid, signal.SIGTERM)


_LIMITS = {"not enough memory": "memory_limit", "instruction_limit exceeded": "instruction_limit"}


def _limit_hint(plugin: PluginConfig, err: str, host: PluginHost | None) -> str:
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


def open_cursor(r: PluginProcess, queue: str, key: str) -> QueueCursor:
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


def read_queues(r: PluginProcess, cursors: list[QueueCursor], slots: list[Slot], *, is_output: bool) -> None:
    loop = ReadLoop(r.channel, cursors, slots, is_output=is_output,
                    terminated=lambda slot, err: r.terminated(slot.plugin, err, slot.host),
                    log=r.logger.bind(r.spec.label))
    r._commit_cb = loop.commit_processed
    loop.run()


def load_slots(r: PluginProcess) -> list[Slot]:
    slots = []
    for plugin in r.spec.plugins:
        try:
            sandbox, host = r.make_sandbox(plugin)
        except PluginError as e:
            r.terminated(plugin, str(e), None)
            continue
        slots.append(Slot(plugin, sandbox, host))
    return slots


def save_state(slot: Slot) -> None:
    if slot.plugin.preserve_data:
        try:
            slot.sandbox.save_state()
        except Exception as e:  # a failed save must not pass unnoticed, but must not lose checkpoints
            slot.host.log_fn(3, f"preserve_data failed: {e}")


__all__ = [
    "Channel", "PluginProcess", "ProcessSpec", "STATUS_BITS", "load_slots", "open_cursor", "read_queues", "save_state",
]
