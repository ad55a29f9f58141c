"""plugins.tsv and utilization.tsv in output_path, in upstream Hindsight's format and cadence.

Hindsight's checkpoint writer runs once a second, arms a sample every sixth run and writes both
files on the run after it (tmp + rename), so they change every six seconds and the rates in
utilization.tsv are per six-second window. plugins.tsv lists the running plugins only: a plugin
that ended or was terminated drops out, which is how plugins_tsv.lua (lua_sandbox_extensions)
notices a termination and reports its .err file. The supervisor calls `tick` once a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hindsight_py.plugin_stats import TSV_KEYS

if TYPE_CHECKING:
    from hindsight_py.config import PluginConfig

SAMPLE_SECONDS = 6

PLUGINS_HEADER = ("Plugin", "Inject Message Count", "Inject Message Bytes", "Process Message Count",
                  "Process Message Failures", "Current Memory", "Max Memory", "Max Output", "Max Instructions",
                  "Message Matcher Avg (ns)", "Message Matcher SD (ns)", "Process Message Avg (ns)",
                  "Process Message SD (ns)", "Timer Event Avg (ns)", "Timer Event SD (ns)")
UTILIZATION_HEADER = ("Plugin", "Messages Processed", "% Utilization", "% Message Matcher", "% Process Message",
                      "% Timer Event")


def round_percentage(part: int, whole: int) -> int:
    """part/whole in percent, rounded to even at .5 (per mille first, as upstream)."""
    if whole == 0:
        return 0
    per_mille = int(part * 1000 / whole)
    rest = per_mille % 10
    percent = per_mille // 10
    if rest > 5 or (rest == 5 and percent % 2):
        percent += 1
    return percent


def _max_rate(total_ns: int, rate: int, max_rate: int) -> int:
    """The highest message rate seen or implied by the time a message takes (upstream's max mps)."""
    if total_ns and rate:
        ns_per_message = total_ns // rate
        implied = 1_000_000_000 // ns_per_message + 1 if ns_per_message else 1
        max_rate = max(max_rate, implied, rate)
    return max_rate


@dataclass
class _Window:
    """A plugin's counters at the previous write: what the six-second deltas are taken from."""

    processed: int = 0
    read: int = 0
    injected: int = 0


class StatsFiles:
    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._ticks = 0
        self._windows: dict[str, _Window] = {}
        self._max_rates: dict[str, int] = {}

    def tick(self, plugins: list[PluginConfig], stats: dict[str, dict[str, int]], analysis_threads: int) -> bool:
        """One run of the checkpoint writer's clock; writes the files on upstream's cadence.
        `plugins` are the running plugins, `stats` their latest reports. True when written."""
        due = self._ticks % SAMPLE_SECONDS == 1
        self._ticks += 1
        if not due:
            return False
        self.write(plugins, stats, analysis_threads)
        return True

    def write(self, plugins: list[PluginConfig], stats: dict[str, dict[str, int]], analysis_threads: int) -> None:
        deltas = {p.name: self._delta(p.name, stats.get(p.name, {})) for p in plugins}
        plugin_rows: list[list[object]] = []
        util_rows: list[list[object]] = []
        input_delta = 0
        for p in plugins:
            if p.type == "input":
                s = stats.get(p.name, {})
                row = [s.get(k, 0) for k in TSV_KEYS]
                row[8:10] = [0, 0]  # an input has no message matcher
                plugin_rows.append([p.name, *row])
                util_rows.append([p.name, deltas[p.name].injected, -1, -1, -1, -1])
                input_delta += deltas[p.name].injected
        for thread in range(analysis_threads):
            members = [p for p in plugins if p.type == "analysis" and (p.assigned_thread or 0) == thread]
            self._analysis_thread(thread, members, stats, deltas, input_delta, plugin_rows, util_rows)
        for p in plugins:
            if p.type == "output":
                s = stats.get(p.name, {})
                plugin_rows.append([p.name, *(s.get(k, 0) for k in TSV_KEYS)])
                d = deltas[p.name]
                mm, pm, te = self._times(p, s, d.read, d.processed)
                total = mm + pm + te
                rate = d.read // SAMPLE_SECONDS
                input_rate = input_delta // SAMPLE_SECONDS if p.read_queue in ("both", "input") else 0
                max_rate = self._max_rates[p.name] = _max_rate(total, rate, self._max_rates.get(p.name, 0))
                util_rows.append([p.name, d.processed, round_percentage(max(rate, input_rate), max_rate),
                                  round_percentage(mm, total), round_percentage(pm, total),
                                  round_percentage(te, total)])
        self._windows = {name: self._windows[name] for name in deltas}
        _replace(self.output_dir / "utilization.tsv", UTILIZATION_HEADER, util_rows)
        _replace(self.output_dir / "plugins.tsv", PLUGINS_HEADER, plugin_rows)

    def _analysis_thread(self, thread: int, members: list[PluginConfig], stats: dict[str, dict[str, int]],
                         deltas: dict[str, _Window], input_delta: int, plugin_rows: list[list[object]],
                         util_rows: list[list[object]]) -> None:
        label = f"analysis{thread}"
        read = max((deltas[p.name].read for p in members), default=0)  # the thread reads for all of them
        times = {p.name: self._times(p, stats.get(p.name, {}), read, deltas[p.name].processed) for p in members}
        mm_total = sum(t[0] for t in times.values())
        pm_total = sum(t[1] for t in times.values())
        te_total = sum(t[2] for t in times.values())
        total = mm_total + pm_total + te_total
        rate = read // SAMPLE_SECONDS
        max_rate = self._max_rates[label] = _max_rate(total, rate, self._max_rates.get(label, 0))
        utilization = min(255, round_percentage(max(rate, input_delta // SAMPLE_SECONDS), max_rate))
        util_rows.append([label, read, utilization, round_percentage(mm_total, total),
                          round_percentage(pm_total, total), round_percentage(te_total, total)])
        for p in members:
            plugin_rows.append([p.name, *(stats.get(p.name, {}).get(k, 0) for k in TSV_KEYS)])
            mm, pm, te = times[p.name]
            own = mm + pm + te
            if total == 0 or own == 0:
                util_rows.append([p.name, 0, 0, 0, 0, 0])
            else:
                util_rows.append([p.name, deltas[p.name].processed, round_percentage(own, total),
                                  round_percentage(mm, own), round_percentage(pm, own), round_percentage(te, own)])

    @staticmethod
    def _times(p: PluginConfig, s: dict[str, int], read: int, processed: int) -> tuple[int, int, int]:
        """Estimated ns spent in the window: matching, process_message, timer_event."""
        timer = int(s.get("te_avg", 0) * SAMPLE_SECONDS / p.ticker_interval) if p.ticker_interval else 0
        return int(s.get("mm_avg", 0) * read), int(s.get("pm_avg", 0) * processed), timer

    def _delta(self, name: str, s: dict[str, int]) -> _Window:
        now = _Window(s.get("processed", 0), s.get("read", 0), s.get("injected", 0))
        before = self._windows.get(name, _Window())
        self._windows[name] = now
        return _Window(max(0, now.processed - before.processed), max(0, now.read - before.read),
                       max(0, now.injected - before.injected))


def _replace(path: Path, header: tuple[str, ...], rows: list[list[object]]) -> None:
    """Write through a .tmp file and rename, so a reader never sees half a file. Failures are not
    fatal (upstream ignores them too): the stats are for people, the checkpoints are what matter."""
    text = "\t".join(header) + "\n" + "".join("\t".join(str(v) for v in row) + "\n" for row in rows)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


__all__ = ["PLUGINS_HEADER", "SAMPLE_SECONDS", "StatsFiles", "UTILIZATION_HEADER", "round_percentage"]
