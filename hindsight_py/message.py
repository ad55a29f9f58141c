"""The Heka message: its protobuf bytes, the Python object, and stream framing.

Byte-compatible with lua_sandbox/Hindsight (docs/upstream-formats.md §5):

- ``decode`` is as strict as the sandbox's ``decode_message`` (same error texts);
- ``encode`` writes fields in upstream's order, so a decoded upstream message
  re-encodes to the same bytes;
- ``frame`` / ``scan_records`` are the queue-file and stream framing, with
  upstream's byte-at-a-time resynchronisation over corrupt data;
- ``is_valid`` is the lighter check upstream's queue readers apply to each
  framed record, and ``header_of`` & co. read one header without building a
  ``Message`` (the hot path of matchers and outputs).

Header and string-field values are ``str`` decoded from UTF-8 with
``errors="surrogateescape"``: invalid UTF-8 survives a decode/encode round trip
byte for byte. Encoding accepts ``bytes`` wherever it accepts ``str``.
"""

from __future__ import annotations

import math
import os
import random
import re
import struct
from collections.abc import Mapping
from typing import Any

from hindsight_py import _accel

__all__ = [
    "STRING", "BYTES", "INTEGER", "DOUBLE", "BOOL", "DEFAULT_SEVERITY", "DEFAULT_MAX_MESSAGE_SIZE",
    "UUID", "TIMESTAMP", "TYPE", "LOGGER", "SEVERITY", "PAYLOAD", "ENV_VERSION", "PID", "HOSTNAME", "FIELDS",
    "DecodeError", "EncodeError", "Field", "Message",
    "decode", "encode", "is_valid", "from_dict", "random_uuid",
    "header_of", "payload_of", "timestamp_of", "type_of", "logger_of",
    "frame", "frame_header", "scan_records", "find_record", "unframe",
]

# Field value types (the protobuf enum).
STRING = 0
BYTES = 1
INTEGER = 2
DOUBLE = 3
BOOL = 4

#: What ``Severity`` reads as when the message has none.
DEFAULT_SEVERITY = 7
#: hindsight.cfg's default ``max_message_size``.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024

# Top-level protobuf tags.
UUID = 1
TIMESTAMP = 2
TYPE = 3
LOGGER = 4
SEVERITY = 5
PAYLOAD = 6
ENV_VERSION = 7
PID = 8
HOSTNAME = 9
FIELDS = 10

_MASK64 = (1 << 64) - 1
_SIGN64 = 1 << 63
_DOUBLE = struct.Struct("<d")
_VARINT1 = [bytes((i,)) for i in range(128)]
_ENC = "utf-8"
_ERRS = "surrogateescape"


class DecodeError(ValueError):
    """The bytes are not a valid Heka message (texts match the sandbox's)."""


class EncodeError(ValueError):
    """A message (or a dict meant to become one) cannot be encoded."""


class _Bad(Exception):
    """Internal: the protobuf item being read is malformed."""


class Field:
    """One entry of a message's ``Fields``; ``values`` is always a list."""

    __slots__ = ("name", "value_type", "representation", "values")

    def __init__(
        self,
        name: str,
        value_type: int = STRING,
        representation: str | None = None,
        values: list[Any] | None = None,
    ) -> None:
        self.name = name
        self.value_type = value_type
        self.representation = representation
        self.values = [] if values is None else values

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Field):
            return NotImplemented
        return (self.name, self.value_type, self.representation, self.values) == (
            other.name, other.value_type, other.representation, other.values)

    def __repr__(self) -> str:
        rep = f", representation={self.representation!r}" if self.representation is not None else ""
        return f"Field({self.name!r}, value_type={self.value_type}{rep}, values={self.values!r})"


class Message:
    """A decoded Heka message.

    Absent headers are ``None``. ``severity`` stays ``None`` when the bytes had
    no Severity; ``effective_severity`` gives what the sandbox reports (7).
    ``raw`` is the protobuf the message was decoded from (``None`` for a
    message built in Python); it is not kept in sync with attribute changes.
    """

    __slots__ = ("uuid", "timestamp", "type", "logger", "severity", "payload", "env_version", "pid",
                 "hostname", "fields", "raw")

    def __init__(
        self,
        uuid: bytes = bytes(16),
        timestamp: int = 0,
        *,
        type: str | None = None,
        logger: str | None = None,
        severity: int | None = None,
        payload: str | None = None,
        env_version: str | None = None,
        pid: int | None = None,
        hostname: str | None = None,
        fields: list[Field] | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.uuid = uuid
        self.timestamp = timestamp
        self.type = type
        self.logger = logger
        self.severity = severity
        self.payload = payload
        self.env_version = env_version
        self.pid = pid
        self.hostname = hostname
        self.fields = [] if fields is None else fields
        self.raw = raw

    @property
    def effective_severity(self) -> int:
        return DEFAULT_SEVERITY if self.severity is None else self.severity

    def field_value(self, name: str, fi: int = 0, ai: int = 0) -> Any:
        """``Fields[name][fi][ai]`` (zero-based), or None when missing.

        String fields give str, bytes fields bytes, integers int, doubles
        float, bools bool.
        """
        if fi < 0 or ai < 0:
            raise IndexError("field and array indices must be >= 0")
        for f in self.fields:
            if f.name == name:
                if fi == 0:
                    values = f.values
                    return values[ai] if ai < len(values) else None
                fi -= 1
        return None

    def to_dict(self) -> dict[str, Any]:
        """The table shape of the sandbox's ``decode_message``: headers that are
        present, plus ``Fields`` as a list of ``{name, value: [...],
        value_type, representation?}`` (``from_dict`` accepts it back)."""
        d: dict[str, Any] = {"Uuid": self.uuid, "Timestamp": self.timestamp}
        for key, value in (("Type", self.type), ("Logger", self.logger), ("Severity", self.severity),
                           ("Payload", self.payload), ("EnvVersion", self.env_version), ("Pid", self.pid),
                           ("Hostname", self.hostname)):
            if value is not None:
                d[key] = value
        if self.fields:
            out = []
            for f in self.fields:
                fd: dict[str, Any] = {"name": f.name, "value": list(f.values), "value_type": f.value_type}
                if f.representation is not None:
                    fd["representation"] = f.representation
                out.append(fd)
            d["Fields"] = out
        return d

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__ if s != "raw")

    def __repr__(self) -> str:
        parts = [f"uuid={self.uuid.hex()}", f"timestamp={self.timestamp}"]
        for s in ("type", "logger", "severity", "payload", "env_version", "pid", "hostname"):
            v = getattr(self, s)
            if v is not None:
                parts.append(f"{s}={v!r}")
        if self.fields:
            parts.append(f"fields={self.fields!r}")
        return f"Message({', '.join(parts)})"


# ---------------------------------------------------------------------------
# varints

def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
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
                v, q = _read_varint_loop(hi, 0, 5)
                if q != 5:
                    return _read_varint_loop(buf, pos, end)
                cached = _hi_cache = (hi, v << 28)
            return (cached[1] | (x & 0x7F) | (x >> 1 & 0x3F80) | (x >> 2 & 0x1FC000)
                    | (x >> 3 & 0xFE00000)), pos + 9
    return _read_varint_loop(buf, pos, end)


# (five high bytes, their value << 28), one tuple so threads see a consistent pair
_hi_cache: tuple[bytes, int] = (b"", 0)


def _read_varint_loop(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
    raise _Bad


#: Matches one varint (at most 10 bytes); used where only its end matters.
_skip_varint = re.compile(rb"[\x80-\xff]{0,9}[\x00-\x7f]").match
_uuid_ts_prefix = re.compile(rb"\x0a\x10[\x00-\xff]{16}\x10[\x80-\xff]{0,9}[\x00-\x7f]").match

_hi_enc_cache: tuple[int, bytes] = (-1, b"")


def _varint(v: int) -> bytes:
    if 0 <= v < 128:
        return _VARINT1[v]
    v &= _MASK64  # negatives become 10-byte two's complement varints, like upstream
    if v < 16384:
        return bytes(((v & 0x7F) | 0x80, v >> 7))
    if v >= 1 << 28:
        # the low 28 bits make four continuation bytes; the rest (a timestamp's
        # high part changes every 0.27 s) is cached
        global _hi_enc_cache
        hi = v >> 28
        cached = _hi_enc_cache
        if hi != cached[0]:
            cached = _hi_enc_cache = (hi, _varint(hi))
        return ((v & 0x7F) | (v << 1 & 0x7F00) | (v << 2 & 0x7F0000) | (v << 3 & 0x7F000000)
                | 0x80808080).to_bytes(4, "little") + cached[1]
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _signed(v: int) -> int:
    return v - (1 << 64) if v & _SIGN64 else v


# ---------------------------------------------------------------------------
# decoding

def decode(raw: bytes, *, fields: bool = True, payload: bool = True) -> Message:
    """Decode protobuf bytes into a Message, as strictly as ``decode_message``.

    ``fields=False`` / ``payload=False`` leave those out of the Message (still checked for
    framing): what a matcher that never looks at them needs, at a fraction of the cost."""
    want_fields, want_payload = fields, payload
    if type(raw) is not bytes:
        raw = bytes(raw)
    n = len(raw)
    if n < 20:
        raise DecodeError("invalid message, too short")
    uuid = timestamp = type_ = logger = severity = payload = env_version = pid = hostname = None
    fields: list[Field] = []
    pos = 0
    key = 0
    try:
        while pos < n:
            # dispatch on the whole key byte: tags are 1..10, so keys are one byte
            key = raw[pos]
            p = pos + 1
            if key in _LEN_KEYS:
                ln = raw[p] if p < n else 0x80
                if ln < 0x80:
                    p += 1
                else:
                    ln, p = _read_varint(raw, p, n)
                end = p + ln
                if end > n:
                    raise _Bad
                if key == 0x32:
                    if want_payload:
                        payload = raw[p:end].decode(_ENC, _ERRS)
                elif key == 0x52:
                    if want_fields:
                        fields.append(_decode_field(raw, p, end))
                elif key == 0x0A:
                    if end - pos != 18:  # upstream wants a one-byte length of exactly 16
                        raise _Bad
                    uuid = raw[p:end]
                elif key == 0x1A:
                    type_ = raw[p:end].decode(_ENC, _ERRS)
                elif key == 0x22:
                    logger = raw[p:end].decode(_ENC, _ERRS)
                elif key == 0x4A:
                    hostname = raw[p:end].decode(_ENC, _ERRS)
                else:
                    env_version = raw[p:end].decode(_ENC, _ERRS)
                pos = end
            elif key == 0x10:
                v, pos = _read_varint(raw, p, n)
                timestamp = v - (1 << 64) if v & _SIGN64 else v
            elif key == 0x40:
                v, pos = _read_varint(raw, p, n)
                pid = v - (1 << 64) if v & _SIGN64 else v
            elif key == 0x28:
                v, pos = _read_varint(raw, p, n)
                severity = v - (1 << 64) if v & _SIGN64 else v
            else:
                raise _Bad
    except _Bad:
        raise DecodeError(f"error in tag: {key >> 3} wiretype: {key & 7} offset: {pos}") from None
    if uuid is None or timestamp is None:
        has_uuid = "not found" if uuid is None else "found"
        has_ts = "not found" if timestamp is None else "found"
        raise DecodeError(f"missing required field uuid: {has_uuid} timestamp: {has_ts}")
    msg = Message.__new__(Message)
    msg.uuid = uuid
    msg.timestamp = timestamp
    msg.type = type_
    msg.logger = logger
    msg.severity = severity
    msg.payload = payload
    msg.env_version = env_version
    msg.pid = pid
    msg.hostname = hostname
    msg.fields = fields
    msg.raw = raw
    return msg


# Keys (tag << 3 | wire type) of the length-delimited top-level items.
_LEN_KEYS = frozenset((0x0A, 0x1A, 0x22, 0x32, 0x3A, 0x4A, 0x52))
_STR_KEYS = frozenset((0x1A, 0x22, 0x32, 0x3A, 0x4A))
_VARINT_KEYS = frozenset((0x10, 0x28, 0x40))


def _decode_field(raw: bytes, pos: int, end: int) -> Field:
    name = None
    value_type = STRING
    representation = None
    values: list[Any] = []
    while pos < end:
        key = raw[pos]
        pos += 1
        if key & 7 == 2:
            ln, pos = _read_varint(raw, pos, end)
            stop = pos + ln
            if stop > end:
                raise _Bad
            if key == 0x22:
                values.append(raw[pos:stop].decode(_ENC, _ERRS))
            elif key == 0x0A:
                name = raw[pos:stop].decode(_ENC, _ERRS)
            elif key == 0x2A:
                values.append(raw[pos:stop])
            elif key == 0x1A:
                representation = raw[pos:stop].decode(_ENC, _ERRS)
            elif key == 0x32 or key == 0x42:
                # packed varints; upstream rejects an empty packed array
                if ln == 0:
                    raise _Bad
                while pos < stop:
                    v, pos = _read_varint(raw, pos, stop)
                    values.append((v - (1 << 64) if v & _SIGN64 else v) if key == 0x32 else v != 0)
            elif key == 0x3A:
                if ln == 0 or ln % 8:
                    raise _Bad
                values.extend(struct.unpack_from(f"<{ln >> 3}d", raw, pos))
            else:
                raise _Bad
            pos = stop
        elif key == 0x30:
            v, pos = _read_varint(raw, pos, end)
            values.append(v - (1 << 64) if v & _SIGN64 else v)
        elif key == 0x10:
            v, pos = _read_varint(raw, pos, end)
            value_type = v - (1 << 64) if v & _SIGN64 else v
        elif key == 0x40:
            v, pos = _read_varint(raw, pos, end)
            values.append(v != 0)
        elif key == 0x39:
            if pos + 8 > end:
                raise _Bad
            values.append(_DOUBLE.unpack_from(raw, pos)[0])
            pos += 8
        else:
            raise _Bad
    if name is None:
        raise _Bad
    f = Field.__new__(Field)
    f.name = name
    f.value_type = value_type
    f.representation = representation
    f.values = values
    return f


def is_valid(raw: bytes) -> bool:
    """The check upstream's queue and stream readers apply to a framed record
    (lsb_decode_heka_message): the top level must parse with known tags, a
    16-byte Uuid and a Timestamp; each field needs a name before its values,
    and the values themselves are only checked for their wire type."""
    n = len(raw)
    # every Heka encoder starts with Uuid and Timestamp: check both in one go
    head = _uuid_ts_prefix(raw)
    if head is not None:
        pos = head.end()
        has_uuid = has_ts = True
    else:
        pos = 0
        has_uuid = has_ts = False
    try:
        while pos < n:
            key = raw[pos]
            p = pos + 1
            if key in _LEN_KEYS:
                ln = raw[p] if p < n else 0x80
                if ln < 0x80:
                    p += 1
                else:
                    ln, p = _read_varint_loop(raw, p, n)
                pos = p + ln
                if pos > n:
                    return False
                if key == 0x52:
                    if not _valid_field(raw, p, pos):
                        return False
                elif key == 0x0A:
                    if ln != 16:
                        return False
                    has_uuid = True
            elif key in _VARINT_KEYS:
                m = _skip_varint(raw, p)
                if m is None:
                    return False
                pos = m.end()
                if key == 0x10:
                    has_ts = True
            else:
                return False
    except _Bad:
        return False
    return has_uuid and has_ts


def _valid_field(raw: bytes, pos: int, end: int) -> bool:
    has_name = False
    while pos < end:
        key = raw[pos]
        pos += 1
        if key == 0x0A or key == 0x1A:  # name, representation
            ln, pos = _read_varint_loop(raw, pos, end)
            pos += ln
            if pos > end:
                return False
            if key == 0x0A:
                has_name = True
        elif key == 0x10:  # value_type
            _, pos = _read_varint_loop(raw, pos, end)
        elif key == 0x22 or key == 0x2A or key == 0x30 or key == 0x40 or key == 0x39:
            # upstream stops at the first value: values come last
            return has_name
        elif key == 0x32 or key == 0x42 or key == 0x3A:  # packed: the length must fit
            ln, p = _read_varint_loop(raw, pos, end)
            return has_name and ln <= end - p
        else:
            return False
    return has_name


# ---------------------------------------------------------------------------
# fast header access (no Message built)

def header_of(raw: bytes, tag: int) -> bytes | int | None:
    """The last value of top-level ``tag`` in ``raw``: bytes for string headers
    and Uuid, int for Timestamp/Severity/Pid (the raw bytes of the last field
    for tag 10), None when absent. Raises DecodeError on malformed framing."""
    n = len(raw)
    found: bytes | int | None = None
    head = _uuid_ts_prefix(raw)
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
                    ln, pos = _read_varint(raw, pos, n)
                end = pos + ln
                if key >> 3 == tag:
                    found = raw[pos:end]
                pos = end
            elif wt == 0:
                if key >> 3 == tag:
                    v, pos = _read_varint(raw, pos, n)
                    found = v - (1 << 64) if v & _SIGN64 else v
                else:
                    m = _skip_varint(raw, pos)
                    if m is None:
                        raise _Bad
                    pos = m.end()
            else:
                raise _Bad
    except (_Bad, IndexError):
        raise DecodeError(f"malformed message near offset {pos}") from None
    if pos > n:
        raise DecodeError("malformed message: truncated")
    if found is None and head is not None:
        # not repeated later: take it from the Uuid/Timestamp prefix
        if tag == TIMESTAMP:
            v = _read_varint(raw, 19, n)[0]
            return v - (1 << 64) if v & _SIGN64 else v
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
                    length, start = _read_varint(raw, pos + 1, n)
                    if key == 0x32:
                        payload_key, payload_end = pos, start + length  # the last one counts
                    pos = start + length
                elif key & 7 == 0:
                    pos = _read_varint(raw, pos + 1, n)[1]
                else:
                    return None
        except (IndexError, _Bad, DecodeError):  # malformed: no shape to learn from it
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
    skip = _skip_varint
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
                        ln, pos = _read_varint(raw, pos, n)
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
        except (IndexError, _Bad, DecodeError):
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


# ---------------------------------------------------------------------------
# encoding

def _b(s: str | bytes) -> bytes:
    return s.encode(_ENC, _ERRS) if type(s) is str else bytes(s)


def _lenpref(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    n = len(data)
    return key, (_VARINT1[n] if n < 128 else _varint(n)), data


def encode(msg: Message) -> bytes:
    """Protobuf bytes for ``msg``, fields in upstream's order."""
    uuid = msg.uuid
    if len(uuid) != 16:
        raise EncodeError("Uuid must be 16 bytes")
    parts = [b"\x0a\x10", uuid, b"\x10", _varint(msg.timestamp)]
    ext = parts.extend
    v = msg.type
    if v is not None:
        ext(_lenpref(b"\x1a", v.encode(_ENC, _ERRS) if type(v) is str else bytes(v)))
    v = msg.logger
    if v is not None:
        ext(_lenpref(b"\x22", v.encode(_ENC, _ERRS) if type(v) is str else bytes(v)))
    if msg.severity is not None:
        ext((b"\x28", _varint(msg.severity)))
    v = msg.payload
    if v is not None:
        ext(_lenpref(b"\x32", v.encode(_ENC, _ERRS) if type(v) is str else bytes(v)))
    v = msg.env_version
    if v is not None:
        ext(_lenpref(b"\x3a", v.encode(_ENC, _ERRS) if type(v) is str else bytes(v)))
    if msg.pid is not None:
        ext((b"\x40", _varint(msg.pid)))
    v = msg.hostname
    if v is not None:
        ext(_lenpref(b"\x4a", v.encode(_ENC, _ERRS) if type(v) is str else bytes(v)))
    for f in msg.fields:
        ext(_lenpref(b"\x52", _encode_field(f)))
    return b"".join(parts)


def _check_int(v: Any) -> int:
    v = int(v)
    if not -(1 << 63) <= v <= _MASK64:
        raise EncodeError(f"integer out of range: {v}")
    return v


def _encode_field(f: Field) -> bytes:
    parts = list(_lenpref(b"\x0a", _b(f.name)))
    vt = f.value_type
    if vt != STRING:
        parts.append(b"\x10")
        parts.append(_varint(vt))
    if f.representation is not None:
        parts.extend(_lenpref(b"\x1a", _b(f.representation)))
    values = f.values
    if values:
        if vt == STRING or vt == BYTES:
            key = b"\x22" if vt == STRING else b"\x2a"
            for v in values:
                parts.extend(_lenpref(key, _b(v)))
        elif vt == INTEGER:
            if len(values) == 1:
                parts.append(b"\x30")
                parts.append(_varint(_check_int(values[0])))
            else:
                parts.extend(_lenpref(b"\x32", b"".join([_varint(_check_int(v)) for v in values])))
        elif vt == DOUBLE:
            if len(values) == 1:
                parts.append(b"\x39")
                parts.append(_DOUBLE.pack(values[0]))
            else:
                parts.extend(_lenpref(b"\x3a", struct.pack(f"<{len(values)}d", *values)))
        elif vt == BOOL:
            if len(values) == 1:
                parts.append(b"\x40\x01" if values[0] else b"\x40\x00")
            else:
                parts.extend(_lenpref(b"\x42", bytes([1 if v else 0 for v in values])))
        else:
            raise EncodeError(f"invalid value_type: {vt}")
    return b"".join(parts)


# ---------------------------------------------------------------------------
# Python plugins' inject_message(dict)

def random_uuid() -> bytes:
    """A random v4 Uuid with upstream's bit pattern (byte 6 = 0x4_, byte 8 = 0xA_)."""
    b = bytearray(random.getrandbits(128).to_bytes(16, "little"))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x0F) | 0xA0
    return bytes(b)


def _uuid_from(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)) and len(value) == 16:
        return bytes(value)
    if isinstance(value, str) and len(value) == 36:
        try:
            if all(value[i] == "-" for i in (8, 13, 18, 23)):
                b = bytes.fromhex(value.replace("-", ""))
                if len(b) == 16:
                    return b
        except ValueError:
            pass
    bytes_attr = getattr(value, "bytes", None)  # uuid.UUID
    if isinstance(bytes_attr, bytes) and len(bytes_attr) == 16:
        return bytes_attr
    return random_uuid()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _header_str(name: str, v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode(_ENC, _ERRS)
    if _is_number(v):
        # upstream writes numbers through Lua's tostring (%.14g)
        return str(v) if isinstance(v, int) else f"{v:.14g}"
    raise EncodeError(f"{name} must be a string or a number, not {type(v).__name__}")


def _header_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if not _is_number(v) or (isinstance(v, float) and not math.isfinite(v)):
        raise EncodeError(f"{name} must be a finite number, not {v!r}")
    return _check_int(v)


def from_dict(
    d: Mapping[str, Any],
    *,
    restricted: bool,
    logger: str,
    hostname: str,
    pid: int,
    now_ns: int,
) -> Message:
    """Build the Message a Python plugin's ``inject_message(d)`` sends.

    Header rules are upstream's (docs/upstream-formats.md §5): with ``restricted``
    the Uuid is random, Timestamp is ``now_ns`` and Logger/Hostname/Pid come
    from the arguments whatever ``d`` says. Otherwise Uuid is taken when it is
    16 raw bytes, a 36-character dashed hex string (or a uuid.UUID), else
    random; Timestamp when it is a number (truncated), else ``now_ns``; a
    missing (or None) Logger/Hostname/Pid is filled in. ``d`` is not modified.

    ``Fields`` is either ``{name: value}`` (str -> STRING, bytes -> BYTES,
    int -> INTEGER, float -> DOUBLE, bool -> BOOL, list -> array of one of
    those, dict -> ``{"value", "value_type", "representation"}``) or a list of
    ``{"name", "value", "value_type", "representation"}``. An empty list gives
    a field with no values. Errors raise EncodeError with upstream's texts.
    """
    get = d.get
    if restricted:
        uuid = random_uuid()
        ts = now_ns
        lg: str | None = logger
        hn: str | None = hostname
        pd: int | None = pid
    else:
        uuid = _uuid_from(get("Uuid"))
        t = get("Timestamp")
        if _is_number(t) and not (isinstance(t, float) and not math.isfinite(t)):
            ts = _check_int(t)
        else:
            ts = now_ns
        lg = _header_str("Logger", get("Logger"))
        if lg is None:
            lg = logger
        hn = _header_str("Hostname", get("Hostname"))
        if hn is None:
            hn = hostname
        pd = _header_int("Pid", get("Pid"))
        if pd is None:
            pd = pid
    return Message(
        uuid, ts,
        type=_header_str("Type", get("Type")),
        logger=lg,
        severity=_header_int("Severity", get("Severity")),
        payload=_header_str("Payload", get("Payload")),
        env_version=_header_str("EnvVersion", get("EnvVersion")),
        pid=pd,
        hostname=hn,
        fields=_fields_from(get("Fields")),
    )


def _fields_from(fields: Any) -> list[Field]:
    if fields is None:
        return []
    out: list[Field] = []
    if isinstance(fields, Mapping):
        for name, value in fields.items():
            if not isinstance(name, str):
                raise EncodeError("field name must be a string")
            if isinstance(value, Mapping):
                out.append(_field_object(name, value))
            else:
                out.append(_field(name, value, None, None))
        return out
    if isinstance(fields, (list, tuple)):
        for obj in fields:
            if not isinstance(obj, Mapping):
                raise EncodeError(f"unsupported type: {type(obj).__name__}")
            name = obj.get("name")
            if isinstance(name, (bytes, bytearray)):
                name = bytes(name).decode(_ENC, _ERRS)
            if not isinstance(name, str):
                raise EncodeError("field name must be a string")
            out.append(_field_object(name, obj))
        return out
    raise EncodeError(f"Fields must be a dict or a list, not {type(fields).__name__}")


def _field_object(name: str, obj: Mapping[str, Any]) -> Field:
    rep = obj.get("representation")
    if rep is not None:
        rep = _header_str("representation", rep)
    vt = obj.get("value_type")
    if vt is not None and not _is_number(vt):
        vt = None  # upstream ignores a non-numeric value_type
    return _field(name, obj.get("value"), rep, None if vt is None else int(vt))


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (str, bytes, bytearray, memoryview)):
        return "string"
    return "nil" if v is None else type(v).__name__


def _field(name: str, value: Any, rep: str | None, vt: int | None) -> Field:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        return Field(name, STRING if vt is None else vt, rep, [])
    first = values[0]
    kind = _kind(first)
    if len(values) > 1 and any(_kind(v) != kind for v in values):
        raise EncodeError("array has mixed types")
    if kind == "string":
        if vt is None:
            vt = STRING if isinstance(first, str) else BYTES
        if vt == STRING:
            return Field(name, STRING, rep, [v if isinstance(v, str) else bytes(v).decode(_ENC, _ERRS)
                                             for v in values])
        if vt == BYTES:
            return Field(name, BYTES, rep, [v.encode(_ENC, _ERRS) if isinstance(v, str) else bytes(v)
                                            for v in values])
        raise EncodeError(f"invalid string value_type: {vt}")
    if kind == "number":
        if vt is None:
            vt = DOUBLE if any(isinstance(v, float) for v in values) else INTEGER
        if vt == INTEGER:
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise EncodeError(f"integer field {name!r} cannot hold {v}")
            return Field(name, INTEGER, rep, [_check_int(v) for v in values])
        if vt == DOUBLE:
            return Field(name, DOUBLE, rep, [float(v) for v in values])
        raise EncodeError(f"invalid numeric value_type: {vt}")
    if kind == "boolean":
        if vt is not None and vt != BOOL:
            raise EncodeError(f"invalid boolean value_type: {vt}")
        return Field(name, BOOL, rep, values)
    if isinstance(value, (list, tuple)):
        raise EncodeError(f"unsupported array type: {kind}")
    raise EncodeError(f"unsupported type: {kind}")


# ---------------------------------------------------------------------------
# stream framing: 0x1E, H, header (0x08 varint(len)), 0x1F, message

def frame_header(length: int) -> bytes:
    """The stream header for a ``length``-byte message (Hindsight's: H = 1 + len(varint))."""
    v = _varint(length)
    return b"\x1e" + _VARINT1[len(v) + 1] + b"\x08" + v + b"\x1f"


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
    append = records.append
    append_end = ends.append
    count = 0
    nbytes = 0
    # The frames every writer makes for messages of 128 B to 2 MB (0x1E, H = 3 or 4, 0x08, a 2- or
    # 3-byte varint, 0x1F), read with a few comparisons each. Anything else, and every frame near
    # `end`, goes to the general loop below, which reads them exactly as before.
    limit = end - 7
    fast = _accel.speedups
    if fast is not None and not validate:
        # the same loop in C (hindsight_py/_speedups.c); it stops where this one would
        pos, count, nbytes = fast.scan_quick(buf, pos, end, max_message_size, records, ends, base, max_records,
                                             max_bytes)
        if count >= max_records or nbytes >= max_bytes:
            return pos, 0
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
            return pos, 0

    find = buf.find
    discarded = 0
    while pos < end:
        if buf[pos] != 0x1E:
            p = find(b"\x1e", pos, end)
            if p < 0:
                discarded += end - pos
                return end, discarded
            discarded += p - pos
            pos = p
        # a frame: 0x1E, H, header[H], 0x1F
        if pos + 2 > end:
            if final:
                discarded += end - pos
                return end, discarded
            break
        hend = pos + buf[pos + 1] + 3
        if hend > end:
            if final:
                pos += 1
                discarded += 1
                continue
            break
        msglen = 0
        if buf[hend - 1] == 0x1F and buf[pos + 2] == 0x08:
            # the length varint must end inside the header
            p = pos + 3
            stop = min(hend - 1, p + 10)
            shift = 0
            while p < stop:
                b = buf[p]
                msglen |= (b & 0x7F) << shift
                p += 1
                if b < 0x80:
                    break
                shift += 7
            else:
                msglen = 0
            if msglen >= _SIGN64:  # upstream reads a signed long long
                msglen = 0
        if msglen == 0 or msglen > max_message_size:
            pos += 1
            discarded += 1
            continue
        mend = hend + msglen
        if mend > end:
            if final:
                pos += 1
                discarded += 1
                continue
            break
        raw = buf[hend:mend]
        if validate and not is_valid(raw):
            pos += 1
            discarded += 1
            continue
        append(raw)
        append_end(base + mend)
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

_V4_BITS = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_BITS = bytes((b & 0x0F) | 0xA0 for b in range(256))
_varint_cache: dict[int, bytes] = {}
_frame_cache: dict[int, bytes] = {}


def random_uuids(n: int) -> bytes:
    """``n`` random version-4 UUIDs back to back, with lua_sandbox's version and variant bits."""
    b = bytearray(os.urandom(16 * n))
    b[6::16] = b[6::16].translate(_V4_BITS)
    b[8::16] = b[8::16].translate(_VARIANT_BITS)
    return bytes(b)


def _payload_message_parts(logger: str, hostname: str, pid: int | None, now_ns: int,
                           type: str | None) -> tuple[bytes, bytes]:
    """The bytes every Payload-only message of one batch shares: from the Timestamp to the
    Payload key, and the headers after the Payload."""
    head = b"\x10" + _varint(now_ns)
    if type is not None:
        head += b"".join(_lenpref(b"\x1a", _b(type)))
    head += b"".join(_lenpref(b"\x22", _b(logger))) + b"\x32"
    tail = b""
    if pid is not None:
        tail += b"\x40" + _varint(pid)
    tail += b"".join(_lenpref(b"\x4a", _b(hostname)))
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
    head, tail = _payload_message_parts(logger, hostname, pid, now_ns, type)
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
            vl = varints[n] = _varint(n)
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
    nb = _b(name)
    return b"\x0a" + _varint(len(nb)) + nb + b"\x22"


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
    head, tail = _payload_message_parts(logger, hostname, pid, 0, type)
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
        parts = [b"\x0a\x10", uuids[16 * i:16 * i + 16], b"\x10", _varint(stamps[i]), head, _varint(len(p)), p, tail]
        for prefix, column in zip(names, columns, strict=True):
            value = column[i]
            if value is not None:
                inner = prefix + b"".join(_lenpref(b"", _b(value)))
                parts += (b"\x52", _varint(len(inner)), inner)
        raw = b"".join(parts)
        out.append(frame_header(len(raw)))
        out.append(raw)
    return b"".join(out)


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
                v, pos = _read_varint_loop(raw, pos, n)
                if v > n - pos:
                    return False, -1, 0, None
                if key >> 3 == tag:
                    start, length = pos, v
                pos += v
            elif key & 7 == 0:
                v, pos = _read_varint_loop(raw, pos, n)
                if key >> 3 == TIMESTAMP:
                    stamp = v
            else:
                return False, -1, 0, None
    except _Bad:
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
        stamps.append(_signed(stamp) if ok and stamp is not None else None)
    return payloads, stamps


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
        head, tail = _payload_message_parts(logger, hostname, pid, now_ns, type)
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
