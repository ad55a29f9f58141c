"""Mixed-type fields: the conflict resolver, the index template, and loads with 0 rejected.

Unit tests read the servers' real error texts (captured from Elasticsearch 8.19 and OpenSearch
2.19); the server tests send CloudTrail-shaped records of every conflicting type to both servers,
through the bulk sender, then through hindsight_cli: a flat file on the project's run/ (Lua
output) and a tree on examples/cloudtrail-tree (native output).
Cost: unit part well under a second; server part about 30 s (index creations dominate).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO_ROOT
from test_cloudtrail_tree import (
    dead_letter_records,
    delete_template,
    example_config,
    pack_tree,
    run_hindsight,
    search_sources,
)

from hindsight_py.outputs import type_conflicts as tc
from hindsight_py.outputs.elasticsearch import BulkSender

# -- the servers' own texts --------------------------------------------------------------------------
ES8 = {
    "object_vs_value": {"type": "document_parsing_exception",
                        "reason": "[1:7] object mapping for [responseElements.role] tried to parse field [role] as "
                                  "object, but found a concrete value"},
    "value_vs_object": {"type": "document_parsing_exception",
                        "reason": "[1:14] failed to parse field [responseElements.endpoint] of type [text] in "
                                  "document with id 'GeUTH6IBFKo-BbQRJ0bb'. Preview of field's value: '{d=1}'",
                        "caused_by": {"type": "illegal_argument_exception",
                                      "reason": "Expected text at 1:7 but found START_OBJECT"}},
    "long_vs_string": {"type": "document_parsing_exception",
                       "reason": "[1:7] failed to parse field [responseElements.version] of type [long] in document "
                                 "with id 'G-UTH6IBFKo-BbQRJ0bw'. Preview of field's value: 'abc'",
                       "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"abc\""}},
    "mixed_array": {"type": "illegal_argument_exception",
                    "reason": "mapper [m] cannot be changed from type [long] to [text]"},
    "too_deep": {"type": "document_parsing_exception",
                 "reason": "[1:124] failed to parse: Limit of mapping depth [20] has been exceeded due to object "
                           "field [deep.l.l]",
                 "caused_by": {"type": "illegal_argument_exception",
                               "reason": "Limit of mapping depth [20] has been exceeded due to object field "
                                         "[deep.l.l]"}},
}
OS2 = {
    "object_vs_value": {"type": "mapper_parsing_exception",
                        "reason": "object mapping for [responseElements.role] tried to parse field [role] as object, "
                                  "but found a concrete value"},
    "value_vs_object": {"type": "mapper_parsing_exception",
                        "reason": "failed to parse field [responseElements.endpoint] of type [text] in document with "
                                  "id 'avYTH6IBOy0z7tR4KRvr'. Preview of field's value: '{d=1}'",
                        "caused_by": {"type": "illegal_state_exception",
                                      "reason": "Can't get text on a START_OBJECT at 1:7"}},
    "dotted_key": {"type": "mapper_parsing_exception",
                   "reason": "Could not dynamically add mapping for field [a.b]. Existing mapping for [a] must be of "
                             "type object but found [text]."},
    "too_deep": {"type": "mapper_parsing_exception", "reason": "failed to parse",
                 "caused_by": {"type": "parse_exception",
                               "reason": "The depth of the field has exceeded the allowed limit of [3]. This limit "
                                         "can be set by changing the [index.mapping.depth.limit] index level "
                                         "setting."}},
}


def resolve(doc: dict[str, Any] | str, error: dict[str, Any]) -> dict[str, Any] | None:
    source = doc if isinstance(doc, str) else json.dumps(doc)
    out = tc.ConflictResolver()(source.encode(), error)
    return None if out is None else json.loads(out)


@pytest.mark.parametrize("errors", [ES8, OS2], ids=["es8", "os2"])
def test_an_object_mapped_field_holding_a_value_moves_the_value_aside(errors):
    doc = {"eventName": "CreateRole", "responseElements": {"role": "arn:aws:iam::1:role/x", "after": 1}}

    fixed = resolve(doc, errors["object_vs_value"])

    assert fixed == {
        "eventName": "CreateRole",
        "responseElements": {"role_string": "arn:aws:iam::1:role/x", "after": 1},
        "_hindsight_renamed": [{"from": "responseElements.role", "to": "responseElements.role_string"}],
    }
    # the key keeps its place: the document reads as the record did
    assert list(fixed["responseElements"]) == ["role_string", "after"]


@pytest.mark.parametrize("errors", [ES8, OS2], ids=["es8", "os2"])
def test_a_value_mapped_field_holding_an_object_moves_the_object_aside(errors):
    doc = {"responseElements": {"endpoint": {"address": "db.example", "port": 5432}}}

    fixed = resolve(doc, errors["value_vs_object"])

    assert fixed["responseElements"] == {"endpoint_object": {"address": "db.example", "port": 5432}}
    assert fixed["_hindsight_renamed"] == [
        {"from": "responseElements.endpoint", "to": "responseElements.endpoint_object"}]


def test_a_string_in_a_number_field_gets_a_string_sibling():
    fixed = resolve({"responseElements": {"version": "abc"}}, ES8["long_vs_string"])
    assert fixed["responseElements"] == {"version_string": "abc"}


def test_only_the_array_elements_that_do_not_fit_move():
    doc = {"items": [{"endpoint": {"a": 1}}, {"endpoint": "text"}, {"endpoint": None}]}
    error = {"type": "document_parsing_exception",
             "reason": "object mapping for [items.endpoint] tried to parse field [endpoint] as object, but found a "
                       "concrete value"}

    fixed = resolve(doc, error)

    assert fixed["items"] == [{"endpoint": {"a": 1}}, {"endpoint_string": "text"}, {"endpoint": None}]


def test_an_array_of_mixed_types_becomes_its_exact_json_text():
    source = '{"m":[1,"a",{"x":1.50}]}'
    fixed = resolve(source, ES8["mixed_array"])
    assert fixed["m_json"] == '[1,"a",{"x":1.50}]'
    assert fixed["_hindsight_renamed"] == [{"from": "m", "to": "m_json"}]


def test_a_dotted_key_under_a_value_field_moves_with_its_first_part():
    fixed = resolve({"a.b": 1, "z": 2}, OS2["dotted_key"])
    assert fixed == {"a_object.b": 1, "z": 2, "_hindsight_renamed": [{"from": "a", "to": "a_object"}]}


@pytest.mark.parametrize("errors", [ES8, OS2], ids=["es8", "os2"])
def test_too_deep_objects_are_kept_as_their_json_text(errors):
    doc = {"deep": {"l": {"l": {"x": 1}}}, "top": 1}
    fixed = resolve(doc, errors["too_deep"])
    assert fixed["deep"]["l"] == {"l_json": '{"x":1}'}
    assert fixed["_hindsight_renamed"] == [{"from": "deep.l.l", "to": "deep.l.l_json"}]


def test_undo_gives_back_the_exact_record_bytes():
    # numbers keep their text, keys their order, non-ASCII stays as it was
    source = ('{"eventName":"CreateRole","n":1.10,"big":12345678901234567890,"e":1E+2,"s":"é\\"x",'
              '"responseElements":{"role":"arn:x","role_string":"taken","other":{"k":[1,2.50]}},'
              '"m":[1,"a"]}')
    resolver = tc.ConflictResolver()
    step1 = resolver(source.encode(), ES8["object_vs_value"])
    assert step1 is not None
    step2 = resolver(step1, ES8["mixed_array"])
    assert step2 is not None
    doc = json.loads(step2)
    assert doc["responseElements"]["role_string_2"] == "arn:x"  # role_string was the record's own
    assert b'"n":1.10' in step2 and b'"e":1E+2' in step2 and b'"big":12345678901234567890' in step2

    restored = tc.undo_renames(tc._loads(step2))

    assert tc._dumps(restored) == source


@pytest.mark.parametrize("error", [
    {"type": "version_conflict_engine_exception", "reason": "[x]: version conflict, document already exists"},
    {"type": "illegal_argument_exception", "reason": "Limit of total fields [1000] has been exceeded"},
    {"type": "illegal_argument_exception", "reason": "Action/metadata line [1] contains an unknown parameter [_type]"},
    "a plain string",
])
def test_errors_that_are_not_type_conflicts_are_left_to_the_dead_letter_file(error):
    assert resolve({"responseElements": {"role": "x"}}, error if isinstance(error, dict) else {"reason": error}) is None


def test_a_path_the_document_does_not_have_is_not_mended():
    assert resolve({"other": 1}, ES8["object_vs_value"]) is None


def test_a_document_is_mended_a_bounded_number_of_times():
    doc = {"responseElements": {"role": "x"},
           "_hindsight_renamed": [{"from": f"f{i}", "to": f"f{i}_string"} for i in range(tc.MAX_RENAMES_PER_DOCUMENT)]}
    assert resolve(doc, ES8["object_vs_value"]) is None


def test_template_config_forms_and_mistakes():
    short = tc.IndexTemplate.from_config("cloudtrail-*")
    assert (short.name, short.index_patterns) == ("hindsight-cloudtrail", ("cloudtrail-*",))
    full = tc.IndexTemplate.from_config({"name": "t", "index_patterns": ["a-*", "b"], "total_fields_limit": 5000,
                                         "aliases": "all"})
    assert (full.name, full.index_patterns, full.total_fields_limit) == ("t", ("a-*", "b"), 5000)
    body = full.composable_body()
    assert body["template"]["settings"] == {"index.mapping.total_fields.limit": 5000}
    assert body["template"]["aliases"] == {"all": {}}
    assert body["template"]["mappings"]["date_detection"] is False
    with pytest.raises(ValueError, match="unknown keys"):
        tc.IndexTemplate.from_config({"index_patterns": "a", "shards": 3})
    with pytest.raises(ValueError, match="index_patterns"):
        tc.IndexTemplate.from_config({"name": "t"})
    sender = BulkSender("http://127.0.0.1:1", dead_letter_path="/dev/null")
    with pytest.raises(ValueError, match="type_conflicts"):
        tc.configure(sender, {"type_conflicts": "drop"}, print)
    tc.configure(sender, {"type_conflicts": "dead_letter"}, print)
    assert sender.conflict_resolver is None and sender.prepare is None


# -- CloudTrail-shaped records of every conflicting type ------------------------------------------
def _record(n: int, **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": {"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/alice", "userName": "alice",
                         "accountId": "111122223333", "accessKeyId": "AKIAEXAMPLE"},
        "eventTime": f"2024-03-0{1 + n % 2}T10:{n % 60:02d}:00Z",
        "eventSource": "ec2.amazonaws.com",
        "eventName": "RunInstances",
        "awsRegion": "us-east-1",
        "requestParameters": {},
        "responseElements": None,
        "eventID": f"00000000-0000-4000-8000-{n:012d}",
        "recipientAccountId": "111122223333",
    }
    for path, value in changes.items():
        parent = record
        *heads, last = path.split("__")
        for head in heads:
            if parent.get(head) is None:
                parent[head] = {}
            parent = parent[head]
        parent[last] = value
    return record


def conflicting_records() -> list[dict[str, Any]]:
    """Each field in both orders (object first, value first), as public CloudTrail data has them."""
    variants: list[dict[str, Any]] = [
        {"responseElements__role": {"arn": "arn:aws:iam::1:role/r", "roleName": "r"}},
        {"responseElements__role": "arn:aws:iam::1:role/r"},
        {"requestParameters__disableApiTermination": {"value": True}},
        {"requestParameters__disableApiTermination": False},
        {"responseElements__endpoint": "db.example.com"},
        {"responseElements__endpoint": {"address": "db.example.com", "port": 5432}},
        {"responseElements__version": 3},
        {"responseElements__version": "3.1-beta"},
        {"responseElements__version": {"major": 3}},
        {"apiVersion": "2012-10-17"},
        {"apiVersion": "2016-11-15a"},
        {"requestParameters__items": [{"key": "k"}]},
        {"requestParameters__items": ["k1", "k2"]},
        {"requestParameters__mixed": [1, "two", {"three": 3}]},
        {"requestParameters__flag": True},
        {"requestParameters__flag": "sometimes"},
        {"requestParameters__a.b": 1},  # a dotted key ...
        {"requestParameters__a": "plain"},  # ... against a value
    ]
    deep: dict[str, Any] = {"x": 1}
    for _ in range(25):
        deep = {"l": deep}
    variants.append({"requestParameters__deep": deep})
    return [_record(n, **changes) for n, changes in enumerate(variants)]


def wide_record(n: int, width: int = 1200) -> dict[str, Any]:
    """More distinct field paths than an index takes by default (1,000)."""
    return _record(n, requestParameters__tags={f"tag{i:04d}": f"v{i}" for i in range(width)})


def _bulk_body(index: str, records: list[dict[str, Any]]) -> bytes:
    lines = []
    for r in records:
        lines.append(json.dumps({"index": {"_index": index, "_id": r["eventID"]}}))
        lines.append(json.dumps(r))
    return ("\n".join(lines) + "\n").encode()


def _stored(base_url: str, index: str) -> dict[str, dict[str, Any]]:
    return {doc["eventID"]: doc for doc in search_sources(base_url, index)}


@pytest.fixture(params=["es8_url", "os2_url"])
def server(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.mark.servers
def test_every_conflicting_type_loads_with_nothing_rejected(server, scratch_index, tmp_path):
    records = conflicting_records()
    plain, mended = scratch_index(server), scratch_index(server)

    with BulkSender(server, dead_letter_path=tmp_path / "plain.jsonl", max_retries=2) as sender:
        baseline = sender.send(_bulk_body(plain, records), len(records))
    with BulkSender(server, dead_letter_path=tmp_path / "dl.jsonl", max_retries=2,
                    conflict_resolver=tc.ConflictResolver()) as sender:
        result = sender.send(_bulk_body(mended, records), len(records))

    # the records do conflict: without the resolver the server rejects some of them
    assert baseline.dead_lettered >= 8
    assert (result.indexed, result.dead_lettered) == (len(records), 0)
    assert not (tmp_path / "dl.jsonl").exists()
    stored = _stored(server, mended)
    assert len(stored) == len(records)
    for record in records:
        doc = stored[record["eventID"]]
        assert tc.undo_renames(copy.deepcopy(doc)) == record
    renamed = {m["to"] for doc in stored.values() for m in doc.get("_hindsight_renamed", [])}
    assert {"responseElements.role_string", "requestParameters.disableApiTermination_boolean",
            "responseElements.endpoint_object", "requestParameters.items_string",
            "requestParameters.mixed_json", "requestParameters.a_string"} <= renamed


@pytest.mark.servers
def test_the_template_maps_cloudtrail_for_cloudtracker(server, scratch_index, tmp_path):
    index = scratch_index(server)
    template = tc.IndexTemplate(name=index, index_patterns=(f"{index}-*",))
    records = [wide_record(100), *conflicting_records()]
    logged: list[str] = []
    try:
        with BulkSender(server, dead_letter_path=tmp_path / "dl.jsonl", max_retries=2,
                        conflict_resolver=tc.ConflictResolver(),
                        prepare=tc.TemplateInstaller(template, lambda level, text: logged.append(text))) as sender:
            result = sender.send(_bulk_body(f"{index}-2024.03.01", records), len(records))
        assert any("installed" in line for line in logged)
        assert (result.indexed, result.dead_lettered) == (len(records), 0)
        stored = _stored(server, f"{index}-*")
        assert len(stored) == len(records)
        # no date detection: both apiVersion strings are kept as they are, no rename needed
        moved = {m["from"] for doc in stored.values() for m in doc.get("_hindsight_renamed", [])}
        assert "apiVersion" not in moved
        mapping = requests.get(f"{server}/{index}-2024.03.01/_mapping", timeout=30).json()
        properties = next(iter(mapping.values()))["mappings"]["properties"]
        assert properties["eventTime"]["type"] == "date"
        assert properties["userIdentity"]["properties"]["arn"]["fields"]["keyword"]["type"] == "keyword"
        assert properties["apiVersion"]["type"] == "text"
        assert len(properties["requestParameters"]["properties"]["tags"]["properties"]) == 1200
        # what CloudTracker asks: terms on .keyword
        answer = requests.post(f"{server}/{index}-*/_search", timeout=30, json={
            "size": 0, "aggs": {"users": {"terms": {"field": "userIdentity.userName.keyword"}}}}).json()
        assert [(b["key"], b["doc_count"]) for b in answer["aggregations"]["users"]["buckets"]] == [
            ("alice", len(records))]
    finally:
        delete_template(server, index)


# -- through hindsight_cli ---------------------------------------------------------------------------
def _project_run_config(tmp_path: Path, server: str, index: str, input_file: Path) -> Path:
    """The project's own run/ (file.lua -> elasticsearch_bulk_api.lua), pointed at the test server."""
    work = tmp_path / "flat"
    shutil.copytree(REPO_ROOT / "run", work / "run", ignore=shutil.ignore_patterns("*.err", "*.rtc"))
    shutil.copy(REPO_ROOT / "run" / "hindsight.cfg", work / "hindsight.cfg")
    cfg_in = work / "run" / "input" / "file.cfg"
    text = cfg_in.read_text()
    text, n = re.subn(r'(?m)^input_filename\s*=.*$', f'input_filename = "{input_file}"', text)
    assert n == 1
    cfg_in.write_text(text)
    port = int(server.rsplit(":", 1)[1])
    cfg_out = work / "run" / "output" / "elasticsearch_bulk_api.cfg"
    text = cfg_out.read_text()
    for key, value in (("port", str(port)), ("address", '"127.0.0.1"')):
        text, n = re.subn(rf'(?m)^{key}\s*=[^-\n]*', f"{key} = {value} ", text)
        assert n == 1, key
    text, n = re.subn(r'index\s*=\s*"cloudtrail"', f'index = "{index}"', text)
    assert n == 1
    # the template from the plugin's cfg: the Lua output does not forward this key itself
    text += f'\nindex_template = {{ name = "{index}", index_patterns = {{ "{index}" }} }}\n'
    cfg_out.write_text(text)
    return work


@pytest.mark.servers
def test_a_flat_file_of_conflicting_records_loads_through_the_lua_output(server, scratch_index, tmp_path):
    records = [*conflicting_records(), wide_record(200)]
    flat = tmp_path / "cloudtrail.json"
    flat.write_text("".join(json.dumps(r) + "\n" for r in records))
    index = scratch_index(server)
    work = _project_run_config(tmp_path, server, index, flat)
    try:
        result = run_hindsight(work)
        assert result.returncode == 0, result.stderr
        assert "index template" in result.stderr and "installed" in result.stderr
        assert dead_letter_records(work / "output") == []
        stored = search_sources(server, index)
        assert len(stored) == len(records)
        # the summary counts the documents that arrived changed
        moved = sum(1 for doc in stored if tc.RENAMED_KEY in doc)
        assert moved > 0
        assert f"moved mistyped fields aside in {moved} documents, " in result.stderr
        by_id = {doc["eventID"]: tc.undo_renames(doc) for doc in stored}
        assert by_id == {r["eventID"]: r for r in records}
    finally:
        delete_template(server, index)


@pytest.mark.servers
def test_a_tree_of_conflicting_records_loads_through_the_example_config(server, scratch_index, tmp_path):
    records = conflicting_records()
    tree = tmp_path / "tree"
    # one file per pair, so each conflict meets its other half in the same index and across files
    pack_tree(tree, [records[i:i + 2] for i in range(0, len(records), 2)] + [[wide_record(300)]])
    index = scratch_index(server)
    work = example_config(tmp_path, root=tree, url=server, index=index)
    try:
        result = run_hindsight(work)
        assert result.returncode == 0, result.stderr
        assert dead_letter_records(work / "output") == []
        stored = search_sources(server, f"{index}-*")
        assert len(stored) == len(records) + 1
        for doc in stored:
            assert doc.pop("@timestamp") == doc["eventTime"]
        by_id = {doc["eventID"]: tc.undo_renames(doc) for doc in stored}
        assert by_id == {r["eventID"]: r for r in [*records, wide_record(300)]}
    finally:
        delete_template(server, index)


def test_the_sender_recognises_a_mended_source_by_the_renamed_key():
    from hindsight_py.outputs.elasticsearch import MENDED_MARK

    assert MENDED_MARK == json.dumps(tc.RENAMED_KEY).encode()
