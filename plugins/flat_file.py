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

from hindsight_py.plugin import dead_letter, inject_payloads, log, read_config

BLOCK_SIZE = 4 << 20

input_filename = read_config("input_filename")
message_type = read_config("message_type")
max_line = int(read_config("max_message_size") or 65536) - 200
if not input_filename:
    raise ValueError("input_filename must be set")


def _ship(lines: list[bytes], offsets_end: int) -> None:
    good = lines
    if max(map(len, lines), default=0) > max_line:
        good = []
        for x in lines:
            if len(x) > max_line:
                dead_letter(f"line of {len(x)} bytes exceeds max_message_size ({input_filename})", x)
            else:
                good.append(x)
    inject_payloads(good, offsets_end, type=message_type)


def process_message(checkpoint):
    offset = int(checkpoint or 0)
    count = 0
    with open(input_filename, "rb") as fh:
        size = fh.seek(0, 2)
        if offset > size:
            raise ValueError(
                f"the checkpoint (byte {offset}) is past the end of {input_filename} ({size} bytes): "
                "the file was replaced or truncated; remove this plugin's checkpoint to read it again"
            )
        fh.seek(offset)
        carry = b""  # the start of a line that continues in the next block
        while True:
            block = fh.read(BLOCK_SIZE)
            if not block:
                break
            # split the block itself (no copy of it): its last piece is an unfinished line
            lines = block.split(b"\n")
            rest = lines.pop()
            if carry:
                if not lines:
                    carry += rest
                    continue
                lines[0] = carry + lines[0]
            if lines:
                offset += len(block) - len(rest) + len(carry)
                carry = rest
                _ship(lines, offset)
                count += len(lines)
            else:
                carry = rest
        if carry:
            offset += len(carry)
            _ship([carry], offset)
            count += 1
    log(6, f"processed {count} lines")
    return 0
