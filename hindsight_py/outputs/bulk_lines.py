"""Bulk action lines made for a whole batch (plugins/elasticsearch_bulk.py's fast path)."""

from __future__ import annotations

import math
from collections.abc import Callable

from hindsight_py import _accel, peek


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


def keyed_action_lines(raws: list[bytes], unit: int, from_stamp: bool, heads: dict[int, bytes],
                       head_for: Callable[[int], bytes], key: bytes,
                       tail: bytes) -> tuple[list[bytes | None], list[bytes | None]]:
    """(payloads, lines): each message's Payload (peek.payloads_and_stamps) and its action line,
    for lines that depend only on the message's time and on the `_id` its payload holds. The
    time key of a message with Timestamp t is floor(t / 1e9) // unit (0 when not from_stamp); its
    line head is heads[key], made by head_for(key) and kept in heads the first time. With a key,
    the line is id_action_lines' of that head; without, the head itself. A line is None where
    the message has no Timestamp (with a key: also no Payload or no plain id): the caller makes
    those the long way. (_speedups.keyed_action_lines is this loop in C.)"""
    fast = _accel.speedups
    if fast is not None:
        return fast.keyed_action_lines(raws, unit, from_stamp, heads, head_for, key, tail)
    if unit < 1:
        raise ValueError("keyed_action_lines: unit must be 1 or more")
    payloads, stamps = peek.payloads_and_stamps(raws)
    line_heads: list[bytes | None] = []
    for stamp in stamps:
        if stamp is None:
            line_heads.append(None)
            continue
        time_key = math.floor(stamp / 1e9) // unit if from_stamp else 0
        head = heads.get(time_key)
        if head is None:
            head = head_for(time_key)
            if type(head) is not bytes:
                raise TypeError("keyed_action_lines: head_for must give bytes")
            heads[time_key] = head
        line_heads.append(head)
    return payloads, id_action_lines(payloads, key, line_heads, tail) if key else line_heads
