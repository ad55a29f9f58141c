"""The supervisor: loads the configuration, starts one process per plugin (analysis: per thread),
keeps `hindsight.cp`, runs hindsight_cli's staged shutdown and computes the exit status.

Staged shutdown (as hindsight_cli): when every input has finished, analysis processes drain the
input queue to its end and stop; then outputs drain both queues and stop. A first SIGINT/SIGTERM
stops the inputs and lets the stages drain (bounded by `shutdown_timeout`, then the outputs are
told to stop, then killed); a second one stops at once, keeping the checkpoints of what was
delivered, so nothing on disk is lost.

Delivery is at-least-once (docs/delivery.md): a checkpoint is written to `hindsight.cp` only after
what it covers is on disk (input and analysis queues, fsync()ed first) or accepted by the server.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from hindsight_py.checkpoint import load_checkpoints, save_checkpoints
from hindsight_py.config import (
    ConfigError,
    HindsightConfig,
    PluginConfig,
    discover_plugin_configs,
    load_hindsight_config,
    load_plugin_config,
    previous_analysis_thread,
    write_runtime_cfg,
)
from hindsight_py.live_stats import LiveStats
from hindsight_py.log import Logger
from hindsight_py.queue import list_ids, queue_head
from hindsight_py.runner import STATUS_BITS, ProcessSpec, run_process
from hindsight_py.sandbox import preload as preload_sandboxes

#: seconds between writes of hindsight.cp; what a kill -9 can make the next run send again is about
#: this much input (the input's checkpoint lags its queue by up to this, plus the children's 0.25 s)
CHECKPOINT_INTERVAL = 0.25
#: seconds between refreshes of the live status line (stderr on a terminal only)
STATUS_INTERVAL = 1.0
#: how long a first stop signal lets the queues drain before the outputs are told to stop
DEFAULT_SHUTDOWN_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT_ENV = "HINDSIGHT_PY_SHUTDOWN_TIMEOUT"
#: seconds the processes get to stop after being told to, before they are killed
STOP_GRACE = 15.0
#: seconds an output that has read its queues to their end waits for the other outputs before its
#: shutdown timer_event (the outputs' barrier): long enough for one to finish writing what another
#: reads, short enough that an output stuck retrying a dead server does not hold up the others'
#: last batches
OUTPUT_BARRIER_WAIT = 5.0
#: exit status bit (hindsight-py): some messages could not be delivered and are in a dead-letter file
STATUS_DEAD_LETTERS = 16
STATUS_SYSTEM_ERROR = 1


@dataclass
class _Child:
    spec: ProcessSpec
    process: Any
    conn: Connection
    done: bool = False
    drain_sent: bool = False
    drained: bool = False  # an output that read its queues to their end, waiting for ("finish",)
    drained_at: float = 0.0  # when it said so (time.monotonic())
    finish_sent: bool = False
    stop_sent: bool = False
    reaped: bool = False  # joined after its "done"
    exited: set[str] = field(default_factory=set)  # its plugins that reported their end


@dataclass
class Summary:
    status: int = 0
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(s.get(key, 0) for s in self.stats.values())


class Supervisor:
    def __init__(self, hs: HindsightConfig, plugins: list[PluginConfig], log_level: int,
                 shutdown_timeout: float = 60.0) -> None:
        self.hs = hs
        self.plugins = plugins
        self.log_level = log_level
        self.logger = Logger(log_level)
        self.log = self.logger.bind("hindsight")
        self.shutdown_timeout = shutdown_timeout
        self.cp_path = hs.output_dir / "hindsight.cp"
        self.checkpoints: dict[str, Any] = {}
        self.cp_dirty = False
        self.children: list[_Child] = []
        self.summary = Summary()
        #: the latest ("stats", name, dict) of each plugin; an "exit" replaces it with the final one
        self.live_stats: dict[str, dict[str, int]] = {}
        self.status_line: StatusLine | None = StatusLine(sys.stderr.write) if _is_terminal(sys.stderr) else None
        self._signals = 0
        self._stop_deadline: float | None = None
        self._kill_deadline: float | None = None
        # per queue, the head up to which the queue files are known to be fsync()ed
        self._synced_heads: dict[str, tuple[int, int]] = {}
        self.published = LiveStats(hs)  # plugins.tsv, utilization.tsv, stats.json, metrics

    # -- start ------------------------------------------------------------------------------
    def prepare(self) -> None:
        out = self.hs.output_dir
        for sub in ("", "input", "analysis"):
            (out / sub).mkdir(mode=0o750, parents=True, exist_ok=True)
        self.checkpoints = dict(load_checkpoints(self.cp_path))
        self._forget_stale_checkpoints()
        for plugin_type in STATUS_BITS:
            d = self.hs.run_dir / plugin_type
            for err in d.glob("*.err"):
                err.unlink(missing_ok=True)
        self._assign_threads()
        for p in self.plugins:
            write_runtime_cfg(p, out)

    def _assign_threads(self) -> None:
        """Analysis threads as upstream: the cfg's `thread`, else last run's, else round robin."""
        rr = 0
        for p in self.plugins:
            if p.type != "analysis":
                continue
            thread = p.thread_id
            if thread is None:
                thread = previous_analysis_thread(self.hs, p.name)
            if thread is None or thread >= self.hs.analysis_threads:
                thread = rr % self.hs.analysis_threads
                rr += 1
            p.assigned_thread = thread

    def _forget_stale_checkpoints(self) -> None:
        names = {p.name for p in self.plugins}
        threads = self.hs.analysis_threads
        for key in list(self.checkpoints):
            if key in ("input", "analysis"):
                continue
            if "->" in key:
                _, reader = key.split("->", 1)
                if reader.startswith("analysis") and reader[8:].isdigit():
                    if int(reader[8:]) < threads:
                        continue
                elif reader in names:
                    continue
            elif key in names:
                continue
            del self.checkpoints[key]

    def spec(self, kind: str, label: str, plugins: list[PluginConfig], thread: int = 0) -> ProcessSpec:
        """One plugin process, resuming from the checkpoints known now."""
        return ProcessSpec(kind, label, plugins, self.hs, self.log_level, os.getpid(), dict(self.checkpoints), thread)

    def _specs(self) -> list[ProcessSpec]:
        specs = []
        spec = self.spec
        for p in self.plugins:
            if p.type == "input":
                specs.append(spec("input", p.name, [p]))
        groups: dict[int, list[PluginConfig]] = {}
        for p in self.plugins:
            if p.type == "analysis":
                groups.setdefault(p.assigned_thread or 0, []).append(p)
        for thread, plugins in sorted(groups.items()):
            specs.append(spec("analysis", f"analysis{thread}", plugins, thread))
        for p in self.plugins:
            if p.type == "output":
                specs.append(spec("output", p.name, [p]))
        return specs

    def start(self) -> None:
        for s in self._specs():
            self.start_process(s)

    def start_process(self, spec: ProcessSpec) -> None:
        preload_sandboxes(spec.plugins)  # once here, not once per process
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=run_process, args=(spec, child), name=spec.label, daemon=False)
        proc.start()
        child.close()
        self.children.append(_Child(spec, proc, parent))

    # -- run --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            self.log(6, "stop signal received")
        else:
            self.log(4, "second stop signal: stopping now (undelivered messages stay queued for the next run)")

    def run(self) -> Summary:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._write_checkpoints(force=True)
            self._reap()
            if self.status_line is not None:
                # the final figures, even for a run shorter than one status interval
                self.status_line.show(self._totals(), time.monotonic())
                self.status_line.clear()
        # a plugin whose process died before it said goodbye still counts what it reported
        for name, stats in self.live_stats.items():
            self.summary.stats.setdefault(name, stats)
        return self.summary

    def _loop(self) -> None:
        last_cp = last_status = last_stats = time.monotonic()
        handled_signals = 0
        while True:
            self.tick()
            # Before the wait, not after it: the end of a stage is received in one turn and the
            # daemon's tick() may only act on it in the next (RunOnce decides there that the inputs
            # have ended), and the next stage must not wait for whatever message wakes the
            # supervisor next (up to 0.2 s of idle at the end of every run).
            self._advance_stages()
            live = [c for c in self.children if not c.done]
            if not live and self.finished():
                return  # the last ones are reaped after the final checkpoints, which need not wait for them
            self._reap()
            if self._signals != handled_signals:
                handled_signals = self._signals
                if handled_signals == 1:
                    self._stop_deadline = time.monotonic() + self.shutdown_timeout
                    self._send("input", "stop")
                else:
                    self._force_stop()
                    return
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self.log(4, f"shutdown did not finish within {self.shutdown_timeout:g}s: stopping the outputs "
                            "(what they have not delivered stays queued for the next run)")
                self._send(None, "stop")
                self._stop_deadline = None
                self._kill_deadline = time.monotonic() + STOP_GRACE
            if self._kill_deadline is not None and time.monotonic() > self._kill_deadline:
                self.log(4, f"processes still running {STOP_GRACE:g}s after being told to stop: killing them")
                self._force_stop()
                return
            ready = []
            if not live:  # the daemon with no plugin running: it waits for load/ or a signal
                time.sleep(0.2)
            else:
                try:
                    ready = wait([c.conn for c in live], timeout=0.2)
                except InterruptedError:
                    pass
            for conn in ready:
                child = next(c for c in live if c.conn is conn)
                self._receive(child)
            for child in live:
                if not child.done and child.process.exitcode is not None and not child.conn.poll():
                    self._child_died(child)
            now = time.monotonic()
            # (not when the run ends with this turn: run() writes them once more, and each write is a
            # few fsync()s the exit would wait for twice)
            ending = self.finished() and all(c.done for c in self.children)
            if now - last_cp >= CHECKPOINT_INTERVAL and not ending:
                self._write_checkpoints()
                last_cp = time.monotonic()
            if now - last_stats >= 1.0:
                last_stats = now
                self.published.publish(self.plugins, self.running_plugins(), self.live_stats, self.summary.stats,
                                       self.checkpoints)
            if self.status_line is not None and now - last_status >= STATUS_INTERVAL:
                self.status_line.show(self._totals(), now)
                last_status = now

    def running_plugins(self) -> list[PluginConfig]:
        """The plugins whose process runs and has not reported their end."""
        live = {p.name for c in self.children if not c.done for p in c.spec.plugins if p.name not in c.exited}
        return [p for p in self.plugins if p.name in live]

    def _totals(self) -> dict[str, int]:
        """The live counters over every plugin (the final ones for plugins that exited)."""
        stats = {**self.live_stats, **self.summary.stats}
        inputs = {p.name for p in self.plugins if p.type == "input"}
        totals = {"read": sum(s.get("injected", 0) for name, s in stats.items() if name in inputs)}
        for key in ("indexed", "dead_lettered", "set_aside", "retried", "moved_aside"):
            totals[key] = sum(s.get(key, 0) for s in stats.values())
        return totals

    def _receive(self, child: _Child) -> None:
        while True:
            try:
                if not child.conn.poll():
                    return
                msg = child.conn.recv()
            except (EOFError, OSError):
                if not child.done:
                    child.process.join(timeout=5)
                    self._child_died(child)
                return
            kind = msg[0]
            if kind == "stats":
                self.live_stats[msg[1]] = msg[2]
            elif kind == "cp":
                for k, v in msg[1].items():
                    if v is not None and self.checkpoints.get(k) != v:
                        self.checkpoints[k] = v
                        self.cp_dirty = True
            elif kind == "exit":
                _, name, status, err, stats = msg
                child.exited.add(name)
                self.summary.status |= status
                if stats:
                    self.summary.stats[name] = stats
                if err:
                    self.summary.errors[name] = err
                    plugin = next((p for p in self.plugins if p.name == name), None)
                    if plugin is not None and plugin.type == "output" and plugin.remove_checkpoints_on_terminate:
                        for k in (f"input->{name}", f"analysis->{name}"):
                            self.checkpoints.pop(k, None)
                        self.cp_dirty = True
            elif kind == "drained":
                child.drained, child.drained_at = True, time.monotonic()
            elif kind == "done":
                child.done = True  # joined by _reap(), once the next stage has been told

    def _reap(self) -> None:
        """Wait for the processes that said "done" to be gone (they exit right after saying it)."""
        for c in self.children:
            if c.done and not c.reaped:
                c.process.join(timeout=10)
                c.reaped = True

    def _child_died(self, child: _Child) -> None:
        if child.done:
            return
        child.done = True
        code = child.process.exitcode
        self.log(3, f"{child.spec.label} exited unexpectedly (exit code {code})")
        self.summary.status |= STATUS_BITS[child.spec.kind]
        for p in child.spec.plugins:
            self.summary.errors.setdefault(p.name, f"process exited unexpectedly ({code})")

    def _kind_done(self, kind: str) -> bool:
        return all(c.done for c in self.children if c.spec.kind == kind)

    # -- what the daemon (daemon.py) changes -------------------------------------------------
    def tick(self) -> None:
        """Called once per loop turn (about every 0.2 s), before anything else."""

    def finished(self) -> bool:
        """Whether the run ends now that no plugin process is running (run-once: yes)."""
        return True

    @property
    def stopping(self) -> bool:
        """A stop signal arrived."""
        return self._signals > 0

    def stages_may_drain(self) -> bool:
        """Whether finished inputs start the staged drain (run-once: yes; the daemon: on a signal)."""
        return True

    def exit_status(self) -> int:
        """The exit status of the run: the failed plugins' bits, dead letters, system errors."""
        return self.summary.status | (STATUS_DEAD_LETTERS if self.summary.total("dead_lettered") else 0)

    def _advance_stages(self) -> None:
        if not self.stages_may_drain() or not self._kind_done("input"):
            return
        self._send("analysis", "drain")
        if self._kind_done("analysis"):
            self._send("output", "drain")
            # the outputs' shutdown barrier: their shutdown timer_events run once every output has
            # read its queues to their end (or ended), or once the first has waited OUTPUT_BARRIER_WAIT
            outputs = [c for c in self.children if c.spec.kind == "output"]
            waiting = [c.drained_at for c in outputs if c.drained and not c.done]
            if all(c.done or c.drained for c in outputs) or (
                    waiting and time.monotonic() - min(waiting) >= OUTPUT_BARRIER_WAIT):
                self._send("output", "finish")

    def _send(self, kind: str | None, what: str) -> None:
        for c in self.children:
            if c.done or (kind is not None and c.spec.kind != kind):
                continue
            if what == "drain":
                if c.drain_sent:
                    continue
                c.drain_sent = True
            elif what == "stop":
                if c.stop_sent:
                    continue
                c.stop_sent = True
            elif what == "finish":
                if c.finish_sent:
                    continue
                c.finish_sent = True
            try:
                c.conn.send((what,))
            except OSError:
                pass

    def _force_stop(self) -> None:
        for c in self.children:
            try:
                while c.conn.poll():
                    self._receive(c)
                    if c.done:
                        break
            except OSError:
                pass
        for c in self.children:
            if not c.done and c.process.is_alive():
                c.process.kill()
        for c in self.children:
            c.process.join(timeout=5)
            if not c.done:
                c.done = True
                self.summary.status |= STATUS_BITS[c.spec.kind]
        self.summary.status |= STATUS_SYSTEM_ERROR

    def _write_checkpoints(self, force: bool = False) -> None:
        heads = {}
        for queue in ("input", "analysis"):
            pos = queue_head(self.hs.output_dir / queue)
            if pos is not None:
                heads[queue] = pos
                value = f"{pos[0]}:{pos[1]}"
                if self.checkpoints.get(queue) != value:
                    self.checkpoints[queue] = value
                    self.cp_dirty = True
        if self.cp_dirty or force:
            # Every checkpoint received so far covers only queue bytes already written; once they
            # are fsync()ed too, even a power cut cannot leave hindsight.cp ahead of the queues.
            for queue, head in heads.items():
                self._sync_queue(queue, head)
            save_checkpoints(self.cp_path, self.checkpoints)
            self.cp_dirty = False

    def _sync_queue(self, queue: str, head: tuple[int, int]) -> None:
        if self._synced_heads.get(queue) == head:
            return
        directory = self.hs.output_dir / queue
        first = self._synced_heads.get(queue, (-1, 0))[0]
        for file_id in list_ids(directory):
            if first <= file_id <= head[0]:
                try:
                    fd = os.open(directory / f"{file_id}.log", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._synced_heads[queue] = head


class StatusLine:
    """The live status line on a terminal: rewritten in place, cleared before the summary.

    Log lines (log.Logger) start by erasing it, so they never end up glued to its text; it comes
    back at the next refresh.
    """

    def __init__(self, write: Callable[[str], Any]) -> None:
        self._write = write
        self._last: tuple[float, int] | None = None  # (time, documents) of the previous refresh
        self._rate = 0.0
        self.shown = False

    def render(self, totals: dict[str, int], now: float) -> str:
        shipped = totals.get("indexed", 0)
        if self._last is not None and now > self._last[0]:
            self._rate = max(0.0, (shipped - self._last[1]) / (now - self._last[0]))
        self._last = (now, shipped)
        dead = totals.get("dead_lettered", 0) + totals.get("set_aside", 0)
        return (f"read {totals.get('read', 0):,} lines | shipped {shipped:,} documents "
                f"({self._rate:,.0f}/s) | dead-lettered {dead:,} | retried {totals.get('retried', 0):,}")

    def show(self, totals: dict[str, int], now: float) -> None:
        self._write("\r\x1b[K" + self.render(totals, now))
        _flush_stderr()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self._write("\r\x1b[K")
            _flush_stderr()
            self.shown = False


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _shutdown_timeout(log: Callable[[int, str], None]) -> float:
    text = os.environ.get(SHUTDOWN_TIMEOUT_ENV)
    if not text:
        return DEFAULT_SHUTDOWN_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        log(4, f"{SHUTDOWN_TIMEOUT_ENV}={text!r} is not a number of seconds: using {DEFAULT_SHUTDOWN_TIMEOUT:g}")
        return DEFAULT_SHUTDOWN_TIMEOUT
    return value


def load_all(cfg_path: str, log_level: int) -> tuple[HindsightConfig, list[PluginConfig]]:
    """hindsight.cfg and every plugin cfg, validated; raises ConfigError on the first problem."""
    hs = load_hindsight_config(cfg_path, log_level)
    pid = os.getpid()
    plugins = []
    for path in discover_plugin_configs(hs):
        plugin_type = Path(path).parent.name
        try:
            plugins.append(load_plugin_config(_shown(path, hs), plugin_type, hs, log_level, pid))
        except ConfigError as e:
            # upstream leaves the reason beside the cfg, where an operator looks first
            err = Path(path).with_suffix(".err")
            try:
                err.write_text(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "\t" + str(e) + "\n")
            except OSError:
                pass
            raise
    return hs, plugins


def _shown(path: Path, hs: HindsightConfig) -> Path:
    """The cfg path as the user would write it (relative to where hindsight runs), for error messages."""
    try:
        return path.relative_to(hs.base_dir)
    except ValueError:
        return path


# glibc's malloc, as the plugin processes use it: every bulk body, queue read and Lua string of a
# few hundred KB would otherwise be an mmap and a munmap (page faults each time) or a heap trim.
# Keeping such blocks in the heap saved 5-15% of the pipelines' time (benchmarks/run.py); peak
# memory stayed within a few MB. Set before the plugin processes fork, so they inherit it.
_MALLOC_TUNING = ((-3, 32 << 20), (-1, 128 << 20), (-2, 16 << 20))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD


def _tune_malloc() -> None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its defaults stay
        return
    for param, value in _MALLOC_TUNING:
        mallopt(param, value)


def run(cfg_path: str, log_level: int = 6, supervisor: type[Supervisor] = Supervisor) -> int:
    """Run a configuration to its end (run-once), or until signalled with `supervisor=Daemon`."""
    _tune_malloc()
    logger = Logger(log_level)
    log = logger.bind("hindsight")
    try:
        hs, plugins = load_all(cfg_path, log_level)
    except ConfigError as e:
        log(3, str(e))
        return STATUS_SYSTEM_ERROR
    except OSError as e:
        log(3, f"loading {cfg_path} failed: {e}")
        return STATUS_SYSTEM_ERROR
    sup = supervisor(hs, plugins, log_level, shutdown_timeout=_shutdown_timeout(log))
    try:
        sup.prepare()
    except Exception as e:  # a broken hindsight.cp or an unwritable output_path
        log(3, str(e))
        return STATUS_SYSTEM_ERROR
    started = time.monotonic()
    sup.start()
    sup.published.start_metrics(log)
    try:
        summary = sup.run()
    finally:
        sup.published.close()
    elapsed = time.monotonic() - started
    status = sup.exit_status()
    dead = summary.total("dead_lettered")
    for name, err in summary.errors.items():
        log(3, f"{name}: {err}")
    aside = summary.total("set_aside")
    dropped = summary.total("dropped")
    moved = summary.total("moved_aside")
    read = sum(s.get("injected", 0) for name, s in summary.stats.items() if name.startswith("input."))
    log(
        5 if status == 0 else 3,
        f"summary: read {read} messages, delivered {summary.total('indexed')} documents, "
        f"dead-lettered {dead}, retried {summary.total('retried')} requests, "
        + (f"set aside {aside} non-JSON payloads, " if aside else "")
        + (f"moved mistyped fields aside in {moved} documents, " if moved else "")
        + (f'dropped {dropped} refused messages (refused_messages = "drop"), ' if dropped else "")
        + f"{elapsed:.1f}s, exit status {status}"
        + (f" (see {hs.output_dir / 'dead_letter'})" if dead or aside else ""),
    )
    sys.stderr.flush()
    return status
