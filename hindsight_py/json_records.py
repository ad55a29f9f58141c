"""Records of a JSON array framed as messages without building them as Python objects.

The tree input (plugins/cloudtrail_tree.py) reads files of ``{"Records": [...]}``. A record
written exactly as ``json.dumps(record, separators=(",", ":"), ensure_ascii=False)`` writes it
(as CloudTrail does) is its own compact JSON: its bytes are the Payload, and its eventTime and
string Fields are cut out of them. ``frame_json_records`` takes such records from an array and
stops at any other (the caller builds that one the slow way, from the parsed record); the C
loop is ``_speedups.frame_json_records``, the Python below its twin (tests/test_speedups.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

from hindsight_py import _accel
from hindsight_py.framing import frame_header
from hindsight_py.wire import encode_varint

_MAX_DEPTH = 64
_MAX_KEYS = 64  # per object
_SHORT = frozenset(b'"\\nrtbf')
_HEX = frozenset(b"0123456789abcdef")
_SPACE = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _string(b: bytes, p: int, end: int) -> tuple[int, bool]:
    """jr_string: the index after the string at p (-1: not as json.dumps writes it), escaped."""
    escaped = False
    p += 1
    while p < end:
        c = b[p]
        if c == 0x22:
            return p + 1, escaped
        if c < 0x20:
            return -1, escaped
        if c == 0x5C:
            if p + 1 >= end:
                return -1, escaped
            e = b[p + 1]
            escaped = True
            if e in _SHORT:
                p += 1
            elif (e == 0x75 and p + 5 < end and b[p + 2] == 0x30 and b[p + 3] == 0x30 and b[p + 4] in b"01"
                  and b[p + 5] in _HEX):
                if int(b[p + 4:p + 6], 16) in (8, 9, 10, 12, 13):
                    return -1, escaped
                p += 5
            else:
                return -1, escaped
        p += 1
    return -1, escaped


def _time(text: bytes) -> int | None:
    """jr_time: "YYYY-MM-DDTHH:MM:SSZ" of 1970-2200 in ns, else None."""
    if (len(text) != 20 or text[4:5] != b"-" or text[7:8] != b"-" or text[10:11] != b"T" or text[13:14] != b":"
            or text[16:17] != b":" or text[19:20] != b"Z"):
        return None
    parts = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    if not all(part and all(c in _DIGITS for c in part) for part in parts):
        return None
    y, m, d, h, mi, s = map(int, parts)
    if not 1970 <= y <= 2200:
        return None
    try:
        when = datetime(y, m, d, h, mi, s, tzinfo=UTC)
    except ValueError:
        return None
    return int((when - _EPOCH).total_seconds()) * 1_000_000_000


class _Record:
    __slots__ = ("start", "end", "ts", "time_at", "add_stamp", "fields")


def _record(b: bytes, p: int, end: int, names: list[bytes], stamp_key: bytes) -> _Record | None:
    """jr_record_scan."""
    r = _Record()
    r.start, r.time_at, r.add_stamp, r.ts = p, -1, bool(stamp_key), 0
    r.fields = [None] * len(names)
    if p >= end or b[p] != 0x7B:
        return None
    kinds: list[int] = []
    keys: list[set[bytes]] = []
    top_key: bytes | None = None
    state = "value"
    while True:
        if state == "key":
            if p >= end or b[p] != 0x22:
                return None
            kstart = p + 1
            p, _ = _string(b, p, end)
            if p < 0 or p >= end or b[p] != 0x3A:
                return None
            key = b[kstart:p - 1]
            if len(keys[-1]) == _MAX_KEYS or key in keys[-1]:
                return None
            keys[-1].add(key)
            if len(kinds) == 1:
                top_key = key
                if key == stamp_key:
                    r.add_stamp = False
            p += 1
        # a value at p
        if p >= end:
            return None
        vstart = p
        c = b[p]
        state = "after"
        if c in (0x7B, 0x5B):
            if len(kinds) == _MAX_DEPTH:
                return None
            kinds.append(c)
            keys.append(set())
            p += 1
            if p < end and b[p] == (0x7D if c == 0x7B else 0x5D):
                kinds.pop()
                keys.pop()
                p += 1
            elif c == 0x5B:
                state = "value"
                continue
            else:
                state = "key"
                continue
        elif c == 0x22:
            p, escaped = _string(b, p, end)
            if p < 0:
                return None
            if len(kinds) == 1 and top_key is not None and not _top_level_string(r, b, vstart, p, escaped,
                                                                                  top_key, names):
                return None
        else:
            p = _scalar(b, p, end)
            if p < 0 or (len(kinds) == 1 and top_key == b"eventTime"):
                return None
        # after a value
        p, state = _after_value(b, p, end, kinds, keys)
        if p < 0:
            return None
        if state == "end":
            r.end = p
            return r if r.time_at >= 0 else None


def _top_level_string(r: _Record, b: bytes, vstart: int, p: int, escaped: bool, key: bytes,
                      names: list[bytes]) -> bool:
    """A string value of the top-level object (b[vstart:p], quotes included) noted in `r` when
    `key` is one of `names` or eventTime; False when it cannot be used as it is."""
    for k, name in enumerate(names):
        if key == name:
            if escaped:
                return False
            r.fields[k] = (vstart + 1, p - vstart - 2)
    if key == b"eventTime":
        ts = _time(b[vstart + 1:p - 1]) if p - vstart == 22 else None
        if ts is None:
            return False
        r.ts, r.time_at = ts, vstart + 1
    return True


def _scalar(b: bytes, p: int, end: int) -> int:
    """The end of the integer, true, false or null at p, or -1 (a fraction or exponent too)."""
    c = b[p]
    if c == 0x2D or c in _DIGITS:
        if c == 0x2D:
            p += 1
        if p >= end or b[p] not in _DIGITS:
            return -1
        if b[p] == 0x30:
            p += 1
            if c == 0x2D:
                return -1
        else:
            while p < end and b[p] in _DIGITS:
                p += 1
        if p < end and (b[p] in b".eE" or b[p] in _DIGITS):
            return -1
        return p
    for literal in (b"true", b"false", b"null"):
        if b.startswith(literal, p):
            return p + len(literal)
    return -1


def _after_value(b: bytes, p: int, end: int, kinds: list[int], keys: list[set[bytes]]) -> tuple[int, str]:
    """Past the closing brackets after a value: where the next key or value starts and which
    ("key", "value"), or the record's end ("end"); -1 when the bytes there are not JSON."""
    while kinds:
        if p >= end:
            return -1, ""
        if b[p] == 0x2C:
            return p + 1, "key" if kinds[-1] == 0x7B else "value"
        if b[p] != (0x7D if kinds[-1] == 0x7B else 0x5D):
            return -1, ""
        p += 1
        kinds.pop()
        keys.pop()
    return p, "end"


def _skip(b: bytes, p: int, end: int) -> int:
    """jr_skip: the end of the JSON value at p by its brackets and strings, or -1."""
    depth = 0
    while p < end:
        c = b[p]
        if c == 0x22:
            p += 1
            while p < end and b[p] != 0x22:
                if b[p] == 0x5C:
                    p += 1
                p += 1
            if p >= end:
                return -1
            if depth == 0:
                return p + 1
        elif c in (0x7B, 0x5B):
            depth += 1
        elif c in (0x7D, 0x5D):
            depth -= 1
            if depth < 0:
                return -1
            if depth == 0:
                return p + 1
        elif depth == 0 and (c == 0x2C or c in _SPACE):
            return p
        p += 1
    return p if depth == 0 else -1


def frame_json_records(data: bytes, pos: int, max_records: int, uuids: bytes, head: bytes, tail: bytes,
                       names: list[bytes], stamp_key: bytes, max_size: int) -> tuple[bytes, int, int, int, int]:
    """(framed, count, pos, status, odd_end): the C source (_speedups.c) says what each is."""
    fast = _accel.speedups
    if fast is not None:
        return fast.frame_json_records(data, pos, max_records, uuids, head, tail, names, stamp_key, max_size)
    if len(names) > 16 or max_records < 0 or len(uuids) < 16 * max_records or any(len(n) > 100 for n in names):
        raise ValueError("frame_json_records: too many names or too long, or too few uuids")
    b, end = data, len(data)
    out: list[bytes] = []
    n, status, odd_end = 0, 0, -1
    pos = max(pos, 0)
    while pos < end and b[pos] in _SPACE:
        pos += 1
    while n < max_records:
        if pos < end and b[pos] == 0x5D:
            status = 1
            break
        r = _record(b, pos, end, names, stamp_key)
        raw = b""
        if r is not None:
            payload = b[r.start:r.end - 1]
            if r.add_stamp:
                payload += b',"' + stamp_key + b'":"' + b[r.time_at:r.time_at + 20] + b'"'
            payload += b"}"
            parts = [b"\x0a\x10", uuids[16 * n:16 * n + 16], b"\x10", encode_varint(r.ts), head, encode_varint(len(payload)),
                     payload, tail]
            for name, field in zip(names, r.fields, strict=True):
                if field is not None:
                    at, length = field
                    inner = b"\x0a" + encode_varint(len(name)) + name + b"\x22" + encode_varint(length) + b[at:at + length]
                    parts += (b"\x52", encode_varint(len(inner)), inner)
            raw = b"".join(parts)
        if r is None or len(raw) > max_size:
            status, odd_end = 2, _skip(b, pos, end)
            break
        out.append(frame_header(len(raw)))
        out.append(raw)
        n += 1
        pos = r.end
        while pos < end and b[pos] in _SPACE:
            pos += 1
        if pos < end and b[pos] == 0x2C:
            pos += 1
            while pos < end and b[pos] in _SPACE:
                pos += 1
        elif pos < end and b[pos] == 0x5D:
            status = 1
            break
        else:
            status = 3
            break
    return b"".join(out), n, pos, status, odd_end
