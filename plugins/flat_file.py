"""Input plugin: one message per line of a file, the native counterpart of run/input/file.lua.

Each line becomes a message whose Payload is the line (without its newline), exactly as
file.lua with decoders.payload makes them, at a fraction of the cost. A line too large for
max_message_size is not cut and not dropped: it goes to the dead-letter file with its offset.

Two modes, chosen by ticker_interval:

- `ticker_interval = 0` (the default): one pass. The file is read to its end, a final line
  without newline is a line too, and the plugin is done. The checkpoint is the byte offset after
  the last line; a checkpoint past the end of the file stops the plugin with an error.
- `ticker_interval = N`: the file is followed (under the `hindsight` daemon, as `tail -F`). Every
  N seconds what was appended is read; a last line without its newline waits for it, so a record
  written in pieces becomes one message. When the name points to a new file (rotation), the old
  file is read to its end first (once it has not grown for `rotate_wait` seconds, default 10,
  so that a writer still holding it open can finish; its last line without newline is then a
  line), then the new one from byte 0. When the file shrinks below
  what was read (truncation, e.g. logrotate's copytruncate), it is read again from byte 0 and a
  warning says so: lines appended between the copy and the truncation are only in the copy.
  The checkpoint is `"<offset>@<inode>"`, so a rotation while the daemon was stopped is noticed
  at the next start (the new file is read from 0, with a warning).

Sample cfg::

    filename        = "flat_file.py"
    input_filename  = "/data/cloudtrail.json"
    -- message_type = "cloudtrail"   -- optional Type header
    -- ticker_interval = 5           -- follow the file, looking for more every 5 s
    -- rotate_wait = 10              -- following: seconds a rotated file must stay unchanged before it is done
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hindsight_py.plugin import dead_letter, inject_lines, inject_payloads, log, read_config

BLOCK_SIZE = 4 << 20
LOG_WARNING, LOG_INFO = 4, 6

input_filename = read_config("input_filename")
message_type = read_config("message_type")
follow = (read_config("ticker_interval") or 0) > 0
rotate_wait = float(read_config("rotate_wait") or 10)
if not input_filename:
    raise ValueError("input_filename must be set")


@dataclass
class _Open:
    """The file being read (followed across calls)."""

    fd: int
    inode: int
    offset: int
    rotated_size: int | None = None  # following a rotated file: its size when it last changed
    rotated_at: float = 0.0  # and when that was (time.monotonic())

    def checkpoint(self) -> str | int:
        return f"{self.offset}@{self.inode}" if follow else self.offset


_current: _Open | None = None
_waiting_said = False
_after_rotation = False  # the file was rotated and finished: the next one starts at byte 0


def _parse(checkpoint: object) -> tuple[int, int | None]:
    """(offset, inode or None) of a checkpoint: a byte offset, or "<offset>@<inode>"."""
    if checkpoint is None or checkpoint == "":
        return 0, None
    text = str(checkpoint)
    offset, _, inode = text.partition("@")
    return int(float(offset)), (int(inode) if inode else None)


def _read(f: _Open, final: bool) -> int:
    """Inject the whole lines from f.offset on (and a last line without newline when `final`)."""
    count = 0
    offset = f.offset

    def too_long(line: bytes, at: int) -> None:
        nonlocal count
        dead_letter(f"line of {len(line)} bytes exceeds max_message_size ({input_filename}, byte {offset + at})",
                    line)
        count += 1

    want = BLOCK_SIZE
    while True:
        # Each block starts where the last whole line ended: the unfinished line at the end of a
        # block is read again with the next one instead of being carried over.
        block = os.pread(f.fd, want, offset)
        if not block:
            break
        last = block.rfind(b"\n")
        if len(block) < want:  # the end of the file
            if final:
                end = len(block)  # a last line without newline is a line too
            elif last >= 0:
                end = last + 1
            else:
                break  # the unfinished line waits for its newline
        elif last >= 0:
            end = last + 1
        else:  # a line longer than the block: read more of it
            want *= 2
            continue
        f.offset = offset + end
        count += inject_lines(block, f.checkpoint(), end=end, type=message_type, too_long=too_long)
        offset = f.offset
        want = BLOCK_SIZE
    return count


def _open(offset: int, inode: int | None) -> _Open | None:
    global _waiting_said
    try:
        fd = os.open(input_filename, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not follow:
            raise
        if not _waiting_said:
            log(LOG_INFO, f"waiting for {input_filename} to appear")
            _waiting_said = True
        return None
    _waiting_said = False
    st = os.fstat(fd)
    if inode is not None and st.st_ino != inode:
        log(LOG_WARNING, f"{input_filename} is another file than the one read up to byte {offset} (inode {st.st_ino}, "
                         f"was {inode}): it was rotated while the plugin was stopped; reading the new file from "
                         "byte 0 (what the old file got after that byte was not read)")
        offset = 0
    elif offset > st.st_size:
        if not follow:
            os.close(fd)
            raise ValueError(
                f"the checkpoint (byte {offset}) is past the end of {input_filename} ({st.st_size} bytes): "
                "the file was replaced or truncated; remove this plugin's checkpoint to read it again"
            )
        log(LOG_WARNING, f"{input_filename} is shorter ({st.st_size} bytes) than what was read ({offset} bytes): "
                         "it was truncated; reading it again from byte 0")
        offset = 0
    return _Open(fd, st.st_ino, offset)


def _rotated(f: _Open) -> bool:
    """Whether the name points to another file now (or to none)."""
    try:
        return os.stat(input_filename).st_ino != f.inode
    except FileNotFoundError:
        return True


def _follow(checkpoint: object) -> int:
    global _current, _after_rotation
    if _current is None:
        _current = _open(0, None) if _after_rotation else _open(*_parse(checkpoint))
        if _current is None:
            return 0
        _after_rotation = False
        if _current.offset == 0:
            inject_payloads([], _current.checkpoint())  # which file, even before its first line
    f = _current
    size = os.fstat(f.fd).st_size
    if size < f.offset:
        log(LOG_WARNING, f"{input_filename} was truncated to {size} bytes after {f.offset} had been read: reading it "
                         "again from byte 0 (with copytruncate, lines written between the copy and the truncation "
                         "are only in the copy)")
        f.offset = 0
    count = _read(f, final=False)
    if _rotated(f):
        now = time.monotonic()
        if f.rotated_size != size:  # the writer may still be finishing it: look again later
            f.rotated_size, f.rotated_at = size, now
            return count
        if now - f.rotated_at < rotate_wait:
            return count
        count += _read(f, final=True)  # the old file is finished
        log(LOG_INFO, f"{input_filename} was rotated: read the old file to its end (byte {f.offset})")
        os.close(f.fd)
        _after_rotation = True
        _current = _open(0, None)
        if _current is not None:
            _after_rotation = False
            inject_payloads([], _current.checkpoint())
            count += _read(_current, final=False)
    return count


def process_message(checkpoint):
    if follow:
        count = _follow(checkpoint)
    else:
        f = _open(*_parse(checkpoint))
        assert f is not None
        try:
            count = _read(f, final=True)
        finally:
            os.close(f.fd)
    if count or not follow:
        log(LOG_INFO, f"processed {count} lines")
    return 0
