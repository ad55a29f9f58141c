"""`hindsight <cfg> [loglevel]`: the daemon. The supervisor of the run-once command, except that:

- it runs until SIGINT/SIGTERM, however its inputs end (inputs with a ticker_interval run again
  every ticker_interval seconds, as in every mode); the signal then drains and stops, as the
  run-once command's first signal does;
- a plugin that fails is reported (log and `.err` file) and stays down while the others go on;
  the exit status is 0 after a stop signal (upstream's daemon), 1 on a system error;
- plugins are started, replaced and stopped while it runs, through `sandbox_load_path`
  (load_path.py has the file rules): a replaced plugin's process stops (an output after what it
  has in flight is confirmed) and a new one resumes from the checkpoints it left. An analysis
  plugin shares its process with the other plugins of its thread: they restart with it.

A cfg that does not load is refused before anything changes: the running plugin (if any) goes on,
the cfg stays in load/, and `run/<type>/<name>.err` says why (upstream stops the running plugin
first, and then cannot start the new one).

`RunOnce` is hindsight_cli's supervisor: the run-once command with the same handling of load/,
until no input runs (as upstream's hindsight_cli).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hindsight_py.config import (
    ConfigError,
    HindsightConfig,
    PluginConfig,
    load_plugin_config,
    previous_analysis_thread,
    write_runtime_cfg,
)
from hindsight_py.load_path import Dropped, LoadDir, clear_markers, run_path_of
from hindsight_py.runner import ProcessSpec
from hindsight_py.supervisor import STATUS_SYSTEM_ERROR, Summary, Supervisor
from hindsight_py.supervisor import run as run_supervisor

#: seconds between scans of sandbox_load_path (upstream reads its inotify events every second)
SCAN_INTERVAL = 1.0


class Daemon(Supervisor):
    def __init__(self, hs: HindsightConfig, plugins: list[PluginConfig], log_level: int,
                 shutdown_timeout: float = 60.0) -> None:
        super().__init__(hs, plugins, log_level, shutdown_timeout)
        self.load_dir = LoadDir(hs.resolve(hs.sandbox_load_path)) if hs.sandbox_load_path else None
        if self.load_dir is not None and not self.load_dir.watched:
            self.log(4, f"inotify is not available: a file in {hs.sandbox_load_path} is taken once it stays "
                        "unchanged for about a second (write it elsewhere and mv it in)")
        self._next_scan = 0.0
        #: process labels to stop (if running) and start again with the plugins configured then
        self._restarts: list[str] = []
        #: the final counters of plugin instances replaced during the run, summed per plugin name
        self._retired: dict[str, dict[str, int]] = {}

    # -- Supervisor hooks ---------------------------------------------------------------------
    def finished(self) -> bool:
        return self.stopping

    def stages_may_drain(self) -> bool:
        return self.stopping

    def exit_status(self) -> int:
        return self.summary.status & STATUS_SYSTEM_ERROR

    def tick(self) -> None:
        if self.stopping:
            return
        self._scan_load_dir()
        if self._restarts:
            self._restart_pending()

    def run(self) -> Summary:
        try:
            summary = super().run()
        finally:
            if self.load_dir is not None:
                self.load_dir.close()
        for name, retired in self._retired.items():
            current = summary.stats.get(name, {})
            summary.stats[name] = {k: current.get(k, 0) + retired.get(k, 0) for k in {*current, *retired}}
        return summary

    # -- load/ --------------------------------------------------------------------------------
    def _scan_load_dir(self, now_or_never: bool = False) -> int:
        """Handle what is ready in load/ (once per SCAN_INTERVAL, or now); how many files that was."""
        now = time.monotonic()
        if self.load_dir is None or (now < self._next_scan and not now_or_never):
            return 0
        self._next_scan = now + SCAN_INTERVAL
        ready, ignored = self.load_dir.scan()
        for path in ignored:
            self.log(7, f"{self._shown(path)} ignored (not a .cfg, .off, .lua or .py file)")
        for dropped in ready:
            self._handle(dropped)
        return len(ready)

    def _handle(self, dropped: Dropped) -> None:
        try:
            if dropped.kind == "source":
                self._load_source(dropped)
            elif dropped.kind == "cfg":
                self._load_cfg(dropped)
            else:
                self._unload(dropped)
        except OSError as e:  # a move that failed: said, and the daemon goes on
            self.log(3, f"{self._shown(dropped.path)}: {e}")

    def _load_source(self, dropped: Dropped) -> None:
        target = run_path_of(dropped, self.hs.run_dir)
        os.replace(dropped.path, target)
        self.log(6, f"{self._shown(target)} updated from {self._shown(dropped.path)}")
        for p in list(self.plugins):
            if p.source_path.absolute() == target.absolute():
                # as upstream, the plugins using that code restart with their run cfg
                self._start_from_run_cfg(p.cfg_path, p.type, p.cfg_path)

    def _load_cfg(self, dropped: Dropped) -> None:
        target = run_path_of(dropped, self.hs.run_dir)
        previous = target.with_name(target.name + ".previous")
        had_previous = target.exists()
        if had_previous:
            os.replace(target, previous)
        os.replace(dropped.path, target)
        if self._start_from_run_cfg(target, dropped.plugin_type, dropped.path):
            previous.unlink(missing_ok=True)
            return
        # refused: the dropped cfg goes back where the operator put it, the running one stays
        os.replace(target, dropped.path)
        if had_previous:
            os.replace(previous, target)
        assert self.load_dir is not None
        self.load_dir.keep(dropped.path)

    def _start_from_run_cfg(self, cfg: Path, plugin_type: str, dropped: Path) -> bool:
        """Load `cfg` (in run/) and (re)start its plugin; False (and an .err) if it does not load."""
        try:
            plugin = load_plugin_config(self._shown(cfg), plugin_type, self.hs, self.log_level, os.getpid())
        except ConfigError as e:
            # named as the operator dropped it (the run/ path it was checked under is temporary)
            reason = e.reason.replace(self._shown(cfg), self._shown(dropped))
            self.log(3, f"loading {self._shown(dropped)} failed: {reason} (refused: "
                        + ("it stays in load/; " if dropped != cfg else "") + "the running plugin, if any, is unchanged)")
            try:
                cfg.with_suffix(".err").write_text(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                                                   + f"\tloading {self._shown(dropped)} failed: {reason}\n")
            except OSError:
                pass
            return False
        clear_markers(cfg)
        self._replace(plugin)
        return True

    def _unload(self, dropped: Dropped) -> None:
        dropped.path.unlink()
        cfg = run_path_of(dropped, self.hs.run_dir, ".cfg")
        try:
            os.replace(cfg, run_path_of(dropped, self.hs.run_dir, ".off"))
        except FileNotFoundError:
            self.log(4, f"{dropped.plugin_name}: no {self._shown(cfg)} to turn off")
        plugin = self._plugin(dropped.plugin_name)
        if plugin is None:
            return
        self.plugins.remove(plugin)
        self.log(6, f"{plugin.name} stopping ({self._shown(dropped.path)})")
        self._restart(self._label(plugin))

    # -- processes ----------------------------------------------------------------------------
    def _replace(self, plugin: PluginConfig) -> None:
        old = self._plugin(plugin.name)
        if plugin.type == "analysis":
            self._assign_thread(plugin, old)
        write_runtime_cfg(plugin, self.hs.output_dir)
        if old is not None:
            self.plugins[self.plugins.index(old)] = plugin
            self._restart(self._label(old))
        else:
            self.plugins.append(plugin)
        self.summary.errors.pop(plugin.name, None)
        self.log(6, f"{plugin.name} {'replaced' if old is not None else 'loaded'}")
        self._restart(self._label(plugin))

    def _assign_thread(self, plugin: PluginConfig, old: PluginConfig | None) -> None:
        if plugin.thread is not None:
            return  # pinned: thread % analysis_threads
        threads = self.hs.analysis_threads
        thread = old.thread_id if old is not None else previous_analysis_thread(self.hs, plugin.name)
        if thread is None or thread >= threads:
            load = {t: 0 for t in range(threads)}
            for p in self.plugins:
                if p.type == "analysis" and p.thread_id is not None and p.name != plugin.name:
                    load[p.thread_id % threads] += 1
            thread = min(load, key=lambda t: (load[t], t))
        plugin.assigned_thread = thread

    def _restart(self, label: str) -> None:
        if label not in self._restarts:
            self._restarts.append(label)

    def _restart_pending(self) -> None:
        for label in list(self._restarts):
            running = [c for c in self.children if c.spec.label == label and not c.done]
            if running:
                for c in running:
                    if not c.stop_sent:
                        c.stop_sent = True
                        try:
                            c.conn.send(("stop",))
                        except OSError:
                            pass
                continue
            self._restarts.remove(label)
            self._retire(label)
            spec = self._spec_for(label)
            if spec is not None:
                self.start_process(spec)

    def _retire(self, label: str) -> None:
        """Forget the finished processes of `label`, keeping their plugins' final counters."""
        for c in [c for c in self.children if c.spec.label == label]:
            c.process.join(timeout=10)  # done: it exits right after saying so
            self.children.remove(c)
            for p in c.spec.plugins:
                stats = self.summary.stats.pop(p.name, None) or self.live_stats.get(p.name) or {}
                self.live_stats.pop(p.name, None)
                retired = self._retired.setdefault(p.name, {})
                for k, v in stats.items():
                    retired[k] = retired.get(k, 0) + v

    def _spec_for(self, label: str) -> ProcessSpec | None:
        if _is_thread_label(label):
            thread = int(label[len("analysis"):])
            plugins = [p for p in self.plugins if p.type == "analysis" and p.thread_id == thread]
            return self.spec("analysis", label, plugins, thread) if plugins else None
        plugin = self._plugin(label)
        return self.spec(plugin.type, label, [plugin]) if plugin is not None else None

    def _plugin(self, name: str) -> PluginConfig | None:
        return next((p for p in self.plugins if p.name == name), None)

    def _label(self, plugin: PluginConfig) -> str:
        return f"analysis{plugin.thread_id or 0}" if plugin.type == "analysis" else plugin.name

    def _shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.hs.base_dir))
        except ValueError:
            return str(path)


class RunOnce(Daemon):
    """`hindsight_cli` with a `sandbox_load_path`: the run-once command, except that load/ is
    handled as the daemon handles it while the run lasts (upstream's hindsight_cli does too).

    The run ends as upstream's: once no input plugin runs (the ones started from load/ included),
    the staged drain begins and load/ is no longer looked at. Before that decision load/ is looked
    at once more, so a plugin whose cfg an input wrote (and closed) before it ended is started,
    however soon it ended after writing it; a stop (`.off`) handled then can end the run at once.
    """

    def __init__(self, hs: HindsightConfig, plugins: list[PluginConfig], log_level: int,
                 shutdown_timeout: float = 60.0) -> None:
        super().__init__(hs, plugins, log_level, shutdown_timeout)
        self._inputs_ended = False
        #: final looks put off for files that may still be written (without inotify only)
        self._put_off = 0

    def finished(self) -> bool:
        return not self._restarts

    def stages_may_drain(self) -> bool:
        return self._inputs_ended or self.stopping

    def exit_status(self) -> int:
        return Supervisor.exit_status(self)

    def tick(self) -> None:
        if self.stopping or self._inputs_ended:
            return
        ended = self._no_input_runs()
        handled = self._scan_load_dir(now_or_never=ended)
        if self._restarts:
            self._restart_pending()
        if not ended or handled or self._restarts:
            return
        if self.load_dir is not None and self.load_dir.settling and self._put_off < 2:
            # without inotify a file seen once is not known to be complete: one more look
            self._put_off += 1
            self._next_scan = time.monotonic() + SCAN_INTERVAL
            return
        self._inputs_ended = True
        self.log(6, "input plugins have exited; cascading shutdown initiated")

    def _no_input_runs(self) -> bool:
        inputs = {p.name for p in self.plugins if p.type == "input"}
        running = any(not c.done for c in self.children if c.spec.kind == "input")
        return not running and not inputs.intersection(self._restarts)


def _is_thread_label(label: str) -> bool:
    return label.startswith("analysis") and label[len("analysis"):].isdigit()


def run(cfg_path: str, log_level: int = 6) -> int:
    return run_supervisor(cfg_path, log_level, supervisor=Daemon)


def run_once(cfg_path: str, log_level: int = 6) -> int:
    """hindsight_cli: the run-once supervisor, which also handles load/ while it runs."""
    return run_supervisor(cfg_path, log_level, supervisor=RunOnce)


__all__ = ["Daemon", "RunOnce", "run", "run_once"]
