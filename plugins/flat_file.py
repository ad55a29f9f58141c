"""Input plugin: one message per line of a file, the native counterpart of run/input/file.lua.

Each line becomes a message whose Payload is the line (without its newline), exactly as
file.lua with decoders.payload makes them, at a fraction of the cost. The checkpoint is the
byte offset after the last line on disk, so a restart resumes there. A final line without a
newline is a line too. A line too large for max_message_size is not cut and not dropped: it goes
to the dead-letter file with its offset.

Sample cfg::

    filename       = "flat_file.py"
    input_filename = "/data/cloudtrail.json"
    -- message_type = "cloudtrail"   -- optional Type header
"""

from __future__ import annotations

import os

from hindsight_py.plugin import dead_letter, inject_lines, log, read_config

BLOCK_SIZE = 4 << 20

input_filename = read_config("input_filename")
message_type = read_config("message_type")
if not input_filename:
    raise ValueError("input_filename must be set")


def process_message(checkpoint):
    offset = int(checkpoint or 0)
    count = 0

    def too_long(line: bytes, at: int) -> None:
        nonlocal count
        dead_letter(f"line of {len(line)} bytes exceeds max_message_size ({input_filename}, byte {offset + at})",
                    line)
        count += 1

    fd = os.open(input_filename, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            raise ValueError(
                f"the checkpoint (byte {offset}) is past the end of {input_filename} ({size} bytes): "
                "the file was replaced or truncated; remove this plugin's checkpoint to read it again"
            )
        want = BLOCK_SIZE
        while True:
            # Each block starts where the last whole line ended: the unfinished line at the end of
            # a block is read again with the next one instead of being carried over.
            block = os.pread(fd, want, offset)
            if not block:
                break
            last = block.rfind(b"\n")
            if len(block) < want:  # the end of the file: a last line without newline is a line too
                end = len(block)
            elif last >= 0:
                end = last + 1
            else:  # a line longer than the block: read more of it
                want *= 2
                continue
            count += inject_lines(block, offset + end, end=end, type=message_type, too_long=too_long)
            offset += end
            want = BLOCK_SIZE
    finally:
        os.close(fd)
    log(6, f"processed {count} lines")
    return 0
