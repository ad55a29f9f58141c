"""The Elasticsearch output's Lua side behind the output extension point (outputs/elasticsearch_lua.py):
the `_type` probe asks until the server answers, then keeps the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sandbox_fakes import FakeHost, lua_sandbox

from hindsight_py import message as hmsg
from hindsight_py.outputs import elasticsearch_lua
from hindsight_py.outputs.elasticsearch_lua import ElasticsearchLua

ACTION_LINES = """
local common = require "encoders.elasticsearch.common"
function process_message()
    dead_letter("line", common.bulkapi_index_json("idx", "doc", nil, nil))
    return 0
end
function timer_event() end
"""


class ProbedHost(FakeHost):
    """A host whose Elasticsearch extension asks `answers` in turn (None: no answer from the server)."""

    def __init__(self, answers: list[bool | None]) -> None:
        super().__init__()
        self.answers = answers
        self.probes = 0
        self.log_fn = self.log

    def probe(self, cfg: dict[str, Any], log: Any) -> bool | None:
        self.probes += 1
        return self.answers.pop(0)

    def lua_extensions(self) -> list[Any]:
        return [ElasticsearchLua(self, probe=self.probe).lua_extension()]  # type: ignore[arg-type]


def action_lines(tmp_path: Path, host: ProbedHost, n: int) -> list[bytes]:
    plugin = tmp_path / "out.lua"
    plugin.write_text(ACTION_LINES)
    sandbox, _ = lua_sandbox(plugin, "output", host, path=str(tmp_path / "?.lua"))  # the bundled modules after it
    result = sandbox.run_batch([hmsg.encode(hmsg.Message(payload="{}"))] * n)
    assert result.status == "ok", result.error
    return [data for _, data in host.dead_letters]


def test_a_server_unreachable_at_the_first_message_is_asked_again(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elasticsearch_lua, "PROBE_INTERVAL", 0.0)
    host = ProbedHost([None, True])  # down at first, then an Elasticsearch 6 (mapping types)
    lines = action_lines(tmp_path, host, 3)
    assert lines[0] == b'{"index":{"_index":"idx"}}', "no answer yet: `_type` left out, as modern servers want"
    assert lines[1:] == [b'{"index":{"_index":"idx","_type":"doc"}}'] * 2, "asked again: `_type` is back"
    assert host.probes == 2, "once the server answered, the answer is kept"


def test_a_server_without_mapping_types_is_asked_once(tmp_path: Path) -> None:
    host = ProbedHost([False])
    assert action_lines(tmp_path, host, 3) == [b'{"index":{"_index":"idx"}}'] * 3
    assert host.probes == 1
    assert (6, "the server does not accept mapping types: `_type` is left out of action lines") in host.logs


def test_an_unanswered_probe_is_not_repeated_within_the_probe_interval(tmp_path: Path) -> None:
    host = ProbedHost([None])  # a server that does not answer is not asked for every message
    assert action_lines(tmp_path, host, 3) == [b'{"index":{"_index":"idx"}}'] * 3
    assert host.probes == 1
