"""Native Elasticsearch/OpenSearch output: elasticsearch_bulk_api.cfg's keys, in Python, and faster.

Every matched message's Payload (a JSON object) becomes one document, as with the Lua plugin
and encoders.elasticsearch.payload. Documents go out in bulk requests of at most `flush_count`
documents and at most `flush_bytes` bytes; the queue checkpoint moves only once the server has
indexed them, or they are in the dead-letter file with the reason. docs/outputs.md lists every
key; the sample cfg is run/output/elasticsearch_bulk.cfg.off.

The hot path (constant action line, the usual case) handles a whole batch of messages with a
few C-level calls: one walk of the messages to check that each Payload is a document as it is,
and, per request, one call that walks them again (to size the body, then to copy the Payloads
from the messages into it). Nothing is parsed as JSON unless a payload needs repair or
`id_field` cannot be found by a plain search.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hindsight_py import message as hmsg
from hindsight_py import peek
from hindsight_py.outputs.bulk_body import (
    bodies_from_messages_in_c,
    bulk_body_of_messages,
    message_documents_size,
    one_line_objects,
)
from hindsight_py.outputs.bulk_lines import keyed_action_lines
from hindsight_py.outputs.delivery import sender_from_config, urls_from_config
from hindsight_py.outputs.elasticsearch import BulkSender
from hindsight_py.outputs.sigv4 import service_for, signer_from_config
from hindsight_py.plugin import (
    dead_letter,
    decode_message,
    deliver_in_background,
    log,
    logger,
    read_config,
    read_message,
    update_checkpoint,
)

LOG_ERR, LOG_WARNING, LOG_INFO = 3, 4, 6
_NL = b"\n"
# Statuses of GET / that mean "this endpoint does not tell" rather than "not reachable":
# OpenSearch Serverless, proxies and restricted users. Such servers take no mapping types.
_ROOT_HIDDEN = frozenset({403, 404, 405, 501})
_HEADER_NAMES = frozenset({"Uuid", "Timestamp", "Type", "Logger", "Severity", "Payload", "EnvVersion", "Pid",
                           "Hostname"})
_PLACEHOLDER = re.compile(r"%\{(.*?)\}")


# -- configuration ----------------------------------------------------------------------------


def _cfg(key: str, default: Any = None) -> Any:
    value = read_config(key)
    return default if value is None else value


def _positive_int(key: str, default: int) -> int:
    value = _cfg(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1 or value != int(value):
        raise ValueError(f"{key} must be a whole number greater than zero, not {value!r}")
    return int(value)


def _optional_str(table: dict[str, Any], key: str, where: str = "") -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}{key} must be nil or a string")
    return value


def _optional_str_cfg(key: str) -> str | None:
    return _optional_str({key: read_config(key)}, key)


_encoder = _cfg("encoders_elasticsearch_common", {})
if not isinstance(_encoder, dict):
    raise ValueError("encoders_elasticsearch_common must be a table")
index_template: str = _optional_str(_encoder, "index", "encoders_elasticsearch_common.") or "heka-%{%Y.%m.%d}"
# encoders.elasticsearch.common's default; only Elasticsearch 6 and older ever see it
type_template: str | None = _optional_str(_encoder, "type_name", "encoders_elasticsearch_common.") or "message"
id_template: str | None = _optional_str(_encoder, "id", "encoders_elasticsearch_common.")
index_from_timestamp = _encoder.get("es_index_from_timestamp", False)
if not isinstance(index_from_timestamp, bool):
    raise ValueError("encoders_elasticsearch_common.es_index_from_timestamp must be nil or boolean")

flush_count = _positive_int("flush_count", 5000)
flush_bytes = _positive_int("flush_bytes", 8 << 20)
op_type = _cfg("op_type", "index")
if op_type not in ("index", "create"):
    raise ValueError(f"op_type must be 'index' or 'create', not {op_type!r}")
pipeline = _optional_str_cfg("pipeline")
id_field = _optional_str_cfg("id_field")
abort_on_error = bool(_cfg("abort_on_error", False))

_SENDER_KEYS = (
    "address", "port", "url", "urls", "timeout", "max_retry", "discard_on_error", "abort_on_error", "username",
    "password", "api_key", "ca_certs", "verify_certs", "client_cert", "client_key", "gzip", "aws_sigv4",
    "aws_region", "aws_service", "aws_profile",
    "type_conflicts", "index_template",  # outputs/type_conflicts.py: renames on mapping conflicts, index template
    "max_in_flight",  # outputs/delivery.py: bulk requests on their way at once
)
_sender_cfg = {key: read_config(key) for key in _SENDER_KEYS}
_urls = urls_from_config(_sender_cfg)
_serverless = bool(_sender_cfg["aws_sigv4"]) and service_for(_urls[0], _sender_cfg["aws_service"]) == "aoss"


# -- state ------------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.sender: BulkSender
        self.pipe: Any  # the sender in a background thread (hindsight_py.outputs.delivery.PipelinedSender)
        self.accepts_types: bool | None = None  # None until the server said (or could not say)
        self.constant_action: bytes | None = None  # the action line, when nothing in it depends on the message
        self.payloads: list[bytes] = []  # pending sources, one line each, without their newline
        # or, with a constant action line, the pending messages themselves, each one's Payload a
        # source as it is: their bodies are made straight from them (bulk_body_of_messages)
        self.messages: list[bytes] = []
        self.actions: list[bytes] = []  # their action lines, when they differ per message
        self.size = 0  # bytes the pending documents take in a bulk body
        self.checked = True  # every pending source starts with "{" (else the sender sets the others aside)
        self.stopped = False  # a stop request interrupted a send: nothing more is sent in this run
        self.time_key: int | None = None  # the last action line of a template that only uses the time
        self.time_line = b""
        self.head_cache: dict[int, bytes] = {}  # _take_keyed: time // _time_unit -> _heads()[0]


S = _State()
_action_is_constant = not id_field and not any(
    "%{" in t for t in (index_template, type_template or "", id_template or ""))


def _make_sender() -> BulkSender:
    sender = sender_from_config(
        _sender_cfg,
        dead_letter_path=Path(str(read_config("output_path"))) / "dead_letter" / f"{read_config('Logger')}.jsonl",
        log=logger(),  # the sender also logs from its delivery thread
    )  # its stop event comes with deliver_in_background, below
    sender.signer = signer_from_config(_sender_cfg, _urls[0])
    return sender


S.sender = _make_sender()
S.pipe = deliver_in_background(S.sender, abort_on_error=abort_on_error)


# -- the server: detection, `_type` -----------------------------------------------------------


def _detect() -> bool:
    """Ask the server what it is; True once it is known whether it takes `_type`."""
    if S.accepts_types is not None:
        return True
    if _serverless:
        S.accepts_types = False
        log(LOG_INFO, f"{_urls[0]}: OpenSearch Serverless (no GET /): `_type` is left out")
        return True
    info = S.sender.detect()
    if info is not None:
        S.accepts_types = info.accepts_types
        log(LOG_INFO, f"{', '.join(_urls)}: {info.distribution} {info.version}; `_type` "
            + ("is sent" if info.accepts_types else "is left out (this server has no mapping types)"))
        return True
    status = S.sender.detect_failure_status
    if status in (401, 407):
        log(LOG_ERR, f"the server refused the credentials (HTTP {status}): check username/password, api_key or "
            "the AWS credentials; documents stay queued until it accepts them")
    if status in _ROOT_HIDDEN:
        S.accepts_types = False
        log(LOG_WARNING, f"GET / answered HTTP {status}, so the server version is unknown: assuming "
            "Elasticsearch 7+/OpenSearch (no `_type`)")
        return True
    return False


def _wait_for_server() -> bool:
    """Block until the server is identified; False if a stop was requested meanwhile.

    Sending without knowing would be a guess: Elasticsearch 6 rejects every document without
    `_type`, Elasticsearch 8 and OpenSearch 2 every document with one. A server that cannot be
    reached could not take the documents anyway.
    """
    delay = 0.5
    stop = S.sender.stop_event
    while not _detect():
        # detect() logged why (unreachable, TLS verification, 401 credentials ...); documents stay queued
        if stop is not None and stop.wait(delay):
            return False
        delay = min(delay * 2, 30.0)
    return True


# -- action lines -----------------------------------------------------------------------------


def _lua_number(value: float) -> str:
    # tostring() of a Lua 5.1 number: %.14g
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else f"{value:.14g}"


def _header_text(msg: hmsg.Message, name: str) -> str | None:
    if name == "Uuid":
        u = msg.uuid.hex().upper()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    if name == "Timestamp":
        secs, ns = divmod(msg.timestamp, 1_000_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"
    value = {"Type": msg.type, "Logger": msg.logger, "Severity": msg.effective_severity, "Payload": msg.payload,
             "EnvVersion": msg.env_version, "Pid": msg.pid, "Hostname": msg.hostname}[name]
    return None if value is None else str(value)


def _field_text(msg: hmsg.Message, name: str) -> str | None:
    value = msg.field_value(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _lua_number(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _interpolate(template: str, raw: bytes, secs: float) -> str:
    """heka.msg_interpolate: headers, then Fields, then strftime of `secs`; unresolved ones stay."""
    msg: list[hmsg.Message] = []

    def message() -> hmsg.Message:
        if not msg:
            msg.append(decode_message(raw))
        return msg[0]

    def resolve(m: re.Match[str]) -> str:
        name = m.group(1)
        text: str | None = None
        if name in _HEADER_NAMES:
            text = _header_text(message(), name)
        elif name.startswith("Fields[") and name.endswith("]"):
            text = _field_text(message(), name[7:-1])
        elif "%" in name:
            # a strftime pattern (upstream would first look for a field of that name: none has one)
            formatted = time.strftime(name, time.gmtime(secs))
            text = formatted if formatted != name else None
        else:
            text = _field_text(message(), name)
        return m.group(0) if text is None else text

    return _PLACEHOLDER.sub(resolve, template)


def _uses_message_only_for_time(template: str) -> bool:
    return all("%" in name and name not in _HEADER_NAMES and not name.startswith("Fields[")
               for name in _PLACEHOLDER.findall(template))


# index/type/id lines that depend only on time are cached per second
_templates_time_only = all(_uses_message_only_for_time(t) for t in (index_template, type_template or ""))
# lines made per batch by _take_keyed: the message's time, if any, from its Timestamp, not the clock
_time_keyed = _templates_time_only and not id_template and (
    index_from_timestamp or not any("%{" in t for t in (index_template, type_template or "")))
# strftime directives that change at most daily, or hourly: a template of those alone gives the
# same line for every second of a day (an hour); with any other, lines are made per second
_DAILY = frozenset("YmdyjaAbBhuwCeDFGgVUWx%")
_HOURLY = _DAILY | frozenset("HIpkl")


def _time_unit_of(templates: tuple[str, ...]) -> int:
    names = [name for t in templates for name in _PLACEHOLDER.findall(t)]
    directives = {d for name in names for d in re.findall(r"%-?(.)", name)}
    return 86400 if directives <= _DAILY else 3600 if directives <= _HOURLY else 1


_time_unit = _time_unit_of((index_template, type_template or ""))
_time_only = not id_field and all(_uses_message_only_for_time(t) for t in (index_template, type_template or "",
                                                                         id_template or ""))


def _id_from_payload(payload: bytes) -> str | None:
    assert id_field is not None
    key = b'"' + id_field.encode() + b'":"'
    at = payload.find(key)
    # the plain search is right only for a single, unescaped occurrence
    if at >= 0 and payload.find(key, at + 1) < 0:
        start = at + len(key)
        end = payload.find(b'"', start)
        if end > 0 and b"\\" not in payload[start:end]:
            return payload[start:end].decode("utf-8", "surrogateescape")
    try:
        value = json.loads(payload).get(id_field)
    except (ValueError, AttributeError):
        return None
    return None if value is None or isinstance(value, dict | list) else str(value)


def _action_line(raw: bytes, payload: bytes) -> bytes:
    secs = time.time()
    if index_from_timestamp and raw:
        secs = peek.timestamp_of(raw) / 1e9
    if _time_only and not _action_is_constant:
        key = int(secs)
        if key == S.time_key:
            return S.time_line
    meta: dict[str, str] = {"_index": _interpolate(index_template, raw, secs).lower()}
    if type_template and S.accepts_types:
        meta["_type"] = _interpolate(type_template, raw, secs)
    doc_id = _id_from_payload(payload) if id_field else (
        _interpolate(id_template, raw, secs) if id_template else None)
    if doc_id is not None:
        meta["_id"] = doc_id
    if pipeline:
        meta["pipeline"] = pipeline
    line = json.dumps({op_type: meta}, separators=(",", ":")).encode()  # ASCII: any byte survives
    if _time_only and not _action_is_constant:
        S.time_key, S.time_line = int(secs), line
    return line


# -- taking messages in -----------------------------------------------------------------------


def _repair(payload: bytes) -> bytes | None:
    """A payload with line breaks as one line, or None when it is not JSON (then it is dead-lettered)."""
    payload = payload.rstrip(b"\r\n")
    if _NL not in payload:
        return payload
    try:
        json.loads(payload)
    except ValueError:
        return None
    # JSON strings cannot hold raw line breaks: every one is whitespace between tokens
    return payload.replace(b"\r", b" ").replace(_NL, b" ")


def _take_slowly(raws: list[bytes], payloads: list[bytes | None]) -> None:
    """One message at a time: missing payloads, line breaks, actions that differ per message."""
    for raw, payload in zip(raws, payloads, strict=True):
        if payload is None:
            try:
                payload = peek.payload_of(raw)
            except hmsg.DecodeError as exc:
                dead_letter(f"the message cannot be decoded: {exc}", raw)
                continue
            if payload is None:
                dead_letter("the message has no Payload, so there is no document to index", raw)
                continue
        if _NL in payload:
            repaired = _repair(payload)
            if repaired is None:
                dead_letter("the payload spans several lines and is not JSON, so it cannot be a document", payload)
                continue
            payload = repaired
        if payload[:1] != b"{":
            S.checked = False  # the sender sets aside what is not a JSON object
        action = S.constant_action if S.constant_action is not None else _action_line(raw, payload)
        if S.constant_action is None:
            S.actions.append(action)
        S.payloads.append(payload)
        S.size += len(payload) + len(action) + 2


def _take(raws: list[bytes]) -> None:
    if S.constant_action is None and _time_keyed:
        _take_keyed(raws)
        return
    if S.constant_action is not None and not S.payloads and bodies_from_messages_in_c():
        size = message_documents_size(raws)
        if size is not None:
            S.messages += raws
            S.size += size + len(raws) * (len(S.constant_action) + 2)
            return
    _payloads_of_messages()  # the pending messages before these, in their place
    payloads = peek.payloads_of(raws)
    if S.constant_action is not None and None not in payloads and one_line_objects(payloads):  # type: ignore[arg-type]
        S.payloads += payloads  # type: ignore[arg-type]
        S.size += sum(map(len, payloads)) + len(payloads) * (len(S.constant_action) + 2)  # type: ignore[arg-type]
        return
    _take_slowly(raws, payloads)


def _payloads_of_messages() -> None:
    """The pending messages as pending payloads, which the other ways of taking messages add to
    (only messages are pending then). Each one's Payload is a document as it is
    (message_documents_size said so): the same documents, the same size, in one call."""
    if S.messages:
        S.payloads = peek.payloads_of(S.messages)  # type: ignore[assignment]
        S.messages = []


def _heads(secs: float) -> tuple[bytes, bytes]:
    """The action line of a message of that time, cut where the `_id` goes: (before, after); the
    line itself and b"" without id_field. What _action_line writes, for an id of plain ASCII."""
    meta: dict[str, str] = {"_index": _interpolate(index_template, b"", secs).lower()}
    if type_template and S.accepts_types:
        meta["_type"] = _interpolate(type_template, b"", secs)
    if not id_field:
        if pipeline:
            meta["pipeline"] = pipeline
        return json.dumps({op_type: meta}, separators=(",", ":")).encode(), b""
    head = json.dumps({op_type: meta}, separators=(",", ":"))[:-2] + ',"_id":"'
    tail = '"' + ("" if not pipeline else ',"pipeline":' + json.dumps(pipeline)) + "}}"
    return head.encode(), tail.encode()


def _take_keyed(raws: list[bytes]) -> None:
    """The batch with action lines that depend only on each message's Timestamp (the daily index)
    and on the `_id` its payload holds: Payloads and Timestamps cut out, one line head per unit of
    data time, the ids put in, all in one C loop (keyed_action_lines). A message the fast way
    cannot vouch for (no Timestamp, an id that is missing, repeated, escaped or not plain ASCII, a
    payload that is not one line of JSON object) goes the slow way, in its place."""
    cache = S.head_cache
    if len(cache) > 100_000:  # bounded: one entry per day (or hour, second) of data time
        cache.clear()
    # the heads per unit of data time the templates can tell apart (the second _action_line
    # would format, cut down to that unit), made once per unit
    key = b'"' + id_field.encode() + b'":"' if id_field else b""
    payloads, lines = keyed_action_lines(raws, _time_unit, index_from_timestamp, cache,
                                         lambda time_key: _heads(time_key * _time_unit)[0], key, _heads(0.0)[1])
    # (with an id_field, a message without Payload has no line either)
    if None not in lines and (id_field or None not in payloads) and one_line_objects(payloads):  # type: ignore[arg-type]
        S.payloads += payloads  # type: ignore[arg-type]
        S.actions += lines  # type: ignore[arg-type]
        S.size += sum(map(len, payloads)) + sum(map(len, lines)) + 2 * len(lines)  # type: ignore[arg-type]
        return
    for raw, payload, line in zip(raws, payloads, lines, strict=True):
        if line is not None and payload is not None and one_line_objects([payload]):
            S.payloads.append(payload)
            S.actions.append(line)
            S.size += len(payload) + len(line) + 2
        else:
            _take_slowly([raw], [payload])


# -- sending ----------------------------------------------------------------------------------


def _cut(start: int) -> int:
    """The end of the request that starts at document `start`: at most flush_count documents and
    flush_bytes bytes (a single larger document goes alone)."""
    n = len(S.payloads)
    end = min(n, start + flush_count)
    constant = S.constant_action
    per_doc = len(constant) + 2 if constant is not None else 2
    size = sum(map(len, S.payloads[start:end])) + per_doc * (end - start)
    if constant is None:
        size += sum(map(len, S.actions[start:end]))
    if size <= flush_bytes:
        return end
    size = 0
    for i in range(start, end):
        doc = len(S.payloads[i]) + per_doc + (0 if constant is not None else len(S.actions[i]))
        if size + doc > flush_bytes and i > start:
            return i
        size += doc
    return end


def _body(start: int, end: int) -> bytes:
    # action, source, action, source, ..., b"": one join, one copy of the body, final newline included
    n = end - start
    lines: list[bytes] = [S.constant_action or b""] * (2 * n) + [b""]
    if S.constant_action is None:
        lines[0:2 * n:2] = S.actions[start:end]
    lines[1:2 * n:2] = S.payloads[start:end]
    return _NL.join(lines)


def _requests() -> Iterator[tuple[bytes, int]]:
    """(body, documents) of each request the pending documents make, in order."""
    start = 0
    while start < len(S.messages):
        body, count = bulk_body_of_messages(S.messages, start, flush_count, flush_bytes,
                                            S.constant_action)  # type: ignore[arg-type]
        yield body, count
        start += count
    start = 0  # (pending payloads and pending messages are never both there)
    while start < len(S.payloads):
        end = _cut(start)
        yield _body(start, end), end - start
        start = end


def _flush() -> bool:
    """Hand every pending document over for delivery; True once they all are.

    The requests go out in the background (deliver_in_background), up to max_in_flight at once,
    while the next batch is read: the host commits nothing past a request until it and every
    request before it are delivered. False if an
    earlier delivery was cut short by a stop request (the runner logs it when the run ends):
    nothing more is sent in this run, and the undelivered messages stay in the queue for the next."""
    if not (S.payloads or S.messages) or S.stopped:
        return not (S.payloads or S.messages)
    for body, count in _requests():
        err = S.pipe.submit(body, count, sources_checked=S.checked)
        if err:
            S.stopped = True
            if not S.pipe.interrupted:
                raise RuntimeError(err)  # abort_on_error, or a failure the sender could not handle
            return False
    S.payloads = []
    S.messages = []
    S.actions = []
    S.size = 0
    S.checked = True
    return True


# -- the plugin API ---------------------------------------------------------------------------


def process_messages(raws: list[bytes]) -> int:
    """A batch of messages: 0 once they are all delivered, -4 while some wait for a fuller request."""
    if S.stopped:
        return -4  # stopping: take nothing more, commit nothing
    if S.accepts_types is None and not _wait_for_server():
        return -3  # stop requested before the server answered: offer the batch again next run
    if S.constant_action is None and _action_is_constant:
        S.constant_action = _action_line(b"", b"")
    _take(raws)
    pending = len(S.payloads) + len(S.messages)
    if pending >= flush_count or S.size >= flush_bytes:
        return 0 if _flush() else -4
    return -4 if pending else 0


def process_message(sequence_id: int) -> int:
    """The same for runtimes that hand over one message at a time."""
    return process_messages([read_message("raw")])


def timer_event(ns: int, shutdown: bool) -> None:
    if S.stopped:
        return
    if _flush():
        update_checkpoint()  # everything read so far is delivered


_detect()  # at start: log what the server is, or why it cannot be reached yet
