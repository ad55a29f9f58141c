"""hindsight_py.message: protobuf bytes, decode strictness, dict encoding, framing."""

from __future__ import annotations

import re
import struct
import uuid as uuidlib

import pytest
from upstream_files import LUA_SANDBOX, read_text

from hindsight_py import framing, message_dict, peek
from hindsight_py import message as m
from hindsight_py.message import (
    BOOL,
    BYTES,
    DOUBLE,
    INTEGER,
    STRING,
    DecodeError,
    EncodeError,
    Field,
    Message,
)

ZERO_UUID = bytes(16)
UUID = bytes(range(16))


def ld(key: int, data: bytes) -> bytes:
    """A length-delimited item with a one-byte length (test messages stay small)."""
    assert len(data) < 128
    return bytes((key, len(data))) + data


def minimal(ts: bytes = b"\x10\x00") -> bytes:
    return b"\x0a\x10" + UUID + ts


# --- encode: exact bytes -----------------------------------------------------

def test_encode_headers_in_upstream_order() -> None:
    msg = Message(ZERO_UUID, 0, type="t", logger="l", severity=6, payload="p", env_version="e",
                  pid=0, hostname="h")
    expected = (b"\x0a\x10" + ZERO_UUID + b"\x10\x00" + ld(0x1A, b"t") + ld(0x22, b"l") + b"\x28\x06"
                + ld(0x32, b"p") + ld(0x3A, b"e") + b"\x40\x00" + ld(0x4A, b"h"))
    assert m.encode(msg) == expected


def test_encode_absent_headers_are_left_out() -> None:
    assert m.encode(Message(ZERO_UUID, 0)) == b"\x0a\x10" + ZERO_UUID + b"\x10\x00"


def test_encode_fields_layout_and_packing() -> None:
    msg = Message(ZERO_UUID, 0, fields=[
        Field("s", STRING, "rep", ["ab"]),
        Field("ss", STRING, None, ["a", "b"]),
        Field("b", BYTES, None, [b"\x00\xff"]),
        Field("i", INTEGER, None, [300]),
        Field("ii", INTEGER, "count", [1, 300, -1]),
        Field("d", DOUBLE, None, [1.5]),
        Field("dd", DOUBLE, None, [1.0, 2.0]),
        Field("t", BOOL, None, [True]),
        Field("tt", BOOL, None, [True, False, True]),
    ])
    minus_one = b"\xff" * 9 + b"\x01"
    fields = [
        ld(0x0A, b"s") + ld(0x1A, b"rep") + ld(0x22, b"ab"),  # STRING: no value_type
        ld(0x0A, b"ss") + ld(0x22, b"a") + ld(0x22, b"b"),  # string arrays: repeated
        ld(0x0A, b"b") + b"\x10\x01" + ld(0x2A, b"\x00\xff"),
        ld(0x0A, b"i") + b"\x10\x02" + b"\x30\xac\x02",
        ld(0x0A, b"ii") + b"\x10\x02" + ld(0x1A, b"count") + ld(0x32, b"\x01\xac\x02" + minus_one),
        ld(0x0A, b"d") + b"\x10\x03" + b"\x39" + struct.pack("<d", 1.5),
        ld(0x0A, b"dd") + b"\x10\x03" + ld(0x3A, struct.pack("<2d", 1.0, 2.0)),
        ld(0x0A, b"t") + b"\x10\x04" + b"\x40\x01",
        ld(0x0A, b"tt") + b"\x10\x04" + ld(0x42, b"\x01\x00\x01"),
    ]
    assert m.encode(msg) == b"\x0a\x10" + ZERO_UUID + b"\x10\x00" + b"".join(ld(0x52, f) for f in fields)


def test_negative_numbers_are_ten_byte_varints() -> None:
    raw = m.encode(Message(ZERO_UUID, -1, severity=-1, pid=-2))
    assert raw == (b"\x0a\x10" + ZERO_UUID + b"\x10" + b"\xff" * 9 + b"\x01" + b"\x28" + b"\xff" * 9 + b"\x01"
                   + b"\x40\xfe" + b"\xff" * 8 + b"\x01")
    msg = m.decode(raw)
    assert (msg.timestamp, msg.severity, msg.pid) == (-1, -1, -2)


@pytest.mark.parametrize("ts", [0, 1, 127, 128, 16383, 16384, (1 << 28) - 1, 1 << 28, 1_000_000_000,
                                1_734_000_000_123_456_789, (1 << 63) - 1, -(1 << 63), -5])
def test_timestamp_varints_round_trip(ts: int) -> None:
    raw = m.encode(Message(UUID, ts))
    # reference varint, written out the slow way
    v = ts & ((1 << 64) - 1)
    ref = bytearray()
    while True:
        if v < 0x80:
            ref.append(v)
            break
        ref.append((v & 0x7F) | 0x80)
        v >>= 7
    assert raw == b"\x0a\x10" + UUID + b"\x10" + bytes(ref)
    assert m.decode(raw).timestamp == ts
    assert peek.timestamp_of(raw) == ts


def test_timestamp_cache_is_not_fooled_by_changing_high_bytes() -> None:
    for ts in (1_734_000_000_000_000_000, 1_734_000_000_000_000_000 + (1 << 28), 1_600_000_000_000_000_000):
        assert m.decode(m.encode(Message(UUID, ts))).timestamp == ts


def test_encode_rejects_bad_uuid_and_out_of_range_integers() -> None:
    with pytest.raises(EncodeError):
        m.encode(Message(b"short", 0))
    with pytest.raises(EncodeError, match="out of range"):
        m.encode(Message(UUID, 0, fields=[Field("x", INTEGER, None, [1 << 64])]))


# --- decode ------------------------------------------------------------------

def full_message() -> Message:
    return Message(UUID, 1_734_000_000_123_456_789, type="type", logger="logger", severity=3,
                   payload="payload ü", env_version="1.0", pid=4321, hostname="host", fields=[
                       Field("s", STRING, "rep", ["x", "y"]),
                       Field("b", BYTES, None, [b"\x00\x01"]),
                       Field("i", INTEGER, None, [-7, 0, 1 << 40]),
                       Field("d", DOUBLE, "ms", [0.25]),
                       Field("t", BOOL, None, [False, True]),
                       Field("s", STRING, None, ["second"]),
                   ])


def test_round_trip_every_type() -> None:
    msg = full_message()
    raw = m.encode(msg)
    back = m.decode(raw)
    assert back == msg
    assert back.raw == raw
    assert m.encode(back) == raw


def test_invalid_utf8_round_trips_byte_for_byte() -> None:
    raw = minimal() + ld(0x32, b"ok \xff\xfe bad") + ld(0x52, ld(0x0A, b"f") + ld(0x22, b"\xc3"))
    msg = m.decode(raw)
    assert isinstance(msg.payload, str)
    assert msg.payload.encode("utf-8", "surrogateescape") == b"ok \xff\xfe bad"
    assert m.encode(msg) == raw


def test_decode_gives_python_types() -> None:
    msg = m.decode(m.encode(full_message()))
    assert msg.field_value("s") == "x"
    assert msg.field_value("s", 0, 1) == "y"
    assert msg.field_value("s", 1) == "second"
    assert msg.field_value("b") == b"\x00\x01"
    assert msg.field_value("i", 0, 2) == 1 << 40
    assert msg.field_value("d") == 0.25 and isinstance(msg.field_value("d"), float)
    assert msg.field_value("t", 0, 1) is True
    assert msg.field_value("s", 2) is None
    assert msg.field_value("s", 0, 2) is None
    assert msg.field_value("nope") is None
    with pytest.raises(IndexError):
        msg.field_value("s", -1)


def test_severity_reads_as_7_when_absent() -> None:
    msg = m.decode(minimal())
    assert msg.severity is None
    assert msg.effective_severity == 7
    assert m.decode(minimal() + b"\x28\x02").effective_severity == 2


def test_packed_and_unpacked_values_both_decode() -> None:
    one = struct.pack("<d", 1.0)
    cases = {
        "unpacked ints": (b"\x10\x02\x30\x01\x30\x02", [1, 2]),
        "packed ints": (b"\x10\x02" + ld(0x32, b"\x01\x02"), [1, 2]),
        "unpacked doubles": (b"\x10\x03\x39" + one + b"\x39" + one, [1.0, 1.0]),
        "packed doubles": (b"\x10\x03" + ld(0x3A, one + one), [1.0, 1.0]),
        "unpacked bools": (b"\x10\x04\x40\x01\x40\x00", [True, False]),
        "packed bools": (b"\x10\x04" + ld(0x42, b"\x01\x00"), [True, False]),
    }
    for name, (body, values) in cases.items():
        msg = m.decode(minimal() + ld(0x52, ld(0x0A, b"count") + body))
        assert msg.fields[0].values == values, name


def test_decode_error_texts() -> None:
    with pytest.raises(DecodeError, match=r"^invalid message, too short$"):
        m.decode(minimal()[:19])
    with pytest.raises(DecodeError, match=r"^missing required field uuid: not found timestamp: found$"):
        m.decode(b"\x10\x00" + ld(0x32, b"x" * 30))
    with pytest.raises(DecodeError, match=r"^missing required field uuid: found timestamp: not found$"):
        m.decode(b"\x0a\x10" + UUID + ld(0x32, b"xyz"))
    # an unknown tag (11) after 20 good bytes
    with pytest.raises(DecodeError, match=r"^error in tag: 11 wiretype: 2 offset: 20$"):
        m.decode(minimal() + ld(0x5A, b"x"))
    # Type sent as a varint: wrong wire type
    with pytest.raises(DecodeError, match=r"^error in tag: 3 wiretype: 0 offset: 20$"):
        m.decode(minimal() + b"\x18\x01")
    # a 15-byte Uuid
    with pytest.raises(DecodeError, match=r"^error in tag: 1 wiretype: 2 offset: 0$"):
        m.decode(b"\x0a\x0f" + UUID[:15] + b"\x10\x00" + ld(0x32, b"xx"))
    # a length running past the end
    with pytest.raises(DecodeError, match=r"^error in tag: 6 wiretype: 2 offset: 20$"):
        m.decode(minimal() + b"\x32\x05abc")
    # a varint with no end within 10 bytes
    with pytest.raises(DecodeError, match=r"^error in tag: 2 wiretype: 0 offset: 18$"):
        m.decode(b"\x0a\x10" + UUID + b"\x10" + b"\x80" * 10 + b"\x01")
    # a field without a name, reported at its top-level key
    with pytest.raises(DecodeError, match=r"^error in tag: 10 wiretype: 2 offset: 20$"):
        m.decode(minimal() + ld(0x52, b"\x10\x02\x30\x01"))
    # a packed array whose length overruns the field
    with pytest.raises(DecodeError, match=r"^error in tag: 10 wiretype: 2 offset: 20$"):
        m.decode(minimal() + ld(0x52, ld(0x0A, b"n") + b"\x32\x03\x01\x01"))


def test_accessors_read_headers_without_decoding() -> None:
    raw = m.encode(full_message())
    assert peek.payload_of(raw) == "payload ü".encode()
    assert peek.type_of(raw) == b"type"
    assert peek.logger_of(raw) == b"logger"
    assert peek.timestamp_of(raw) == 1_734_000_000_123_456_789
    assert peek.header_of(raw, m.PID) == 4321
    assert peek.header_of(raw, m.SEVERITY) == 3
    assert peek.header_of(raw, m.UUID) == UUID
    bare = minimal(b"\x10\x05")
    assert peek.payload_of(bare) is None and peek.type_of(bare) is None
    assert peek.timestamp_of(bare) == 5
    with pytest.raises(DecodeError):
        peek.payload_of(minimal() + b"\x32\x05abc")


def test_repeated_headers_last_one_wins() -> None:
    raw = minimal(b"\x10\x05") + ld(0x32, b"first") + b"\x10\x09" + ld(0x32, b"second")
    msg = m.decode(raw)
    assert (msg.timestamp, msg.payload) == (9, "second")
    assert (peek.timestamp_of(raw), peek.payload_of(raw)) == (9, b"second")


def test_is_valid_follows_the_queue_readers_check() -> None:
    assert m.is_valid(m.encode(full_message()))
    assert not m.is_valid(b"\x0a\x10" + UUID)  # no Timestamp
    assert not m.is_valid(minimal() + ld(0x5A, b"x"))  # unknown tag
    assert not m.is_valid(minimal() + ld(0x52, b"\x10\x02\x30\x01"))  # field without a name
    assert not m.is_valid(b"\x0a\x0f" + UUID[:15] + b"\x10\x00")
    # upstream's reader stops at a field's first value and never parses the values,
    # where decode_message does: a broken packed varint passes one and not the other
    lax = minimal() + ld(0x52, ld(0x0A, b"n") + b"\x10\x02" + ld(0x32, b"\x80\x80"))
    assert m.is_valid(lax)
    with pytest.raises(DecodeError):
        m.decode(lax)


# --- from_dict (Python plugins' inject_message) ------------------------------

CFG = {"logger": "input.test", "hostname": "box", "pid": 77, "now_ns": 1_000}


def test_restricted_headers_override_the_dict() -> None:
    msg = message_dict.from_dict({"Uuid": UUID, "Timestamp": 5, "Logger": "x", "Hostname": "y", "Pid": 1, "Type": "t"},
                      restricted=True, **CFG)
    assert msg.uuid != UUID and len(msg.uuid) == 16
    assert msg.uuid[6] >> 4 == 4 and msg.uuid[8] >> 4 == 0xA
    assert (msg.timestamp, msg.logger, msg.hostname, msg.pid, msg.type) == (1_000, "input.test", "box", 77, "t")


def test_unrestricted_headers_are_taken_or_filled_in() -> None:
    msg = message_dict.from_dict({"Uuid": UUID, "Timestamp": 12.9, "Logger": "mine", "Severity": 2.7, "Payload": b"\xff"},
                      restricted=False, **CFG)
    assert msg.uuid == UUID
    assert msg.timestamp == 12  # truncated
    assert (msg.logger, msg.hostname, msg.pid) == ("mine", "box", 77)
    assert msg.severity == 2
    assert peek.payload_of(m.encode(msg)) == b"\xff"
    text = "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert message_dict.from_dict({"Uuid": text}, restricted=False, **CFG).uuid == UUID
    assert message_dict.from_dict({"Uuid": uuidlib.UUID(bytes=UUID)}, restricted=False, **CFG).uuid == UUID
    for bad in ("00010203x0405-0607-0809-0a0b0c0d0e0f", "zz010203-0405-0607-0809-0a0b0c0d0e0f", b"short", None):
        got = message_dict.from_dict({"Uuid": bad}, restricted=False, **CFG)
        assert got.uuid != UUID and got.uuid[6] >> 4 == 4
    assert message_dict.from_dict({"Timestamp": "soon"}, restricted=False, **CFG).timestamp == 1_000
    assert message_dict.from_dict({"Type": 12, "EnvVersion": 1.5}, restricted=False, **CFG).type == "12"


def test_hash_form_fields_map_python_types() -> None:
    msg = message_dict.from_dict({"Fields": {"s": "v", "b": b"\x01", "i": 3, "d": 2.5, "t": True, "a": [1, 2],
                                  "ad": [1, 2.5], "as": ["x", "y"], "e": [],
                                  "o": {"value": 5, "value_type": DOUBLE, "representation": "ms"}}},
                      restricted=False, **CFG)
    got = {f.name: (f.value_type, f.representation, f.values) for f in msg.fields}
    assert got == {
        "s": (STRING, None, ["v"]), "b": (BYTES, None, [b"\x01"]), "i": (INTEGER, None, [3]),
        "d": (DOUBLE, None, [2.5]), "t": (BOOL, None, [True]), "a": (INTEGER, None, [1, 2]),
        "ad": (DOUBLE, None, [1.0, 2.5]), "as": (STRING, None, ["x", "y"]), "e": (STRING, None, []),
        "o": (DOUBLE, "ms", [5.0]),
    }
    assert m.decode(m.encode(msg)).fields == msg.fields


def test_array_form_fields_keep_their_order() -> None:
    fields = [{"name": "z", "value": "1"}, {"name": "a", "value": [3, 4], "value_type": INTEGER},
              {"name": "b", "value": "raw", "value_type": BYTES, "representation": "r"}]
    msg = message_dict.from_dict({"Fields": fields}, restricted=False, **CFG)
    assert [(f.name, f.value_type, f.values) for f in msg.fields] == [
        ("z", STRING, ["1"]), ("a", INTEGER, [3, 4]), ("b", BYTES, [b"raw"])]
    # to_dict gives the same shape back
    assert message_dict.from_dict(m.decode(m.encode(msg)).to_dict(), restricted=False, **CFG).fields == msg.fields


@pytest.mark.parametrize("fields, text", [
    ({"x": [1, "a"]}, "array has mixed types"),
    ({"x": [True, 1]}, "array has mixed types"),
    ({"x": {"value": "s", "value_type": 2}}, "invalid string value_type: 2"),
    ({"x": {"value": 1, "value_type": 0}}, "invalid numeric value_type: 0"),
    ({"x": {"value": True, "value_type": 2}}, "invalid boolean value_type: 2"),
    ({"x": {"representation": "r"}}, "unsupported type: nil"),
    ({"x": [{"a": 1}]}, "unsupported array type: dict"),
    ({1: "v"}, "field name must be a string"),
    ([{"value": 1}], "field name must be a string"),
])
def test_from_dict_field_errors(fields: object, text: str) -> None:
    with pytest.raises(EncodeError, match=f"^{re.escape(text)}$"):
        message_dict.from_dict({"Fields": fields}, restricted=False, **CFG)


def test_from_dict_does_not_modify_the_dict() -> None:
    d = {"Payload": "p"}
    message_dict.from_dict(d, restricted=False, **CFG)
    assert d == {"Payload": "p"}


# --- framing -----------------------------------------------------------------

def test_frame_header_bytes() -> None:
    assert framing.frame(b"abcde") == b"\x1e\x02\x08\x05\x1fabcde"
    assert framing.frame_header(300) == b"\x1e\x03\x08\xac\x02\x1f"


def records_in(data: bytes, **kw: object) -> tuple[list[bytes], list[int], int, int]:
    records: list[bytes] = []
    ends: list[int] = []
    resume, discarded = framing.scan_records(data, 0, len(data), kw.pop("max_size", 1024), records, ends, **kw)
    return records, ends, resume, discarded


def test_scan_skips_garbage_byte_by_byte_and_counts_it() -> None:
    a = m.encode(Message(UUID, 1))
    b = m.encode(Message(UUID, 2))
    garbage = [
        b"no marker here",
        b"\x1e\x02\x08\x05\x00",  # no 0x1F after the header
        b"\x1e\x02\x09\x05\x1f",  # header is not field 1
        b"\x1e\x02\x08\x00\x1f",  # length 0
        b"\x1e\x03\x08\xff\x7f\x1f",  # length over max_message_size
        framing.frame(b"\x0a\x10" + UUID + b"\x18\x01"),  # frames a message that does not decode
    ]
    for junk in garbage:
        data = framing.frame(a) + junk + framing.frame(b)
        records, ends, resume, discarded = records_in(data)
        assert records == [a, b], junk
        assert discarded == len(junk), junk
        assert ends == [len(framing.frame(a)), len(data)] and resume == len(data)


def test_scan_finds_a_record_hidden_inside_a_bad_frame() -> None:
    # a bogus header claims the next 40 bytes; when they do not decode, scanning
    # resumes one byte later and finds the real record inside them
    inner = framing.frame(m.encode(Message(UUID, 7)))
    data = b"\x1e\x02\x08\x28\x1f" + inner + b"\x00" * 10
    records, _, _, discarded = records_in(data, final=True)
    assert records == [inner[5:]]
    assert discarded == 5 + 10


def test_scan_waits_for_a_partial_frame_unless_final() -> None:
    a = framing.frame(m.encode(Message(UUID, 1)))
    b = framing.frame(m.encode(Message(UUID, 2)))
    for cut in (1, 2, 4, len(b) - 1):
        data = a + b[:cut]
        records, _, resume, discarded = records_in(data)
        assert len(records) == 1 and resume == len(a) and discarded == 0
        records, _, resume, discarded = records_in(data, final=True)
        assert len(records) == 1 and resume == len(data) and discarded == cut
        records, _, resume, discarded = records_in(data + b[cut:])
        assert len(records) == 2 and resume == len(a) + len(b) and discarded == 0


def test_scan_limits_and_find_record() -> None:
    frames = [framing.frame(m.encode(Message(UUID, i))) for i in range(5)]
    data = b"".join(frames)
    records, ends, resume, _ = records_in(data, max_records=2, base=1000)
    assert len(records) == 2 and ends == [1000 + len(frames[0]), 1000 + resume]
    raw, resume, discarded = framing.find_record(b"xx" + data, 0)
    assert raw == m.encode(Message(UUID, 0)) and discarded == 2 and resume == 2 + len(frames[0])
    raw, resume, discarded = framing.find_record(frames[0][:10])
    assert raw is None and resume == 0 and discarded == 0
    assert framing.unframe(b"junk" + data + frames[0][:7]) == [m.encode(Message(UUID, i)) for i in range(5)]


def test_scan_without_validation_accepts_any_protobuf() -> None:
    data = framing.frame(b"not a heka message")
    assert records_in(data)[0] == []
    assert records_in(data, validate=False)[0] == [b"not a heka message"]


# --- upstream's own vectors (read from the fetched sources at test time) ---------------


@pytest.mark.upstream
@pytest.mark.lua51  # the vectors file has escapes only Lua 5.1 reads, such as "\\s"
def test_upstream_encode_vectors_round_trip() -> None:
    from hindsight_py._lupa import LuaRuntime

    text = read_text(LUA_SANDBOX, "src/heka/test/lua/encode_message.lua")
    table = text[text.index("local msgs = ") + len("local msgs = "):text.index("\nfor i, v in ipairs(msgs)")]
    lua = LuaRuntime(encoding=None)
    vectors = lua.execute(b"return " + table.encode())
    checked = 0
    for v in vectors.values():
        rv = bytes(v[b"rv"])
        if v[b"framed"]:
            (raw,) = framing.unframe(rv)
            assert framing.frame(m.encode(m.decode(raw))) == rv
        else:
            assert m.encode(m.decode(rv)) == rv
        checked += 1
    assert checked >= 10


@pytest.mark.upstream
def test_upstream_decode_message_tests_pass() -> None:
    """Runs upstream's decode_message.lua with ``decode_message`` bridged to ours."""
    from hindsight_py._lupa import LuaRuntime

    lua = LuaRuntime(encoding=None, unpack_returned_tuples=True)

    def to_lua(value: object) -> object:
        if isinstance(value, dict):
            return lua.table_from({k.encode(): to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        return value

    def py_decode(pb: bytes) -> tuple[bool, object]:
        try:
            return True, to_lua(m.decode(pb).to_dict())
        except DecodeError as e:
            return False, str(e).encode()

    lua.globals().py_decode = py_decode
    lua.execute(b"function decode_message(pb) local ok, r = py_decode(pb); if not ok then error(r, 0) end; "
                b"return r end")
    lua.execute(read_text(LUA_SANDBOX, "src/heka/test/lua/decode_message.lua").encode())


def test_scan_reads_every_header_size_and_what_lies_between() -> None:
    # 1-, 2- and 3-byte lengths (the last two take the quick path), garbage, a frame over the size
    # limit and a partial frame at the end: each record found, each bad byte counted once
    sizes = [10, 300, 1200, 20000, 70000, 5]
    raws = [m.encode(Message(UUID, i, payload="x" * n)) for i, n in enumerate(sizes)]
    frames = [framing.frame(r) for r in raws]
    too_big = framing.frame(m.encode(Message(UUID, 9, payload="y" * 200_000)))
    data = frames[0] + frames[1] + b"junk" + frames[2] + frames[3] + too_big + frames[4] + frames[5] + frames[1][:9]
    records, ends, resume, discarded = records_in(data, max_size=100_000)
    assert records == raws
    assert discarded == 4 + len(too_big)
    assert resume == len(data) - 9 and ends[-1] == resume
    records, _, resume, discarded = records_in(data, max_size=100_000, max_records=3)
    assert records == raws[:3] and discarded == 4
    records, _, _, discarded = records_in(data, max_size=100_000, validate=True, final=True)
    assert records == raws and discarded == 4 + len(too_big) + 9
