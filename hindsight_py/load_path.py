"""The daemon's `sandbox_load_path`: which files dropped into `load/<type>/` are ready, and the
file moves into `sandbox_run_path` that upstream Hindsight makes for them.

Upstream reacts to inotify events; this module polls (the daemon scans about once a second), so
files already in load/ when the daemon starts are handled too. A file is taken only once it is
unchanged (size and mtime) over two scans, so a cfg still being written is never read half-way;
dropping files in with a rename is still the safest way.

The moves, as upstream (src/hs_config.c, hs_*_plugins.c):
- `<name>.lua` / `<name>.py`: moved to `run/<type>/`; the plugins using that source restart.
- `<name>.cfg`: `run/<type>/<name>.off` and `.err` are removed, the cfg is moved to
  `run/<type>/<name>.cfg`, and the plugin starts, or restarts if it was running.
- `<name>.off`: removed from load/; `run/<type>/<name>.cfg` is renamed to `<name>.off` and the
  plugin stops.
Any other file is left where it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PLUGIN_TYPES = ("input", "analysis", "output")
SOURCE_SUFFIXES = (".lua", ".py")
#: what a scan hands over first: sources before the cfgs that use them, stops last
_ORDER = {".lua": 0, ".py": 0, ".cfg": 1, ".off": 2}


@dataclass(frozen=True)
class Dropped:
    """A file in load/<type>/ that is ready to be handled."""

    plugin_type: str
    path: Path

    @property
    def kind(self) -> str:
        """"source", "cfg" or "off"."""
        suffix = self.path.suffix
        return "source" if suffix in SOURCE_SUFFIXES else suffix[1:]

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def plugin_name(self) -> str:
        """`<type>.<name>`, as the plugin is named (cfg and off files only)."""
        return f"{self.plugin_type}.{self.path.stem}"


class LoadDir:
    """The files of load/ that stayed unchanged since the previous scan."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._previous: dict[Path, tuple[int, int]] = {}
        #: files handled but left in place (a refused cfg), until they change
        self._kept: dict[Path, tuple[int, int]] = {}
        self._ignored: set[Path] = set()

    def scan(self) -> tuple[list[Dropped], list[Path]]:
        """(the files ready to be handled, in order; the files seen for the first time that no
        rule takes, to be reported once)."""
        current: dict[Path, tuple[int, int]] = {}
        ready: list[Dropped] = []
        ignored: list[Path] = []
        for plugin_type in PLUGIN_TYPES:
            try:
                entries = sorted(os.scandir(self.root / plugin_type), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                path = Path(entry.path)
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                suffix = path.suffix
                if suffix not in _ORDER or len(path.name) <= len(suffix) or path.name.startswith("."):
                    if path not in self._ignored:
                        self._ignored.add(path)
                        ignored.append(path)
                    continue
                signature = (st.st_size, st.st_mtime_ns)
                current[path] = signature
                if self._kept.get(path) == signature:
                    continue
                if self._previous.get(path) == signature:
                    ready.append(Dropped(plugin_type, path))
        self._previous = current
        self._kept = {p: sig for p, sig in self._kept.items() if p in current}
        ready.sort(key=lambda d: (_ORDER[d.path.suffix], PLUGIN_TYPES.index(d.plugin_type), d.path.name))
        return ready, ignored

    def keep(self, path: Path) -> None:
        """Leave `path` in load/ and do not hand it over again until it changes."""
        try:
            st = path.stat()
        except OSError:
            return
        self._kept[path] = (st.st_size, st.st_mtime_ns)


def run_path_of(dropped: Dropped, run_dir: Path, suffix: str | None = None) -> Path:
    """Where `dropped` goes in sandbox_run_path (with another suffix: its .cfg, .off or .err)."""
    name = dropped.path.name if suffix is None else dropped.stem + suffix
    return run_dir / dropped.plugin_type / name


def clear_markers(cfg_in_run: Path) -> None:
    """Before a (re)start, as upstream: the .off and .err beside the run cfg go."""
    for suffix in (".off", ".err"):
        cfg_in_run.with_suffix(suffix).unlink(missing_ok=True)


__all__ = ["Dropped", "LoadDir", "PLUGIN_TYPES", "clear_markers", "run_path_of"]
