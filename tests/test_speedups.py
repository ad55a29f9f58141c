"""The C loops (hindsight_py/_speedups.c) give exactly what their Python twins give.

Every test runs twice: with the extension and with HINDSIGHT_PY_PURE's Python code. The inputs
are fuzzed (seeded): well-formed batches, and the same with bytes flipped, cut or inserted,
so that every early exit of the C code is reached.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from twin_vectors import BODY_LINES, ID_VALUES, PAYLOAD_PIECES, VECTORS, fixed_uuids

from hindsight_py import _accel, framing, message_dict, peek
from hindsight_py import message as hmsg
from hindsight_py.outputs.bulk_body import every_line_is_an_object, one_line_objects

try:
    from hindsight_py import _speedups
except ImportError:  # not built here
    _speedups = None


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch):
    if request.param == "c":
        if _speedups is None:
            pytest.skip("hindsight_py._speedups is not built")
        monkeypatch.setattr(_accel, "speedups", _speedups)
    else:
        monkeypatch.setattr(_accel, "speedups", None)
    return request.param


def test_the_extension_is_built_where_a_compiler_is():
    # `pip install` builds it quietly or not at all (it is optional): a broken build would only
    # show as a slower pipeline, so the test suite says it
    if os.environ.get("HINDSIGHT_PY_PURE"):
        pytest.skip("HINDSIGHT_PY_PURE is set")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    assert _speedups is not None, "hindsight_py._speedups was not built: run `pip install -e .` again"
    assert _accel.speedups is _speedups


def test_hindsight_py_pure_turns_the_c_loops_off():
    code = "from hindsight_py import _accel; print(_accel.speedups is None)"
    env = {**os.environ, "HINDSIGHT_PY_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.id)
def test_vectors(impl, vector, monkeypatch):
    """One table (tests/twin_vectors.py), the same answers from the C loop and from its Python twin."""
    monkeypatch.setattr(framing, "random_uuids", fixed_uuids)
    assert vector.call() == vector.answer()


def test_every_c_loop_has_vectors():
    source = (REPO_ROOT / "hindsight_py" / "_speedups.c").read_text()
    loops = set(re.findall(r'^\s*\{"(\w+)", \w+, METH_', source, re.MULTILINE))
    assert loops and {v.twin for v in VECTORS} == loops


def _messages(rng: random.Random, n: int, *, one_shape: bool) -> list[bytes]:
    sizes = [0, 1, 5, 100, 127, 128, 129, 1200, 16000, 16383, 16384, 70000]
    out = []
    for i in range(n):
        size = rng.choice(sizes) if rng.random() < 0.3 else rng.randrange(0, 3000)
        payload = bytes(rng.randrange(256) for _ in range(min(size, 64))) * (size // 64 + 1)
        payload = payload[:size]
        if one_shape:
            fields = {"Payload": payload, "Logger": "input.file", "Hostname": "h", "Pid": 7}
        else:
            fields = {"Payload": payload, "Logger": rng.choice(["a", "input.file", "x" * 200]),
                      "Hostname": "h", "Type": rng.choice([None, "t"]), "Pid": rng.choice([None, 1, 70000])}
            if rng.random() < 0.2:
                fields["Fields"] = {"k": rng.randrange(1000)}
            if rng.random() < 0.1:
                del fields["Payload"]
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["Timestamp"] = 1_700_000_000_000_000_000 + i
        out.append(hmsg.encode(message_dict.from_dict(fields, restricted=False, logger="-", hostname="-", pid=1, now_ns=0)))
    return out


def _damage(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        what = rng.randrange(4)
        if not b:
            break
        at = rng.randrange(len(b))
        if what == 0:
            b[at] = rng.randrange(256)
        elif what == 1:
            b[at] = rng.choice([0x1E, 0x1F, 0x08, 0x80, 0x7F, 0x0A, 0x10, 0x32])
        elif what == 2:
            del b[at:at + rng.randrange(1, 40)]
        else:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    return bytes(b)


def _scan(buf: bytes, **kw) -> tuple:
    records: list[bytes] = []
    ends: list[int] = []
    resume, discarded = framing.scan_records(buf, kw.pop("pos", 0), kw.pop("end", len(buf)), kw.pop("max_size"),
                                          records, ends, validate=False, **kw)
    return resume, discarded, records, ends


def _scan_cases(rng: random.Random):
    for case in range(300):
        raws = _messages(rng, rng.randrange(1, 30), one_shape=case % 2 == 0)
        buf = b"".join(framing.frame(r) for r in raws)
        if case % 3:
            buf = _damage(rng, buf)
        end = len(buf) if rng.random() < 0.6 else rng.randrange(len(buf) + 1)
        yield buf, {
            "pos": rng.choice([0, 0, 0, rng.randrange(len(buf) + 1)]),
            "end": end,
            # also exactly one record's size, and one byte less
            "max_size": rng.choice([1 << 20, 64 * 1024, 2000, 300, len(raws[0]), len(raws[0]) - 1]),
            "base": rng.choice([0, 12345]),
            "final": rng.random() < 0.5,
            "max_records": rng.choice([1 << 62, 1, 3, 10]),
            "max_bytes": rng.choice([1 << 62, 1, 5000]),
        }


@pytest.mark.skipif(_speedups is None, reason="hindsight_py._speedups is not built")
def test_scan_records_gives_the_same_records_in_c(monkeypatch):
    rng = random.Random(7)
    for buf, kw in _scan_cases(rng):
        monkeypatch.setattr(_accel, "speedups", _speedups)
        got = _scan(buf, **dict(kw))
        monkeypatch.setattr(_accel, "speedups", None)
        assert got == _scan(buf, **dict(kw)), kw


def test_scan_records_reads_whole_batches(impl):
    raws = _messages(random.Random(5), 40, one_shape=False)
    buf = b"".join(framing.frame(r) for r in raws)
    resume, discarded, records, ends = _scan(buf, max_size=1 << 20, final=True)
    assert (resume, discarded, records) == (len(buf), 0, raws)
    assert ends[-1] == len(buf)


def _encode_cases(rng: random.Random):
    for _ in range(200):
        payloads = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 127, 128, 500, 16384])))
                    for _ in range(rng.randrange(0, 20))]
        uuids = bytes(rng.randrange(256) for _ in range(16 * len(payloads)))
        kw = {"logger": rng.choice(["input.file", "x" * 300]), "hostname": "host", "pid": rng.choice([None, 5, 1 << 20]),
              "now_ns": 1_700_000_000_123_456_789, "type": rng.choice([None, "cloudtrail"])}
        yield payloads, uuids, kw


def test_encode_payloads_frames_every_payload(impl, monkeypatch):
    for payloads, uuids, kw in _encode_cases(random.Random(11)):
        monkeypatch.setattr(framing, "random_uuids", lambda n, u=uuids: u[:16 * n])
        decoded = [hmsg.decode(r) for r in framing.unframe(framing.encode_payloads(payloads, **kw), 1 << 20)]
        assert [peek.payload_of(hmsg.encode(m)) for m in decoded] == payloads
        assert [m.uuid for m in decoded] == [uuids[i:i + 16] for i in range(0, 16 * len(payloads), 16)]
        assert {(m.logger, m.hostname, m.pid, m.type, m.timestamp) for m in decoded} <= {
            (kw["logger"], "host", kw["pid"], kw["type"], kw["now_ns"])}


@pytest.mark.skipif(_speedups is None, reason="hindsight_py._speedups is not built")
def test_encode_payloads_gives_the_same_bytes_in_c(monkeypatch):
    for payloads, uuids, kw in _encode_cases(random.Random(11)):
        monkeypatch.setattr(framing, "random_uuids", lambda n, u=uuids: u[:16 * n])
        monkeypatch.setattr(_accel, "speedups", _speedups)
        got = framing.encode_payloads(payloads, **kw)
        monkeypatch.setattr(_accel, "speedups", None)
        assert got == framing.encode_payloads(payloads, **kw)


def test_encode_payloads_takes_bytearrays_too(impl):
    framed = framing.encode_payloads([bytearray(b"ab"), b"cd"], logger="l", hostname="h", pid=None, now_ns=1)
    assert [peek.payload_of(r) for r in framing.unframe(framed)] == [b"ab", b"cd"]


def _line_cases(rng: random.Random):
    pieces = [b"", b"a", b"{}", b"x" * 300, b"y" * 2000, b"\r", b"\x00\xff"]
    for _ in range(300):
        lines = [rng.choice(pieces) for _ in range(rng.randrange(0, 12))]
        data = b"\n".join(lines) + rng.choice([b"", b"\n", b"\n\n"])
        start = rng.choice([0, 0, rng.randrange(len(data) + 1)])
        end = rng.choice([len(data), rng.randrange(start, len(data) + 1)])
        yield data, start, end, rng.choice([0, 1, 299, 300, 1999, 1 << 20])


_LINE_HEADERS = {"logger": "input.file", "hostname": "h", "pid": 3, "now_ns": 1_700_000_000_000_000_000, "type": None}


def _fixed_uuids(monkeypatch, count: int) -> None:
    uuids = bytes(range(256)) * (count // 16 + 1)
    monkeypatch.setattr(framing, "random_uuids", lambda k, u=uuids: u[:16 * k])


def test_lines_count_and_frame_as_split_lines_says(impl, monkeypatch):
    for data, start, end, max_len in _line_cases(random.Random(19)):
        lines = framing.split_lines(data, start, end)
        _fixed_uuids(monkeypatch, len(lines))
        framed, n, stop = framing.encode_lines(data, start, end, max_len, **_LINE_HEADERS)
        short = [len(line) <= max_len for line in lines] + [False]
        assert n == short.index(False)
        assert stop == (end if n == len(lines) else start + sum(len(line) + 1 for line in lines[:n]))
        assert framed == framing.encode_payloads(lines[:n], **_LINE_HEADERS)
        # with no line too long, every line
        assert framing.encode_lines(data, start, end, 1 << 30, **_LINE_HEADERS) == (
            framing.encode_payloads(lines, **_LINE_HEADERS), len(lines), end)


@pytest.mark.skipif(_speedups is None, reason="hindsight_py._speedups is not built")
def test_encode_lines_gives_the_same_in_c(monkeypatch):
    for data, start, end, max_len in _line_cases(random.Random(23)):
        _fixed_uuids(monkeypatch, len(framing.split_lines(data, start, end)))
        monkeypatch.setattr(_accel, "speedups", _speedups)
        got = framing.encode_lines(data, start, end, max_len, **_LINE_HEADERS)
        monkeypatch.setattr(_accel, "speedups", None)
        assert got == framing.encode_lines(data, start, end, max_len, **_LINE_HEADERS)


def test_payloads_of_matches_the_full_walk(impl):
    rng = random.Random(13)
    for case in range(300):
        raws = _messages(rng, rng.randrange(1, 25), one_shape=case % 3 != 0)
        if case % 2:
            raws = [_damage(rng, r) if rng.random() < 0.4 else r for r in raws]
        assert peek.payloads_of(raws) == peek._walk_payloads(raws)


def test_payloads_of_matches_the_full_walk_on_messages_like_the_first(impl, monkeypatch):
    # the shape is learned from an intact first message; the others are it or another message,
    # often damaged where the shortcut looks
    rng = random.Random(20240101)
    base = [hmsg.encode(message_dict.from_dict(d, restricted=False, logger="input.file", hostname="vm", pid=4242,
                                       now_ns=1_700_000_000_000_000_000 + i))
            for i, d in enumerate([{"Payload": '{"a": 1}'}, {"Payload": "x" * 300, "Type": "t"},
                                   {"Payload": "{}", "Fields": {"n": 1}}, {"Payload": "y" * 20000}])]
    real_walk = peek._walk_payloads
    walks = 0

    def counted(raws: list[bytes]) -> list[bytes | None]:
        nonlocal walks
        walks += len(raws)
        return real_walk(raws)

    monkeypatch.setattr(peek, "_walk_payloads", counted)
    for _ in range(2000):
        first = rng.choice(base)
        batch = [first]
        for _ in range(15):
            raw = bytearray(first if rng.random() < 0.7 else rng.choice(base))
            damage = rng.random()
            if damage < 0.2:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif damage < 0.3:
                del raw[rng.randrange(len(raw)):]
            elif damage < 0.4:
                raw += b"\x32\x03abc"  # a second Payload: the last one counts
            batch.append(bytes(raw))
        assert peek.payloads_of(batch) == [real_walk([raw])[0] for raw in batch]
    assert walks < 2000 * 16 * 0.8  # the shortcut took a good share of them


def test_payloads_of_cuts_one_shape_without_walking(impl, monkeypatch):
    raws = _messages(random.Random(3), 50, one_shape=True)
    walked: list[int] = []
    real_walk = peek._walk_payloads
    monkeypatch.setattr(peek, "_walk_payloads", lambda r: walked.append(len(r)) or real_walk(r))
    payloads = peek.payloads_of(raws)
    assert payloads == real_walk(raws)
    # the shape was learned from the first message and every payload cut but those whose
    # length takes three varint bytes
    assert len(walked) == sum(len(p) >= 16384 for p in payloads) > 0


def test_one_line_objects(impl):
    rng = random.Random(17)
    pieces = list(PAYLOAD_PIECES)
    for _ in range(500):
        payloads = [rng.choice(pieces) for _ in range(rng.randrange(0, 6))]
        want = all(p[:1] == b"{" and b"\n" not in p for p in payloads)
        assert one_line_objects(payloads) is want


def test_every_line_is_an_object(impl):
    rng = random.Random(29)
    pieces = list(BODY_LINES)
    for _ in range(500):
        body = b"\n".join(rng.choice(pieces) for _ in range(rng.randrange(0, 7))) + rng.choice([b"", b"\n"])
        want = body.startswith(b"{") and all(line.startswith(b"{") for line in body.split(b"\n")[1:-1]) and (
            body.endswith(b"\n") or body.split(b"\n")[-1].startswith(b"{"))
        assert every_line_is_an_object(body) is want, body[:80]


# -- the fast paths of issue 17: tree input, header matchers, per-batch action lines ------------------
def _both(monkeypatch, call):
    """call() with the C loops and with their Python twins: (c result, python result)."""
    monkeypatch.setattr(_accel, "speedups", _speedups)
    c = call()
    monkeypatch.setattr(_accel, "speedups", None)
    return c, call()


needs_c = pytest.mark.skipif(_speedups is None, reason="hindsight_py._speedups is not built")


@needs_c
def test_frame_records_gives_the_same_bytes_in_c(monkeypatch):
    rng = random.Random(17)
    values = [None, "", "a", "ünï", "😀" * 50, "x" * 300, "\udcff", "q\"\\"]
    for case in range(200):
        n = rng.randrange(0, 20)
        payloads = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 200, 20000]))) for _ in range(n)]
        stamps = [rng.choice([0, 1, -1, 1 << 62, -(1 << 63), 1_700_000_000_000_000_000]) for _ in range(n)]
        fields = {name: [rng.choice(values) for _ in range(n)] for name in rng.sample(["a", "eventID", "ü"], 2)}
        uuids = hmsg.random_uuids(n)
        monkeypatch.setattr(framing, "random_uuids", lambda k, u=uuids: u)
        c, py = _both(monkeypatch, lambda p=payloads, s=stamps, f=fields: framing.encode_records(
            p, s, f, logger="in", hostname="h", pid=3, type="t"))
        assert c == py, case


def test_encode_records_builds_what_inject_message_builds(impl):
    from sandbox_fakes import split_framed

    payloads = [b'{"a":1}', "ünï".encode(), b""]
    stamps = [5, -7, 1_700_000_000_000_000_000]
    fields = {"eventID": ["x", None, "😀"], "n": [None, None, "y"]}
    framed = framing.encode_records(payloads, stamps, fields, logger="in", hostname="h", pid=9, type="t")
    for i, raw in enumerate(split_framed(framed)):
        msg = hmsg.decode(raw)
        want = {"Payload": payloads[i].decode(), "Timestamp": stamps[i], "Type": "t", "Uuid": msg.uuid,
                "Fields": {k: v[i] for k, v in fields.items() if v[i] is not None}}
        assert raw == hmsg.encode(message_dict.from_dict(want, restricted=False, logger="in", hostname="h", pid=9, now_ns=0))


def _walk_cases(rng: random.Random):
    for case in range(200):
        raws = _messages(rng, rng.randrange(1, 20), one_shape=case % 2 == 0)
        if case % 2:
            raws = [_damage(rng, r) if rng.random() < 0.5 else r for r in raws]
        yield raws


@needs_c
def test_header_selection_and_payloads_and_stamps_give_the_same_in_c(monkeypatch):
    rng = random.Random(19)
    for raws in _walk_cases(rng):
        for tag, value in ((3, b"t"), (4, b"input.file"), (9, b"h"), (6, b"")):
            c, py = _both(monkeypatch, functools.partial(peek.header_selection, raws, tag, value))
            assert c == py
        c, py = _both(monkeypatch, functools.partial(peek.payloads_and_stamps, raws))
        assert c == py


def test_payloads_and_stamps_of_valid_messages_are_their_payload_and_timestamp(impl):
    raws = [r for raws in _walk_cases(random.Random(23)) for r in raws if hmsg.is_valid(r)]
    payloads, stamps = peek.payloads_and_stamps(raws)
    assert payloads == [peek.payload_of(r) for r in raws]
    assert stamps == [peek.timestamp_of(r) for r in raws]


@needs_c
def test_id_action_lines_give_the_same_in_c(monkeypatch):
    from hindsight_py.outputs.bulk_lines import id_action_lines

    rng = random.Random(29)
    ids = list(ID_VALUES)
    for case in range(300):
        payloads = []
        for _ in range(rng.randrange(0, 10)):
            parts = [b'{"k":1', b',"eventID":"' + rng.choice(ids) + b'"', b',"n":{"eventID":"z"}', b"}",
                     b',"eventID":"cut']
            payloads.append(b"".join(rng.sample(parts, rng.randrange(1, 4))) if rng.random() < 0.9 else None)
        heads = [rng.choice([b'{"index":{"_id":"', None]) for _ in payloads]
        c, py = _both(monkeypatch, lambda p=payloads, h=heads: id_action_lines(p, b'"eventID":"', h, b'"}}'))
        assert c == py, case


@needs_c
def test_id_action_lines_find_the_key_at_any_offset_in_c(monkeypatch):
    """The C search steps 16 places at a time on two of the key's bytes: the key, near misses and a
    second occurrence at every offset of payloads long and short still give the Python result."""
    from hindsight_py.outputs.bulk_lines import id_action_lines

    key = b'"eventID":"'
    decoys = [b"x", b"e", b"D", b'"', b'"eventI', b'"eventID"', b'eventID":"', b'"eventXD":"', b"\xc3\xa9"]
    rng = random.Random(37)
    payloads = []
    for before in range(40):
        for after in (0, 1, 17):
            filler = b"".join(rng.choice(decoys) for _ in range(before))
            payloads.append(b"{" + filler + key + b"id-" + bytes([65 + before % 26]) + b'"' + b"y" * after + b"}")
            payloads.append(b"{" + key + b'a"' + filler + key + b'b"}')  # twice: no plain id
            payloads.append(b"{" + filler + b"}")  # none
            payloads.append(key[:before % len(key)])  # cut short
    heads = [b'{"index":{"_id":"'] * len(payloads)
    c, py = _both(monkeypatch, lambda: id_action_lines(payloads, key, heads, b'"}}'))
    assert c == py
    assert sum(line is not None for line in c) > 40  # the ids found once


@needs_c
def test_keyed_action_lines_give_the_same_in_c(monkeypatch):
    from hindsight_py.outputs.bulk_lines import keyed_action_lines

    day = 86400 * 10**9
    stamps = [0, 1, -1, day - 1, day, -day, -day - 1, 1_700_000_000_000_000_000, 2**63 - 1, -(2**63),
              1_704_067_199_999_999_999, 1_704_067_200_000_000_000]
    made = []
    for i, stamp in enumerate(stamps):
        payload = b'{"eventID":"e-%d","n":1}' % i if i % 4 else b'{"n":1}'
        made.append(hmsg.encode(hmsg.Message(bytes(16), stamp, payload=payload.decode())))
    rng = random.Random(41)
    for case, raws in enumerate(_walk_cases(rng)):
        raws = raws + rng.sample(made, rng.randrange(len(made)))
        rng.shuffle(raws)
        unit = rng.choice([1, 3600, 86400, 7])
        from_stamp = rng.random() < 0.8
        key = rng.choice([b'"eventID":"', b""])
        results = []
        for fast in (True, False):
            heads = {0: b"zero"} if case % 3 == 0 else {}
            asked: list[int] = []

            def head_for(time_key, asked=asked):
                asked.append(time_key)
                return b"head %d " % time_key

            monkeypatch.setattr(_accel, "speedups", _speedups if fast else None)
            results.append((keyed_action_lines(raws, unit, from_stamp, heads, head_for, key, b" tail"), heads, asked))
        assert results[0][2] == results[1][2], (case, unit, from_stamp)
        assert results[0] == results[1], case
    with pytest.raises(TypeError):
        keyed_action_lines(made, 1, True, {}, lambda k: "not bytes", b"", b"")


@needs_c
def test_frame_json_records_gives_the_same_in_c(monkeypatch):
    from fastpath_records import odd_records, sample_records, texts

    from hindsight_py.json_records import frame_json_records

    rng = random.Random(31)
    records = sample_records(200) + odd_records()
    names = [b"eventID", b"eventTime", b"eventName"]
    for case in range(150):
        chosen = rng.sample(records, rng.randrange(0, 12))
        data = b'{"Records":[' + rng.choice([b",", b" , "]).join(texts(chosen, rng)) + b"]}"
        if case % 3 == 0:
            data = _damage(rng, data)
        pos = rng.choice([12, 12, rng.randrange(len(data) + 1)])
        kw = {"max_records": rng.choice([0, 1, 5, 50]), "stamp_key": rng.choice([b"@timestamp", b""]),
              "max_size": rng.choice([1 << 20, 3000])}
        uuids = hmsg.random_uuids(kw["max_records"])
        c, py = _both(monkeypatch, functools.partial(frame_json_records, data, pos, kw["max_records"], uuids,
                                                     b"\x1a\x01t\x32", b"\x4a\x01h", names, kw["stamp_key"],
                                                     kw["max_size"]))
        assert c == py, (case, kw)


def _document_cases(rng: random.Random):
    """Batches of messages whose Payloads are documents, or nearly (other payloads, damage)."""
    pieces = list(PAYLOAD_PIECES)
    for raws in _walk_cases(rng):
        docs = [hmsg.encode(message_dict.from_dict({"Payload": rng.choice(pieces), "Type": rng.choice(["t", "uu"])},
                                                   restricted=False, logger="in", hostname="h", pid=1, now_ns=0))
                for _ in range(rng.randrange(0, 8))]
        yield docs
        yield docs + raws[:2]


@needs_c
def test_bodies_from_messages_are_the_same_in_c(monkeypatch):
    from hindsight_py.outputs.bulk_body import bulk_body_of_messages, message_documents_size

    rng = random.Random(37)
    action = b'{"index":{"_index":"x"}}'
    for case, raws in enumerate(_document_cases(rng)):
        c, py = _both(monkeypatch, functools.partial(message_documents_size, raws))
        assert c == py, case
        good = [raw for raw in raws if message_documents_size([raw]) is not None]
        for start, max_docs, max_bytes in ((0, 1000, 1 << 30), (1, 2, 1 << 30), (0, 1000, 3000), (2, 5, 1)):
            if start < len(good):
                c, py = _both(monkeypatch, functools.partial(bulk_body_of_messages, good, start, max_docs, max_bytes,
                                                             action))
                assert c == py, (case, start)


def test_a_body_from_messages_is_the_body_of_their_payloads(impl):
    from hindsight_py.outputs.bulk_body import bulk_body_of_messages, message_documents_size

    rng = random.Random(41)
    action = b'{"create":{}}'
    for raws in _document_cases(rng):
        good = [raw for raw in raws if message_documents_size([raw]) is not None]
        if message_documents_size(raws) is not None:
            assert message_documents_size(raws) == sum(len(p) for p in peek.payloads_of(raws))
        start, bodies = 0, []
        while start < len(good):
            body, count = bulk_body_of_messages(good, start, 3, 1 << 20, action)
            assert 1 <= count <= 3
            bodies.append(body)
            start += count
        assert b"".join(bodies) == b"".join(action + b"\n" + p + b"\n" for p in peek.payloads_of(good))
        for bad in (len(good), -1):
            with pytest.raises(ValueError):
                bulk_body_of_messages(good, bad, 3, 1 << 20, action)
        others = [raw for raw in raws if message_documents_size([raw]) is None]
        if others:
            with pytest.raises(ValueError):
                bulk_body_of_messages(others, 0, 3, 1 << 20, action)


@needs_c
def test_frame_json_records_reads_strings_and_keys_byte_by_byte_in_c_too(monkeypatch):
    """The C scan steps over eight plain bytes at a time and compares keys word by word: every
    special byte at every offset of a string, and keys that differ in any one byte, still give
    what the Python twin gives."""
    from hindsight_py.json_records import frame_json_records

    specials = [b'"', b"\\", b"\\n", b"\\u0001", b"\\u0008", b"\\x", b"\x00", b"\x1f", b"\x7f", b"\xc3\xa9", b"\xff", b"\t"]
    records = []
    for special in specials:
        for offset in range(18):
            text = b"a" * offset + special + b"b" * (17 - offset)
            records.append(b'{"eventTime":"2024-01-01T00:00:00Z","s":"' + text + b'","eventID":"' + text + b'"}')
    for length in range(1, 20):
        key = bytes(range(97, 97 + length))
        for at in range(length):  # a key that differs from the first in one byte, and one the same
            other = key[:at] + b"Z" + key[at + 1:]
            records.append(b'{"eventTime":"2024-01-01T00:00:00Z","' + key + b'":1,"' + other + b'":2}')
            records.append(b'{"eventTime":"2024-01-01T00:00:00Z","' + key + b'":1,"' + key + b'":2}')
    uuids = hmsg.random_uuids(1)
    taken = 0
    for record in records:
        data = b"[" + record + b"]"
        c, py = _both(monkeypatch, functools.partial(frame_json_records, data, 1, 1, uuids, b"\x1a\x01t\x32", b"",
                                                     [b"eventID"], b"@timestamp", 1 << 20))
        assert c == py, record
        taken += c[1]
    assert 200 < taken < len(records)  # plain strings and distinct keys are taken, the rest refused
