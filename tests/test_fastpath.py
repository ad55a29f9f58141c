"""The S3-tree input's and the native output's fast paths give what their slow paths give.

Input: records framed straight from a file's bytes (frame_json_records) are the messages
plugins/cloudtrail_tree.py's make_message builds from the parsed record, byte for byte but the
Uuid, on the committed sample and odd records. Output: the action lines made per batch carry the
`_id` and daily index the per-message rule gives. Matchers: select() agrees with decoding.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import time
import types
import zlib
from types import SimpleNamespace
from typing import Any

import pytest
from bulk_sink import BulkSink
from conftest import REPO_ROOT
from fastpath_records import odd_records, sample_records, texts
from native_pipeline import FakeCluster, NativePipeline
from test_speedups import _damage, _messages, impl  # noqa: F401 - impl is a fixture

from hindsight_py import message as hmsg
from hindsight_py import plugin as api
from hindsight_py.matcher import compile_matcher
from hindsight_py.sandbox.python import PythonSandbox

MAX = 64 * 1024


def _host() -> Any:
    """What PythonSandbox's inject and encode methods use of a sandbox."""
    host = SimpleNamespace(_restricted=False, _logger="input.ct", _hostname="host", _pid=42, _max_message_size=MAX,
                           _out=[], _out_bytes=0, _out_count=0, plugin_type="input")
    host._maybe_flush = lambda: None
    host._queue = types.MethodType(PythonSandbox._queue, host)
    host._end_injection = lambda checkpoint: None
    return host


@pytest.fixture
def tree_plugin(tmp_path):
    """plugins/cloudtrail_tree.py as a module, its cfg read from a stand-in sandbox."""
    config = {"root": str(tmp_path), "output_path": str(tmp_path), "Logger": "input.ct", "max_message_size": MAX}
    token = api.enter(SimpleNamespace(config=config))
    spec = importlib.util.spec_from_file_location("cloudtrail_tree_under_test", REPO_ROOT / "plugins/cloudtrail_tree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    api.leave(token)


def _same_but_uuid(fast: bytes, slow: bytes) -> None:
    a, b = hmsg.decode(fast), hmsg.decode(slow)
    a.uuid = b.uuid
    assert a == b
    assert hmsg.encode(a) == slow


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_a_file_inflated_whole_is_what_inflating_it_step_by_step_gives(tree_plugin, monkeypatch, inflater):
    if inflater == "zlib":
        monkeypatch.setattr(tree_plugin, "_zlib", zlib)
    else:
        assert tree_plugin._zlib.__name__ == "isal.isal_zlib"  # the tests run with the `fast` extra
    rng = random.Random(5)
    text = b'{"Records":[' + b",".join(texts(sample_records(), rng)) + b"]}"
    one = gzip.compress(text)
    big = gzip.compress(text * 40, 9)  # a size hint far too small for its first member
    sound = {"one member": one, "members": one + gzip.compress(b"more") + big, "padded": one + bytes(100),
             "empty text": gzip.compress(b""), "zlib header": zlib.compress(text)}
    for name, data in sound.items():
        assert tree_plugin._gunzip(data) == tree_plugin._inflate_in_steps(data) == (gzip.decompress(data)
                                                                                  if name != "zlib header" else text,
                                                                                  None), name
    damaged = {"truncated": one[:len(one) // 2], "no trailer": one[:-3], "corrupt": one[:40] + bytes(30) + one[70:],
               "trailing bytes": one + b"junk", "second truncated": one + big[:1000]}
    for name, data in damaged.items():
        assert tree_plugin._inflate_whole(data) is None, name
        assert tree_plugin._gunzip(data) == tree_plugin._inflate_in_steps(data), name
        assert tree_plugin._gunzip(data)[1] is not None, name


@pytest.mark.usefixtures("impl")
def test_records_framed_from_their_bytes_are_the_messages_make_message_builds(tree_plugin):
    from sandbox_fakes import split_framed

    rng = random.Random(3)
    records = sample_records() + odd_records()
    rng.shuffle(records)
    data = b'{"Records":[' + b",".join(texts(records, rng)) + b"]}"
    host = _host()
    pos, number, taken, refused = len(b'{"Records":['), 0, 0, 0
    while True:
        host._out = []
        count, pos, status, odd_end = PythonSandbox.inject_json_records(
            host, data, pos, 50, tree_plugin._FIELDS, "@timestamp", "cloudtrail")
        for raw in split_framed(b"".join(host._out)):
            record = json.loads(json.dumps(records[number]))
            slow = PythonSandbox._encode(host, tree_plugin.make_message(record))
            _same_but_uuid(raw, slow)
            number += 1
        taken += count
        if status == 1:
            break
        if status == 2:  # the slow way's, in the plugin: here only stepped over
            assert odd_end > pos
            assert json.loads(data[pos:odd_end]) == records[number]
            number += 1
            refused += 1
            pos = tree_plugin._NEXT(data, odd_end).end()
        else:
            assert status == 0
    assert number == len(records)
    assert taken > 750 and refused >= 25  # the sample's compact records, and every odd one


@pytest.mark.usefixtures("impl")
def test_the_batch_of_parsed_records_is_what_make_message_builds(tree_plugin, monkeypatch):
    from sandbox_fakes import split_framed

    records = sample_records(200) + [r for r in odd_records() if isinstance(r, dict)]
    host = _host()
    sent: list[bytes] = []

    def inject_records(payloads, stamps, fields, checkpoint, type):
        host._out = []
        PythonSandbox.inject_records(host, payloads, stamps, fields, None, type)
        sent.extend(split_framed(b"".join(host._out)))

    def inject_message(msg, checkpoint):
        if msg is not None:
            sent.append(PythonSandbox._encode(host, msg))

    monkeypatch.setattr(tree_plugin, "inject_records", inject_records)
    monkeypatch.setattr(tree_plugin, "inject_message", inject_message)
    monkeypatch.setattr(tree_plugin, "dead_letter", lambda reason, payload: sent.append(b"dead letter"))
    now = time.time_ns()
    position = SimpleNamespace(at=lambda number: f"cp {number}")  # the checkpoint after record `number`
    tree_plugin._send_batch("f.json.gz", json.loads(json.dumps(records)), 1, position)
    expected = []
    for record in records:
        try:
            expected.append(PythonSandbox._encode(host, tree_plugin.make_message(record)))
        except ValueError:
            expected.append(b"dead letter")
    assert len(sent) == len(expected)
    for got, want in zip(sent, expected, strict=True):
        if want == b"dead letter" or hmsg.decode(want).timestamp >= now:  # the clock's time: not comparable
            assert (got == b"dead letter") == (want == b"dead letter")
        else:
            _same_but_uuid(got, want)


INJECT_ODD_RECORDS = '''
import json
from hindsight_py.plugin import inject_message

def process_message(checkpoint):
    for i, doc in enumerate(json.loads(open({path!r}).read())):
        inject_message({{"Type": "cloudtrail", "Payload": json.dumps(doc, separators=(",", ":"), ensure_ascii=False),
                         "Timestamp": 1704067200 * 10**9 + i * 3_600_000_000_000 - 1}})
    inject_message({{"Type": "other", "Payload": '{{"eventID":"not matched"}}'}})
    return 0
'''


@pytest.mark.parametrize("pure", [False, True])
def test_action_lines_made_per_batch_carry_the_id_and_daily_index_of_the_slow_rule(tmp_path, pure):
    records = sample_records(300) + [r for r in odd_records() if isinstance(r, dict) and "userAgent" not in r]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    cluster = FakeCluster()
    try:
        pipeline = NativePipeline(tmp_path / "run", [], {
            "url": cluster.url, "id_field": "eventID", "message_matcher": "Type == 'cloudtrail'",
            "encoders_elasticsearch_common": {"index": "CT-%{%Y.%m.%d}", "es_index_from_timestamp": True},
        }, input_plugin=INJECT_ODD_RECORDS.format(path=str(path)))
        env = {"HINDSIGHT_PY_PURE": "1"} if pure else None
        assert pipeline.run(env=env).returncode == 0, pipeline.stderr
        lines = [line for r in cluster.bulks() for line in r.body.split(b"\n")[:-1]]
    finally:
        cluster.close()
    assert len(lines) == 2 * len(records)
    for i, (action, source) in enumerate(zip(lines[0::2], lines[1::2], strict=True)):
        doc = json.loads(source)
        assert doc == records[i]
        meta = {"_index": time.strftime("ct-%Y.%m.%d", time.gmtime((1704067200 * 10**9 + i * 3_600_000_000_000 - 1)
                                                                  / 1e9))}
        value = doc.get("eventID")
        if value is not None and not isinstance(value, dict | list):
            meta["_id"] = str(value)
        assert action == json.dumps({"index": meta}, separators=(",", ":")).encode(), i


def _example_bulk_pairs(tmp_path, root, name: str, env: dict[str, str]) -> dict[bytes, tuple[bytes, bytes]]:
    """examples/cloudtrail-tree over `root` into a recording sink: action and source line by _id."""
    import os
    import subprocess
    import sys

    from test_cloudtrail_tree import RUN_TIMEOUT, example_config

    sink = BulkSink(record=True).start()
    try:
        work = example_config(tmp_path, root=root, url=sink.url, index="ct", name=name)
        done = subprocess.run([sys.executable, "-m", "hindsight_py", "hindsight.cfg", "7"], cwd=work, timeout=RUN_TIMEOUT,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, env={**os.environ, **env})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        pairs = {}
        for request in sink.requests:
            lines = request.body.split(b"\n")
            assert lines[-1] == b""
            for action, source in zip(lines[0:-1:2], lines[1:-1:2], strict=True):
                pairs[json.loads(action)["index"].get("_id", action)] = (action, source)
    finally:
        sink.close()
    return pairs


def test_the_example_sends_the_same_bulk_lines_with_and_without_the_c_loops(tmp_path):
    """The whole S3-tree path (examples/cloudtrail-tree: _id = eventID, daily index, @timestamp),
    with the C loops (bytes framed from the file, action lines keyed in C) and without them
    (records parsed and built one by one, lines made per message): the same action line and
    source for every record; the real records' as the configuration promises."""
    from test_cloudtrail_tree import _object_path

    rng = random.Random(13)
    real = sample_records(600)
    odd = [r for r in odd_records() if isinstance(r, dict) and r.get("eventID") not in (None, "", 12345)]
    records = real + odd
    for i, record in enumerate(records):
        record["eventID"] = f"{record['eventID']}-{i}"  # one document per record: none replaces another
    rng.shuffle(records)
    for i in range(0, len(records), 97):  # as CloudTrail writes them (compact), now and then otherwise
        path = _object_path(tmp_path / "tree", records[i:i + 97], rng)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b'{"Records":[' + b",".join(texts(records[i:i + 97], rng)) + b"]}"))
    fast = _example_bulk_pairs(tmp_path, tmp_path / "tree", "fast", {})
    pure = _example_bulk_pairs(tmp_path, tmp_path / "tree", "pure", {"HINDSIGHT_PY_PURE": "1"})
    assert fast == pure
    assert len(fast) == len(records)
    for record in real:
        action, source = fast[record["eventID"]]
        day = record["eventTime"][:10].replace("-", ".")
        assert json.loads(action) == {"index": {"_index": f"ct-{day}", "_id": record["eventID"]}}
        assert source == json.dumps({**record, "@timestamp": record["eventTime"]}, separators=(",", ":"),
                                    ensure_ascii=False).encode()


@pytest.mark.parametrize("expression", ["Type == 'cloudtrail'", "Logger == 'input.file'", "Type != 't'",
                                        "Hostname == 'h'", "Payload == ''", "EnvVersion == 'x'"])
@pytest.mark.usefixtures("impl")
def test_select_picks_what_decoding_and_matching_picks(expression):
    matcher = compile_matcher(expression)
    assert matcher.header_test is not None
    rng = random.Random(11)
    for case in range(60):
        raws = _messages(rng, rng.randrange(1, 40), one_shape=case % 2 == 0)
        if case % 3 == 0:  # damaged, but valid still: queue readers hand over only valid messages
            raws = [d if hmsg.is_valid(d := _damage(rng, r)) and rng.random() < 0.3 else r for r in raws]
        expected = [i for i, raw in enumerate(raws) if matcher(hmsg.decode(raw))]
        assert matcher.select(raws) == expected


def test_select_is_only_for_one_header_comparison():
    for expression in ("TRUE", "Type == 'a' && Logger == 'b'", "Fields[x] == 'y'", "Type =~ 'a'", "Severity == 7",
                       "Type == NIL"):
        assert compile_matcher(expression).header_test is None
        assert compile_matcher(expression).select([]) is None


def test_a_checkpoint_counts_only_ledger_lines_already_on_disk(tree_plugin, monkeypatch, tmp_path):
    """plugins/cloudtrail_tree.py fsyncs its ledger in the background: until a finished file's
    line is on disk, the checkpoint handed over stays the last one that counts only what is
    (a restart reads a little more again, never less); before returning it hands over the latest."""
    handed: list[str] = []
    monkeypatch.setattr(tree_plugin, "inject_message", lambda message, checkpoint: handed.append(checkpoint))
    ledger = tree_plugin.S.ledger = tree_plugin.Ledger(str(tmp_path / "ledger" / "input.ct.files"))
    ledger.load(0)
    started: list[int] = []
    monkeypatch.setattr(ledger, "sync_in_background", lambda: started.append(ledger.size))  # a slow disk
    in_a = tree_plugin._Position(ledger, "a.json.gz").at(5)
    assert json.loads(in_a) == {"v": 1, "ledger": 0, "file": "a.json.gz", "records": 5}
    ledger.add("a.json.gz", 10, "ok")
    assert ledger.durable == 0 and started == [ledger.size]
    assert tree_plugin._Position(ledger, "b.json.gz").at(3) == in_a  # b's would count a's line
    tree_plugin._settle()
    assert ledger.durable == ledger.size == len((tmp_path / "ledger" / "input.ct.files").read_bytes())
    assert [json.loads(c) for c in handed] == [{"v": 1, "ledger": ledger.size, "file": "b.json.gz", "records": 3}]
    assert tree_plugin._Position(ledger, "b.json.gz").at(4) != in_a  # on disk: counted at once
