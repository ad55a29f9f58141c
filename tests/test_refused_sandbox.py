"""Refused messages at the sandbox level, with the fake host (tests/sandbox_fakes.py): what the
plugin sees (upstream's error texts) and what the host is handed (the message, the reason, the
offsets), for Lua plugins (also run under HINDSIGHT_PY_LUA=lua51 by scripts/test.sh) and Python
plugins. End to end: tests/test_refused_messages.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import record_line
from sandbox_fakes import FakeHost, lua_sandbox
from test_sandbox_python import py_sandbox

from hindsight_py import message as hmsg
from hindsight_py.sandbox.base import PluginError

INPUT_REFUSALS = """
require "string"
errs = {}
local function try(...)
    local ok, e = pcall(inject_message, ...)
    errs[#errs + 1] = e
end
function process_message(cp)
    try({Payload = string.rep("x", 70000)})
    inject_message(nil, 10)
    try({Payload = "p", Fields = {bad = {value = {}}}})
    inject_message(nil, 20)
    try("not protobuf")
    try({Payload = "q"}, {})
    inject_message({Payload = "fine"}, 30)
    return 0
end
"""


def test_lua_input_refusals_reach_the_host_with_offsets_and_upstream_errors(tmp_path: Path) -> None:
    plugin = tmp_path / "in.lua"
    plugin.write_text(INPUT_REFUSALS)
    sandbox, host = lua_sandbox(plugin, "input", output_limit=1 << 20)
    assert sandbox.run_input(5) == (0, None)
    # the plugin sees upstream's texts, and goes on
    assert list(sandbox.globals_table()[b"errs"].values()) == [
        b"inject_message() failed: exceeded max_message_size",
        b"inject_message() failed: unsupported type: nil",
        b"inject_message() attempted to inject a invalid protobuf string",
        b"inject_message() unsupported checkpoint type: table",
    ]
    assert [m.payload for m in host.messages()] == ["fine"] and host.checkpoints == [30]
    reasons = [r[0] for r in host.refusals]
    assert reasons == [
        "inject_message() failed: exceeded max_message_size (the message is 70058 bytes, max_message_size = 65536)",
        "inject_message() failed: unsupported type: nil",
        "inject_message() attempted to inject a invalid protobuf string",
        "inject_message() unsupported checkpoint type: table",
    ]
    messages = [r[1] for r in host.refusals]
    assert messages[0]["Payload"] == "x" * 70000 and messages[1]["Fields"] == {"bad": {"value": {}}}
    assert messages[2] == b"not protobuf" and messages[3] == {"Payload": "q"}
    # (offset, next_offset): the checkpoint at the refusal, and the one the plugin passed next
    # (a refusal followed by another one, or by an inject without a checkpoint, gets none)
    assert [r[2:] for r in host.refusals] == [(5, 10), (10, 20), (20, None), (20, 30)]


ANALYSIS_REFUSALS = """
require "string"
function process_message()
    pcall(inject_message, {Payload = "over the process_message_inject_limit"})
    return 0
end
function timer_event(ns)
    pcall(inject_payload, "txt", "big", string.rep("a", 100), string.rep("b", 100), 7)
    inject_payload("txt", "small", "fits")
end
"""


def test_lua_analysis_inject_limit_and_output_limit_refusals(tmp_path: Path) -> None:
    plugin = tmp_path / "a.lua"
    plugin.write_text(ANALYSIS_REFUSALS)
    sandbox, host = lua_sandbox(plugin, "analysis", output_limit=200)
    raw = record_line(0)
    result = sandbox.run_batch([hmsg.encode(hmsg.Message(payload=raw))], 0)
    assert result.status == "ok"
    sandbox.run_timer(0, False, 10)
    assert [m.payload for m in host.messages()] == ["fits"]  # the buffer did not keep the refused parts
    (r1, m1, *_), (r2, m2, *_) = host.refusals
    assert r1 == "inject_message() failed: injection limit exceeded (process_message_inject_limit = 0)"
    assert m1["Payload"] == "over the process_message_inject_limit"
    assert r2 == "inject_payload() output_limit exceeded (output_limit = 200)"
    assert m2["Payload"] == "a" * 100 + "b" * 100 + "7"  # whole: every part, the one past the limit too
    assert m2["Type"] == "inject_payload" and m2["Fields"] == {"payload_type": "txt", "payload_name": "big"}


OUTPUT_FAILS = """
function process_message()
    local p = read_message("Payload")
    if p == "own" then dead_letter("the plugin's own", p) end
    if p ~= "ok" then return -1, "cannot encode " .. p end
    return 0
end
"""


def test_lua_output_minus_one_keeps_the_message_unless_the_plugin_dead_lettered_it(tmp_path: Path) -> None:
    plugin = tmp_path / "o.lua"
    plugin.write_text(OUTPUT_FAILS)
    sandbox, host = lua_sandbox(plugin, "output")
    raws = [hmsg.encode(hmsg.Message(payload=p, logger="input.file")) for p in ("ok", "bad", "own")]
    result = sandbox.run_batch(raws)
    assert (result.status, result.processed, result.failures) == ("ok", 3, 2)
    [(reason, message, offset, _)] = host.refusals
    assert reason == "process_message() returned -1: cannot encode bad" and message == raws[1] and offset is None
    assert host.dead_letters == [("the plugin's own", b"own")]  # once: not again for its -1


def test_python_plugin_refusals(tmp_path: Path) -> None:
    sb, host = py_sandbox(tmp_path, """
        def process_message():
            try:
                inject_message({"Payload": "over the limit"})
            except RuntimeError:
                pass
            return 0

        def timer_event(ns, shutdown):
            try:
                inject_payload("txt", "big", "a" * 100, "b" * 100, 7)
            except ValueError:
                pass
            inject_payload("txt", "small", "fits")
    """, "analysis", output_limit=200)
    assert sb.run_batch([hmsg.encode(hmsg.Message(payload="x"))], 0).status == "ok"
    sb.run_timer(0, False, 10)
    assert [m.payload for m in host.messages()] == ["fits"]
    (r1, m1, *_), (r2, m2, *_) = host.refusals
    assert r1 == "inject_message() failed: injection limit exceeded (process_message_inject_limit = 0)"
    assert m1 == {"Payload": "over the limit"}
    assert r2 == "inject_payload() output_limit exceeded (output_limit = 200)"
    assert m2["Payload"] == "a" * 100 + "b" * 100 + "7" and m2["Fields"]["payload_name"] == "big"

    out, host = py_sandbox(tmp_path, """
        def process_message(seq):
            p = read_message("Payload")
            if p == "own":
                dead_letter("the plugin's own", p)
            return 0 if p == "ok" else (-1, "cannot encode " + p)
    """, "output")
    raws = [hmsg.encode(hmsg.Message(payload=p)) for p in ("ok", "bad", "own")]
    assert out.run_batch(raws).failures == 2
    out._flush()
    [(reason, message, *_)] = host.refusals
    assert reason == "process_message() returned -1: cannot encode bad" and message == raws[1]
    assert host.dead_letters == [("the plugin's own", b"own")]


def test_a_refused_message_the_host_cannot_keep_fails_the_call_even_if_caught(tmp_path: Path) -> None:
    """A dead-letter file that cannot be written (a full disk) is no reason to lose the message."""
    class FullDisk(FakeHost):
        def refused(self, reason: str, message: Any, offset: Any) -> bool:
            raise OSError(28, "No space left on device")

    plugin = tmp_path / "in.lua"
    plugin.write_text(INPUT_REFUSALS)
    sandbox, _ = lua_sandbox(plugin, "input", FullDisk())
    with pytest.raises(PluginError, match="failed to write a refused message to the dead-letter file: .*No space"):
        sandbox.run_input(None)
    sb, _ = py_sandbox(tmp_path, """
        def process_message(cp):
            try:
                inject_message({"Payload": "x" * 70000})
            except BaseException:
                pass
            return 0
    """, "input", FullDisk())
    with pytest.raises(PluginError, match="failed to write a refused message to the dead-letter file"):
        sb.run_input(None)
