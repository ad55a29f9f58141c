"""Reading a Heka message's headers and Payload without building a ``Message``: one header
(``header_of`` & co.), the Payloads of a batch (``payloads_of``, cut by shape), a header
selection and payloads with timestamps for whole batches. The hot path of matchers and outputs;
the batch loops have C twins in ``_speedups.c`` (tests/test_speedups.py compares them)."""

from __future__ import annotations

from hindsight_py import _accel
from hindsight_py.message import LOGGER, PAYLOAD, TIMESTAMP, TYPE, UUID, DecodeError
from hindsight_py.wire import (
    SIGN64,
    Malformed,
    read_varint,
    read_varint_loop,
    signed64,
    skip_varint,
    uuid_ts_prefix,
)


def header_of(raw: bytes, tag: int) -> bytes | int | None:
    """The last value of top-level ``tag`` in ``raw``: bytes for string headers
    and Uuid, int for Timestamp/Severity/Pid (the raw bytes of the last field
    for tag 10), None when absent. Raises DecodeError on malformed framing."""
    n = len(raw)
    found: bytes | int | None = None
    head = uuid_ts_prefix(raw)
    pos = 0 if head is None else head.end()
    try:
        while pos < n:
            key = raw[pos]
            pos += 1
            wt = key & 7
            if wt == 2:
                ln = raw[pos]
                if ln < 0x80:
                    pos += 1
                else:
                    ln, pos = read_varint(raw, pos, n)
                end = pos + ln
                if key >> 3 == tag:
                    found = raw[pos:end]
                pos = end
            elif wt == 0:
                if key >> 3 == tag:
                    v, pos = read_varint(raw, pos, n)
                    found = v - (1 << 64) if v & SIGN64 else v
                else:
                    m = skip_varint(raw, pos)
                    if m is None:
                        raise Malformed
                    pos = m.end()
            else:
                raise Malformed
    except (Malformed, IndexError):
        raise DecodeError(f"malformed message near offset {pos}") from None
    if pos > n:
        raise DecodeError("malformed message: truncated")
    if found is None and head is not None:
        # not repeated later: take it from the Uuid/Timestamp prefix
        if tag == TIMESTAMP:
            v = read_varint(raw, 19, n)[0]
            return v - (1 << 64) if v & SIGN64 else v
        if tag == UUID:
            return raw[2:18]
    return found


def payload_of(raw: bytes) -> bytes | None:
    return header_of(raw, PAYLOAD)  # type: ignore[return-value]


_HIGH_BITS = 0x8080808080808080


class _PayloadShape:
    """Where the Payload sits in messages whose headers are all alike but Uuid and Timestamp (one
    input's messages): the bytes between the Timestamp and the Payload, and those after it.

    Learned by walking one message. A message whose bytes there are the same parses the same
    way, so its Payload is cut out with a few comparisons instead of a walk."""

    def __init__(self, middle: bytes, tail: bytes) -> None:
        self.middle = middle  # from the end of the Timestamp (byte 28) to the Payload key, included
        self.length_at = 28 + len(middle)  # the Payload's length varint
        self.tail = tail

    @classmethod
    def learn(cls, raw: bytes) -> _PayloadShape | None:
        # Uuid, then a Timestamp of nine varint bytes (every time since 1972) end at byte 28
        if not cls._header_ok(raw):
            return None
        pos, n, payload_key, payload_end = 28, len(raw), -1, -1
        try:
            while pos < n:
                key = raw[pos]
                if key & 7 == 2:
                    length, start = read_varint(raw, pos + 1, n)
                    if key == 0x32:
                        payload_key, payload_end = pos, start + length  # the last one counts
                    pos = start + length
                elif key & 7 == 0:
                    pos = read_varint(raw, pos + 1, n)[1]
                else:
                    return None
        except (IndexError, Malformed, DecodeError):  # malformed: no shape to learn from it
            return None
        if payload_key < 0 or pos != n:
            return None
        return cls(raw[28:payload_key + 1], raw[payload_end:])

    @staticmethod
    def _header_ok(raw: bytes) -> bool:
        return (raw[:2] == b"\x0a\x10" and len(raw) > 28 and raw[18] == 0x10 and raw[27] < 0x80
                and int.from_bytes(raw[19:27], "little") & _HIGH_BITS == _HIGH_BITS)

    def cut(self, raws: list[bytes]) -> list[bytes | None]:
        """The Payload of each message of this shape; None for the others.
        (_speedups.cut_payloads is this loop in C.)"""
        fast = _accel.speedups
        if fast is not None:
            return fast.cut_payloads(raws, self.middle, self.length_at, self.tail)
        out: list[bytes | None] = []
        add = out.append
        middle, length_at, tail = self.middle, self.length_at, self.tail
        header_ok = self._header_ok
        for raw in raws:
            payload = None
            if raw.startswith(middle, 28) and len(raw) > length_at + 1 and header_ok(raw):
                pos = length_at
                length = raw[pos]
                if length < 0x80:
                    pos += 1
                elif raw[pos + 1] < 0x80:
                    length = (length & 0x7F) | (raw[pos + 1] << 7)
                    pos += 2
                else:
                    length = -1
                end = pos + length
                if length >= 0 and len(raw) - end == len(tail) and raw.endswith(tail):
                    payload = raw[pos:end]
            add(payload)
        return out


def payloads_of(raws: list[bytes]) -> list[bytes | None]:
    """``payload_of`` for a whole batch in one call: the output hot path.

    None for a message without a Payload, or whose framing is broken (the caller dead-letters
    those). Messages shaped like the first (one input's messages) have their Payload cut out
    without a walk."""
    shape = _PayloadShape.learn(raws[0]) if raws else None
    if shape is None:
        return _walk_payloads(raws)
    out = shape.cut(raws)
    if None in out:
        for i, payload in enumerate(out):
            if payload is None:
                out[i] = _walk_payloads([raws[i]])[0]
    return out


def _walk_payloads(raws: list[bytes]) -> list[bytes | None]:
    out: list[bytes | None] = []
    app = out.append
    skip = skip_varint
    for raw in raws:
        n = len(raw)
        found = None
        # every message starts with Uuid (tag 1, 16 bytes) and usually Timestamp (tag 2): skip both
        pos = 18 if raw[:2] == b"\x0a\x10" else 0
        if pos and raw[18:19] == b"\x10":
            m = skip(raw, 19)
            if m is not None:
                pos = m.end()
        try:
            while pos < n:
                key = raw[pos]
                pos += 1
                if key & 7 == 2:
                    ln = raw[pos]
                    if ln < 0x80:
                        pos += 1
                    else:
                        ln, pos = read_varint(raw, pos, n)
                    if key == 0x32:
                        found = raw[pos:pos + ln]
                    pos += ln
                elif key & 7 == 0:
                    while raw[pos] & 0x80:
                        pos += 1
                    pos += 1
                else:
                    found = None
                    break
        except (IndexError, Malformed, DecodeError):
            found = None
        app(found if pos <= n else None)
    return out


def type_of(raw: bytes) -> bytes | None:
    return header_of(raw, TYPE)  # type: ignore[return-value]


def logger_of(raw: bytes) -> bytes | None:
    return header_of(raw, LOGGER)  # type: ignore[return-value]


def timestamp_of(raw: bytes) -> int:
    ts = header_of(raw, TIMESTAMP)
    if ts is None:
        raise DecodeError("missing required field uuid: found timestamp: not found")
    return ts  # type: ignore[return-value]



def _walk(raw: bytes, tag: int) -> tuple[bool, int, int, int | None]:
    """The top-level keys of ``raw`` as header_of walks them: (framing sound, start and length of
    the last length-delimited ``tag`` (start -1: none), the last Timestamp as unsigned 64 bits or
    None). (_speedups' walk_message.)"""
    pos, n, start, length, stamp = 0, len(raw), -1, 0, None
    try:
        while pos < n:
            key = raw[pos]
            pos += 1
            if key & 7 == 2:
                v, pos = read_varint_loop(raw, pos, n)
                if v > n - pos:
                    return False, -1, 0, None
                if key >> 3 == tag:
                    start, length = pos, v
                pos += v
            elif key & 7 == 0:
                v, pos = read_varint_loop(raw, pos, n)
                if key >> 3 == TIMESTAMP:
                    stamp = v
            else:
                return False, -1, 0, None
    except Malformed:
        return False, -1, 0, None
    return True, start, length, stamp


def header_selection(raws: list[bytes], tag: int, value: bytes) -> list[int]:
    """For each message: 1 when its last top-level string header ``tag`` is exactly ``value``, 0
    when another or absent, -1 when its framing cannot be walked or it lacks a leading 16-byte
    Uuid or a Timestamp (decode those). (_speedups.header_selection is this loop in C.)"""
    fast = _accel.speedups
    if fast is not None:
        return fast.header_selection(raws, tag, value)
    out = []
    for raw in raws:
        verdict = -1
        if type(raw) is bytes and len(raw) > 18 and raw[:2] == b"\x0a\x10":
            ok, start, length, stamp = _walk(raw, tag)
            if ok and stamp is not None:
                verdict = int(start >= 0 and raw[start:start + length] == value)
        out.append(verdict)
    return out


def payloads_and_stamps(raws: list[bytes]) -> tuple[list[bytes | None], list[int | None]]:
    """Each message's Payload and Timestamp (signed), None where it has none or its framing is
    broken. (_speedups.payloads_and_stamps is this loop in C.)"""
    fast = _accel.speedups
    if fast is not None:
        return fast.payloads_and_stamps(raws)
    payloads: list[bytes | None] = []
    stamps: list[int | None] = []
    for raw in raws:
        ok, start, length, stamp = _walk(raw, PAYLOAD) if type(raw) is bytes else (False, -1, 0, None)
        payloads.append(raw[start:start + length] if ok and start >= 0 else None)
        stamps.append(signed64(stamp) if ok and stamp is not None else None)
    return payloads, stamps
