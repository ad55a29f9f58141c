"""Native Elasticsearch/OpenSearch output: the keys of elasticsearch_bulk_api.cfg, in Python.

Every matched message's Payload becomes one document (the payload encoder of the Lua plugin).
Documents are sent in bulk requests of at most `flush_count` documents or `flush_bytes` bytes,
and the queue checkpoint only moves once the server has indexed (or we dead-lettered) them.

Sample cfg (everything but filename and message_matcher is optional)::

    filename        = "elasticsearch_bulk.py"
    message_matcher = "Logger == 'input.file'"
    ticker_interval = 10          -- seconds: send a partial batch at least this often
    address         = "127.0.0.1" -- or url = "https://es.example.com:9200", or urls = {...}
    port            = 9200
    flush_count     = 5000
    flush_bytes     = 8 * 1024 * 1024
    timeout         = 30
    username = "elastic"; password = "..."   -- or api_key = "..."
    ca_certs = "/etc/ssl/my-ca.pem"; verify_certs = true
    gzip            = false
    op_type         = "index"     -- or "create"
    pipeline        = nil         -- an ingest pipeline name
    id_field        = "eventID"   -- `_id` from this top-level JSON key of the payload
    encoders_elasticsearch_common = {
        index = "cloudtrail",                   -- %{Header}, %{Fields[x]} and %{%Y.%m.%d} interpolate
        type_name = "doc",                      -- sent only to servers that accept types
        es_index_from_timestamp = true,
    }
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from hindsight_py import message as hmsg
from hindsight_py.outputs.elasticsearch import SendInterrupted
from hindsight_py.outputs.lua_binding import ChannelStopEvent, sender_from_config
from hindsight_py.plugin import (
    current_message,
    dead_letter,
    is_running,
    log,
    read_config,
    read_message,
    update_checkpoint,
)

_INTERPOLATION = re.compile(r"%\{([^}]*)\}")


def _cfg(key: str, default: Any) -> Any:
    v = read_config(key)
    return default if v is None else v


encoder_cfg = read_config("encoders_elasticsearch_common") or {}
index_template = str(encoder_cfg.get("index", "heka-%{%Y.%m.%d}"))
type_name = encoder_cfg.get("type_name")
index_from_timestamp = bool(encoder_cfg.get("es_index_from_timestamp", False))
op_type = str(_cfg("op_type", "index"))
pipeline = read_config("pipeline")
id_field = read_config("id_field")
id_template = encoder_cfg.get("id")
flush_count = int(_cfg("flush_count", 5000))
flush_bytes = int(_cfg("flush_bytes", 8 << 20))
ticker_interval = int(_cfg("ticker_interval", 10))
if flush_count <= 0:
    raise ValueError("flush_count must be greater than zero")
if op_type not in ("index", "create"):
    raise ValueError("op_type must be 'index' or 'create'")

_all_cfg = {k: read_config(k) for k in (
    "address", "port", "url", "urls", "timeout", "max_retry", "discard_on_error", "abort_on_error",
    "username", "password", "api_key", "ca_certs", "verify_certs", "client_cert", "client_key", "gzip",
    "type_conflicts", "index_template")}
_output_path = read_config("output_path")
_logger = read_config("Logger")


class _State:
    sender: Any = None
    accepts_types: bool | None = None
    parts: list[bytes] = []
    count = 0
    size = 0
    last_flush = time.monotonic()
    constant_action: bytes | None = None


S = _State()


def _sender() -> Any:
    if S.sender is None:
        from pathlib import Path

        S.sender = sender_from_config(
            _all_cfg,
            dead_letter_path=Path(_output_path) / "dead_letter" / f"{_logger}.jsonl",
            log=log,
            stop_event=ChannelStopEvent(is_running),
        )
    return S.sender


def _types_ok() -> bool:
    if S.accepts_types is None:
        info = _sender().detect()
        if info is None:
            return False
        S.accepts_types = info.accepts_types
    return S.accepts_types


def _interpolate(template: str) -> str:
    if "%{" not in template:
        return template
    msg = current_message()

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key.startswith("%"):
            secs = (msg.timestamp / 1e9) if (index_from_timestamp and msg is not None) else time.time()
            return time.strftime(key, time.gmtime(secs))
        if key.startswith("Fields[") and key.endswith("]"):
            v = msg.field_value(key[7:-1]) if msg else None
        else:
            v = read_message(key)
        return m.group(0) if v is None else str(v)

    return _INTERPOLATION.sub(sub, template)


_ID_KEY: bytes | None = None


def _doc_id(payload: bytes) -> str | None:
    if id_field:
        key = f'"{id_field}":"'.encode()
        at = payload.find(key)
        if at >= 0 and payload.find(key, at + 1) < 0:
            end = payload.find(b'"', at + len(key))
            if end > 0 and b"\\" not in payload[at + len(key):end]:
                return payload[at + len(key):end].decode("utf-8", "surrogateescape")
        try:
            v = json.loads(payload).get(id_field)
        except (ValueError, AttributeError):
            return None
        return None if v is None else str(v)
    if id_template:
        return _interpolate(str(id_template))
    return None


def _action(payload: bytes) -> bytes:
    if S.constant_action is not None:
        return S.constant_action
    meta: dict[str, Any] = {"_index": _interpolate(index_template).lower()}
    if type_name and _types_ok():
        meta["_type"] = _interpolate(str(type_name))
    if pipeline:
        meta["pipeline"] = pipeline
    doc_id = _doc_id(payload)
    if doc_id is not None:
        meta["_id"] = doc_id
    line = json.dumps({op_type: meta}, separators=(",", ":")).encode() + b"\n"
    if "%{" not in index_template and not (type_name and "%{" in str(type_name)) and not id_field and not id_template:
        S.constant_action = line
    return line


def _flush(checked: bool = False) -> bool:
    """Send the batch; True once every document is indexed or dead-lettered."""
    if S.count == 0:
        return True
    body = b"".join(S.parts)
    try:
        _sender().send(body, S.count, sources_checked=checked)
    except SendInterrupted:
        log(4, f"stopped with {S.count} documents undelivered; they stay queued for the next run")
        raise
    S.parts = []
    S.count = 0
    S.size = 0
    S.last_flush = time.monotonic()
    return True


def process_message(sequence_id: int) -> int:
    raw = read_message("raw")
    payload = hmsg.payload_of(raw)
    if payload is None:
        return -2
    S.parts.append(_action(payload))
    S.parts.append(payload if payload.endswith(b"\n") else payload + b"\n")
    S.count += 1
    S.size += len(payload)
    if S.count >= flush_count or S.size >= flush_bytes:
        _flush()
        return 0
    return -4


_NL = b"\n"
# Every document gets the same action line unless the index, type or id depend on the message.
_CONSTANT_ACTION = not (
    "%{" in index_template or id_field or id_template or (type_name and "%{" in str(type_name))
)


def _process_messages(raws: list[bytes]) -> int:
    """The whole batch at once (the runner's fast path): the same documents as process_message."""
    if S.constant_action is None:
        _action(b"{}")  # builds and caches the constant action line
    payloads = hmsg.payloads_of(raws)
    if any(p is None or p[:1] != b"{" or p[-1:] == _NL for p in payloads):
        rc = -4
        for raw in raws:
            rc = _add_one(raw)
        return rc
    action = S.constant_action
    assert action is not None
    # one C-level join per batch: action, payload, newline for every document
    S.parts.append(action + (_NL + action).join(payloads) + _NL)  # type: ignore[arg-type]
    S.count += len(payloads)
    S.size += sum(map(len, payloads))  # type: ignore[arg-type]
    if S.count >= flush_count or S.size >= flush_bytes:
        _flush(checked=True)
        return 0
    return -4


def _add_one(raw: bytes) -> int:
    payload = hmsg.payload_of(raw)
    if payload is None:
        return 0 if S.count == 0 else -4
    if payload[:1] != b"{":
        dead_letter("not a JSON object, so it cannot be a document", payload)
        return 0 if S.count == 0 else -4
    S.parts.append(_action(payload))
    S.parts.append(payload if payload.endswith(_NL) else payload + _NL)
    S.count += 1
    S.size += len(payload)
    if S.count >= flush_count or S.size >= flush_bytes:
        _flush(checked=True)
        return 0
    return -4


if _CONSTANT_ACTION:
    process_messages = _process_messages


def timer_event(ns: int, shutdown: bool) -> None:
    if S.count and (shutdown or time.monotonic() - S.last_flush >= ticker_interval):
        _flush()
        update_checkpoint()
