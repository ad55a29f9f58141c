"""`hindsight-py create-index`: the index set-up step of CloudTracker's recipe, on every server.

The body conversions are checked as functions; the command is checked as a user runs it (exit
status, messages) against the real servers, from a typed mapping body of the recipe's shape, and,
when the upstream sources are fetched, from the recipe's own text.

Cost: about half a second per server (plus its start-up the first time).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import requests
from upstream_files import CLOUDTRACKER, read_text

from hindsight_py.outputs.index_setup import (
    DEFAULT_TOTAL_FIELDS_LIMIT,
    EXIT_EXISTS,
    IndexSetupError,
    create_index_body,
    normalized_settings,
    typeless_mappings,
)

# The recipe's shape: a create-index body whose mapping sits under the type "doc".
PROPERTIES = {
    "@timestamp": {"type": "date"},
    "eventName": {"type": "keyword"},
    "userIdentity": {"properties": {"arn": {"type": "text", "fields": {"keyword": {"type": "keyword",
                                                                                   "ignore_above": 256}}}}},
}
TYPED_BODY = {"mappings": {"doc": {"properties": PROPERTIES}}}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`hindsight-py create-index ARGS` (through the entry point's function, with this interpreter)."""
    command = "import sys; from hindsight_py.cli import main_py; sys.exit(main_py(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", command, "create-index", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


# -- bodies -----------------------------------------------------------------------------------


def test_a_typed_mapping_loses_its_type_for_servers_without_types():
    assert typeless_mappings({"doc": {"properties": PROPERTIES}}) == {"properties": PROPERTIES}
    assert typeless_mappings({"properties": PROPERTIES}) == {"properties": PROPERTIES}
    assert typeless_mappings({"dynamic": "strict", "properties": {}}) == {"dynamic": "strict", "properties": {}}
    assert typeless_mappings({"_default_": {"dynamic": True}, "doc": {"properties": {}}}) == {"properties": {}}
    with pytest.raises(IndexSetupError, match="mapping types a, b"):
        typeless_mappings({"a": {"properties": {}}, "b": {"properties": {}}})


def test_settings_are_taken_in_any_of_their_forms():
    flat = {"index.mapping.total_fields.limit": 5000}
    assert normalized_settings(flat) == flat
    assert normalized_settings({"index": {"mapping": {"total_fields": {"limit": 5000}}}}) == flat
    assert normalized_settings({"settings": {"mapping.total_fields.limit": 5000}}) == flat
    assert normalized_settings({"number_of_replicas": 0}) == {"index.number_of_replicas": 0}


def test_the_field_limit_is_the_option_else_the_files_else_the_default():
    key = "index.mapping.total_fields.limit"
    body = create_index_body(TYPED_BODY, None, None, keep_types=False)
    assert body == {"settings": {key: DEFAULT_TOTAL_FIELDS_LIMIT}, "mappings": {"properties": PROPERTIES}}
    with_settings = {**TYPED_BODY, "settings": {"number_of_shards": 2, key: 3000}}
    assert create_index_body(with_settings, None, None, keep_types=False)["settings"] == {
        "index.number_of_shards": 2, key: 3000}
    assert create_index_body(with_settings, {key: 4000}, None, keep_types=False)["settings"][key] == 4000
    assert create_index_body(with_settings, {key: 4000}, 6000, keep_types=False)["settings"][key] == 6000
    # servers that take types get a typed mapping as written, an untyped one under the outputs' type
    assert create_index_body(TYPED_BODY, None, None, keep_types=True)["mappings"] == TYPED_BODY["mappings"]
    assert create_index_body({"properties": {}}, None, None, keep_types=True, type_name="message")["mappings"] == {
        "message": {"properties": {}}}
    # a bare mapping (no "mappings" wrapper) is a mapping
    assert create_index_body({"doc": {"properties": {}}}, None, None, keep_types=False)["mappings"] == {
        "properties": {}}


# -- the command's errors ---------------------------------------------------------------------


def test_a_bad_file_is_named_in_the_error(tmp_path):
    broken = tmp_path / "mapping.json"
    broken.write_text('{"mappings": {"doc": ')
    result = run_cli("--url", "http://127.0.0.1:9", "--index", "cloudtrail", "--mapping", str(broken))
    assert result.returncode == 1
    assert f"mapping file {broken}: not valid JSON" in result.stderr and "line 1" in result.stderr

    listed = tmp_path / "settings.json"
    listed.write_text("[1, 2]")
    result = run_cli("--url", "http://127.0.0.1:9", "--index", "cloudtrail", "--settings", str(listed))
    assert result.returncode == 1 and f"settings file {listed}: expected a JSON object" in result.stderr

    result = run_cli("--url", "http://127.0.0.1:9", "--index", "cloudtrail", "--mapping", str(tmp_path / "none"))
    assert result.returncode == 1 and "No such file" in result.stderr and str(tmp_path / "none") in result.stderr


def test_an_unreachable_server_is_a_clear_error(unused_port):
    result = run_cli("--url", f"http://127.0.0.1:{unused_port}", "--index", "cloudtrail")
    assert result.returncode == 1
    assert re.search(rf"cannot reach http://127\.0\.0\.1:{unused_port}: .*refused", result.stderr)


def test_usage_errors_exit_2():
    result = run_cli("--index", "cloudtrail")
    assert result.returncode == 2 and "--url" in result.stderr



# -- real servers -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["es8", "es9", "os2", "es7", "os3"])
def test_create_index_from_the_typed_recipe_body(tmp_path, search_server, scratch_index, server):
    base_url = search_server(server)
    index = scratch_index(base_url)
    mapping = tmp_path / "cloudtrail_mapping.json"
    mapping.write_text(json.dumps(TYPED_BODY))

    created = run_cli("--url", base_url, "--index", index, "--mapping", str(mapping))
    assert created.returncode == 0, created.stderr
    assert f"created index {index}" in created.stdout and "mapping type doc dropped" in created.stdout

    held = requests.get(f"{base_url}/{index}/_mapping", timeout=30).json()[index]["mappings"]
    assert held["properties"]["eventName"] == {"type": "keyword"}
    assert held["properties"]["userIdentity"] == PROPERTIES["userIdentity"]
    settings = requests.get(f"{base_url}/{index}/_settings", timeout=30).json()[index]["settings"]["index"]
    assert settings["mapping"]["total_fields"]["limit"] == str(DEFAULT_TOTAL_FIELDS_LIMIT)

    again = run_cli("--url", base_url, "--index", index, "--mapping", str(mapping))
    assert again.returncode == EXIT_EXISTS
    assert f"index {index} already exists" in again.stderr
    assert run_cli("--url", base_url, "--index", index, "--exists-ok").returncode == 0


def test_a_mapping_the_server_refuses_is_reported(tmp_path, es8_url, scratch_index):
    index = scratch_index(es8_url)
    mapping = tmp_path / "mapping.json"
    mapping.write_text('{"mappings": {"properties": {"a": {"type": "no-such-type"}}}}')
    result = run_cli("--url", es8_url, "--index", index, "--mapping", str(mapping))
    assert result.returncode == 1
    assert "mapper_parsing_exception" in result.stderr and "no-such-type" in result.stderr


def _recipe_blocks(markdown: str) -> tuple[str, str]:
    """The JSON bodies of the recipe's `PUT /cloudtrail` and `PUT /cloudtrail/_settings` blocks."""
    mapping = re.search(r"```\s*\nPUT /cloudtrail\s*\n(.*?)```", markdown, re.S)
    settings = re.search(r"```\s*\nPUT /cloudtrail/_settings\s*\n(.*?)```", markdown, re.S)
    assert mapping and settings, "the recipe's PUT blocks were not found"
    return mapping.group(1), settings.group(1)


@pytest.mark.upstream
@pytest.mark.parametrize("server", ["es8", "es9", "os2"])
def test_create_index_from_cloudtrackers_own_recipe(tmp_path, search_server, scratch_index, server):
    markdown = read_text(CLOUDTRACKER, "docs/elasticsearch.md")
    mapping_text, settings_text = _recipe_blocks(markdown)
    mapping, settings = tmp_path / "cloudtrail_mapping.json", tmp_path / "cloudtrail_settings.json"
    mapping.write_text(mapping_text)
    settings.write_text(settings_text)
    base_url = search_server(server)
    index = scratch_index(base_url)

    result = run_cli("--url", base_url, "--index", index, "--mapping", str(mapping), "--settings", str(settings))
    assert result.returncode == 0, result.stderr

    [typed] = json.loads(mapping_text)["mappings"].values()  # the recipe's one type, "doc"
    held = requests.get(f"{base_url}/{index}/_mapping", timeout=30).json()[index]["mappings"]
    assert set(held["properties"]) == set(typed["properties"])
    limit = json.loads(settings_text)["index.mapping.total_fields.limit"]
    got = requests.get(f"{base_url}/{index}/_settings", timeout=30).json()[index]["settings"]["index"]
    assert got["mapping"]["total_fields"]["limit"] == str(limit)  # the recipe's own value is kept
