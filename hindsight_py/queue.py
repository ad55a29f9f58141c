"""Framed queue files: a multi-process writer with roll-over and a tailing reader.

Layout (upstream's, docs/upstream-formats.md §7): ``<output_path>/input/<id>.log``
and ``<output_path>/analysis/<id>.log``, decimal ids from 0, each a sequence
of framed Heka messages. A position is ``(file id, byte offset)``, written
``"<id>:<offset>"`` in checkpoints.

What hindsight-py adds, in ``<queue dir>/.lock`` (a name upstream never uses):

- every append holds an exclusive ``flock`` on it, so any number of writer
  processes can share a queue;
- it stores the queue *head*, the ``(id, offset)`` just after the last complete
  append, updated after each append. Readers never read past the head, so
  they never see an append in progress; bytes past the head can only be left
  by a writer that died mid-append, and the next writer to take the lock
  truncates them (``QueueWriter.torn_bytes``). Where there is no ``.lock``
  (a queue written by upstream Hindsight) readers fall back to waiting at a
  partial record, as upstream does.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .framing import scan_records
from .message import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "Batch", "QueueReader", "QueueWriter", "format_position", "parse_position",
    "list_ids", "queue_head", "LOCK_NAME",
]

LOCK_NAME = ".lock"
_HEAD = struct.Struct("<QQQ")
_HEAD_MAGIC = 0x48696E6473696768  # "Hindsigh": a torn or foreign .lock fails the check
_LOG_NAME = re.compile(r"(\d+)\.log\Z")
_CHUNK = 1 << 20
# Gaps in the file ids are looked for at most this often while idle at EOF
# (a directory listing per poll would cost more than the poll).
_GAP_CHECK_INTERVAL = 1.0

Position = tuple[int, int]


def format_position(position: Position) -> str:
    """``(3, 1048576)`` -> ``"3:1048576"`` (the hindsight.cp form)."""
    return f"{position[0]}:{position[1]}"


def parse_position(text: str) -> Position:
    """``"3:1048576"`` -> ``(3, 1048576)``; raises ValueError naming the text."""
    m = re.fullmatch(r"(\d+):(\d+)", text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"invalid queue position {text!r}: expected '<file id>:<offset>'")
    return int(m.group(1)), int(m.group(2))


def list_ids(directory: Path) -> list[int]:
    """The ids of the ``<id>.log`` files in ``directory``, ascending ([] if it does not exist)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    ids = []
    for name in names:
        m = _LOG_NAME.match(name)
        if m:
            ids.append(int(m.group(1)))
    ids.sort()
    return ids


def _log_path(directory: Path, file_id: int) -> str:
    return os.path.join(directory, f"{file_id}.log")


def _read_head_fd(fd: int) -> Position | None:
    for _ in range(3):  # the head is rewritten in place: retry a torn read
        data = os.pread(fd, _HEAD.size, 0)
        if len(data) != _HEAD.size:
            return None
        file_id, offset, check = _HEAD.unpack(data)
        if check == file_id ^ offset ^ _HEAD_MAGIC:
            return file_id, offset
    return None


def queue_head(directory: Path) -> Position | None:
    """The queue head recorded by hindsight-py writers (None without one):
    the writer position for ``hindsight.cp``'s ``input``/``analysis`` keys."""
    try:
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _read_head_fd(fd)
    finally:
        os.close(fd)


def _last_record_end(fd: int, start: int, size: int) -> int:
    """Offset just after the last complete, valid record in [start, size)."""
    last = start
    pos = start
    buf = b""
    base = start
    records: list[bytes] = []
    ends: list[int] = []
    while True:
        data = os.pread(fd, min(_CHUNK * 4, size - (base + len(buf))), base + len(buf))
        final = not data
        buf += data
        resume, _ = scan_records(buf, pos - base, len(buf), 1 << 40, records, ends, base=base, final=final)
        if ends:
            last = ends[-1]
        records.clear()
        ends.clear()
        if final:
            return last
        pos = base + resume
        buf = buf[resume:]
        base = pos


class QueueWriter:
    """Appends framed records to a queue directory; safe across processes.

    Opens the newest ``<id>.log`` (``0.log`` if none). ``append`` rolls to
    ``id + 1`` once the file reaches ``output_size`` (so a file may exceed it by
    one append). Writes are not fsync()ed unless ``fsync`` is set: a killed
    process's writes survive in the page cache; only a power loss can lose them.

    ``torn_bytes`` counts the bytes of incomplete appends (left by a writer
    killed mid-write) that this writer truncated away; the caller logs it.
    """

    def __init__(self, directory: Path, output_size: int, *, fsync: bool = False) -> None:
        if output_size <= 0:
            raise ValueError("output_size must be positive")
        self.directory = Path(directory)
        self.output_size = output_size
        self.fsync = fsync
        self.torn_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fd = -1
        self._id = -1
        self._offset = 0
        # flock excludes other processes (and other descriptors); threads
        # sharing this writer share its descriptor, so they need a mutex too
        self._mutex = threading.Lock()
        with self._locked():
            self._open_newest()

    # -- public -------------------------------------------------------------

    def append(self, data: bytes) -> Position:
        """Append ``data`` (one or many framed records) in one locked write.

        Returns the position just after it, in the file it was written to.
        """
        if not data:
            return self.position()
        with self._locked():
            self._sync_with_head()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._fd)
            self._offset += len(data)
            end = (self._id, self._offset)
            self._write_head()
            if self._offset >= self.output_size:
                self._roll()
        return end

    def position(self) -> Position:
        """The queue head: where the next append will go (across all writers)."""
        head = _read_head_fd(self._lock_fd)
        return head if head is not None else (self._id, self._offset)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (all called with the lock held) ----------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._lock_fd < 0:
                raise ValueError("QueueWriter is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_file(self, file_id: int) -> None:
        fd = os.open(_log_path(self.directory, file_id),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._id = file_id

    def _open_newest(self) -> None:
        ids = list_ids(self.directory)
        newest = ids[-1] if ids else 0
        head = _read_head_fd(self._lock_fd)
        self._open_file(newest)
        size = os.fstat(self._fd).st_size
        if head is not None and head[0] == newest and head[1] <= size:
            start = head[1]
        else:
            # no usable head (a queue written by upstream, or files moved
            # under us): find the last complete record the slow way, once
            start = 0
        self._offset = self._cut_torn_tail(start, size)
        self._write_head()

    def _sync_with_head(self) -> None:
        head = _read_head_fd(self._lock_fd)
        if head is None:  # .lock damaged: rebuild it from the files
            self._open_newest()
            return
        if head[0] != self._id:
            self._open_file(head[0])
        size = os.fstat(self._fd).st_size
        if size != head[1]:
            # past the head: a writer died mid-append; short: the file was
            # truncated behind our back. Either way the file is the truth.
            self._offset = self._cut_torn_tail(min(head[1], size), size)
            self._write_head()
        else:
            self._offset = size

    def _cut_torn_tail(self, start: int, size: int) -> int:
        """Keep the complete records past ``start``, truncate what follows them."""
        if start >= size:
            return size
        # the append descriptor is write-only
        fd = os.open(_log_path(self.directory, self._id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            end = _last_record_end(fd, start, size)
        finally:
            os.close(fd)
        if end < size:
            os.ftruncate(self._fd, end)
            self.torn_bytes += size - end
        return end

    def _write_head(self) -> None:
        os.pwrite(self._lock_fd, _HEAD.pack(self._id, self._offset, self._id ^ self._offset ^ _HEAD_MAGIC), 0)

    def _roll(self) -> None:
        self._open_file(self._id + 1)
        if self.fsync:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._offset = os.fstat(self._fd).st_size
        self._write_head()


class Batch:
    """Records read from one queue file: ``records[i]`` is a raw protobuf
    message and ``ends[i]`` the offset just after it in ``file_id``."""

    __slots__ = ("file_id", "records", "ends")

    def __init__(self, file_id: int, records: list[bytes], ends: list[int]) -> None:
        self.file_id = file_id
        self.records = records
        self.ends = ends

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Batch(file_id={self.file_id}, records={len(self.records)}, end={self.ends[-1] if self.ends else None})"


class QueueReader:
    """Tails a queue directory from a position (None: the oldest file, offset 0).

    ``read_batch`` returns the complete records available now (None if none),
    never spanning two files. It moves to the next file once the current one
    is exhausted and a newer one exists, jumping over missing ids (as upstream's
    readers do). Corrupt bytes and records longer than ``max_message_size`` are
    skipped and counted in ``discarded_bytes``, which the caller reports.
    """

    def __init__(
        self,
        directory: Path,
        position: Position | None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        *,
        validate: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.max_message_size = max_message_size
        self.validate = validate
        self.discarded_bytes = 0
        self._want = position  # where to open, while no file is open
        self._fd = -1
        self._id = -1
        self._buf = b""
        self._start = 0  # index in _buf of the first unconsumed byte
        self._base = 0  # file offset of _buf[0]
        self._pos: Position = position if position is not None else (-1, 0)
        self._lock_fd = -1
        self._next_gap_check = 0.0

    # -- public -------------------------------------------------------------

    def read_batch(self, max_records: int = 1000, max_bytes: int = 4 << 20) -> Batch | None:
        while True:
            if self._fd < 0 and not self._open_wanted():
                return None
            head = self._head()
            if head is not None and head[0] == self._id:
                # the writers' file: everything up to the head is complete
                return self._read(head[1], True, max_records, max_bytes)
            final = head is not None and head[0] > self._id
            batch = self._read(None, final, max_records, max_bytes)
            if batch is not None:
                return batch
            if not final:
                # no head to go by (an upstream queue): the file is done only
                # once a newer one exists; then read what its writer added last
                if not self._newer_exists():
                    return None
                batch = self._read(None, True, max_records, max_bytes)
                if batch is not None:
                    return batch
            if not self._advance():
                return None

    def position(self) -> Position:
        """``(file id, offset)`` just after the last record returned
        (``(id + 1, 0)`` once a file is finished)."""
        if self._pos[0] < 0:
            ids = list_ids(self.directory)
            return (ids[0] if ids else 0), 0
        return self._pos

    def at_end(self) -> bool:
        """True when every complete record written so far has been returned and
        no partial data is pending (the shutdown drain's test)."""
        if self._fd < 0:
            if self._want is None:
                return not list_ids(self.directory)
            return not any(i >= self._want[0] for i in list_ids(self.directory))
        if self._start < len(self._buf):
            return False
        consumed = self._base + self._start
        head = self._head()
        if head is not None:
            if head[0] > self._id:
                return False
            if head[0] == self._id:
                return consumed >= head[1]
        if os.fstat(self._fd).st_size > consumed:
            return False
        return not any(i > self._id for i in list_ids(self.directory))

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    def __enter__(self) -> QueueReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _head(self) -> Position | None:
        if self._lock_fd < 0:
            try:
                self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        return _read_head_fd(self._lock_fd)

    def _open_wanted(self) -> bool:
        want = self._want
        if want is not None:
            try:
                self._open(want[0], want[1])
                return True
            except FileNotFoundError:
                pass
        ids = list_ids(self.directory)
        if want is None:
            if not ids:
                return False
            self._open(ids[0], 0)
            return True
        later = [i for i in ids if i > want[0]]
        if not later:
            return False  # not written yet
        self._open(later[0], 0)
        return True

    def _open(self, file_id: int, offset: int) -> None:
        fd = os.open(_log_path(self.directory, file_id), os.O_RDONLY | os.O_CLOEXEC)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._id = file_id
        self._buf = b""
        self._start = 0
        self._base = offset
        self._pos = (file_id, offset)
        self._want = None

    def _read(self, limit: int | None, final: bool, max_records: int, max_bytes: int) -> Batch | None:
        """Records from the current file up to ``limit`` (None: EOF). ``final``:
        no more bytes will come before ``limit``/EOF, so a frame cut off there
        is garbage rather than a record still being written."""
        buf = self._buf
        start = self._start
        base = self._base
        if limit is not None:
            limit = max(limit, base + start)
            if base + len(buf) > limit:  # bytes read before the head was known
                buf = buf[:limit - base]
        records: list[bytes] = []
        ends: list[int] = []
        nbytes = 0
        eof = False
        while True:
            count = len(records)
            start, discarded = scan_records(
                buf, start, len(buf), self.max_message_size, records, ends, base=base,
                validate=self.validate, final=eof and final,
                max_records=max_records - count, max_bytes=max_bytes - nbytes)
            self.discarded_bytes += discarded
            if len(records) > count:
                nbytes += sum(map(len, records[count:]))
                if len(records) >= max_records or nbytes >= max_bytes:
                    break
            if eof:
                break
            # The next bytes, from the start of the frame still pending (read again rather than
            # copied from buf: a few hundred bytes instead of the whole new chunk), and enough for
            # any record whose frame has started.
            pending = len(buf) - start
            want = pending + (max(_CHUNK, self.max_message_size + 300 - pending) if pending else _CHUNK)
            if limit is not None:
                want = min(want, limit - base - start)
            data = os.pread(self._fd, want, base + start) if want > pending else b""
            if len(data) > pending:
                buf = data
                base += start
                start = 0
            else:
                eof = True
                if not final or start == len(buf):
                    break
        self._buf = buf
        self._start = start
        self._base = base
        if not records:
            return None
        self._pos = (self._id, ends[-1])
        return Batch(self._id, records, ends)

    def _newer_exists(self) -> bool:
        if os.path.exists(_log_path(self.directory, self._id + 1)):
            return True
        now = time.monotonic()
        if now < self._next_gap_check:
            return False
        self._next_gap_check = now + _GAP_CHECK_INTERVAL
        return any(i > self._id for i in list_ids(self.directory))

    def _advance(self) -> bool:
        """Move to the next existing file after the current, finished one."""
        current = self._id
        pending = len(self._buf) - self._start
        try:
            self._open(current + 1, 0)
        except FileNotFoundError:
            later = [i for i in list_ids(self.directory) if i > current]
            if not later:
                return False
            try:
                self._open(later[0], 0)
            except FileNotFoundError:
                return False
        self.discarded_bytes += pending
        return True
