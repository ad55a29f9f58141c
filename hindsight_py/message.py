"""The Heka message: the Python object and its protobuf bytes (decode, encode, validity).

Byte-compatible with lua_sandbox/Hindsight (docs/upstream-formats.md §5):

- ``decode`` is as strict as the sandbox's ``decode_message`` (same error texts);
- ``encode`` writes fields in upstream's order, so a decoded upstream message
  re-encodes to the same bytes;
- ``is_valid`` is the lighter check upstream's queue readers apply to each
  framed record.

The neighbours: ``message_dict`` builds a Message from a plugin's table (``from_dict``),
``framing`` frames records into and out of streams and queue files (and frames
Payload-only messages fast), ``peek`` reads headers and payloads without building a
``Message`` (the hot path of matchers and outputs).

Header and string-field values are ``str`` decoded from UTF-8 with
``errors="surrogateescape"``: invalid UTF-8 survives a decode/encode round trip
byte for byte. Encoding accepts ``bytes`` wherever it accepts ``str``.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

from hindsight_py.wire import (
    MASK64,
    SIGN64,
    TEXT_ENCODING,
    TEXT_ERRORS,
    Malformed,
    as_bytes,
    encode_varint,
    length_prefixed,
    read_varint,
    read_varint_loop,
    skip_varint,
    uuid_ts_prefix,
)

__all__ = [
    "STRING", "BYTES", "INTEGER", "DOUBLE", "BOOL", "DEFAULT_SEVERITY", "DEFAULT_MAX_MESSAGE_SIZE",
    "UUID", "TIMESTAMP", "TYPE", "LOGGER", "SEVERITY", "PAYLOAD", "ENV_VERSION", "PID", "HOSTNAME", "FIELDS",
    "DecodeError", "EncodeError", "Field", "Message",
    "decode", "encode", "is_valid", "random_uuid", "random_uuids",
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

_DOUBLE = struct.Struct("<d")


class DecodeError(ValueError):
    """The bytes are not a valid Heka message (texts match the sandbox's)."""


class EncodeError(ValueError):
    """A message (or a dict meant to become one) cannot be encoded."""


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
                    ln, p = read_varint(raw, p, n)
                end = p + ln
                if end > n:
                    raise Malformed
                if key == 0x32:
                    if want_payload:
                        payload = raw[p:end].decode(TEXT_ENCODING, TEXT_ERRORS)
                elif key == 0x52:
                    if want_fields:
                        fields.append(_decode_field(raw, p, end))
                elif key == 0x0A:
                    if end - pos != 18:  # upstream wants a one-byte length of exactly 16
                        raise Malformed
                    uuid = raw[p:end]
                elif key == 0x1A:
                    type_ = raw[p:end].decode(TEXT_ENCODING, TEXT_ERRORS)
                elif key == 0x22:
                    logger = raw[p:end].decode(TEXT_ENCODING, TEXT_ERRORS)
                elif key == 0x4A:
                    hostname = raw[p:end].decode(TEXT_ENCODING, TEXT_ERRORS)
                else:
                    env_version = raw[p:end].decode(TEXT_ENCODING, TEXT_ERRORS)
                pos = end
            elif key == 0x10:
                v, pos = read_varint(raw, p, n)
                timestamp = v - (1 << 64) if v & SIGN64 else v
            elif key == 0x40:
                v, pos = read_varint(raw, p, n)
                pid = v - (1 << 64) if v & SIGN64 else v
            elif key == 0x28:
                v, pos = read_varint(raw, p, n)
                severity = v - (1 << 64) if v & SIGN64 else v
            else:
                raise Malformed
    except Malformed:
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
            ln, pos = read_varint(raw, pos, end)
            stop = pos + ln
            if stop > end:
                raise Malformed
            if key == 0x22:
                values.append(raw[pos:stop].decode(TEXT_ENCODING, TEXT_ERRORS))
            elif key == 0x0A:
                name = raw[pos:stop].decode(TEXT_ENCODING, TEXT_ERRORS)
            elif key == 0x2A:
                values.append(raw[pos:stop])
            elif key == 0x1A:
                representation = raw[pos:stop].decode(TEXT_ENCODING, TEXT_ERRORS)
            elif key == 0x32 or key == 0x42:
                # packed varints; upstream rejects an empty packed array
                if ln == 0:
                    raise Malformed
                while pos < stop:
                    v, pos = read_varint(raw, pos, stop)
                    values.append((v - (1 << 64) if v & SIGN64 else v) if key == 0x32 else v != 0)
            elif key == 0x3A:
                if ln == 0 or ln % 8:
                    raise Malformed
                values.extend(struct.unpack_from(f"<{ln >> 3}d", raw, pos))
            else:
                raise Malformed
            pos = stop
        elif key == 0x30:
            v, pos = read_varint(raw, pos, end)
            values.append(v - (1 << 64) if v & SIGN64 else v)
        elif key == 0x10:
            v, pos = read_varint(raw, pos, end)
            value_type = v - (1 << 64) if v & SIGN64 else v
        elif key == 0x40:
            v, pos = read_varint(raw, pos, end)
            values.append(v != 0)
        elif key == 0x39:
            if pos + 8 > end:
                raise Malformed
            values.append(_DOUBLE.unpack_from(raw, pos)[0])
            pos += 8
        else:
            raise Malformed
    if name is None:
        raise Malformed
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
    head = uuid_ts_prefix(raw)
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
                    ln, p = read_varint_loop(raw, p, n)
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
                m = skip_varint(raw, p)
                if m is None:
                    return False
                pos = m.end()
                if key == 0x10:
                    has_ts = True
            else:
                return False
    except Malformed:
        return False
    return has_uuid and has_ts


def _valid_field(raw: bytes, pos: int, end: int) -> bool:
    has_name = False
    while pos < end:
        key = raw[pos]
        pos += 1
        if key == 0x0A or key == 0x1A:  # name, representation
            ln, pos = read_varint_loop(raw, pos, end)
            pos += ln
            if pos > end:
                return False
            if key == 0x0A:
                has_name = True
        elif key == 0x10:  # value_type
            _, pos = read_varint_loop(raw, pos, end)
        elif key == 0x22 or key == 0x2A or key == 0x30 or key == 0x40 or key == 0x39:
            # upstream stops at the first value: values come last
            return has_name
        elif key == 0x32 or key == 0x42 or key == 0x3A:  # packed: the length must fit
            ln, p = read_varint_loop(raw, pos, end)
            return has_name and ln <= end - p
        else:
            return False
    return has_name


# ---------------------------------------------------------------------------
# encoding

def encode(msg: Message) -> bytes:
    """Protobuf bytes for ``msg``, fields in upstream's order."""
    uuid = msg.uuid
    if len(uuid) != 16:
        raise EncodeError("Uuid must be 16 bytes")
    parts = [b"\x0a\x10", uuid, b"\x10", encode_varint(msg.timestamp)]
    ext = parts.extend
    v = msg.type
    if v is not None:
        ext(length_prefixed(b"\x1a", v.encode(TEXT_ENCODING, TEXT_ERRORS) if type(v) is str else bytes(v)))
    v = msg.logger
    if v is not None:
        ext(length_prefixed(b"\x22", v.encode(TEXT_ENCODING, TEXT_ERRORS) if type(v) is str else bytes(v)))
    if msg.severity is not None:
        ext((b"\x28", encode_varint(msg.severity)))
    v = msg.payload
    if v is not None:
        ext(length_prefixed(b"\x32", v.encode(TEXT_ENCODING, TEXT_ERRORS) if type(v) is str else bytes(v)))
    v = msg.env_version
    if v is not None:
        ext(length_prefixed(b"\x3a", v.encode(TEXT_ENCODING, TEXT_ERRORS) if type(v) is str else bytes(v)))
    if msg.pid is not None:
        ext((b"\x40", encode_varint(msg.pid)))
    v = msg.hostname
    if v is not None:
        ext(length_prefixed(b"\x4a", v.encode(TEXT_ENCODING, TEXT_ERRORS) if type(v) is str else bytes(v)))
    for f in msg.fields:
        ext(length_prefixed(b"\x52", _encode_field(f)))
    return b"".join(parts)


def check_int(v: Any) -> int:
    v = int(v)
    if not -(1 << 63) <= v <= MASK64:
        raise EncodeError(f"integer out of range: {v}")
    return v


def _encode_field(f: Field) -> bytes:
    parts = list(length_prefixed(b"\x0a", as_bytes(f.name)))
    vt = f.value_type
    if vt != STRING:
        parts.append(b"\x10")
        parts.append(encode_varint(vt))
    if f.representation is not None:
        parts.extend(length_prefixed(b"\x1a", as_bytes(f.representation)))
    values = f.values
    if values:
        if vt == STRING or vt == BYTES:
            key = b"\x22" if vt == STRING else b"\x2a"
            for v in values:
                parts.extend(length_prefixed(key, as_bytes(v)))
        elif vt == INTEGER:
            if len(values) == 1:
                parts.append(b"\x30")
                parts.append(encode_varint(check_int(values[0])))
            else:
                parts.extend(length_prefixed(b"\x32", b"".join([encode_varint(check_int(v)) for v in values])))
        elif vt == DOUBLE:
            if len(values) == 1:
                parts.append(b"\x39")
                parts.append(_DOUBLE.pack(values[0]))
            else:
                parts.extend(length_prefixed(b"\x3a", struct.pack(f"<{len(values)}d", *values)))
        elif vt == BOOL:
            if len(values) == 1:
                parts.append(b"\x40\x01" if values[0] else b"\x40\x00")
            else:
                parts.extend(length_prefixed(b"\x42", bytes([1 if v else 0 for v in values])))
        else:
            raise EncodeError(f"invalid value_type: {vt}")
    return b"".join(parts)



# ---------------------------------------------------------------------------
# Uuids

def random_uuid() -> bytes:
    """A random v4 Uuid with upstream's bit pattern (byte 6 = 0x4_, byte 8 = 0xA_)."""
    b = bytearray(random.getrandbits(128).to_bytes(16, "little"))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x0F) | 0xA0
    return bytes(b)



_V4_BITS = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_BITS = bytes((b & 0x0F) | 0xA0 for b in range(256))


def random_uuids(n: int) -> bytes:
    """``n`` random version-4 UUIDs back to back, with lua_sandbox's version and variant bits."""
    b = bytearray(os.urandom(16 * n))
    b[6::16] = b[6::16].translate(_V4_BITS)
    b[8::16] = b[8::16].translate(_VARIANT_BITS)
    return bytes(b)
