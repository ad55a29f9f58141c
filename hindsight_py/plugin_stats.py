"""A plugin's statistics as Hindsight keeps them: counters and running timing averages.

The runner measures whole calls (a batch handed to process_message, a matcher over a batch, one
timer_event), two clock reads each, and adds the per-message mean of each call as one sample.
Upstream times one message per plugin every six seconds instead; per-call means cost as little
and follow the plugin's real load more closely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: the keys of the stats dict a runner reports for the tsv columns (plugins.tsv's order)
TSV_KEYS = ("injected", "inject_bytes", "processed", "failures", "mem_cur", "mem_max", "out_max", "ins_max",
            "mm_avg", "mm_sd", "pm_avg", "pm_sd", "te_avg", "te_sd")


class RunningStats:
    """Mean and sample standard deviation without keeping the samples (Welford, as lua_sandbox)."""

    __slots__ = ("count", "mean", "_sum")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._sum = 0.0

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.count += 1
        old = self.mean
        self.mean = old + (value - old) / self.count
        self._sum += (value - old) * (value - self.mean)

    @property
    def sd(self) -> float:
        return math.sqrt(self._sum / (self.count - 1)) if self.count > 1 else 0.0


@dataclass
class PluginTimings:
    """Per-message timings (ns) of one plugin, and its memory high-water mark."""

    matcher: RunningStats = field(default_factory=RunningStats)
    process: RunningStats = field(default_factory=RunningStats)
    timer: RunningStats = field(default_factory=RunningStats)
    mem_max: int = 0
    #: messages the plugin's read loop offered its matcher (utilization.tsv's rates)
    read: int = 0

    def call(self, stats: RunningStats, elapsed_ns: int, messages: int) -> None:
        if messages > 0:
            stats.add(elapsed_ns / messages)

    def as_dict(self, mem_cur: int) -> dict[str, int]:
        self.mem_max = max(self.mem_max, mem_cur)
        return {
            "mem_cur": mem_cur,
            "mem_max": self.mem_max,
            "mm_avg": round(self.matcher.mean), "mm_sd": round(self.matcher.sd),
            "pm_avg": round(self.process.mean), "pm_sd": round(self.process.sd),
            "te_avg": round(self.timer.mean), "te_sd": round(self.timer.sd),
            "read": self.read,
        }


__all__ = ["PluginTimings", "RunningStats", "TSV_KEYS"]
