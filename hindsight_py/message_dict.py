"""A Heka message from a plugin's table (Python plugins' ``inject_message(dict)``):
``from_dict``, with lua_sandbox's rules for headers, Fields and representations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hindsight_py.message import (
    BOOL,
    BYTES,
    DOUBLE,
    INTEGER,
    STRING,
    EncodeError,
    Field,
    Message,
    check_int,
    random_uuid,
)
from hindsight_py.wire import TEXT_ENCODING, TEXT_ERRORS


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
        return bytes(v).decode(TEXT_ENCODING, TEXT_ERRORS)
    if _is_number(v):
        # upstream writes numbers through Lua's tostring (%.14g)
        return str(v) if isinstance(v, int) else f"{v:.14g}"
    raise EncodeError(f"{name} must be a string or a number, not {type(v).__name__}")


def _header_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if not _is_number(v) or (isinstance(v, float) and not math.isfinite(v)):
        raise EncodeError(f"{name} must be a finite number, not {v!r}")
    return check_int(v)


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
            ts = check_int(t)
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
                name = bytes(name).decode(TEXT_ENCODING, TEXT_ERRORS)
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
            return Field(name, STRING, rep, [v if isinstance(v, str) else bytes(v).decode(TEXT_ENCODING, TEXT_ERRORS)
                                             for v in values])
        if vt == BYTES:
            return Field(name, BYTES, rep, [v.encode(TEXT_ENCODING, TEXT_ERRORS) if isinstance(v, str) else bytes(v)
                                            for v in values])
        raise EncodeError(f"invalid string value_type: {vt}")
    if kind == "number":
        if vt is None:
            vt = DOUBLE if any(isinstance(v, float) for v in values) else INTEGER
        if vt == INTEGER:
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise EncodeError(f"integer field {name!r} cannot hold {v}")
            return Field(name, INTEGER, rep, [check_int(v) for v in values])
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
