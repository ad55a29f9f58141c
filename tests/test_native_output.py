"""The native output (plugins/elasticsearch_bulk.py) through `hindsight_cli`, as a user runs it.

Request shapes, `_type`, options and payload handling are checked against a fake cluster that
records every request; delivery into the real servers (Elasticsearch 7, 8, 9, OpenSearch 2, 3)
with CloudTracker's `type_name = "doc"` is checked by counting and comparing what they hold.

Cost: each fake-cluster test is one short hindsight_cli run (about 1-2 s); each real server
takes 3,000 lines in about 3-6 s, plus its start-up the first time (es7, os3, es9: 15-60 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import CLOUDTRAIL_GENERATOR
from native_pipeline import FakeCluster, NativePipeline, count, documents

LINES = 3000


@pytest.fixture(scope="module")
def cloudtrail(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """LINES generated CloudTrail records, one JSON object a line, unique eventIDs."""
    path = tmp_path_factory.mktemp("data") / "cloudtrail.ndjson"
    subprocess.run([sys.executable, str(CLOUDTRAIL_GENERATOR), "-n", str(LINES), "-o", str(path)], check=True,
                   stdin=subprocess.DEVNULL)
    lines = path.read_bytes().splitlines()
    assert len(lines) == LINES
    return lines


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    cluster = FakeCluster()
    yield cluster
    cluster.close()


def encoder(**keys: object) -> dict[str, object]:
    return {"encoders_elasticsearch_common": {"index": "cloudtrail", "type_name": "doc", **keys}}


# -- request shapes ---------------------------------------------------------------------------


def test_documents_are_the_payloads_in_requests_bounded_by_count_and_bytes(tmp_path, fake, cloudtrail):
    lines = cloudtrail[:700]
    flush_bytes = 40_000
    pipeline = NativePipeline(tmp_path, lines, {"url": fake.url, "flush_count": 60, "flush_bytes": flush_bytes,
                                                **encoder()})
    result = pipeline.run()

    assert result.returncode == 0, pipeline.stderr
    # every line once, byte for byte (requests in flight at once may arrive in any order)
    assert sorted(fake.sources()) == sorted(lines)
    for request in fake.bulks():
        pairs = request.pairs()
        assert len(pairs) <= 60
        assert len(request.body) <= flush_bytes
        assert {json.dumps(a) for a, _ in pairs} == {'{"index": {"_index": "cloudtrail"}}'}
    # the byte bound, not the count, cut most requests: ~1.2 KB documents, 40 KB a request
    assert max(len(r.pairs()) for r in fake.bulks()) < 60
    assert pipeline.summary() == {"read": 700, "delivered": 700, "dead": 0}
    assert pipeline.dead_letters() == []
    assert pipeline.checkpoint() == f"0:{(tmp_path / 'output' / 'input' / '0.log').stat().st_size}"  # all committed


@pytest.mark.parametrize(
    ("distribution", "version", "sent_type"),
    [("elasticsearch", "6.8.23", "doc"), ("elasticsearch", "7.17.29", None), ("elasticsearch", "8.19.0", None),
     ("opensearch", "2.19.0", None), ("opensearch", "1.3.20", None)],
)
def test_type_is_sent_only_to_servers_that_take_it(tmp_path, cloudtrail, distribution, version, sent_type):
    cluster = FakeCluster(version, distribution)
    try:
        pipeline = NativePipeline(tmp_path, cloudtrail[:5], {"url": cluster.url, **encoder()})
        assert pipeline.run().returncode == 0, pipeline.stderr
        actions = [a for r in cluster.bulks() for a, _ in r.pairs()]
    finally:
        cluster.close()
    assert len(actions) == 5
    assert all(a["index"].get("_type") == sent_type for a in actions)
    assert f"{distribution} {version}" in pipeline.stderr


def test_op_type_pipeline_id_gzip_and_index_from_the_message_time(tmp_path, fake, cloudtrail):
    lines = cloudtrail[:50]
    before = time.gmtime()
    pipeline = NativePipeline(tmp_path, lines, {
        "url": fake.url, "op_type": "create", "pipeline": "cloudtrail-geoip", "id_field": "eventID", "gzip": True,
        **encoder(index="CT-%{%Y.%m}", es_index_from_timestamp=True),
    })
    assert pipeline.run().returncode == 0, pipeline.stderr
    after = time.gmtime()

    bulks = fake.bulks()
    assert bulks and all(r.headers.get("Content-Encoding") == "gzip" and r.wire_body != r.body for r in bulks)
    pairs = [p for r in bulks for p in r.pairs()]
    assert [s for _, s in pairs] == lines
    months = {time.strftime("ct-%Y.%m", t) for t in (before, after)}  # the messages were made in between
    for action, source in pairs:
        meta = action["create"]
        assert set(meta) == {"_index", "_id", "pipeline"}
        assert meta["_id"] == json.loads(source)["eventID"]
        assert meta["pipeline"] == "cloudtrail-geoip"
        assert meta["_index"] in months


@pytest.mark.parametrize(
    ("keys", "header"),
    [({"api_key": "aWQ6c2VjcmV0"}, "ApiKey aWQ6c2VjcmV0"),
     ({"username": "hindsight", "password": "pa:ss"}, "Basic aGluZHNpZ2h0OnBhOnNz")],
)
def test_credentials_go_with_every_request(tmp_path, fake, keys, header):
    pipeline = NativePipeline(tmp_path, [b'{"a":1}'], {"url": fake.url, **keys, **encoder()})
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert len(fake.requests) == 2  # GET / and one bulk request
    assert all(r.headers.get("Authorization") == header for r in fake.requests)


# Messages a line-based input cannot make: a Python input plugin injects them as they are.
ODD_MESSAGES = '''
from hindsight_py.plugin import inject_message

def process_message(checkpoint):
    inject_message({"Payload": '{"n": 1}'})
    inject_message({"Payload": '{\\n  "n": 2,\\n  "text": "two lines"\\n}'})
    inject_message({"Payload": '{"n": 3}\\n'})
    inject_message({"Payload": "12 messages analysed"})
    inject_message({"Type": "no.payload", "Fields": {"n": 5}})
    inject_message({"Payload": "not json\\nacross lines"})
    inject_message({"Payload": '  {"n": 7}'})
    return 0
'''


def test_payloads_are_repaired_or_dead_lettered_never_lost(tmp_path, fake):
    pipeline = NativePipeline(tmp_path, [], {"url": fake.url, **encoder()}, input_plugin=ODD_MESSAGES)
    assert pipeline.run().returncode == 16, pipeline.stderr  # 16: some messages are in the dead-letter file

    indexed = [json.loads(s) for s in fake.sources()]
    assert indexed == [{"n": 1}, {"n": 2, "text": "two lines"}, {"n": 3}, {"n": 7}]
    assert all(b"\n" not in s for s in fake.sources())
    letters = pipeline.dead_letters()
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(letters) == 3, letters
    assert any("no Payload" in r for r in reasons)
    assert any("several lines and is not JSON" in r for r in reasons)
    assert any("not a JSON object" in r for r in reasons)
    texts = json.dumps(letters)
    assert "12 messages analysed" in texts and "not json\\nacross lines" in texts


# Full read batches of documents (kept as messages until their request is made), then odd messages
# in the next batch, before the request is due: every one in its place.
DOCUMENTS_THEN_ODD_ONES = '''
from hindsight_py.plugin import inject_message

def process_message(checkpoint):
    for i in range(2000):
        inject_message({"Payload": '{"i": %d}' % i})
    inject_message({"Payload": '{\\n  "i": 2000\\n}'})
    inject_message({"Payload": "not a document"})
    for i in range(2001, 2500):
        inject_message({"Payload": '{"i": %d}' % i})
    return 0
'''


def test_documents_keep_their_order_around_odd_messages(tmp_path, fake):
    pipeline = NativePipeline(tmp_path, [], {"url": fake.url, "ticker_interval": 600, **encoder()},
                              input_plugin=DOCUMENTS_THEN_ODD_ONES)
    assert pipeline.run().returncode == 0, pipeline.stderr  # (a payload set aside is no failure)

    requests = [[json.loads(source)["i"] for _, source in r.pairs()] for r in fake.bulks()]
    assert all(numbers == sorted(numbers) for numbers in requests)
    assert sorted(sum(requests, [])) == list(range(2500))
    [letter] = pipeline.dead_letters()
    assert "not a JSON object" in letter["reason"]
    assert pipeline.summary() == {"read": 2501, "delivered": 2500, "dead": 0}


# Messages whose headers change from one to the next: the payload must be found in each.
MIXED_SHAPES = '''
from hindsight_py.plugin import inject_message

def process_message(checkpoint):
    for i in range(600):
        doc = '{"i": %d, "pad": "%s"}' % (i, "x" * ((i * 7919) % 40000 if i % 50 == 0 else i % 300))
        msg = {"Payload": doc}
        if i % 3 == 0:
            msg["Type"] = "t%d" % (i % 7)
        if i % 5 == 0:
            msg["Fields"] = {"n": i, "s": "y" * (i % 200)}
        if i % 11 == 0:
            msg["Severity"] = i % 8
        if i % 13 == 0:
            msg["Hostname"] = "host-%d" % i
        inject_message(msg)
    return 0
'''


def test_payloads_are_found_whatever_the_headers_around_them(tmp_path, fake):
    pipeline = NativePipeline(tmp_path, [], {"url": fake.url, **encoder()}, input_plugin=MIXED_SHAPES)
    assert pipeline.run().returncode == 0, pipeline.stderr
    expected = [b'{"i": %d, "pad": "%s"}' % (i, b"x" * ((i * 7919) % 40000 if i % 50 == 0 else i % 300))
                for i in range(600)]
    assert fake.sources() == expected
    assert max(map(len, expected)) > 16384  # three-byte payload lengths were among them


def test_a_rejected_document_is_dead_lettered_with_the_reason_and_the_rest_indexed(tmp_path, cloudtrail):
    lines = cloudtrail[:20]
    bad = json.loads(lines[7])["eventID"].encode()
    error = {"type": "illegal_argument_exception", "reason": "rejected by the test"}
    cluster = FakeCluster(reject=lambda action, source: (400, error) if bad in source else None)
    try:
        pipeline = NativePipeline(tmp_path, lines, {"url": cluster.url, **encoder()})
        assert pipeline.run().returncode == 16, pipeline.stderr
    finally:
        cluster.close()
    letters = pipeline.dead_letters()
    assert [letter["data"].encode() for letter in letters] == [lines[7]]
    assert letters[0]["status"] == 400 and "rejected by the test" in letters[0]["reason"]
    assert pipeline.summary() == {"read": 20, "delivered": 19, "dead": 1}


def test_a_url_that_is_no_bulk_endpoint_is_waited_out_not_dead_lettered(tmp_path, cloudtrail):
    refusals = []

    def wrong_endpoint_three_times(request):
        if "/_bulk" in request.path and len(refusals) < 3:
            refusals.append(request.path)
            return 404, b'{"error":"no handler found for uri [/_bulk] and method [POST]","status":404}'
        return None

    cluster = FakeCluster(gate=wrong_endpoint_three_times)
    try:
        # discard_on_error with max_retry = 0 gives up on documents at once: not on a configuration error
        pipeline = NativePipeline(tmp_path, cloudtrail[:10], {"url": cluster.url, "discard_on_error": True,
                                                              "max_retry": 0, **encoder()})
        assert pipeline.run().returncode == 0, pipeline.stderr
    finally:
        cluster.close()
    assert len(refusals) == 3
    assert cluster.sources()[-10:] == cloudtrail[:10]
    assert pipeline.dead_letters() == []


def test_the_next_url_takes_over_when_one_is_down(tmp_path, fake, cloudtrail, unused_port):
    pipeline = NativePipeline(tmp_path, cloudtrail[:30], {
        "urls": [f"http://127.0.0.1:{unused_port}", fake.url], "timeout": 2, **encoder()})
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert fake.sources() == cloudtrail[:30]


def test_while_the_server_is_down_nothing_is_committed_and_a_later_run_delivers(tmp_path, cloudtrail, unused_port):
    lines = cloudtrail[:40]
    pipeline = NativePipeline(tmp_path, lines, {"url": f"http://127.0.0.1:{unused_port}", **encoder()})
    proc = pipeline.start()
    pipeline.wait_for_log("cannot detect the search server", proc, count=2)
    pipeline.stop(proc)
    assert pipeline.checkpoint() in (None, "0:0")
    assert pipeline.dead_letters() == []

    cluster = FakeCluster()
    try:
        pipeline.write_output({"url": cluster.url, **encoder()})
        assert pipeline.run().returncode == 0, pipeline.stderr
        assert cluster.sources() == lines  # exactly once: nothing was sent before
    finally:
        cluster.close()


def test_bad_configuration_stops_the_plugin_with_the_reason(tmp_path, fake):
    pipeline = NativePipeline(tmp_path, [b'{"a":1}'], {"url": fake.url, "op_type": "upsert", **encoder()})
    result = pipeline.run()
    assert result.returncode & 8, pipeline.stderr
    assert "op_type must be 'index' or 'create'" in pipeline.stderr



# -- real servers -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["es8", "es9", "os2", "es7", "os3"])
def test_every_server_takes_every_document(tmp_path, search_server, scratch_index, cloudtrail, server):
    base_url = search_server(server)
    index = scratch_index(base_url)
    pipeline = NativePipeline(tmp_path, cloudtrail, {
        "url": base_url, "id_field": "eventID", "flush_count": 500,
        **encoder(index=index, es_index_from_timestamp=True),  # CloudTracker's encoder settings
    })
    assert pipeline.run().returncode == 0, pipeline.stderr

    assert pipeline.dead_letters() == []
    assert pipeline.summary() == {"read": LINES, "delivered": LINES, "dead": 0}
    assert count(base_url, index) == LINES
    held = {doc.pop("_id"): doc for doc in documents(base_url, index)}
    expected = {record["eventID"]: record for record in map(json.loads, cloudtrail)}
    assert held == expected


def test_without_the_c_loops_every_document_arrives_the_same(tmp_path, es8_url, scratch_index, cloudtrail):
    # HINDSIGHT_PY_PURE=1: what a machine without a C compiler runs (hindsight_py/_speedups.c unbuilt)
    index = scratch_index(es8_url)
    too_long = b'{"big":"' + b"x" * (1 << 20) + b'"}'  # over max_message_size: dead-lettered
    lines = [*cloudtrail[:100], too_long, *cloudtrail[100:]]
    pipeline = NativePipeline(tmp_path, lines, {
        "url": es8_url, "id_field": "eventID", **encoder(index=index, es_index_from_timestamp=True),
    })
    assert pipeline.run(env={"HINDSIGHT_PY_PURE": "1"}).returncode == 16, pipeline.stderr  # a dead letter

    (dead,) = pipeline.dead_letters()
    assert (dead["plugin"], dead["data"].encode()) == ("input.file", too_long)
    offset = sum(len(line) + 1 for line in cloudtrail[:100])
    assert dead["reason"].endswith(f", byte {offset})")
    held = {doc.pop("_id"): doc for doc in documents(es8_url, index)}
    assert held == {record["eventID"]: record for record in map(json.loads, cloudtrail)}


def test_a_second_run_of_the_same_lines_overwrites_instead_of_duplicating(tmp_path, es8_url, scratch_index,
                                                                            cloudtrail):
    index = scratch_index(es8_url)
    lines = cloudtrail[:300]
    for attempt in ("first", "second"):
        pipeline = NativePipeline(tmp_path / attempt, lines, {"url": es8_url, "id_field": "eventID",
                                                              **encoder(index=index)})
        assert pipeline.run().returncode == 0, pipeline.stderr
    assert count(es8_url, index) == len(lines)
