"""One table of hand-written vectors for the C loops of hindsight_py/_speedups.c and their Python
twins (framing, peek, json_records, outputs/bulk_lines, outputs/elasticsearch).

Each vector calls the public entry point, which runs the C loop when it is loaded and the Python
twin when it is not; tests/test_speedups.py runs every vector both ways against the same answer.
An answer is a literal, or, for framed bytes, ``Reference``: what the general encoder (no twin)
builds for the same messages. The fuzzing in test_speedups.py draws its pieces from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hindsight_py import framing, message_dict, peek
from hindsight_py import message as hmsg
from hindsight_py.json_records import frame_json_records
from hindsight_py.outputs.bulk_body import (
    bulk_body_of_messages,
    every_line_is_an_object,
    message_documents_size,
    one_line_objects,
)
from hindsight_py.outputs.bulk_lines import id_action_lines, keyed_action_lines

UUID = bytes(range(16))
STAMP = 1_700_000_000_000_000_000  # a Timestamp of nine varint bytes, as every time since 1972
HEADERS = {"logger": "input.file", "hostname": "h", "pid": 3, "now_ns": STAMP}


def fixed_uuids(n: int) -> bytes:
    """What the vectors' framing.random_uuids gives (the test puts it in place)."""
    return UUID * n


@dataclass(frozen=True)
class Reference:
    """The framed messages the general encoder builds: one per dict (restricted headers off)."""

    messages: tuple[dict[str, Any], ...]
    logger: str = HEADERS["logger"]
    hostname: str = HEADERS["hostname"]
    pid: int | None = HEADERS["pid"]

    def bytes(self) -> bytes:
        return b"".join(framing.frame(hmsg.encode(message_dict.from_dict(
            {"Uuid": UUID, "Timestamp": STAMP, **m}, restricted=False, logger=self.logger, hostname=self.hostname,
            pid=self.pid, now_ns=STAMP))) for m in self.messages)


@dataclass(frozen=True)
class Vector:
    twin: str  # the C function (_speedups.<twin>) this vector reaches, and its Python twin
    name: str
    call: Callable[[], Any]
    expected: Any

    @property
    def id(self) -> str:
        return f"{self.twin}:{self.name}"

    def answer(self) -> Any:
        return self.expected.bytes() if isinstance(self.expected, Reference) else self.expected


def message(*, payload: str | None = None, type: str | None = None, timestamp: int | None = STAMP,
            extra: bytes = b"") -> bytes:
    """A message's protobuf bytes (``extra`` appended: repeated headers, damage)."""
    raw = hmsg.encode(hmsg.Message(UUID, timestamp if timestamp is not None else 0, type=type, logger="input.file",
                                    payload=payload, hostname="h", pid=3))
    if timestamp is None:  # cut the Timestamp out: the Uuid is 18 bytes, the Timestamp follows
        end = 19
        while raw[end] & 0x80:
            end += 1
        raw = raw[:18] + raw[end + 1:]
    return raw + extra


# -- the pieces the fuzzing composes, each with its own answer -------------------------------------

# one payload: may it go into a bulk body as it is (starts with "{", no line feed)?
PAYLOAD_PIECES: dict[bytes, bool] = {
    b"{}": True, b'{"a":1}': True, b"": False, b"[1]": False, b'{"a":\n1}': False, b"{" + b"x" * 5000: True,
    b'{"b":"\\n"}': True, b" {}": False,
}
# one line of a bulk body: does it start with "{"?
BODY_LINES: dict[bytes, bool] = {
    b"{}": True, b'{"index":{}}': True, b"": False, b"[1]": False, b" {}": False, b"x": False, b"{" + b"y" * 3000: True,
}
# a document's eventID value: is it taken as the _id as it is (printable ASCII, no quote or backslash)?
ID_VALUES: dict[bytes, bool] = {
    b"abc-123": True, b"": False, b'a\\"b': False, b"\xc3\xbc": False, b"a\x01": False, b"x" * 100: True,
    b"~ !": True,
}

KEY = b'"eventID":"'
HEAD = b'{"index":{"_id":"'
TAIL = b'"}}'


def _vectors() -> list[Vector]:
    v: list[Vector] = []
    add = v.append

    for payload, ok in PAYLOAD_PIECES.items():
        add(Vector("one_line_objects", repr(payload[:12]), lambda p=payload: one_line_objects([p]), ok))
    add(Vector("one_line_objects", "none", lambda: one_line_objects([]), True))
    add(Vector("one_line_objects", "one bad of three", lambda: one_line_objects([b"{}", b"x", b"{}"]), False))

    for line, ok in BODY_LINES.items():
        add(Vector("every_line_is_an_object", repr(line[:12]), lambda b=line + b"\n": every_line_is_an_object(b), ok))
    for body, ok in ((b"", False), (b"{}\n{}", True), (b"{}\nx", False), (b"{}\n\n", False),
                     (b'{"index":{}}\n{"a":1}\n', True), (b"{}\n[1]\n{}\n", False)):
        add(Vector("every_line_is_an_object", repr(body), lambda b=body: every_line_is_an_object(b), ok))

    for value, ok in ID_VALUES.items():
        payload = b'{"k":1,' + KEY + value + b'"}'
        add(Vector("id_action_lines", repr(value[:12]),
                   lambda p=payload: id_action_lines([p], KEY, [HEAD], TAIL), [HEAD + value + TAIL if ok else None]))
    add(Vector("id_action_lines", "key twice", lambda: id_action_lines(
        [b'{' + KEY + b'a","n":{' + KEY + b'b"}}'], KEY, [HEAD], TAIL), [None]))
    add(Vector("id_action_lines", "no closing quote", lambda: id_action_lines([b'{' + KEY + b"cut"], KEY, [HEAD], TAIL),
               [None]))
    add(Vector("id_action_lines", "no payload, no head", lambda: id_action_lines(
        [None, b"{" + KEY + b'a"}'], KEY, [HEAD, None], TAIL), [None, None]))

    def keyed(raws: list[bytes], unit: int = 86400, from_stamp: bool = True, key: bytes = KEY) -> Any:
        heads: dict[int, bytes] = {19_000: b"cached "}
        payloads, lines = keyed_action_lines(raws, unit, from_stamp, heads, lambda k: b"head %d " % k, key, TAIL)
        return lines, sorted(heads)

    day = 86400 * 10**9
    doc = '{"k":1,' + KEY.decode() + 'e-1"}'
    for name, raws, unit, from_stamp, key, answer in (
        ("a day's head, made once", [message(payload=doc, timestamp=20_000 * day + 5)] * 2, 86400, True, KEY,
         ([b"head 20000 e-1" + TAIL] * 2, [19_000, 20_000])),
        ("a head kept", [message(payload=doc, timestamp=19_000 * day)], 86400, True, KEY,
         ([b"cached e-1" + TAIL], [19_000])),
        # t / 1e9 of the last ns of 2023-12-31 rounds up to 2024-01-01 (day 19723), as the slow way's does
        ("a day's last ns, before 1970", [message(payload=doc, timestamp=19_723 * day - 1), message(payload=doc,
         timestamp=day - 10**9), message(payload=doc, timestamp=-1)], 86400, True, KEY,
         ([b"head 19723 e-1" + TAIL, b"head 0 e-1" + TAIL, b"head -1 e-1" + TAIL], [-1, 0, 19_000, 19_723])),
        ("hours", [message(payload=doc, timestamp=3 * 3600 * 10**9)], 3600, True, KEY,
         ([b"head 3 e-1" + TAIL], [3, 19_000])),
        ("not from the Timestamp", [message(payload=doc, timestamp=5 * day)], 86400, False, KEY,
         ([b"head 0 e-1" + TAIL], [0, 19_000])),
        ("no key: the head itself", [message(payload="{}", timestamp=0)], 86400, True, b"", ([b"head 0 "], [0, 19_000])),
        ("no Timestamp, no id, no Payload", [message(payload=doc, timestamp=None), message(payload="{}"),
                                             message()], 86400, True, KEY, ([None, None, None], [19_000, 19_675])),
        ("a message it cannot walk", [message(payload=doc, extra=b"\x0b")], 86400, True, KEY, ([None], [19_000])),
    ):
        add(Vector("keyed_action_lines", name, lambda r=raws, u=unit, f=from_stamp, k=key: keyed(r, u, f, k),
                   answer))

    t, u = message(type="t"), message(type="u")
    for name, raws, verdicts in (
        ("equal, other, absent", [t, u, message()], [1, 0, 0]),
        ("the last Type counts", [message(type="t", extra=b"\x1a\x01u"), message(type="u", extra=b"\x1a\x01t")],
         [0, 1]),
        ("no Timestamp", [message(type="t", timestamp=None)], [-1]),
        ("a length past the end", [t + b"\x1a\x05t"], [-1]),
        ("a wire type it cannot walk", [t + b"\x0b"], [-1]),
        ("too short for a Uuid", [t[:10]], [-1]),
    ):
        add(Vector("header_selection", name, lambda r=raws: peek.header_selection(r, 3, b"t"), verdicts))
    add(Vector("header_selection", "an empty Payload", lambda: peek.header_selection(
        [message(payload=""), message(payload="p"), message()], 6, b""), [1, 0, 0]))

    add(Vector("payloads_and_stamps", "payload, none, broken", lambda: peek.payloads_and_stamps(
        [message(payload="p"), message(timestamp=-7), message(payload="p") + b"\x32\x09"]),
        ([b"p", None, None], [STAMP, -7, None])))
    add(Vector("payloads_and_stamps", "the last Payload counts", lambda: peek.payloads_and_stamps(
        [message(payload="a", extra=b"\x32\x01b")]), ([b"b"], [STAMP])))

    docs = [message(payload=p) for p in ("{}", '{"a":1}', "{" + "x" * 200, "{" + "y" * 20000)]
    add(Vector("message_documents_size", "every Payload a document", lambda: message_documents_size(docs),
               2 + 7 + 201 + 20001))
    for name, raw in (("no Payload", message()), ("not an object", message(payload="[1]")),
                      ("a line feed", message(payload='{"a":\n1}')), ("an empty Payload", message(payload="")),
                      ("broken", message(payload="{}") + b"\x32\x09"), ("not bytes", "{}")):
        add(Vector("message_documents_size", name, lambda r=raw: message_documents_size([docs[0], r]), None))
    add(Vector("message_documents_size", "the last Payload counts", lambda: message_documents_size(
        [message(payload="x", extra=b"\x32\x02{}")]), 2))
    action = b'{"index":{}}'
    add(Vector("bulk_body_of_messages", "all of them", lambda: bulk_body_of_messages(docs, 0, 10, 1 << 20, action),
               (b"".join(action + b"\n" + d + b"\n" for d in (b"{}", b'{"a":1}', b"{" + b"x" * 200,
                                                              b"{" + b"y" * 20000)), 4)))
    add(Vector("bulk_body_of_messages", "from the second, two at most", lambda: bulk_body_of_messages(
        docs, 1, 2, 1 << 20, action), (action + b'\n{"a":1}\n' + action + b"\n{" + b"x" * 200 + b"\n", 2)))
    add(Vector("bulk_body_of_messages", "as many as max_bytes holds", lambda: bulk_body_of_messages(
        docs, 0, 10, 2 * len(action) + 2 + 7 + 4, action), (action + b"\n{}\n" + action + b'\n{"a":1}\n', 2)))
    add(Vector("bulk_body_of_messages", "one larger than max_bytes goes alone", lambda: bulk_body_of_messages(
        docs, 3, 10, 10, action)[1], 1))

    one_shape = [message(payload=p) for p in ("a", "bb", "x" * 200, "y" * 20000)]
    add(Vector("cut_payloads", "one shape, every length of varint",
               lambda: peek.payloads_of(one_shape), [b"a", b"bb", b"x" * 200, b"y" * 20000]))
    add(Vector("cut_payloads", "other shapes among them", lambda: peek.payloads_of(
        [message(payload="a"), message(type="t", payload="c"), message(), message(payload="a", extra=b"\x32\x01z")]),
        [b"a", b"c", None, b"z"]))

    payloads = [b"", b"p", b"x" * 127, b"y" * 128, b"z" * 16384]
    add(Vector("frame_payloads", "every length of varint",
               lambda: framing.encode_payloads(payloads, **HEADERS),
               Reference(tuple({"Payload": p.decode()} for p in payloads))))
    add(Vector("frame_payloads", "a Type, no Pid",
               lambda: framing.encode_payloads([b"p"], **{**HEADERS, "pid": None}, type="cloudtrail"),
               Reference(({"Payload": "p", "Type": "cloudtrail"},), pid=None)))

    lines = b"a\n\nbb\r\n" + b"c" * 300 + b"\nlast"
    add(Vector("count_lines", "up to the first too long", lambda: framing.encode_lines(lines, 0, len(lines), 299,
               **HEADERS)[1:], (3, 7)))
    add(Vector("count_lines", "all of them", lambda: framing.encode_lines(lines, 0, len(lines), 300, **HEADERS)[1:],
               (5, len(lines))))
    add(Vector("frame_lines", "each line a Payload", lambda: framing.encode_lines(lines, 2, len(lines), 1 << 20,
               **HEADERS)[0], Reference(tuple({"Payload": p} for p in ("", "bb\r", "c" * 300, "last")))))

    add(Vector("frame_records", "Timestamps and Fields", lambda: framing.encode_records(
        [b'{"a":1}', "ünï".encode()], [5, -7], {"eventID": ["x", None], "n": [None, "y"]}, type="t", **{
            k: HEADERS[k] for k in ("logger", "hostname", "pid")}),
        Reference(({"Payload": '{"a":1}', "Timestamp": 5, "Type": "t", "Fields": {"eventID": "x"}},
                   {"Payload": "ünï", "Timestamp": -7, "Type": "t", "Fields": {"n": "y"}}))))

    frames = b"".join(framing.frame(message(payload=p)) for p in ("a" * 200, "b" * 200))
    add(Vector("scan_quick", "two common frames, then a cut one", lambda: _scan(frames + frames[:20]),
               ((len(frames), 0), [message(payload="a" * 200), message(payload="b" * 200)])))
    add(Vector("scan_quick", "garbage between", lambda: _scan(frames[:len(frames) // 2] + b"xx" + frames, final=True),
               ((len(frames) * 3 // 2 + 2, 2), [message(payload="a" * 200), message(payload="a" * 200),
                                                message(payload="b" * 200)])))

    data = (b'{"Records":[{"eventID":"e1","eventTime":"2024-01-01T00:00:01Z"},'
            b'{"eventID":"e2","eventTime":"2024-01-01T00:00:02Z"}, {"eventID":"e3"}]}')
    odd = data.index(b'{"eventID":"e3"}')
    add(Vector("frame_json_records", "two records, then one without an eventTime", lambda: _json_records(data, 12),
               (2, odd, 2, odd + len(b'{"eventID":"e3"}'), [b"e1", b"e2"])))
    add(Vector("frame_json_records", "the end of the array", lambda: _json_records(b'{"Records":[]}', 12),
               (0, 12, 1, -1, [])))
    return v


def _scan(buf: bytes, *, final: bool = False) -> tuple[tuple[int, int], list[bytes]]:
    records: list[bytes] = []
    ends: list[int] = []
    resume = framing.scan_records(buf, 0, len(buf), 1 << 20, records, ends, validate=False, final=final)
    return resume, records


def _json_records(data: bytes, pos: int) -> tuple[Any, ...]:
    framed, count, pos, status, odd_end = frame_json_records(data, pos, 10, fixed_uuids(10), b"\x1a\x01t\x32",
                                                             b"\x4a\x01h", [b"eventID"], b"", 1 << 20)
    ids = [hmsg.decode(raw).field_value("eventID") for raw in framing.unframe(framed, 1 << 20)]
    return count, pos, status, odd_end, [i.encode() for i in ids]


VECTORS = _vectors()
