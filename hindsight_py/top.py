"""`hindsight-py top hindsight.cfg`: a live terminal view of a running daemon.

It reads what the daemon leaves in output_path, `stats.json` (once a second) and `utilization.tsv`
(every six seconds), so it needs no connection to the daemon and can run as any user who can read
that directory. Per plugin: state, rate, totals, dead letters, documents with fields moved aside,
the queue lag of its readers (bytes, and messages estimated from the mean message size) and its
utilization. `q` or ^C quits.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any

from hindsight_py.config import ConfigError, load_hindsight_config
from hindsight_py.live_stats import STATS_FILE, read_stats_file

#: a stats.json older than this means the daemon is not refreshing it
STALE_SECONDS = 5.0
COLUMNS = ("PLUGIN", "STATE", "RATE/s", "PROCESSED", "DELIVERED", "DEAD", "MOVED", "LAG BYTES", "LAG MSGS", "UTIL%")
WIDTHS = (34, 9, 8, 10, 10, 6, 6, 10, 9, 6)


def _line(cells: tuple[str, ...]) -> str:
    """The plugin name left-aligned, the figures right-aligned, in the columns' widths."""
    return cells[0].ljust(WIDTHS[0]) + "".join(c.rjust(w) for c, w in zip(cells[1:], WIDTHS[1:], strict=True))


def _rate_key(row: dict[str, Any]) -> str:
    if row["type"] == "input":
        return "injected"
    return "indexed" if row.get("indexed") else "processed"


def _utilization(output_dir: Path) -> dict[str, str]:
    try:
        lines = (output_dir / "utilization.tsv").read_text().splitlines()[1:]
    except OSError:
        return {}
    cells = [line.split("\t") for line in lines]
    return {c[0]: c[2] for c in cells if len(c) > 2 and c[2] != "-1"}


def _lags(snap: dict[str, Any], reader: str) -> tuple[int | None, int | None]:
    found = [r for r in snap.get("readers", {}).values() if r["reader"] == reader]
    if not found or any(r.get("lag_bytes") is None for r in found):
        return None, None
    messages = [r.get("lag_messages") for r in found]
    return (sum(r["lag_bytes"] for r in found),
            None if any(m is None for m in messages) else sum(m for m in messages if m is not None))


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def render(snap: dict[str, Any] | None, previous: dict[str, Any] | None, utilization: dict[str, str],
           source: Path, now: float) -> list[str]:
    """The screen's lines for one snapshot (`previous`: the one before, for the rates)."""
    if snap is None:
        return [f"hindsight-py top: waiting for {source / STATS_FILE} (is the daemon running?)", "", "q quits"]
    age = now - snap.get("time", 0)
    up = int(snap.get("time", 0) - snap.get("started", 0))
    head = f"hindsight-py top  {source}  up {up // 3600:d}:{up // 60 % 60:02d}:{up % 60:02d}"
    if age > STALE_SECONDS:
        head += f"  (no update for {age:.0f}s: is the daemon running?)"
    lines = [head, ""]
    lines.append(_line(COLUMNS))
    interval = snap["time"] - previous["time"] if previous else 0.0
    for name, row in snap.get("plugins", {}).items():
        key = _rate_key(row)
        rate: float | None = None
        if previous and interval > 0 and name in previous.get("plugins", {}):
            rate = max(0.0, (row.get(key, 0) - previous["plugins"][name].get(key, 0)) / interval)
        reader = name
        if row["type"] == "analysis":
            reader = next((r["reader"] for r in snap.get("readers", {}).values()
                           if r["reader"].startswith("analysis")), name)
        lag_b, lag_m = _lags(snap, reader) if row["type"] != "input" else (None, None)
        dead = row.get("dead_lettered", 0) + row.get("set_aside", 0)
        cells = (name, "running" if row.get("running") else "ended", _human(rate), _human(row.get("processed", 0)
                 if row["type"] != "input" else row.get("injected", 0)), _human(row.get("indexed", 0)),
                 _human(dead), _human(row.get("moved_aside", 0)), _human(lag_b), _human(lag_m),
                 utilization.get(name, "-"))
        lines.append(_line(cells))
    lines += ["", "q quits"]
    return lines


def _draw(lines: list[str]) -> None:
    sys.stdout.write("\x1b[H\x1b[2J" + "\r\n".join(lines) + "\r\n")
    sys.stdout.flush()


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help") or len(args) > 3:
        sys.stderr.write("usage: hindsight-py top <hindsight.cfg> [--interval SECONDS]\n")
        return 0 if args and args[0] in ("-h", "--help") else 1
    interval = 1.0
    if len(args) == 3 and args[1] == "--interval":
        try:
            interval = max(0.2, float(args[2]))
        except ValueError:
            sys.stderr.write(f"--interval takes seconds, not {args[2]!r}\n")
            return 1
    try:
        hs = load_hindsight_config(args[0])
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"{e}\n")
        return 1
    output_dir = hs.output_dir
    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    previous: dict[str, Any] | None = None  # the snapshot before the latest one: the rates' base
    latest: dict[str, Any] | None = None
    try:
        if interactive:
            tty.setcbreak(sys.stdin.fileno())
        sys.stdout.write("\x1b[?25l")  # no cursor blinking over the table
        while True:
            snap = read_stats_file(output_dir)
            if snap is not None and (latest is None or snap["time"] != latest["time"]):
                previous, latest = latest, snap
            _draw(render(snap, previous, _utilization(output_dir), Path(os.path.relpath(output_dir)), time.time()))
            ready = select.select([sys.stdin], [], [], interval)[0] if interactive else time.sleep(interval)
            if ready and sys.stdin.read(1) in ("q", "Q"):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.write("\x1b[?25h")
        sys.stdout.flush()
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


__all__ = ["main", "render"]
