"""Log lines in Hindsight's format: `<ns-epoch> [<level>] <component> <text>` on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LEVEL_NAMES = {0: "panic", 1: "alert", 2: "crit", 3: "error", 4: "warning", 5: "notice", 6: "info", 7: "debug"}

# On a terminal the supervisor keeps a live status line (no newline) at the bottom; a log line
# first erases it, so that the two never share a line. The status line is redrawn a moment later.
_ERASE_LINE = "\r\x1b[K"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Logger:
    def __init__(self, level: int = 6) -> None:
        self.level = level
        self._prefix = _ERASE_LINE if _stderr_is_terminal() else ""

    def __call__(self, level: int, component: str, text: str) -> None:
        if level > self.level:
            return
        line = f"{self._prefix}{time.time_ns()} [{LEVEL_NAMES.get(level, level)}] {component} {text}\n"
        # one write per line so that lines from several processes never interleave
        sys.stderr.write(line)
        sys.stderr.flush()

    def bind(self, component: str) -> Callable[[int, str], None]:
        def log(level: int, text: str) -> None:
            self(level, component, text)

        return log
