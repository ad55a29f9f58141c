"""The project's own test tools: the CloudTrail generator (tests/cloudtrail_gen.py) keeps the
properties other tests and the benchmark count on, and the fake bulk endpoint (tests/bulk_sink.py)
answers as a server would. Cost: about 2 s.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import requests
from bulk_sink import BulkSink
from cloudtrail_gen import DEFAULT_SEED, lines
from conftest import CLOUDTRAIL_GENERATOR

SAMPLE = 5000
# what Elasticsearch's dynamic mapping takes for a date (strict_date_optional_time, yyyy/MM/dd)
DATE_LIKE = re.compile(r"^\d{4}[-/]\d{2}[-/]\d{2}")
DATE_FIELDS = {"eventTime", "userIdentity.sessionContext.attributes.creationDate", "responseElements.lastModified"}


@pytest.fixture(scope="module")
def sample() -> list[bytes]:
    return list(lines(SAMPLE))


@pytest.fixture(scope="module")
def records(sample: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sample]


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every scalar, arrays flattened as Elasticsearch maps them."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item, path)]
    return [(path, value)]


def test_the_same_seed_gives_the_same_lines_and_a_longer_run_begins_with_them(sample):
    assert list(lines(SAMPLE)) == sample
    assert list(lines(100)) == sample[:100]
    assert list(lines(100, seed=DEFAULT_SEED + 1)) != sample[:100]


def test_the_command_writes_the_same_lines(tmp_path):
    out = tmp_path / "ct.ndjson"
    subprocess.run([sys.executable, str(CLOUDTRAIL_GENERATOR), "-n", "50", "-o", str(out)], check=True)
    assert out.read_bytes() == b"".join(line + b"\n" for line in lines(50))


def test_records_are_cloudtrail_lines_of_about_a_kilobyte(sample, records):
    sizes = [len(line) for line in sample]
    assert 1000 < statistics.mean(sizes) < 1500
    assert min(sizes) > 400 and max(sizes) < 16_384
    assert not any(b"\n" in line for line in sample)
    assert len({r["eventID"] for r in records}) == SAMPLE
    times = [r["eventTime"] for r in records]
    assert times == sorted(times) and all(re.fullmatch(r"2024-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times)
    for key in ("awsRegion", "recipientAccountId", "eventSource", "eventName", "userIdentity"):
        assert all(r.get(key) for r in records), key


def test_every_field_keeps_one_type_and_only_dates_look_like_dates(records):
    types: dict[str, set[str]] = defaultdict(set)
    date_like: set[str] = set()
    for record in records:
        for path, value in leaves(record):
            if value is not None:
                types[path].add("number" if isinstance(value, int | float) and not isinstance(value, bool)
                                else type(value).__name__)
            if isinstance(value, str) and DATE_LIKE.match(value):
                date_like.add(path)
    assert {path: kinds for path, kinds in types.items() if len(kinds) > 1} == {}
    assert date_like <= DATE_FIELDS
    assert 100 < len(types) < 1000  # index.mapping.total_fields.limit is 1,000


def test_source_addresses_mix_ip_addresses_and_names(records):
    kinds = defaultdict(int)
    for record in records:
        value = record["sourceIPAddress"]
        try:
            kinds[f"ipv{ipaddress.ip_address(value).version}"] += 1
        except ValueError:
            kinds["AWS Internal" if value == "AWS Internal" else "service"] += 1
            assert value == "AWS Internal" or value.endswith(".amazonaws.com")
    assert kinds["ipv4"] > SAMPLE * 0.7
    assert all(kinds[k] > SAMPLE * 0.01 for k in ("ipv6", "service", "AWS Internal")), kinds


# -- the fake bulk endpoint -----------------------------------------------------------------------
@pytest.fixture
def sink():
    server = BulkSink(version="2.19.0", distribution="opensearch", record=True).start()
    yield server
    server.close()


def test_the_sink_answers_every_action_and_counts_it(sink):
    body = b'{"index":{"_index":"a"}}\n{"x":1}\n{"create":{"_index":"a","_id":"2"}}\n{"x":2}\n'
    plain = requests.post(f"{sink.url}/_bulk", data=body, timeout=10)
    zipped = requests.post(f"{sink.url}/a/_bulk?filter_path=items.*.status", data=gzip.compress(body),
                           headers={"Content-Encoding": "gzip"}, timeout=10)
    for answer in (plain, zipped):
        assert answer.status_code == 200
        assert answer.json() == {"took": 1, "errors": False,
                                 "items": [{"index": {"status": 201}}, {"create": {"status": 201}}]}
    stats = requests.get(f"{sink.url}/_sink_stats", timeout=10).json()
    assert stats == {"requests": 2, "docs": 4, "bytes": len(body) + len(gzip.compress(body))}
    assert sink.sources() == [b'{"x":1}', b'{"x":2}'] * 2
    assert [r.pairs()[1][0] for r in sink.requests] == [{"create": {"_index": "a", "_id": "2"}}] * 2


def test_the_sink_presents_itself_as_the_server_asked_for(sink):
    root = requests.get(sink.url, timeout=10).json()
    assert root["version"] == {"distribution": "opensearch", "number": "2.19.0"}
    assert requests.put(f"{sink.url}/an-index", json={}, timeout=10).json() == {"acknowledged": True}
    es = BulkSink(version="8.19.0").start()
    try:
        assert requests.get(es.url, timeout=10).json()["version"] == {"number": "8.19.0", "build_flavor": "default"}
    finally:
        es.close()


def test_the_sink_command_prints_its_url(tmp_path: Path):
    process = subprocess.Popen([sys.executable, str(CLOUDTRAIL_GENERATOR.with_name("bulk_sink.py"))],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert requests.get(url, timeout=10).json()["tagline"] == "You Know, for Search"
    finally:
        process.terminate()
        process.wait(30)
