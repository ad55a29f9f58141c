"""The lua_sandbox API as Lua plugins see it (docs/upstream-formats.md §3-§5), driven through LuaSandbox
with a fake host (tests/sandbox_fakes.py), plus a few end-to-end runs of hindsight_cli.

Error texts are upstream's (lua_sandbox src/heka/sandbox.c, message.c, luasandbox*.c).
Cost: about 3 s in all (the hindsight_cli runs are about 0.5 s each).
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sandbox_fakes import OUTPUT_RETURN_CODE_CASES, FakeHost, lua_sandbox

from hindsight_py import message as hmsg
from hindsight_py import message_dict
from hindsight_py.sandbox.base import PluginError


def plugin(tmp_path: Path, source: str, kind: str = "analysis", host: FakeHost | None = None, **kw: Any) -> Any:
    f = tmp_path / f"p{len(list(tmp_path.glob('p*.lua')))}.lua"
    f.write_text(textwrap.dedent(source))
    sb, h = lua_sandbox(f, kind, host, **kw)
    return sb, h


def raw_message(**kw: Any) -> bytes:
    d = {"Uuid": bytes(range(16)), "Timestamp": 1_000_000_000, **kw}
    return hmsg.encode(message_dict.from_dict(d, restricted=False, logger="l", hostname="h", pid=1, now_ns=0))


PM0 = "function process_message() return 0 end\n"


# ------------------------------------------------------------------------------------------------
# the environment
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [
        ("input", "read_config print decode_message inject_message create_stream_reader is_running",
         "read_message encode_message add_to_payload inject_payload update_checkpoint output"),
        ("analysis", "read_config print decode_message inject_message read_message add_to_payload inject_payload",
         "encode_message update_checkpoint create_stream_reader is_running output collectgarbage"),
        ("output", "read_config print decode_message inject_message read_message encode_message update_checkpoint "
         "create_message_matcher", "add_to_payload inject_payload create_stream_reader is_running output"),
    ],
)
def test_globals_per_plugin_type(tmp_path: Path, kind: str, present: str, absent: str) -> None:
    checks = [f"assert(type({n}) == 'function', '{n}')" for n in present.split()]
    checks += [f"assert({n} == nil, '{n}')" for n in absent.split()]
    checks += [f"assert({n} == nil, '{n}')" for n in "dofile load loadfile loadstring newproxy string table os io".split()]
    plugin(tmp_path, "\n".join(checks) + "\n" + PM0, kind)


def test_libraries_are_required_not_global(tmp_path: Path) -> None:
    sb, _ = plugin(tmp_path, """
        local s = require "string"
        assert(string == s and s.dump == nil)
        assert(not pcall(string.gfind, "a", "a"))
        local m = require "math"
        assert(math.abs(m.erf(0.5) - 0.5204998778) < 1e-9 and math.abs(m.erfc(0.5) - 0.4795001222) < 1e-9)
        local ok, err = pcall(require, "io")
        assert(not ok and err:find("module 'io' disabled", 1, true), err)
        ok, err = pcall(require, "coroutine")
        assert(not ok and err:find("module 'coroutine' disabled", 1, true), err)
        local os = require "os"
        assert(os.exit == nil and os.getenv == nil and os.remove == nil and os.time ~= nil)
        ok, err = pcall(require, "no-such")
        assert(not ok and err:find("invalid module name", 1, true), err)
        assert(package.seeall and package.path == nil and package.loaded == nil)
        assert(os.date("%H", 0) == "00") -- UTC
    """ + PM0)


def test_input_and_output_keep_io_but_lose_os_exit(tmp_path: Path) -> None:
    for kind in ("input", "output"):
        plugin(tmp_path, """
            local io = require "io"; local os = require "os"
            assert(io.open and os.exit == nil and os.setlocale == nil and os.getenv ~= nil)
            assert(type(collectgarbage) == "function")
        """ + PM0, kind)


def test_read_config_values_reference_and_errors(tmp_path: Path) -> None:
    plugin(tmp_path, """
        local t = read_config("nested")
        t.added = 1
        assert(read_config("nested").added == 1, "a table comes back by reference")
        assert(read_config("user_key") == "v" and read_config("missing") == nil)
        assert(read_config("input_limit") == 65536 and read_config("max_message_size") == 65536)
        assert(read_config("remove_entries")[""][1] == "collectgarbage")
        assert(read_config("disable_modules").io == true)
        local ok, err = pcall(read_config, "a", "b")
        assert(err == "bad argument #0 to '?' (too many arguments)", err)
        ok, err = pcall(read_config)
        assert(err == "bad argument #1 to '?' (string expected, got no value)", err)
    """ + PM0, cfg="user_key = 'v'\nnested = {a = 1}\n")


def test_cjson_sandbox_behaviour(tmp_path: Path) -> None:
    plugin(tmp_path, """
        require "cjson"
        local t = cjson.decode('{"a":null,"b":[1,null,3],"c":1}')
        assert(t.a == nil and t.b[2] == nil and t.b[3] == 3 and t.c == 1)
        assert(cjson.decode("null") == nil)
        cjson.decode_null(true)
        assert(cjson.decode('{"a":null}').a == cjson.null)
        assert(cjson.encode({}) == "{}")
        assert(cjson.encode({a = "x/y"}) == '{"a":"x\\\\/y"}')
        assert(cjson.new == nil and cjson.encode_keep_buffer == nil)
        local ok, err = pcall(cjson.encode, {string.rep("x", 100)})
        assert(not ok and err:find("output_limit exceeded", 1, true), err)
    """.replace("string.rep", "(require 'string').rep") + PM0, "input", output_limit=64, path="/nonexistent/?.lua")


# ------------------------------------------------------------------------------------------------
# read_message, decode_message, encode_message
# ------------------------------------------------------------------------------------------------
def test_read_message_forms(tmp_path: Path) -> None:
    raw = raw_message(Type="t", Payload="p", Fields={"s": ["a", "b"], "n": 2.5, "b": True})
    sb, _ = plugin(tmp_path, """
        assert(read_message("Type") == nil) -- no active message
        function process_message()
            assert(read_message("Type") == "t" and read_message("Payload") == "p" and read_message("Logger") == "l")
            assert(read_message("Timestamp") == 1e9 and read_message("Severity") == 7 and read_message("Pid") == 1)
            assert(read_message("EnvVersion") == nil and #read_message("Uuid") == 16)
            assert(read_message("Fields[s]", 0, 1) == "b" and read_message("Fields[s]", 0, 2) == nil)
            assert(read_message("Fields[s]", 1) == nil and read_message("Fields[n]") == 2.5)
            assert(read_message("Fields[b]") == true and read_message("Fields[none]") == nil)
            assert(read_message("size") == #read_message("raw") and #read_message("framed") > read_message("size"))
            local zc = read_message("Payload", nil, nil, true)
            assert(type(zc) == "userdata" and tostring(zc) == "p")
            assert(decode_message(read_message("raw", 0, 0, true)).Type == "t")
            local ok, err = pcall(read_message, "Bogus")
            assert(err == "heka_read_message() field: 'Bogus' not supported/recognized", err)
            ok, err = pcall(read_message, "Fields[s]", -1)
            assert(not ok)
            ok, err = pcall(read_message, "Timestamp", 0, 0, true)
            assert(not ok and err:find("not supported/recognized", 1, true), err)
            ok, err = pcall(read_message, "Type", 0, 0, "x")
            assert(err == "bad argument #4 to '?' (boolean expected, got string)", err)
            return 0
        end
    """)
    assert sb.process_message_direct(raw) == (True, 0, None)


def test_decode_and_encode_message(tmp_path: Path) -> None:
    sb, _ = plugin(tmp_path, """
        require "string"
        local ok, err = pcall(decode_message, "short")
        assert(err == "invalid message, too short", err)
        ok, err = pcall(decode_message, string.rep("x", 30))
        assert(err and err:find("error in tag:", 1, true), err)
        local pb = encode_message({Uuid = string.rep("\\0", 16), Timestamp = 5, Type = "x",
            Fields = {n = {value = 3, value_type = 2}}})
        local m = decode_message(pb)
        assert(m.Type == "x" and m.Timestamp == 5 and m.Logger == "test.plugin" and m.Hostname == "test.host")
        assert(m.Fields[1].name == "n" and m.Fields[1].value_type == 2 and m.Fields[1].value[1] == 3)
        local framed = encode_message({Timestamp = 5}, true)
        assert(framed:byte(1) == 30)
        ok, err = pcall(encode_message, {Fields = {x = {value = {1, "a"}}}})
        assert(err == "encode_message() failed: array has mixed types", err)
        ok, err = pcall(encode_message, {Payload = string.rep("x", 200)})
        assert(err and err:find("encode_message() failed: ", 1, true), err)
    """ + PM0, "output", output_limit=100)


# ------------------------------------------------------------------------------------------------
# inputs: inject_message forms, checkpoints, stream readers, is_running
# ------------------------------------------------------------------------------------------------
def test_input_inject_forms_and_checkpoints(tmp_path: Path) -> None:
    sb, host = plugin(tmp_path, """
        require "string"
        local pbstr = encode_ok
        function process_message(cp)
            assert(cp == nil)
            local msg = {Type = "table", Payload = "p"}
            inject_message(msg, 1)
            assert(msg.Logger == "test.plugin" and msg.Hostname == "test.host", "headers are filled in")
            local hsr = create_stream_reader("r")
            local framed = "\\30\\2\\8\\20\\31\\10\\16" .. string.rep("\\0", 16) .. "\\16\\6"
            local found, consumed = hsr:find_message(framed)
            assert(found and consumed == 25)
            inject_message(hsr, "cp-two")
            inject_message("\\10\\16" .. string.rep("\\0", 16) .. "\\16\\7")
            inject_message(nil, 3)
            local ok, err = pcall(inject_message, "\\0")
            assert(err == "inject_message() attempted to inject a invalid protobuf string", err)
            ok, err = pcall(inject_message, nil)
            assert(err == "inject_message() message cannot be nil without a checkpoint update", err)
            ok, err = pcall(inject_message, {}, {})
            assert(err == "inject_message() unsupported checkpoint type: table", err)
            ok, err = pcall(inject_message, true)
            assert(err == "inject_message() unsupported message type: boolean", err)
            ok, err = pcall(inject_message, nil, string.rep("x", 8192))
            assert(err == "inject_message() failed: checkpoint update", err)
            assert(is_running())
            return 0, "done"
        end
    """, "input")
    assert sb.run_input(None) == (0, "done")
    msgs = host.messages()
    assert [m.type for m in msgs] == ["table", None, None]
    assert [m.timestamp for m in msgs[1:]] == [6, 7]
    assert host.checkpoints[-1] == 3
    assert msgs[0].payload == "p"


def test_checkpoint_is_recorded_only_with_its_message_on_disk(tmp_path: Path) -> None:
    written_at_cp: list[int] = []

    class Host(FakeHost):
        def checkpoint(self, value: Any) -> None:
            written_at_cp.append(len(self.written))
            super().checkpoint(value)

    sb, host = plugin(tmp_path, """
        function process_message()
            for i = 1, 2500 do inject_message({Payload = "x"}, i) end
            return 0
        end
    """, "input", Host())
    sb.run_input(None)
    assert len(host.written) == 2500
    # every flush writes the messages first, then the checkpoint of the last one written
    assert all(n >= host.checkpoints[i] for i, n in enumerate(written_at_cp))
    assert host.checkpoints[-1] == 2500


def test_is_running_and_shutdown_sync_point(tmp_path: Path) -> None:
    host = FakeHost(running=False)
    sb, _ = plugin(tmp_path, """
        n = 0
        function process_message()
            assert(not is_running())
            while true do n = n + 1; inject_message(nil, n) end
        end
    """, "input", host)
    assert sb.run_input(None) == (0, None)  # the "shutting down" error is a clean stop
    assert host.checkpoints == [1]


def test_a_string_checkpoint_is_text_for_hindsight_cp_and_a_string_again_in_lua(tmp_path: Path) -> None:
    # tail.lua's "inode:offset": hindsight.cp holds text; the plugin gets a Lua string back
    host = FakeHost()
    sb, _ = plugin(tmp_path, """
        require "string"
        function process_message(cp)
            assert(cp == nil or type(cp) == "string", type(cp))
            local inode, offset = string.match(cp or "7:0", "^(%d+):(%d+)$")
            inject_message(nil, string.format("%s:%d", inode, offset + 10))
            return 0
        end
    """, "input", host)
    assert sb.run_input(None) == (0, None)
    assert sb.run_input(host.checkpoints[-1]) == (0, None)
    assert host.checkpoints == ["7:10", "7:20"]


# ------------------------------------------------------------------------------------------------
# analysis: payloads, print, injection limits
# ------------------------------------------------------------------------------------------------
def test_payload_functions_and_number_format(tmp_path: Path) -> None:
    sb, host = plugin(tmp_path, """
        function timer_event(ns)
            add_to_payload(1, " ", 1.5, " ", 0.1 + 0.2, " ", 3e10, " ", true, " ", nil, " ", 0/0, " ", -1/0)
            inject_payload("txt", "name", "!")
            inject_payload() -- empty: nothing injected
            local ok, err = pcall(add_to_payload, {})
            assert(err == "bad argument #1 to '?' (unsupported type)", err)
            ok, err = pcall(add_to_payload)
            assert(err == "bad argument #0 to '?' (must have at least one argument)", err)
            ok, err = pcall(inject_payload, "txt", "n", print)
            assert(err == "bad argument #3 to '?' (unsupported type)", err)
            ok, err = pcall(inject_payload, 1)
            assert(err == "inject_payload() payload_type argument must be a string", err)
            ok, err = pcall(add_to_payload, (require "string").rep("x", 300))
            assert(err == "output_limit exceeded", err)
        end
    """ + PM0, output_limit=250)
    sb.run_timer(0, False, 10)
    (m,) = host.messages()
    assert m.type == "inject_payload" and m.logger == "test.plugin"
    assert m.payload == "1 1.5 0.3 30000000000 true nil nan -inf!"
    assert (m.field_value("payload_type"), m.field_value("payload_name")) == ("txt", "name")


def test_print_logs_only_at_debug_level_and_clears_the_payload(tmp_path: Path) -> None:
    source = """
        function timer_event()
            add_to_payload("lost")
            print("a", 1, "b\\tc\\1", "d\\0e")
            inject_payload()
        end
    """ + PM0
    sb, host = plugin(tmp_path, source, log_level=7)
    sb.run_timer(0, False, 10)
    assert host.logs == [(7, "a\t1\tb c \td")] and host.written == []
    sb, host = plugin(tmp_path, source, log_level=6)
    sb.run_timer(0, False, 10)
    assert host.logs == [] and host.written == []


def test_analysis_inject_limits(tmp_path: Path) -> None:
    sb, host = plugin(tmp_path, """
        function process_message() inject_message({}); return 0 end
        function timer_event() for i = 1, 3 do inject_message({}) end end
    """)
    res = sb.run_batch([raw_message()], 0)  # process_message_inject_limit 0: none allowed
    assert res.status == "terminate"
    assert res.error.endswith("inject_message() failed: injection limit exceeded"), res.error
    sb, host = plugin(tmp_path, """
        function process_message() inject_message({}); return 0 end
        function timer_event() for i = 1, 3 do inject_message({}) end end
    """)
    assert sb.run_batch([raw_message(), raw_message()], 1).status == "ok"
    sb.run_timer(0, False, 3)
    with pytest.raises(PluginError, match="injection limit exceeded"):
        sb.run_timer(0, False, 2)
    assert len(host.written) == 2 + 3 + 2


# ------------------------------------------------------------------------------------------------
# outputs: return codes, batching, async acks, matchers
# ------------------------------------------------------------------------------------------------
OUTPUT_RC = """
    function process_message(seq)
        local rc = tonumber(read_message("Payload"))
        if rc == -5 then update_checkpoint(seq, 2) end
        if rc == 9 then update_checkpoint() return -4 end
        return rc, rc == -1 and "failed" or nil
    end
    function timer_event() update_checkpoint() end
"""


@pytest.mark.parametrize(("codes", "status", "processed", "commit", "failures", "batching"), OUTPUT_RETURN_CODE_CASES)
def test_output_return_codes(tmp_path: Path, codes: list[int], status: str, processed: int, commit: int,
                             failures: int, batching: bool) -> None:
    sb, host = plugin(tmp_path, OUTPUT_RC, "output")
    res = sb.run_batch([raw_message(Payload=str(c)) for c in codes])
    assert (res.status, res.processed, res.commit_index, res.failures, res.batching) == (
        status, processed, commit, failures, batching)
    if status == "terminate":
        assert res.error == "process_message() received a termination status code"
    if -1 in codes:
        assert (4, "received: -1 msg: failed") in host.logs


def test_output_batch_committed_from_timer_event(tmp_path: Path) -> None:
    sb, host = plugin(tmp_path, OUTPUT_RC, "output")
    assert sb.run_batch([raw_message(Payload="-4")]).batching
    sb.run_timer(0, False)
    assert host.commits == 1


def test_output_async_acks(tmp_path: Path) -> None:
    sb, _ = plugin(tmp_path, OUTPUT_RC, "output")
    res = sb.run_batch([raw_message(Payload="-5")])
    assert (res.status, res.error) == ("terminate", "cannot use async checkpointing without a configured buffer")
    sb, _ = plugin(tmp_path, OUTPUT_RC, "output", async_buffer_size=10)
    res = sb.run_batch([raw_message(Payload="-5"), raw_message(Payload="-5")])
    assert (res.status, res.commit_index, res.failures) == ("ok", 0, 4)
    assert sb.take_acks() == [1, 2] and sb.take_acks() == []


def test_output_update_checkpoint_and_matcher_errors(tmp_path: Path) -> None:
    sb, _ = plugin(tmp_path, """
        local m = create_message_matcher("Type == 'a'")
        local ok, err = pcall(m.eval, m)
        assert(err == "no active message", err)
        ok, err = pcall(create_message_matcher, "Bogus == 1")
        assert(err == "invalid message matcher expression", err)
        ok, err = pcall(update_checkpoint, 1, 2, 3)
        assert(err == "update_checkpoint() invalid number of args: 3", err)
        ok, err = pcall(update_checkpoint, 1, "x")
        assert(err == "bad argument #2 to '?' (number expected, got string)", err)
        function process_message() return m:eval() and 0 or -2 end
    """, "output")
    assert sb.process_message_direct(raw_message(Type="a")) == (True, 0, None)
    assert sb.process_message_direct(raw_message(Type="b")) == (True, -2, None)


def test_output_io_write_takes_zero_copy_references(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    sb, _ = plugin(tmp_path, f"""
        local io = require "io"
        local fh = assert(io.open([[{out}]], "w"))
        local payload = read_message("Payload", nil, nil, true)
        function process_message()
            fh:write(payload, "\\n")
            fh:flush()
            return 0
        end
    """, "output")
    sb.process_message_direct(raw_message(Payload="zero copy"))
    assert out.read_text() == "zero copy\n"


# ------------------------------------------------------------------------------------------------
# callback failures and limits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("error('boom')", r"^process_message\(\) \S+:\d+: boom$"),
        ("error({})", r"^process_message\(\) <nil error message>$"),
        ("return 'x'", r"^process_message\(\) must return a numeric status code$"),
        ("return 0, 1", r"^process_message\(\) must return a nil or string error message$"),
        ("while true do end", r"^process_message\(\) instruction_limit exceeded$"),
        ("for i = 1, 10 do pcall(function() while true do end end) end return 0",
         r"^process_message\(\) instruction_limit exceeded$"),
        ("local t = {} for i = 1, 1e7 do t[i] = {} end", r"^process_message\(\) not enough memory$"),
    ],
)
def test_process_message_failures_terminate(tmp_path: Path, body: str, error: str) -> None:
    sb, _ = plugin(tmp_path, f"function process_message() {body} end\n", memory_limit=1 << 20,
                   instruction_limit=100000)
    res = sb.run_batch([raw_message()])
    assert res.status == "terminate"
    assert res.error is not None
    import re

    assert re.match(error, res.error), res.error


@pytest.mark.parametrize(
    "body",
    [
        # each loop would end within seconds if compiled (the test fails instead of hanging) and
        # is thousands of times over the limit if counted
        "spin.long()",  # in a module the plugin required
        'require "table"; table.sort({3, 1, 2}, function(a, b) local i = 0 while i < 1e9 do i = i + 1 end end)',
        "for i = 1, 2e7 do local p = read_message('Payload') end",  # calling the sandbox's API
        "local x = 0 for i = 1, 1e9 do x = x + i end",  # a numeric loop LuaJIT would compile at once
    ],
)
def test_the_instruction_limit_reaches_every_loop_of_the_plugin(tmp_path: Path, body: str) -> None:
    # Under LuaJIT the sandbox's own code is compiled, the plugin's must not be: a compiled loop
    # never reaches the count hook. Every loop the plugin brings, in its file or in a module it
    # requires, is stopped by the limit.
    (tmp_path / "spin.lua").write_text("local M = {}\nfunction M.long() local x = 0 for i = 1, 1e9 do x = x + 1 end end\n"
                                       "return M\n")
    sb, _ = plugin(tmp_path, f'local spin = require "spin"\nfunction process_message() {body} return 0 end\n',
                   instruction_limit=100000, path=str(tmp_path / "?.lua"))
    res = sb.run_batch([raw_message()] * 3)
    assert (res.status, res.error) == ("terminate", "process_message() instruction_limit exceeded")


def test_missing_callbacks(tmp_path: Path) -> None:
    sb, _ = plugin(tmp_path, "x = 1\n")
    res = sb.run_batch([raw_message()])
    assert (res.status, res.error) == ("terminate", "process_message() function was not found")
    with pytest.raises(PluginError, match="^timer_event\\(\\) function was not found$"):
        sb.run_timer(0, True)


def test_load_errors_and_limits(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="instruction_limit exceeded"):
        plugin(tmp_path, "while true do end\n", instruction_limit=10000)
    with pytest.raises(PluginError, match="not enough memory"):
        plugin(tmp_path, "local t = {} for i = 1, 1e7 do t[i] = i end\n", memory_limit=1 << 20)


def test_input_instruction_budget_restarts_at_every_inject(tmp_path: Path) -> None:
    """A run-once input reading far more than instruction_limit in one call loses no line."""
    sb, host = plugin(tmp_path, """
        function process_message()
            for i = 1, 20000 do
                local s = 0
                for j = 1, 20 do s = s + j end
                inject_message({Payload = tostring(i)}, i)
            end
            return 0
        end
    """, "input", instruction_limit=10000)
    assert sb.run_input(None) == (0, None)
    assert len(host.written) == 20000 and host.checkpoints[-1] == 20000


def test_input_that_swallows_the_limit_is_still_terminated(tmp_path: Path) -> None:
    sb, host = plugin(tmp_path, """
        function process_message()
            for i = 1, 5 do
                local ok = pcall(function() while true do end end)
                if not ok then inject_message({Payload = "after"}, i) end
            end
            return 0
        end
    """, "input", instruction_limit=10000)
    with pytest.raises(PluginError, match=r"^process_message\(\) instruction_limit exceeded$"):
        sb.run_input(None)


# ------------------------------------------------------------------------------------------------
# preserve_data
# ------------------------------------------------------------------------------------------------
PRESERVE = """
    _PRESERVATION_VERSION = @V@
    count = 0
    data = {list = {1, "two", true}, [3] = 0/0, inf = 1/0}
    data.self = data
    alias = data.list
    skipped = function() end
    function process_message() count = count + 1; return 0 end
"""


def test_preserve_data_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "analysis.p.data"
    src = PRESERVE.replace("@V@", "2")
    sb, _ = plugin(tmp_path, src, preserve_data=True, state_path=state)
    sb.run_batch([raw_message()] * 3)
    sb.save_state()
    text = state.read_text()
    assert text.startswith("if _PRESERVATION_VERSION and _PRESERVATION_VERSION ~= 2 then return end\n")
    # the list is saved under whichever of its two names the table walk meets first
    assert '_G["count"] = 3\n' in text and '[2] = "two"\n' in text
    assert '_G["data"][3] = 0/0\n' in text and '_G["data"]["inf"] = 1/0\n' in text
    assert '_G["data"]["self"] = _G["data"]\n' in text
    assert "skipped" not in text and "_PRESERVATION_VERSION\"]" not in text

    sb, _ = plugin(tmp_path, src, preserve_data=True, state_path=state)
    assert sb.globals_table()[b"count"] == 3
    sb, _ = plugin(tmp_path, PRESERVE.replace("@V@", "3"), preserve_data=True, state_path=state)
    assert sb.globals_table()[b"count"] == 0, "a new _PRESERVATION_VERSION discards the old state"


def test_preserve_data_failures(tmp_path: Path) -> None:
    state = tmp_path / "analysis.p.data"
    state.write_text("_G['count'] = \n")  # broken: the plugin starts without it, the file is removed
    host = FakeHost()
    sb, _ = plugin(tmp_path, PRESERVE.replace("@V@", "0"), host=host, preserve_data=True, state_path=state)
    assert not state.exists() and host.logs[0][0] == 3 and "restore_global_data" in host.logs[0][1]
    sb, _ = plugin(tmp_path, "t = {[function() end] = 1}\n" + PM0, preserve_data=True, state_path=state)
    state.write_text("old")
    with pytest.raises(PluginError, match="serialize_data cannot preserve type 'function'"):
        sb.save_state()
    assert not state.exists()


# ------------------------------------------------------------------------------------------------
# hindsight_cli end to end
# ------------------------------------------------------------------------------------------------
def cli_layout(root: Path, plugins: dict[str, str]) -> Path:
    (root / "output").mkdir(parents=True, exist_ok=True)
    for kind in ("input", "analysis", "output"):
        (root / "run" / kind).mkdir(parents=True, exist_ok=True)
    (root / "hindsight.cfg").write_text(textwrap.dedent("""
        output_path = "output"
        sandbox_run_path = "run"
        analysis_lua_path = ""
        analysis_lua_cpath = ""
        io_lua_path = ""
        io_lua_cpath = ""
        hostname = "test"
        input_defaults = {}
        analysis_defaults = {}
        output_defaults = {}
    """))
    for name, text in plugins.items():
        (root / "run" / name).write_text(textwrap.dedent(text))
    return root


def run_cli(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hindsight_cli", "hindsight.cfg", "7"], cwd=root, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


GEN = {
    "input/gen.cfg": 'filename = "gen.lua"\n',
    "input/gen.lua": """
        function process_message()
            for i = 1, 50 do inject_message({Type = "gen", Payload = tostring(i)}, i) end
            return 0
        end
    """,
    "output/sink.cfg": 'filename = "sink.lua"\nmessage_matcher = "Type == \'gen\'"\n',
    "output/sink.lua": """
        n = 0
        function process_message() n = n + 1; return 0 end
        function timer_event(ns, shutdown) if shutdown then assert(n == 50, n) end end
    """,
}


def test_cli_bad_plugins_are_terminated_and_the_others_keep_running(tmp_path: Path) -> None:
    root = cli_layout(tmp_path, {
        **GEN,
        "analysis/boom.cfg": 'filename = "boom.lua"\nmessage_matcher = "TRUE"\n',
        "analysis/boom.lua": "function process_message() error('boom') end\nfunction timer_event() end\n",
        "analysis/spin.cfg": 'filename = "spin.lua"\nmessage_matcher = "TRUE"\ninstruction_limit = 10000\n',
        "analysis/spin.lua": "function process_message() while true do end end\nfunction timer_event() end\n",
        "analysis/hog.cfg": 'filename = "hog.lua"\nmessage_matcher = "TRUE"\nmemory_limit = 1e6\n',
        "analysis/hog.lua": "t = {}\nfunction process_message() while true do t[#t + 1] = {} end end\n"
                            "function timer_event() end\n",
    })
    result = run_cli(root)
    assert result.returncode == 4, result.stderr
    errs = {p.stem: p.read_text().split("\t", 1)[1].strip() for p in (root / "run" / "analysis").glob("*.err")}
    assert errs["boom"].startswith("process_message() ") and errs["boom"].endswith(": boom")
    assert errs["spin"] == "process_message() instruction_limit exceeded"
    assert errs["hog"] == "process_message() not enough memory"
    for name in ("boom", "spin", "hog"):
        assert f"analysis.{name} terminated: {errs[name]}" in result.stderr
    assert "output.sink" not in "".join(line for line in result.stderr.splitlines() if "[error]" in line)


def test_cli_preserve_data_across_runs(tmp_path: Path) -> None:
    root = cli_layout(tmp_path, {
        **GEN,
        "analysis/count.cfg": 'filename = "count.lua"\nmessage_matcher = "TRUE"\npreserve_data = true\n',
        "analysis/count.lua": "total = 0\nfunction process_message() total = total + 1; return 0 end\n"
                              "function timer_event(ns, shutdown) end\n",
        "input/gen.cfg": 'filename = "gen.lua"\npreserve_data = true\n',
        "input/gen.lua": """
            runs = 0
            function process_message(cp)
                runs = runs + 1
                for i = (cp or 0) + 1, (cp or 0) + 50 do inject_message({Type = "gen"}, i) end
                return 0
            end
        """,
    })
    for _ in range(2):
        result = run_cli(root)
        assert result.returncode == 0, result.stderr
    count = (root / "output" / "analysis.count.data").read_text()
    assert '_G["total"] = 100\n' in count
    assert '_G["runs"] = 2\n' in (root / "output" / "input.gen.data").read_text()


def test_what_an_output_wrote_is_in_its_files_before_the_runner_commits(tmp_path: Path) -> None:
    # upstream's elasticsearch_bulk_api.lua reports a message done once it wrote it to its batch
    # file: after the call, the runner commits, so the bytes must have left the file's buffer
    batch = tmp_path / "out.batch"
    sb, _ = plugin(tmp_path, f"""
        require "io"
        local fh = assert(io.open({str(batch)!r}, "a+"))
        function process_message() fh:write(read_message("Payload"), "\\n") return 0 end
        function timer_event(ns) fh:write("tick\\n") end
        """, kind="output")
    res = sb.run_batch([raw_message(Payload=f"p{i}") for i in range(3)])
    assert res.status == "ok"
    assert batch.read_bytes() == b"p0\np1\np2\n"
    sb.run_timer(0, False)
    assert batch.read_bytes() == b"p0\np1\np2\ntick\n"
