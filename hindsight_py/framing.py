"""Stream framing of Heka messages (0x1E, H, header (0x08 varint(len)), 0x1F, message):
framing, scanning queue files and streams with upstream's resynchronisation, and the fast
encoders of whole batches of Payload-only messages (from payloads or straight from a block of
lines) and of records with their own Timestamp and string Fields. The batch loops have C twins
in ``_speedups.c`` (tests/test_speedups.py compares them)."""

from __future__ import annotations

from hindsight_py import _accel
from hindsight_py.message import DEFAULT_MAX_MESSAGE_SIZE, is_valid, random_uuids
from hindsight_py.wire import SIGN64, VARINT1, as_bytes, encode_varint, length_prefixed


def frame_header(length: int) -> bytes:
    """The stream header for a ``length``-byte message (Hindsight's: H = 1 + len(varint))."""
    v = encode_varint(length)
    return b"\x1e" + VARINT1[len(v) + 1] + b"\x08" + v + b"\x1f"


def frame(raw: bytes) -> bytes:
    return frame_header(len(raw)) + raw


def scan_records(
    buf: bytes,
    pos: int,
    end: int,
    max_message_size: int,
    records: list[bytes],
    ends: list[int],
    *,
    base: int = 0,
    validate: bool = True,
    final: bool = False,
    max_records: int = 1 << 62,
    max_bytes: int = 1 << 62,
) -> tuple[int, int]:
    """Append the framed records found in ``buf[pos:end]`` to ``records`` (their
    protobuf bytes) and ``ends`` (``base`` + the index just after each).

    Resynchronises like upstream: scan to the next 0x1E; a bad header, a
    missing 0x1F, a length of 0 or over ``max_message_size``, or a record
    failing ``is_valid`` (when ``validate``) costs one byte, counted as
    discarded. A frame cut off by ``end`` stops the scan, to be completed by
    more data, unless ``final`` says no more data will come: then it is
    garbage too and scanning goes on past its first byte.

    Stops after ``max_records`` records or once ``max_bytes`` of them have
    been collected. Returns ``(resume, discarded)``: where to continue (the
    start of a pending partial frame, or ``end``) and the bytes skipped.
    """
    fast = _accel.speedups
    if fast is not None and not validate:
        # the quick loop in C (hindsight_py/_speedups.c); it stops where the Python one would
        pos, count, nbytes = fast.scan_quick(buf, pos, end, max_message_size, records, ends, base, max_records,
                                             max_bytes)
    else:
        pos, count, nbytes = _scan_quick(buf, pos, end, max_message_size, records, ends, base, validate,
                                         max_records, max_bytes)
    if count >= max_records or nbytes >= max_bytes:
        return pos, 0
    return _scan_general(buf, pos, end, max_message_size, records, ends, base, validate, final,
                         max_records - count, max_bytes - nbytes)


def _scan_quick(buf: bytes, pos: int, end: int, max_message_size: int, records: list[bytes], ends: list[int],
                base: int, validate: bool, max_records: int, max_bytes: int) -> tuple[int, int, int]:
    """The frames every writer makes for messages of 128 B to 2 MB (0x1E, H = 3 or 4, 0x08, a 2- or
    3-byte varint, 0x1F), read with a few comparisons each, until the first other one or one near
    `end` (left to the general loop, which reads them exactly as before). Returns where it
    stopped, and how many records and bytes it collected."""
    append = records.append
    append_end = ends.append
    count = 0
    nbytes = 0
    limit = end - 7
    while pos < limit and buf[pos] == 0x1E and buf[pos + 2] == 0x08:
        h = buf[pos + 1]
        b0 = buf[pos + 3]
        b1 = buf[pos + 4]
        if h == 3 and buf[pos + 5] == 0x1F and b0 >= 0x80 and 0 < b1 < 0x80:
            hend = pos + 6
            mend = hend + ((b0 & 0x7F) | (b1 << 7))
        elif h == 4 and buf[pos + 6] == 0x1F and b0 >= 0x80 and b1 >= 0x80 and 0 < buf[pos + 5] < 0x80:
            hend = pos + 7
            mend = hend + ((b0 & 0x7F) | ((b1 & 0x7F) << 7) | (buf[pos + 5] << 14))
        else:
            break
        if mend > end or mend - hend > max_message_size:
            break
        raw = buf[hend:mend]
        if validate and not is_valid(raw):
            break
        append(raw)
        append_end(base + mend)
        pos = mend
        count += 1
        nbytes += mend - hend
        if count >= max_records or nbytes >= max_bytes:
            break
    return pos, count, nbytes


def _frame_length(buf: bytes, pos: int, hend: int) -> int:
    """The message length in the header of the frame at `pos` (ending at `hend`), or 0 when the
    header is not 0x08 and a varint that ends inside it followed by 0x1F."""
    if buf[hend - 1] != 0x1F or buf[pos + 2] != 0x08:
        return 0
    p = pos + 3
    stop = min(hend - 1, p + 10)
    shift = 0
    msglen = 0
    while p < stop:
        b = buf[p]
        msglen |= (b & 0x7F) << shift
        p += 1
        if b < 0x80:
            return msglen if msglen < SIGN64 else 0  # upstream reads a signed long long
        shift += 7
    return 0


def _scan_general(buf: bytes, pos: int, end: int, max_message_size: int, records: list[bytes], ends: list[int],
                  base: int, validate: bool, final: bool, max_records: int, max_bytes: int) -> tuple[int, int]:
    """Any frame, resynchronising after garbage (scan_records' rules); `(resume, discarded)`."""
    find = buf.find
    count = 0
    nbytes = 0
    discarded = 0
    while pos < end:
        if buf[pos] != 0x1E:
            p = find(b"\x1e", pos, end)
            if p < 0:
                return end, discarded + end - pos
            discarded += p - pos
            pos = p
        # a frame: 0x1E, H, header[H], 0x1F
        if pos + 2 > end:
            if final:
                return end, discarded + end - pos
            break
        hend = pos + buf[pos + 1] + 3
        if hend > end:
            if not final:
                break
            pos += 1
            discarded += 1
            continue
        msglen = _frame_length(buf, pos, hend)
        mend = hend + msglen
        if msglen == 0 or msglen > max_message_size or (mend > end and final):
            pos += 1
            discarded += 1
            continue
        if mend > end:
            break
        raw = buf[hend:mend]
        if validate and not is_valid(raw):
            pos += 1
            discarded += 1
            continue
        records.append(raw)
        ends.append(base + mend)
        pos = mend
        count += 1
        nbytes += msglen
        if count >= max_records or nbytes >= max_bytes:
            break
    return pos, discarded


def find_record(
    buf: bytes,
    pos: int = 0,
    end: int | None = None,
    *,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    validate: bool = True,
    final: bool = False,
) -> tuple[bytes | None, int, int]:
    """The next framed record in ``buf[pos:end]``: ``(raw, resume, discarded)``.

    ``raw`` is None when there is no complete record; ``resume`` is then where
    a possibly incomplete frame starts (keep ``buf[resume:]`` and add data).
    """
    records: list[bytes] = []
    ends: list[int] = []
    resume, discarded = scan_records(buf, pos, len(buf) if end is None else end, max_message_size,
                                     records, ends, validate=validate, final=final, max_records=1)
    return (records[0] if records else None), resume, discarded


def unframe(data: bytes, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, *,
            validate: bool = True) -> list[bytes]:
    """Every record in a complete framed buffer (garbage and partial frames skipped)."""
    records: list[bytes] = []
    scan_records(data, 0, len(data), max_message_size, records, [], validate=validate, final=True)
    return records



# ---------------------------------------------------------------------------
# the fast path for inputs: many Payload-only messages at once

_varint_cache: dict[int, bytes] = {}
_frame_cache: dict[int, bytes] = {}



def payload_message_parts(logger: str, hostname: str, pid: int | None, now_ns: int,
                           type: str | None) -> tuple[bytes, bytes]:
    """The bytes every Payload-only message of one batch shares: from the Timestamp to the
    Payload key, and the headers after the Payload."""
    head = b"\x10" + encode_varint(now_ns)
    if type is not None:
        head += b"".join(length_prefixed(b"\x1a", as_bytes(type)))
    head += b"".join(length_prefixed(b"\x22", as_bytes(logger))) + b"\x32"
    tail = b""
    if pid is not None:
        tail += b"\x40" + encode_varint(pid)
    tail += b"".join(length_prefixed(b"\x4a", as_bytes(hostname)))
    return head, tail


def encode_payloads(
    payloads: list[bytes],
    *,
    logger: str,
    hostname: str,
    pid: int | None,
    now_ns: int,
    type: str | None = None,
) -> bytes:
    """Framed protobuf for one message per payload, as ``encode(from_dict({"Payload": p}, ...))``
    would build them (restricted headers off), but about three times faster: the headers every
    message shares are encoded once, and each message costs a few list appends."""
    uuids = random_uuids(len(payloads))
    head, tail = payload_message_parts(logger, hostname, pid, now_ns, type)
    fast = _accel.speedups
    if fast is not None and isinstance(payloads, list):
        try:
            return fast.frame_payloads(payloads, uuids, head, tail)  # the loop below, in C
        except TypeError:  # an item that is not bytes (bytearray, memoryview): the loop takes those
            pass
    fixed = 18 + len(head) + len(tail)
    varints = _varint_cache
    frames = _frame_cache
    out: list[bytes] = []
    app = out.append
    at = 0
    for p in payloads:
        n = len(p)
        vl = varints.get(n)
        if vl is None:
            vl = varints[n] = encode_varint(n)
        size = fixed + len(vl) + n
        fh = frames.get(size)
        if fh is None:
            fh = frames[size] = frame_header(size)
        app(fh)
        app(b"\x0a\x10")
        app(uuids[at:at + 16])
        app(head)
        app(vl)
        app(p)
        app(tail)
        at += 16
    if len(varints) > 70000:  # bounded: payload sizes are bounded by max_message_size
        varints.clear()
        frames.clear()
    return b"".join(out)


def field_prefix(name: str) -> bytes:
    """The bytes of a one-string Field before its value's length: name, then the value_string key."""
    nb = as_bytes(name)
    return b"\x0a" + encode_varint(len(nb)) + nb + b"\x22"


def encode_records(
    payloads: list[bytes],
    stamps: list[int],
    fields: dict[str, list[str | None]],
    *,
    logger: str,
    hostname: str,
    pid: int | None,
    type: str | None = None,
) -> bytes:
    """Framed protobuf for one message per payload, each with its own Timestamp and string Fields,
    as ``encode(from_dict({"Payload": p, "Timestamp": t, "Type": type, "Fields": {...}}, ...))``
    would build them (restricted headers off) but for the Uuid. ``fields`` maps each field name to
    one value per message (a str, or None where that message has no such field), in order.
    (_speedups.frame_records is the loop below, in C.)"""
    n = len(payloads)
    uuids = random_uuids(n)
    head, tail = payload_message_parts(logger, hostname, pid, 0, type)
    head = head[2:]  # without the Timestamp (0x10, varint(0))
    names = [field_prefix(name) for name in fields]
    columns = list(fields.values())
    fast = _accel.speedups
    if fast is not None:
        try:
            return fast.frame_records(payloads, stamps, uuids, head, tail, names, columns)
        except (TypeError, ValueError, OverflowError):  # not bytes/str, lone surrogates: the loop takes those
            pass
    out: list[bytes] = []
    for i, p in enumerate(payloads):
        parts = [b"\x0a\x10", uuids[16 * i:16 * i + 16], b"\x10", encode_varint(stamps[i]), head, encode_varint(len(p)), p, tail]
        for prefix, column in zip(names, columns, strict=True):
            value = column[i]
            if value is not None:
                inner = prefix + b"".join(length_prefixed(b"", as_bytes(value)))
                parts += (b"\x52", encode_varint(len(inner)), inner)
        raw = b"".join(parts)
        out.append(frame_header(len(raw)))
        out.append(raw)
    return b"".join(out)




def split_lines(data: bytes | memoryview, start: int = 0, end: int | None = None) -> list[bytes]:
    """The lines of ``data[start:end]``: split at b"\\n", a last piece without one is a line too."""
    lines = bytes(data[start:end]).split(b"\n")
    if not lines[-1]:
        lines.pop()
    return lines


def encode_lines(
    data: bytes | memoryview,
    start: int,
    end: int,
    max_len: int,
    *,
    logger: str,
    hostname: str,
    pid: int | None,
    now_ns: int,
    type: str | None = None,
) -> tuple[bytes, int, int]:
    """``encode_payloads`` of the lines of ``data[start:end]`` (split_lines) up to the first one
    longer than ``max_len``: the framed messages, how many, and where that long line starts
    (``end`` if there is none). With the C loops the lines never become objects."""
    fast = _accel.speedups
    if fast is not None:
        count, stop = fast.count_lines(data, start, end, max_len)
        head, tail = payload_message_parts(logger, hostname, pid, now_ns, type)
        return fast.frame_lines(data, start, stop, random_uuids(count), head, tail), count, stop
    lines = split_lines(data, start, end)
    stop = start
    for i, line in enumerate(lines):
        if len(line) > max_len:
            del lines[i:]
            break
        stop += len(line) + 1
    else:
        stop = end
    framed = encode_payloads(lines, logger=logger, hostname=hostname, pid=pid, now_ns=now_ns, type=type)
    return framed, len(lines), stop
