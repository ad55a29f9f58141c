"""`sandbox_load_path`: which files dropped into `load/<type>/` are ready, and the file moves into
`sandbox_run_path` that upstream Hindsight makes for them (the daemon and hindsight_cli alike).

When a file is ready, as upstream (src/hindsight.c watches load/<type>/ with inotify for
IN_CLOSE_WRITE | IN_MOVED_TO): once the program writing it closed it, or once it was renamed into
load/. A cfg written with one open/write/close (as a plugin's io.open, `cp` or `cat >` do) is
therefore read whole; a file written in several opens (`echo a > f; echo b >> f`) may be read
after the first, as upstream would: write elsewhere and `mv` it in to be safe. A file rewritten
again and again is handled at each close (a `.off` rewritten every second stops its plugin at the
first one).

Unlike upstream, files already in load/ when the watch starts are handled too: those (and every
file where inotify is not available, or after its event queue overflowed) are taken once they stay
unchanged (size and mtime) over two scans, since nothing says whether their writer is done.

The moves, as upstream (src/hs_config.c, hs_*_plugins.c):
- `<name>.lua` / `<name>.py`: moved to `run/<type>/`; the plugins using that source restart.
- `<name>.cfg`: `run/<type>/<name>.off` and `.err` are removed, the cfg is moved to
  `run/<type>/<name>.cfg`, and the plugin starts, or restarts if it was running.
- `<name>.off`: removed from load/; `run/<type>/<name>.cfg` is renamed to `<name>.off` and the
  plugin stops.
Any other file is left where it is.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path

PLUGIN_TYPES = ("input", "analysis", "output")
SOURCE_SUFFIXES = (".lua", ".py")
#: what a scan hands over first: sources before the cfgs that use them, stops last
_ORDER = {".lua": 0, ".py": 0, ".cfg": 1, ".off": 2}

# <sys/inotify.h>
_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_Q_OVERFLOW = 0x8, 0x80, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


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


class _Watch:
    """inotify on the load/<type>/ directories: the files closed after writing or moved in."""

    def __init__(self, fd: int, dirs: dict[int, Path]) -> None:
        self._fd = fd
        self._dirs = dirs

    @classmethod
    def open(cls, dirs: list[Path]) -> _Watch | None:
        """The watch, or None where inotify is not available (not Linux, or its limits reached)."""
        try:
            libc = ctypes.CDLL(None)  # the C library the interpreter runs on
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        watched = {}
        for d in dirs:
            wd = libc.inotify_add_watch(fd, os.fsencode(d), _IN_CLOSE_WRITE | _IN_MOVED_TO)
            if wd >= 0:
                watched[wd] = d
        return cls(fd, watched)

    def read(self) -> tuple[set[Path], bool]:
        """(the files named by the events since the last read; whether some events were lost)."""
        named: set[Path] = set()
        lost = False
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return named, lost
            except OSError:
                return named, True
            offset = 0
            while offset + _EVENT.size <= len(buf):
                wd, mask, _, length = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    lost = True
                elif wd in self._dirs and name:
                    named.add(self._dirs[wd] / os.fsdecode(name))

    def close(self) -> None:
        os.close(self._fd)


class LoadDir:
    """The files of load/ that are ready: closed by their writer or moved in (inotify), else (files
    there before the watch, or no inotify) unchanged since the previous scan."""

    def __init__(self, root: Path, watch: bool = True) -> None:
        self.root = root
        self._watch = _Watch.open([root / t for t in PLUGIN_TYPES]) if watch else None
        #: the files whose writer may not be done, as far as the watch knows (all without one)
        self._unknown: set[Path] | None = (
            {path for _, path, _ in self._files()} if self._watch is not None else None)
        self._previous: dict[Path, tuple[int, int]] = {}
        #: files handled but left in place (a refused cfg), until they change
        self._kept: dict[Path, tuple[int, int]] = {}
        self._ignored: set[Path] = set()
        #: files the last scan saw that may become ready without another event (two-scan rule)
        self.settling: list[Path] = []

    @property
    def watched(self) -> bool:
        """Whether readiness comes from inotify (else from the two-scan rule only)."""
        return self._watch is not None

    def _files(self) -> list[tuple[str, Path, os.stat_result]]:
        files = []
        for plugin_type in PLUGIN_TYPES:
            try:
                entries = sorted(os.scandir(self.root / plugin_type), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_file():
                        files.append((plugin_type, Path(entry.path), entry.stat()))
                except OSError:
                    continue
        return files

    def scan(self) -> tuple[list[Dropped], list[Path]]:
        """(the files ready to be handled, in order; the files seen for the first time that no
        rule takes, to be reported once)."""
        events, lost = self._watch.read() if self._watch is not None else (set(), False)
        current: dict[Path, tuple[int, int]] = {}
        ready: list[Dropped] = []
        ignored: list[Path] = []
        settling: list[Path] = []
        for plugin_type, path, st in self._files():
            suffix = path.suffix
            if suffix not in _ORDER or len(path.name) <= len(suffix) or path.name.startswith("."):
                if path not in self._ignored:
                    self._ignored.add(path)
                    ignored.append(path)
                continue
            signature = (st.st_size, st.st_mtime_ns)
            current[path] = signature
            if path in events:
                ready.append(Dropped(plugin_type, path))
            elif self._kept.get(path) == signature:
                continue
            elif self._unknown is None or lost or path in self._unknown:
                if self._previous.get(path) == signature:
                    ready.append(Dropped(plugin_type, path))
                else:
                    settling.append(path)
        self._previous = current
        if self._unknown is not None:
            self._unknown = {p for p in self._unknown if p in current and p not in events} | (
                set(settling) if lost else set())
        self._kept = {p: sig for p, sig in self._kept.items() if p in current and p not in events}
        self.settling = [p for p in settling if p not in {d.path for d in ready}]
        ready.sort(key=lambda d: (_ORDER[d.path.suffix], PLUGIN_TYPES.index(d.plugin_type), d.path.name))
        return ready, ignored

    def keep(self, path: Path) -> None:
        """Leave `path` in load/ and do not hand it over again until it changes."""
        try:
            st = path.stat()
        except OSError:
            return
        self._kept[path] = (st.st_size, st.st_mtime_ns)
        if self._unknown is not None:
            self._unknown.discard(path)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


def run_path_of(dropped: Dropped, run_dir: Path, suffix: str | None = None) -> Path:
    """Where `dropped` goes in sandbox_run_path (with another suffix: its .cfg, .off or .err)."""
    name = dropped.path.name if suffix is None else dropped.stem + suffix
    return run_dir / dropped.plugin_type / name


def clear_markers(cfg_in_run: Path) -> None:
    """Before a (re)start, as upstream: the .off and .err beside the run cfg go."""
    for suffix in (".off", ".err"):
        cfg_in_run.with_suffix(suffix).unlink(missing_ok=True)


__all__ = ["Dropped", "LoadDir", "PLUGIN_TYPES", "clear_markers", "run_path_of"]
