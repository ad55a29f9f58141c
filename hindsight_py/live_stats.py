"""The running daemon's figures, once a second: per-plugin counters and each reader's queue lag.

The supervisor builds one snapshot a second from what its children report and from hindsight.cp's
positions, and writes it to `<output_path>/stats.json` (tmp + rename) for `hindsight-py top`; the
Prometheus endpoint (metrics.py) serves the same snapshot.

Queue lag is exact in bytes: from a reader's checkpoint to the queue's head, over the queue files
between. In messages it is an estimate: the bytes over the mean size of the messages injected into
that queue this run (counting them would mean reading the backlog).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hindsight_py.metrics import MetricsServer
from hindsight_py.queue import list_ids, parse_position, queue_head
from hindsight_py.stats_files import StatsFiles

if TYPE_CHECKING:
    from hindsight_py.config import HindsightConfig, PluginConfig

#: the writer of each queue: inputs write "input", analysis plugins "analysis"
QUEUE_WRITERS = {"input": "input", "analysis": "analysis"}
STATS_FILE = "stats.json"


def lag_bytes(directory: Path, checkpoint: str | None, head: tuple[int, int] | None) -> int | None:
    """Bytes from `checkpoint` ("id:offset", None: the queue's start) to `head`; None without a head."""
    if head is None:
        return None
    ids = list_ids(directory)
    if checkpoint is None:
        start = (ids[0], 0) if ids else head
    else:
        try:
            start = parse_position(checkpoint)
        except ValueError:
            return None
    if start[0] == head[0]:
        return max(0, head[1] - start[1])
    total = head[1]
    for file_id in ids:
        if start[0] <= file_id < head[0]:
            try:
                size = (directory / f"{file_id}.log").stat().st_size
            except OSError:
                continue
            total += size - start[1] if file_id == start[0] else size
    return max(0, total)


def snapshot(plugins: list[Any], running: set[str], stats: dict[str, dict[str, int]],
             checkpoints: dict[str, Any], output_dir: Path, started: float) -> dict[str, Any]:
    """One second's figures (plain JSON types). `plugins` are PluginConfigs, `running` their names
    still running, `stats` the latest report of each."""
    plugin_rows: dict[str, Any] = {}
    for p in plugins:
        plugin_rows[p.name] = {"type": p.type, "running": p.name in running, **stats.get(p.name, {})}
    queues: dict[str, Any] = {}
    for queue, writer_type in QUEUE_WRITERS.items():
        head = queue_head(output_dir / queue)
        messages = sum(s.get("injected", 0) for name, s in plugin_rows.items() if s["type"] == writer_type)
        size = sum(s.get("inject_bytes", 0) for name, s in plugin_rows.items() if s["type"] == writer_type)
        queues[queue] = {"head": f"{head[0]}:{head[1]}" if head else None,
                         "mean_message_bytes": size / messages if messages else None}
    readers: dict[str, Any] = {}
    for reader, queue in _readers(plugins):
        key = f"{queue}->{reader}"
        head = queue_head(output_dir / queue)
        lag = lag_bytes(output_dir / queue, checkpoints.get(key), head)
        mean = queues[queue]["mean_message_bytes"]
        readers[key] = {"queue": queue, "reader": reader, "checkpoint": checkpoints.get(key), "lag_bytes": lag,
                        "lag_messages": round(lag / mean) if lag is not None and mean else None}
    return {"time": time.time(), "started": started, "plugins": plugin_rows, "queues": queues, "readers": readers}


def _readers(plugins: list[Any]) -> list[tuple[str, str]]:
    """(reader, queue) of every queue reader: each analysis thread reads input, outputs their queues."""
    found: list[tuple[str, str]] = []
    threads = sorted({p.assigned_thread or 0 for p in plugins if p.type == "analysis"})
    found += [(f"analysis{t}", "input") for t in threads]
    for p in plugins:
        if p.type == "output":
            if p.read_queue in ("both", "input"):
                found.append((p.name, "input"))
            if p.read_queue in ("both", "analysis"):
                found.append((p.name, "analysis"))
    return found


def write_stats_file(output_dir: Path, snap: dict[str, Any]) -> None:
    path = output_dir / STATS_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(snap, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:  # figures for people: never worth stopping the daemon for
        pass


def read_stats_file(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_dir / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None


class LiveStats:
    """What the supervisor publishes of its children's stats: plugins.tsv/utilization.tsv (on
    upstream's cadence), stats.json and, when hindsight.cfg asks for it, the metrics endpoint."""

    def __init__(self, hs: HindsightConfig) -> None:
        self.hs = hs
        self.stats_files = StatsFiles(hs.output_dir)
        self.started = time.time()
        #: the latest snapshot: what stats.json and the metrics endpoint show
        self.latest: dict[str, Any] | None = None
        self.metrics: MetricsServer | None = None

    def start_metrics(self, log: Callable[[int, str], None]) -> None:
        """The Prometheus endpoint, if configured (start it after forking the plugin processes:
        they need neither its thread nor its socket). A port in use is logged, not fatal."""
        if not self.hs.metrics_address:
            return
        try:
            self.metrics = MetricsServer(self.hs.metrics_address, lambda: self.latest)
        except (OSError, ValueError) as e:
            log(3, f"metrics_address {self.hs.metrics_address}: {e}")
            return
        log(6, f"serving metrics on http://{self.hs.metrics_address}/metrics")

    def publish(self, plugins: list[PluginConfig], running: list[PluginConfig], live: dict[str, dict[str, int]],
                final: dict[str, dict[str, int]], checkpoints: dict[str, Any]) -> None:
        """Once a second. `live`: the latest report of each plugin, `final`: the last one of those
        that exited."""
        self.stats_files.tick(running, live, self.hs.analysis_threads)
        self.latest = snapshot(plugins, {p.name for p in running}, {**live, **final}, checkpoints,
                               self.hs.output_dir, self.started)
        write_stats_file(self.hs.output_dir, self.latest)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


__all__ = ["STATS_FILE", "LiveStats", "lag_bytes", "read_stats_file", "snapshot", "write_stats_file"]
