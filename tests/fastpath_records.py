"""CloudTrail-like records for the fast-path tests: the committed sample and odd ones."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

from conftest import REPO_ROOT

SAMPLE = REPO_ROOT / "examples" / "cloudtrail-sample.ndjson"


def sample_records(n: int = 1000) -> list[dict[str, Any]]:
    with open(SAMPLE, "rb") as fh:
        return [json.loads(line) for line in fh.read().splitlines()[:n]]


def odd_records() -> list[Any]:
    """Records the fast path must refuse or handle exactly as the slow path does."""
    base = sample_records(1)[0]

    def variant(**changes: Any) -> dict[str, Any]:
        record = copy.deepcopy(base)
        for key, value in changes.items():
            if value is ...:
                record.pop(key, None)
            else:
                record[key] = value
        return record

    nested = variant()
    nested["requestParameters"] = {"eventID": "nested-id", "note": 'a "quoted" \\ value'}
    return [
        variant(eventID=...),                                   # no eventID: no _id
        variant(eventTime=...),                                 # no eventTime: no Timestamp from it
        variant(eventTime="2024-01-01T00:00:01.250Z"),          # other formats of eventTime
        variant(eventTime="2024-01-01T01:00:01+01:00"),
        variant(eventTime="2024-01-01 00:00:01Z"),
        variant(eventTime="2024-01-01T00:00:01"),               # no zone: no Timestamp
        variant(eventTime="2024-02-30T00:00:01Z"),              # no such day
        variant(eventTime="1969-12-31T23:59:59Z"),
        variant(eventTime=1704067201),
        variant(eventID="ünïcødé-ид-😀"),                       # unicode
        variant(eventID='with "escaped" quotes \\ and \n a newline'),
        variant(eventName="Describe\u0001Things\u2028"),
        variant(eventID=12345),                                 # not a string: no Field, _id "12345"
        variant(eventID=""),
        variant(**{"@timestamp": "2000-01-01T00:00:00Z"}),      # has its own @timestamp
        variant(responseElements={"ratio": 1.5e-7, "big": 1e16, "x": 0.1, "n": -0}),
        variant(userAgent="a" * 70000),                         # large
        nested,
        variant(requestParameters={"deep": json.loads("[" * 70 + "1" + "]" * 70)}),
        variant(requestParameters={str(i): i for i in range(80)}),
        {"eventID": "tiny", "eventTime": "2024-03-01T12:00:00Z"},
        {},
        [1, 2],
        "a string",
        None,
    ]


def texts(records: list[Any], rng: random.Random) -> list[bytes]:
    """Each record as compact JSON, now and then written some other way."""
    out = []
    for record in records:
        style = rng.random()
        if style < 0.8:
            text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        elif style < 0.9:
            text = json.dumps(record, separators=(",", ":"))  # \u escapes
        else:
            text = json.dumps(record, indent=1)
        out.append(text.encode("utf-8", "surrogateescape"))
    return out
