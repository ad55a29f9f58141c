"""Bulk action lines made for a whole batch (plugins/elasticsearch_bulk.py's fast path)."""

from __future__ import annotations

from hindsight_py import _accel


def _plain_id(payload: bytes, key: bytes) -> bytes | None:
    at = payload.find(key)
    if at < 0 or payload.find(key, at + 1) >= 0:
        return None
    start = at + len(key)
    end = start
    n = len(payload)
    while end < n and 0x20 <= payload[end] < 0x7F and payload[end] not in b'"\\':
        end += 1
    return payload[start:end] if end < n and payload[end] == 0x22 and end > start else None


def id_action_lines(payloads: list[bytes | None], key: bytes, heads: list[bytes | None],
                    tail: bytes) -> list[bytes | None]:
    """For each payload that holds ``key`` (b'"eventID":"') exactly once, followed by a value of
    printable ASCII without a quote or backslash and then its closing quote: heads[i] + that value
    + tail, the action line with that `_id`. None for the others (and where a payload or head is
    None): their lines are made the long way. (_speedups.id_action_lines is this loop in C.)"""
    fast = _accel.speedups
    if fast is not None:
        return fast.id_action_lines(payloads, key, heads, tail)
    if len(heads) != len(payloads) or not key:
        raise ValueError("id_action_lines: one head per payload, and a key")
    out: list[bytes | None] = []
    for payload, head in zip(payloads, heads, strict=True):
        value = _plain_id(payload, key) if type(payload) is bytes and type(head) is bytes else None
        out.append(None if value is None else head + value + tail)  # type: ignore[operator]
    return out
