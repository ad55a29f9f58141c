"""The dead-letter files: one writer and one record schema for every plugin (docs/delivery.md).

`output_path/dead_letter/<plugin>.jsonl` holds one JSON object per line, every one with the same
keys (``None`` where a key does not apply):

- ``time``: when it was written (UTC, ISO 8601, milliseconds)
- ``plugin``: the plugin whose file it is
- ``kind``: what ``data`` holds: ``"document"`` (a bulk document the server refused or that cannot
  be one), ``"message"`` (a message the host refused or an output failed: its Payload, the rest of
  it in ``message``), ``"protobuf"`` (message bytes that are not a valid message), ``"data"``
  (what a plugin passed to ``dead_letter()``)
- ``reason``: why it is here
- ``data``: the bytes, as text: ``record["data"].encode("utf-8", "surrogateescape")`` gives them
  back byte for byte (the JSON is ASCII, so invalid UTF-8 survives as ``\\udcXX`` escapes)
- ``offset``: an input's checkpoint when the message was refused (a file input's: the byte offset
  where the record starts)
- ``next_offset``: the checkpoint the input passed next, the one that moved past the record
- ``message``: a refused message's headers and Fields, without its Payload (they are in ``data``)
- ``status``, ``error``, ``action``: a bulk document's HTTP status (``None`` when never sent), the
  server's error object and the bulk action line

Every append is written and fsync()ed before it returns: the caller commits a checkpoint that skips
the records right after.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KINDS = ("document", "message", "protobuf", "data")


def _text(data: bytes | str | None) -> str | None:
    if data is None or isinstance(data, str):
        return data
    return data.decode("utf-8", "surrogateescape")


def jsonable(value: Any) -> Any:
    """`value` with bytes as surrogateescape text and anything JSON cannot hold as its repr()."""
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else str(jsonable(k))): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def record(
    kind: str,
    reason: str,
    data: bytes | str | None,
    *,
    offset: Any = None,
    next_offset: Any = None,
    message: dict[str, Any] | None = None,
    status: int | None = None,
    error: Any = None,
    action: Any = None,
) -> dict[str, Any]:
    """One dead letter, every key of the schema present (the writer adds `time` and `plugin`)."""
    assert kind in KINDS, kind
    return {
        "kind": kind,
        "reason": reason,
        "data": _text(data),
        "offset": jsonable(offset),
        "next_offset": jsonable(next_offset),
        "message": None if message is None else jsonable(message),
        "status": status,
        "error": error,
        "action": action,
    }


def message_record(reason: str, message: Any, **extra: Any) -> dict[str, Any]:
    """The dead letter of a whole message: a dict in lua_sandbox's table shape or protobuf bytes.

    A dict keeps its Payload in `data` and everything else in `message`. Protobuf bytes are
    decoded the same way; bytes that are not a message are kept as they are (kind "protobuf")."""
    if isinstance(message, bytes | bytearray):
        from hindsight_py import message as hmsg

        try:
            decoded = hmsg.decode(bytes(message)).to_dict()
        except hmsg.DecodeError:
            return record("protobuf", reason, bytes(message), **extra)
        decoded["Uuid"] = decoded["Uuid"].hex() if isinstance(decoded.get("Uuid"), bytes) else decoded.get("Uuid")
        message = decoded
    rest = dict(message) if isinstance(message, dict) else {"value": message}
    payload = rest.pop("Payload", None)
    if payload is not None and not isinstance(payload, bytes | str):
        rest["Payload"] = payload  # not text: it stays with the rest
        payload = None
    return record("message", reason, payload, message=rest, **extra)


class DeadLetterFile:
    """Appends records to one plugin's dead-letter file; shared by every writer in the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.plugin = path.name.removesuffix(".jsonl")
        self._lock = threading.Lock()

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        lines = [
            json.dumps({"time": stamp, "plugin": self.plugin, **r}, separators=(",", ":"), default=repr) + "\n"
            for r in records
        ]
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # opened for each append: a file moved away or removed while hindsight runs starts anew
            with open(self.path, "a", encoding="ascii") as fh:
                fh.writelines(lines)
                fh.flush()
                if stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # not /dev/null
                    os.fsync(fh.fileno())


_files: dict[str, DeadLetterFile] = {}
_files_lock = threading.Lock()


def dead_letter_file(path: Path | str) -> DeadLetterFile:
    """The writer of `path` (one per file and process, so that appends never interleave)."""
    key = os.path.abspath(path)
    with _files_lock:
        f = _files.get(key)
        if f is None:
            f = _files[key] = DeadLetterFile(Path(key))
        return f


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """The records of a dead-letter file (tests and tools)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


def data_bytes(rec: dict[str, Any]) -> bytes | None:
    """The exact bytes of a record's `data`."""
    data = rec.get("data")
    return None if data is None else data.encode("utf-8", "surrogateescape")
