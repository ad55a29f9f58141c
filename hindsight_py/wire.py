"""The protobuf wire primitives the message modules share (message, message_dict, framing, peek,
json_records): varints, length-prefixed items, and text as bytes (UTF-8 with surrogateescape,
so invalid UTF-8 survives a round trip)."""

from __future__ import annotations

import re

MASK64 = (1 << 64) - 1
SIGN64 = 1 << 63
VARINT1 = [bytes((i,)) for i in range(128)]
TEXT_ENCODING = "utf-8"
TEXT_ERRORS = "surrogateescape"


class Malformed(Exception):
    """The protobuf item being read is malformed (the readers turn this into DecodeError or None)."""


# ---------------------------------------------------------------------------
# varints

def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Unsigned 64-bit varint at buf[pos]; at most 10 bytes, all before ``end``."""
    b = buf[pos] if pos < end else 0x80
    if b < 0x80:
        return b, pos + 1
    if pos + 9 <= end and buf[pos + 8] < 0x80:
        # nine bytes, the size of every timestamp since 1972: decode the low
        # four at once and cache the slowly changing high five
        x = int.from_bytes(buf[pos:pos + 4], "little")
        if x & 0x80808080 == 0x80808080:
            global _hi_cache
            hi = buf[pos + 4:pos + 9]
            cached = _hi_cache
            if hi != cached[0]:
                v, q = read_varint_loop(hi, 0, 5)
                if q != 5:
                    return read_varint_loop(buf, pos, end)
                cached = _hi_cache = (hi, v << 28)
            return (cached[1] | (x & 0x7F) | (x >> 1 & 0x3F80) | (x >> 2 & 0x1FC000)
                    | (x >> 3 & 0xFE00000)), pos + 9
    return read_varint_loop(buf, pos, end)


# (five high bytes, their value << 28), one tuple so threads see a consistent pair
_hi_cache: tuple[bytes, int] = (b"", 0)


def read_varint_loop(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & MASK64, pos
        shift += 7
    raise Malformed


#: Matches one varint (at most 10 bytes); used where only its end matters.
skip_varint = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]").match
uuid_ts_prefix = re.compile(rb"\x0a\x10[\x00-\xff]{16}\x10[\x80-\xff]{0,9}[\x00-\x7f]").match

_hi_enc_cache: tuple[int, bytes] = (-1, b"")


def encode_varint(v: int) -> bytes:
    if 0 <= v < 128:
        return VARINT1[v]
    v &= MASK64  # negatives become 10-byte two's complement varints, like upstream
    if v < 16384:
        return bytes(((v & 0x7F) | 0x80, v >> 7))
    if v >= 1 << 28:
        # the low 28 bits make four continuation bytes; the rest (a timestamp's
        # high part changes every 0.27 s) is cached
        global _hi_enc_cache
        hi = v >> 28
        cached = _hi_enc_cache
        if hi != cached[0]:
            cached = _hi_enc_cache = (hi, encode_varint(hi))
        return ((v & 0x7F) | (v << 1 & 0x7F00) | (v << 2 & 0x7F0000) | (v << 3 & 0x7F000000)
                | 0x80808080).to_bytes(4, "little") + cached[1]
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def signed64(v: int) -> int:
    return v - (1 << 64) if v & SIGN64 else v


def as_bytes(s: str | bytes) -> bytes:
    return s.encode(TEXT_ENCODING, TEXT_ERRORS) if type(s) is str else bytes(s)


def length_prefixed(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    n = len(data)
    return key, (VARINT1[n] if n < 128 else encode_varint(n)), data
