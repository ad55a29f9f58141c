"""Bulk request bodies (NDJSON action and source lines) as the server reads them: cut into
documents, counted, and checked line by line before a payload joins one.

The bulk sender (outputs/elasticsearch.py) cuts a body only when an answer needs it (a rejected
item, a retry of part of a request); the outputs count and check bodies as they build them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hindsight_py import _accel, peek

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads


@dataclass
class Document:
    """One document of a bulk body: its action line, and its source line (None for a delete)."""

    action: bytes
    source: bytes | None  # None for a delete action

    def to_ndjson(self) -> bytes:
        if self.source is None:
            return self.action + b"\n"
        return self.action + b"\n" + self.source + b"\n"


def action_has_source(action: bytes) -> bool:
    try:
        doc = _loads(action)
    except ValueError:
        return True  # malformed; the server will say so, assume the usual pair
    return not (isinstance(doc, dict) and len(doc) == 1 and "delete" in doc)


def split_bulk_body(body: bytes) -> list[Document]:
    """Cut an NDJSON bulk body into documents (action line + source line; delete has none).

    Lines pair up as the server pairs them: blank lines where an action is expected are skipped,
    but the line after an action is its source even when blank (or missing at the end), so an
    empty document cannot shift the documents after it onto the wrong action lines.
    """
    lines = body.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the body's final newline
    docs: list[Document] = []
    i = 0
    while i < len(lines):
        action = lines[i]
        if not action.strip():
            i += 1
        elif action_has_source(action):
            docs.append(Document(action, lines[i + 1] if i + 1 < len(lines) else b""))
            i += 2
        else:
            docs.append(Document(action, None))
            i += 1
    return docs


# A line that does not start with "{" (an empty line included); the final newline has no line after it.
_LINE_NOT_AN_OBJECT = re.compile(rb"\n[^{]")


def every_line_is_an_object(body: bytes) -> bool:
    # the common case: every action and source line starts with "{"
    fast = _accel.speedups
    if fast is not None:
        return fast.every_line_is_an_object(body)  # a memchr loop, four times faster than the regex
    # a regex with a literal prefix scans at memchr speed, five times faster than counting b"\n{"
    return body.startswith(b"{") and _LINE_NOT_AN_OBJECT.search(body) is None


def one_line_objects(payloads: list[bytes]) -> bool:
    """Every payload starts with "{" and has no line feed: it can go into a bulk body as it is."""
    fast = _accel.speedups
    if fast is not None:
        return fast.one_line_objects(payloads)
    return not any(p[:1] != b"{" for p in payloads) and not any(b"\n" in p for p in payloads)


def message_documents_size(raws: list[bytes]) -> int | None:
    """The bytes of the messages' Payloads when every one can go into a bulk body as it is
    (one_line_objects), else None."""
    fast = _accel.speedups
    if fast is not None:
        size = fast.message_documents_size(raws)
        return None if size < 0 else size
    payloads = peek.payloads_and_stamps(raws)[0]  # (the walk of the C loop)
    if None in payloads or not one_line_objects(payloads):  # type: ignore[arg-type]
        return None
    return sum(map(len, payloads))  # type: ignore[arg-type]


def bulk_body_of_messages(raws: list[bytes], start: int, max_docs: int, max_bytes: int,
                          action: bytes) -> tuple[bytes, int]:
    """(body, documents): `action` before each Payload of the messages from `start` on, one line
    each, for at most `max_docs` messages and `max_bytes` bytes (at least one message, however
    large). Every message must have passed message_documents_size.

    One copy of each Payload, straight from its message: no list of payloads in between."""
    fast = _accel.speedups
    if fast is not None:
        return fast.bulk_body_of_messages(raws, start, max_docs, max_bytes, action)  # type: ignore[no-any-return]
    payloads = peek.payloads_and_stamps(raws[start:start + max_docs] if start >= 0 and max_docs >= 1 else [])[0]
    if not payloads:
        raise ValueError("bulk_body_of_messages: no message to take")
    size = 0
    for n, payload in enumerate(payloads):
        if payload is None or not one_line_objects([payload]):
            raise ValueError("bulk_body_of_messages: a message whose Payload is no document")
        more = len(action) + len(payload) + 2
        if n and size + more > max_bytes:
            payloads = payloads[:n]
            break
        size += more
    lines = [action] * (2 * len(payloads)) + [b""]
    lines[1::2] = payloads  # type: ignore[assignment]
    return b"\n".join(lines), len(payloads)


def bodies_from_messages_in_c() -> bool:
    """Whether bulk_body_of_messages is the C loop: only then is keeping messages until their
    body is made cheaper than cutting their payloads out when they arrive."""
    return _accel.speedups is not None


def bulk_body_count(body: bytes) -> int:
    """The number of documents (actions) in a bulk body.

    The usual body repeats one action line before every source: then the count is the number of
    line pairs, found with C-level calls. Anything else is cut up as the server would cut it."""
    lines = body.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    pairs = len(lines) // 2
    if pairs and len(lines) % 2 == 0:
        action = lines[0]
        if action.strip() and action_has_source(action) and lines[0::2].count(action) == pairs:
            return pairs
    return len(split_bulk_body(body))


__all__ = ["Document", "action_has_source", "bodies_from_messages_in_c", "bulk_body_count", "bulk_body_of_messages",
           "every_line_is_an_object", "message_documents_size", "one_line_objects", "split_bulk_body"]
