"""The API a Python plugin calls: the lua_sandbox functions, the Python way.

A plugin is a `.py` file named by `filename` in its cfg. It defines the same callbacks as a Lua
plugin and imports what it needs from here::

    from hindsight_py.plugin import read_config, read_message, inject_message

    def process_message(checkpoint):          # input: the last checkpoint (None the first time)
        ...
        return 0

    def process_message(sequence_id):         # output: read the message with read_message()
        payload = read_message("Payload")
        return 0

    def timer_event(ns, shutdown):            # analysis and output, optional
        ...

Return codes and their meaning are upstream's (docs/plugins.md). The functions act on the plugin
being called: one process may host several analysis plugins, each sees its own config and message.
A thread the plugin starts calls them through ``bind(fn)`` (or logs through ``logger()``): a new
thread has no plugin bound, so it can never be charged to another plugin of the process.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from hindsight_py.message import Message
    from hindsight_py.outputs.delivery import PipelinedSender
    from hindsight_py.outputs.elasticsearch import BulkSender

_T = TypeVar("_T")


class Host(Protocol):
    """What the functions below reach: the plugin being called. The host of Python plugins
    (sandbox/python.py) implements it and binds itself with ``enter`` around each callback."""

    config: dict[str, Any]

    def inject(self, msg: Any, checkpoint: Any) -> None: ...
    def inject_payloads(self, payloads: list[bytes], checkpoint: Any, type: str | None) -> None: ...
    def inject_records(self, payloads: list[bytes], stamps: list[int], fields: dict[str, list[str | None]],
                       checkpoint: Any, type: str | None) -> None: ...
    def inject_json_records(self, data: bytes, pos: int, max_records: int, fields: tuple[str, ...],
                            stamp_key: str | None, type: str | None) -> tuple[int, int, int, int] | None: ...
    def inject_lines(self, data: bytes, checkpoint: Any, end: int | None, type: str | None,
                     too_long: Callable[[bytes, int], None] | None) -> int: ...
    def inject_payload(self, payload_type: str, payload_name: str | None, parts: tuple[Any, ...]) -> None: ...
    def add_to_payload(self, parts: tuple[Any, ...]) -> None: ...
    def read_message(self, name: str, field_index: int, array_index: int) -> Any: ...
    def current_message(self) -> Message | None: ...
    def encode(self, msg: Any, framed: bool) -> bytes: ...
    def is_running(self) -> bool: ...
    def update_checkpoint(self, sequence_id: int | None, failures: int) -> None: ...
    def create_matcher(self, expression: str) -> Any: ...
    def dead_letter(self, reason: str, data: bytes | str) -> None: ...
    def count_delivery(self, indexed: int, dead_lettered: int, set_aside: int, retried: int) -> None: ...
    def background_delivery(self, sender: BulkSender, abort: bool) -> PipelinedSender: ...
    def track_delivery(self, delivery: Any) -> None: ...
    def log(self, level: int, text: str) -> None: ...


# The plugin being called, per thread and per context: one process may host several analysis
# plugins, and a helper thread must not be charged to whichever plugin happens to be running.
# A new thread starts with no plugin bound (threads do not inherit context variables): it calls
# the API through `bind(fn)` (or logs through `logger()`), which carry the plugin that made them.
_host: contextvars.ContextVar[Host | None] = contextvars.ContextVar("hindsight_py.plugin.host", default=None)


def enter(host: Host) -> contextvars.Token[Host | None]:
    """For the host: ``host`` is the plugin being called until ``leave(token)``."""
    return _host.set(host)


def leave(token: contextvars.Token[Host | None]) -> None:
    _host.reset(token)


def _sandbox() -> Host:
    host = _host.get()
    if host is None:
        raise RuntimeError("hindsight_py.plugin functions can only be called from a running plugin "
                           "(in a thread the plugin started: through hindsight_py.plugin.bind(fn))")
    return host


def bind(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn``, calling the API as the plugin that calls ``bind``: for the threads a plugin starts,
    e.g. ``threading.Thread(target=bind(work)).start()``."""
    host = _sandbox()

    def bound(*args: Any, **kwargs: Any) -> _T:
        token = _host.set(host)
        try:
            return fn(*args, **kwargs)
        finally:
            _host.reset(token)

    return bound


def read_config(key: str) -> Any:
    """The cfg value (with Hindsight's runtime keys such as Logger, output_path), or None."""
    return _sandbox().config.get(key)


def inject_message(msg: dict[str, Any] | Message | bytes | None = None, checkpoint: float | str | None = None) -> None:
    """Queue a message: a dict in lua_sandbox's table shape, a Message, or protobuf bytes.

    Inputs may pass a checkpoint (number or string), recorded once the message is on disk, and
    may pass `msg=None` with a checkpoint alone.
    """
    _sandbox().inject(msg, checkpoint)


def inject_payloads(payloads: list[bytes], checkpoint: float | str | None = None, *, type: str | None = None) -> None:
    """Inputs: one message per payload (the fast path for line-oriented inputs), then the checkpoint.

    Equivalent to ``inject_message({"Payload": p, "Type": type})`` for each payload, several times
    faster. A payload larger than max_message_size allows raises ValueError before anything is queued.
    """
    _sandbox().inject_payloads(payloads, checkpoint, type)


def inject_records(
    payloads: list[bytes],
    stamps: list[int],
    fields: dict[str, list[str | None]],
    checkpoint: float | str | None = None,
    *,
    type: str | None = None,
) -> None:
    """Inputs: one message per payload with its own Timestamp (ns) and string Fields, then the checkpoint.

    The same messages as ``inject_message({"Payload": p, "Timestamp": t, "Type": type, "Fields":
    {name: value, ...}})`` for each payload (a None value: no such field in that message), framed
    in one pass. The caller keeps each message within max_message_size (nothing checks it here).
    """
    _sandbox().inject_records(payloads, stamps, fields, checkpoint, type)


def inject_json_records(
    data: bytes,
    pos: int,
    max_records: int,
    *,
    fields: tuple[str, ...] = (),
    stamp_key: str | None = None,
    type: str | None = None,
) -> tuple[int, int, int, int] | None:
    """Inputs: up to ``max_records`` elements of the JSON array in ``data`` from ``pos`` (CloudTrail
    records), one message each, framed in one pass without parsing them into objects.

    Each message is ``inject_message({"Payload": <the record's bytes>, "Timestamp": eventTime, "Type":
    type, "Fields": {name: the record's string value}})``, the record getting ``stamp_key`` (a copy
    of eventTime) unless it has it. Only records already written as compact ``json.dumps(...,
    ensure_ascii=False)`` would write them, with an eventTime "YYYY-MM-DDTHH:MM:SSZ", are taken:
    hindsight_py/json_records.py. Returns (messages queued, where it stopped, status, end of the
    element it stopped at) as frame_json_records says, or None where it cannot (restricted headers).
    No checkpoint: the caller injects one after.
    """
    return _sandbox().inject_json_records(data, pos, max_records, fields, stamp_key, type)


def inject_lines(
    data: bytes,
    checkpoint: float | str | None = None,
    *,
    end: int | None = None,
    type: str | None = None,
    too_long: Callable[[bytes, int], None] | None = None,
) -> int:
    """Inputs: one message per line of ``data[:end]``, then the checkpoint; returns how many.

    The same messages as ``inject_payloads(data[:end].split(b"\\n"))`` without the empty piece
    after a final line break (a last line without one is a line too), made straight from the
    block. A line longer than max_message_size allows goes to ``too_long(line, offset)``; without
    that callback it raises ValueError before anything is queued.
    """
    return _sandbox().inject_lines(data, checkpoint, end, type, too_long)


def inject_payload(payload_type: str = "txt", payload_name: str | None = None, *parts: Any) -> None:
    """Analysis: inject the payload buffer (plus `parts`) as an `inject_payload` message."""
    _sandbox().inject_payload(payload_type, payload_name, parts)


def add_to_payload(*parts: Any) -> None:
    """Analysis: append to the payload buffer that inject_payload sends."""
    _sandbox().add_to_payload(parts)


def read_message(name: str, field_index: int = 0, array_index: int = 0) -> Any:
    """A header (`Payload`, `Timestamp`, ...), `raw`, `framed`, `size`, or `Fields[name]` of the current message."""
    return _sandbox().read_message(name, field_index, array_index)


def current_message() -> Message | None:
    """The current message, decoded (cached per message)."""
    return _sandbox().current_message()


def decode_message(raw: bytes) -> Message:
    from hindsight_py.message import decode

    return decode(raw)


def encode_message(msg: dict[str, Any] | Message, framed: bool = False) -> bytes:
    """Output plugins: the protobuf bytes of a message (framed for a stream when asked)."""
    return _sandbox().encode(msg, framed)


def is_running() -> bool:
    """Inputs: False once a clean stop has been requested."""
    return _sandbox().is_running()


def update_checkpoint(sequence_id: int | None = None, failures: int = 0) -> None:
    """Outputs: commit a batch (no argument) or acknowledge an asynchronous message."""
    _sandbox().update_checkpoint(sequence_id, failures)


def create_message_matcher(expression: str) -> Any:
    """A compiled message_matcher; call it with a Message, or `.eval()` it on the current message."""
    return _sandbox().create_matcher(expression)


def dead_letter(reason: str, data: bytes | str = b"") -> None:
    """Record a message that cannot be passed on, with the reason (never drop data silently)."""
    _sandbox().dead_letter(reason, data)


def count_delivery(indexed: int = 0, dead_lettered: int = 0, set_aside: int = 0, retried: int = 0) -> None:
    """Outputs that ship documents themselves: add to the counts of the run summary
    (documents indexed, dead-lettered, set aside as not documents; requests retried)."""
    _sandbox().count_delivery(indexed, dead_lettered, set_aside, retried)


def deliver_in_background(sender: BulkSender, *, abort_on_error: bool = False) -> PipelinedSender:
    """Outputs: a handle that delivers bulk bodies through `sender` in a background thread.

    ``handle.submit(body, count)`` returns at once (once fewer than the sender's ``connections``
    bodies are on their way) with None, or the error of an earlier delivery. The plugin may then report its messages done:
    the host holds their checkpoint back until the body is delivered, and counts the outcome.
    With ``abort_on_error`` a delivery that dead-lettered documents is an error.
    """
    return _sandbox().background_delivery(sender, abort_on_error)


def track_delivery(delivery: Any) -> None:
    """Outputs: have the host wait for `delivery`, work the plugin finishes after its call returns
    (a write, a request): an object with ``ticket`` (the last piece handed over), ``done`` (the
    last one settled: delivered or dead-lettered), ``busy`` (done != ticket), ``interrupted``, and
    ``wait()`` (wait for what is in flight; its error or None). Once a message is reported done
    (0, or update_checkpoint), its checkpoint is held back until ``done`` reaches the ``ticket``
    of that moment: the extension point any output type delivers through (deliver_in_background
    is one)."""
    _sandbox().track_delivery(delivery)


def logger() -> Callable[[int, str], None]:
    """`log`, bound to this plugin: for threads the plugin runs (`log` itself finds its plugin
    only while a callback runs, or in a function wrapped by `bind`)."""
    return _sandbox().log


def log(level: int, text: str) -> None:
    """Log at a syslog level (3 error, 4 warning, 6 info, 7 debug) under the plugin's name."""
    _sandbox().log(level, text)


__all__ = [
    "add_to_payload",
    "bind",
    "count_delivery",
    "track_delivery",
    "create_message_matcher",
    "current_message",
    "dead_letter",
    "decode_message",
    "deliver_in_background",
    "encode_message",
    "inject_json_records",
    "inject_lines",
    "inject_message",
    "inject_payload",
    "inject_payloads",
    "inject_records",
    "is_running",
    "log",
    "logger",
    "read_config",
    "read_message",
    "update_checkpoint",
]
