"""hindsight-py's stand-ins for lua_sandbox_extensions' C modules, inside a sandbox: what upstream's
own module tests (tests/test_upstream_suites.py) do not look at — the cost the plugin is charged,
where errors point, files opened from analysis plugins, the pipes of io.popen, and the Debian C
modules the sandbox now loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sandbox_fakes import FakeHost, lua_sandbox
from upstream_files import LUA_SANDBOX_EXTENSIONS, available, read_bytes

from hindsight_py._lupa import FLAVOUR
from hindsight_py.sandbox.base import PluginError


def run(tmp_path: Path, kind: str, code: str, **kw: Any) -> Any:
    plugin = tmp_path / "plugin.lua"
    plugin.write_text(code)
    kw.setdefault("path", str(tmp_path / "?.lua"))
    sb, _ = lua_sandbox(plugin, kind, FakeHost(), **kw)
    return sb


def saved_state(tmp_path: Path, code: str, state: Path) -> bytes:
    """What preserve_data writes to `state` for an analysis plugin after one process_message."""
    sb = run(tmp_path, "analysis", code, preserve_data=True, state_path=state)
    sb.process_message_direct(None)
    text, err = sb._control.serialize_state()
    assert err is None
    state.write_bytes(text)
    return text


# Plugins whose stand-in calls would take far more instructions than their limit if they were
# counted: (plugin source, instruction_limit)
UNCOUNTED = {
    # 3000 adds hash ~20000 times: millions of VM instructions in Lua, none in upstream's C. The
    # plugin's own loop and calls (a few instructions each, as upstream counts a C call) stay well
    # within the limit, and so does the whole call.
    "filters": ("""
        require "bloom_filter"
        require "cuckoo_filter"
        bf = bloom_filter.new(5000, 0.01)
        cf = cuckoo_filter.new(5000)
        function process_message()
            for i = 1, 3000 do bf:add(i); cf:add(i) end
            return 0
        end
        function timer_event() end
    """, 200_000),
    # a circular buffer's cbuf text (6,000 cells formatted in Lua), a hyperloglog's bytes and a sax
    # word, through inject_payload and tostring: upstream's C output functions count nothing
    "payload_outputs": ("""
        require "circular_buffer"
        require "hyperloglog"
        require "sax"
        cb = circular_buffer.new(1000, 6, 60)
        hll = hyperloglog.new()
        win = sax.window.new(1440, 24, 6)
        function process_message()
            for i = 0, 999 do cb:set(i * 60e9, 1, i) end
            for i = 1, 1000 do hll:add(i) end
            for i = 1, 1440 do win:add(i % 7) end
            inject_payload("cbuf", "volume", cb)
            inject_payload("txt", "hll", hll)
            inject_payload("txt", "sax", win, tostring(win), tostring(hll))
            return 0
        end
        function timer_event() end
    """, 100_000),
    # tostring() of each streaming_algorithms object writes its C struct's bytes from Lua here,
    # thousands of cells each: upstream's C __tostring counts nothing against the limit
    "streaming_algorithms_tostring": ("""
        require "streaming_algorithms.cm_sketch"
        require "streaming_algorithms.matrix"
        require "streaming_algorithms.p2"
        require "streaming_algorithms.running_stats"
        require "streaming_algorithms.time_series"
        local sa = streaming_algorithms
        local objects = {sa.cm_sketch.new(0.0005, 0.01), sa.matrix.new(60, 60), sa.matrix.new(60, 60, "float"),
                         sa.p2.quantile(0.5), sa.p2.histogram(8), sa.running_stats.new(),
                         sa.time_series.new(4000, 60e9)}
        function process_message()
            local bytes = 0
            for _, o in ipairs(objects) do bytes = bytes + #tostring(o) end
            inject_payload("txt", "sizes", tostring(bytes))
            return 0
        end
        function timer_event() end
    """, 20_000),
}


@pytest.mark.parametrize("case", list(UNCOUNTED))
def test_standins_cost_the_plugin_no_instructions(case: str, tmp_path: Path) -> None:
    code, limit = UNCOUNTED[case]
    sb = run(tmp_path, "analysis", code, instruction_limit=limit)
    assert sb.process_message_direct(None)[:2] == (True, 0)


def test_the_plugins_own_loop_is_still_counted(tmp_path: Path) -> None:
    sb = run(tmp_path, "analysis", """
        require "bloom_filter"
        bf = bloom_filter.new(5000, 0.01)
        function process_message()
            local x = 0
            for i = 1, 300000 do x = x + i end
            bf:add(x)
            return 0
        end
        function timer_event() end
    """, instruction_limit=200_000)
    ok, err, _ = sb.process_message_direct(None)
    assert not ok and "instruction_limit exceeded" in str(err)


def test_standin_errors_point_at_the_plugins_call_like_luaL_argerror(tmp_path: Path) -> None:
    sb = run(tmp_path, "analysis", """
        require "cuckoo_filter"
        require "string"
        local cf = cuckoo_filter.new(20)
        local _, method = pcall(function() cf:add({}) end)
        local _, field = pcall(function() cf.add(cf, {}) end)
        local _, count = pcall(function() cf:add() end)
        result = method .. "|" .. field .. "|" .. count
        function process_message() return 0 end
        function timer_event() end
    """)
    method, field, count = sb.globals_table()[b"result"].decode().split("|")
    assert method.endswith(":5: bad argument #1 to 'add' (must be a string or number)"), method
    assert field.endswith(":6: bad argument #2 to 'add' (must be a string or number)"), field
    assert count.endswith(":7: bad argument #-1 to 'add' (incorrect number of arguments)"), count


@pytest.mark.upstream
@pytest.mark.skipif(not available(LUA_SANDBOX_EXTENSIONS), reason="lua_sandbox_extensions is not fetched")
def test_maxminddb_opens_databases_from_an_analysis_plugin_which_has_no_io(tmp_path: Path) -> None:
    (tmp_path / "city.mmdb").write_bytes(read_bytes(LUA_SANDBOX_EXTENSIONS, "maxminddb/tests/GeoIP2-City-Test.mmdb"))
    sb = run(tmp_path, "analysis", f"""
        local mm = require "maxminddb"
        assert(not pcall(require, "io"))
        local db = mm.open("{tmp_path}/city.mmdb")
        local r = db:lookup("216.160.83.56")
        city, country, lat = r:get("city", "names", "en"), r:get("country", "iso_code"), r:get("location", "latitude")
        sub = r:get("subdivisions", "0", "iso_code")
        local _, e1 = pcall(db.lookup, db, "192.168.1.1")
        local _, e2 = pcall(db.lookup, db, "not an address")
        local _, e3 = pcall(r.get, r, "city")
        local _, e4 = pcall(mm.open, "{tmp_path}/missing.mmdb")
        errors = table.concat({{e1, e2, e3, e4}}, "|")
        function process_message() return 0 end
        function timer_event() end
    """.replace("table.concat", "require('table').concat"))
    g = sb.globals_table()
    assert (g[b"city"], g[b"country"], g[b"lat"], g[b"sub"]) == (b"Milton", b"US", 47.2513, b"WA")
    assert g[b"errors"].decode().split("|") == [
        "Success.",  # no entry: lua-maxminddb raises libmaxminddb's status text
        "Name or service not known",
        "Unsupported maxmind data type",
        "Error opening the specified MaxMind DB file",
    ]


def test_io_popen_reads_and_writes_under_both_flavours(tmp_path: Path) -> None:
    out = tmp_path / "written.txt"
    sb = run(tmp_path, "input", f"""
        require "io"
        local p = assert(io.popen("printf 'one\\\\ntwo\\\\n'"))
        first = p:read("*l")
        rest = p:read("*a")
        p:close()
        local w = assert(io.popen("cat > {out}", "w"))
        w:write("from ", "the plugin")
        w:close()
        function process_message() return 0 end
    """)
    g = sb.globals_table()
    assert (g[b"first"], g[b"rest"]) == (b"one", b"two\n")
    assert out.read_text() == "from the plugin"


def test_an_inputs_popen_sees_what_it_injected_before(tmp_path: Path) -> None:
    # upstream writes each injected message at once; hindsight-py flushes its batch before the pipe
    host = FakeHost()
    plugin = tmp_path / "plugin.lua"
    plugin.write_text("""
        require "io"
        function process_message()
            inject_message({Payload = "before the pipe"})
            local p = io.popen("true"); p:close()
            inject_message({Payload = "after the pipe"})
            return 0
        end
    """)
    seen: list[int] = []
    original = host.write_messages

    def write_messages(data: bytes, count: int) -> None:
        seen.append(count)
        original(data, count)

    host.write_messages = write_messages  # type: ignore[method-assign]
    sb, _ = lua_sandbox(plugin, "input", host)
    sb.run_input(None)
    assert seen == [1, 1]  # without the flush: one write of both


@pytest.mark.parametrize("module, probe", [
    ("lfs", "lfs.attributes('/', 'mode') == 'directory'"),
    ("zlib", "zlib.crc32()('abc') == 891568578"),
    ("bit", "bit.bxor(5, 3) == 6 and bit.tohex(255) == '000000ff'"),
])
def test_debian_c_modules_load_in_the_sandbox(tmp_path: Path, module: str, probe: str) -> None:
    sb = run(tmp_path, "input", f"""
        {module} = require "{module}"
        ok = {probe}
        function process_message() return 0 end
    """)
    assert sb.globals_table()[b"ok"] is True, FLAVOUR


def test_a_missing_debian_module_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hindsight_py.sandbox.lua as lua_mod

    monkeypatch.setattr(lua_mod, "SYSTEM_LUA_CPATH", str(tmp_path / "none" / "?.so"))
    with pytest.raises(PluginError, match=r"module 'zlib' not found in .* \(install Debian's lua-zlib, or set "):
        run(tmp_path, "input", 'require "zlib"\nfunction process_message() return 0 end')


def test_filters_are_preserved_and_restored_as_upstream_writes_them(tmp_path: Path) -> None:
    code = """
        require "cuckoo_filter"
        require "cuckoo_filter_expire"
        require "bloom_filter"
        require "hyperloglog"
        hll = hyperloglog.new()
        cf = cuckoo_filter.new(64)
        cfe = cuckoo_filter_expire.new(1024, 5)
        bf = bloom_filter.new(100, 0.01)
        same = cf
        function process_message()
            for i = 1, 40 do cf:add(i); cfe:add("k" .. i, 1e9 * 3600); bf:add(i); hll:add(i) end
            cf:add("a\\n\\r\\"\\\\")
            return 0
        end
        function timer_event() end
    """
    state = tmp_path / "state.data"
    text = saved_state(tmp_path, code, state)
    lines = text.decode("latin-1").splitlines()
    # cf and same are one filter: written once under the name walked first, aliased under the other
    assert any(re.fullmatch(r'if _G\["(cf|same)"\] == nil then _G\["\1"\] = cuckoo_filter.new\(64\) end', line)
               for line in lines)
    assert 'if _G["cfe"] == nil then _G["cfe"] = cuckoo_filter_expire.new(1024, 5) end' in lines
    assert 'if _G["bf"] == nil then _G["bf"] = bloom_filter.new(100, 0.01) end' in lines
    assert 'if _G["hll"] == nil then _G["hll"] = hyperloglog.new() end' in lines
    assert any(line.startswith('_G["hll"]:fromstring("HYLL') for line in lines)

    sb2 = run(tmp_path, "analysis", code, preserve_data=True, state_path=state)
    g = sb2.globals_table()
    assert (g[b"cf"].count(g[b"cf"]), g[b"cfe"].count(g[b"cfe"]), g[b"bf"].count(g[b"bf"])) == (41, 40, 40)
    assert g[b"cf"].query(g[b"cf"], b"a\n\r\"\\") and g[b"bf"].query(g[b"bf"], 7)
    assert g[b"hll"].count(g[b"hll"]) == 40
    assert tuple(g[b"cfe"].query(g[b"cfe"], b"k3")) == (True, 12)  # 3600 s / 5 min intervals
    assert '_G["same"] = _G["cf"]' in lines or '_G["cf"] = _G["same"]' in lines


def test_date_formats_parses_and_normalises_in_utc(tmp_path: Path) -> None:
    sb = run(tmp_path, "input", """
        local date = require "date"
        local t = date.time("2017-07-17 00:00:00.123456", "%Y-%m-%d %H:%M:%S")
        a = date.format(t, "%Y-%m-%dT%H:%M:%SZ")
        b = date.format(1571067566 * 1e9, "%a %b %e %j %Z %z %F %T")
        c = date.time({year = 2017, month = 9, day = 31, hour = 23, min = 59, sec = 59, sec_frac = 0.9})
        d = date.floor(date.time("2017-07-16 17:16:15.14", "%Y-%m-%d %H:%M:%S"), "hour")
        e = date.get(t, "wday")
        local ok, err = pcall(date.format, t, "%F", "America/Los_Angeles")
        f = err
        local ok2, err2 = pcall(date.time, "not a date", "%Y-%m-%d")
        g = err2
        function process_message() return 0 end
    """)
    g = sb.globals_table()
    assert g[b"a"] == b"2017-07-17T00:00:00.123456000Z"
    assert g[b"b"] == b"Mon Oct 14 287 UTC +0000 2019-10-14 15:39:26.000000000"
    assert g[b"c"] == 1506902399.9e9  # October 1st: date/tz's normalisation of September 31st
    assert g[b"d"] == 1500224400e9  # 2017-07-16 17:00 UTC
    assert g[b"e"] == 2  # a Monday
    assert g[b"f"] == b"America/Los_Angeles not found in timezone database"
    assert g[b"g"] == b"parse failed"


def test_circular_buffer_errors_are_upstreams(tmp_path: Path) -> None:
    # upstream's test.lua checks only that these fail; the texts are luaL_argerror's and the C module's
    sb = run(tmp_path, "analysis", """
        require "circular_buffer"
        local cb = circular_buffer.new(2, 2, 1)
        local calls = {
            function() circular_buffer.new(2) end,
            function() circular_buffer.new(2, 257, 1) end,
            function() circular_buffer.new(nil, 1, 1) end,
            function() cb:set(0, 3, 1) end,
            function() cb.get(1, 1, 1) end,
            function() cb:format("invalid") end,
            function() cb:get_range(1, 2e9, 1e9) end,
            function() cb:fromstring("1 1 2") end,
            function() cb:set(0, 1, 1); cb:set(0, 1, 0/0) end,
            function() cb:set(0, 2, 1/0); cb:add(0, 2, -1/0) end,
        }
        errors = {}
        for i, f in ipairs(calls) do
            local ok, err = pcall(f)
            errors[i] = (err:gsub("^[^:]*:%d+: ", ""))
        end
        errors = table.concat(errors, "|")
        function process_message() return 0 end
        function timer_event() end
    """.replace("table.concat", "require('table').concat"))
    assert sb.globals_table()[b"errors"].decode().split("|") == [
        "bad argument #0 to 'new' (incorrect number of arguments)",
        "bad argument #2 to 'new' (columns must be > 0 and <= 256)",
        "bad argument #1 to 'new' (number expected, got nil)",
        "bad argument #2 to 'set' (column out of range)",
        "bad argument #1 to 'get' (mozsvc.circular_buffer expected, got number)",
        "bad argument #1 to 'format' (invalid option 'invalid')",
        "bad argument #3 to 'get_range' (end must be >= start)",
        "fromstring() too few values: 1, expected 4",
        "cannot uninitialize a value",
        "add produced a NAN",
    ]


def test_libinjection_checks_through_libinjection_python(tmp_path: Path) -> None:
    sb = run(tmp_path, "analysis", """
        local libi = require "libinjection"
        local state = libi.sqli_state()
        local q = "1' OR '1'='1"
        libi.sqli_init(state, q, #q, 0)
        sqli, fingerprint = libi.is_sqli(state), state.fingerprint
        benign = libi.sqli("hello world", 11, "")
        xss = libi.xss("<img src=x onerror=alert(1)>", 28)
        local _, e = pcall(libi.sqli_init, state, "x")
        arity = e
        function process_message() return 0 end
        function timer_event() end
    """)
    g = sb.globals_table()
    assert (g[b"sqli"], g[b"fingerprint"], g[b"benign"], g[b"xss"]) == (1, b"s&sos", 0, 1)
    assert g[b"arity"].endswith(b"Error in libinjection_sqli_init expected 4..4 args, got 2")


def test_libinjection_without_its_python_package_names_the_extra(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import hindsight_py.sandbox.lua as lua_mod

    monkeypatch.setattr(lua_mod, "libinjection_check", lambda: None)
    with pytest.raises(PluginError, match=re.escape(
            "module 'libinjection' needs the Python package libinjection-python: "
            "pip install 'hindsight-py[libinjection]'")):
        run(tmp_path, "analysis", 'require "libinjection"\nfunction process_message() return 0 end')


def test_a_circular_buffer_goes_into_payloads_as_upstreams_output(tmp_path: Path) -> None:
    # inject_payload("cbuf", name, cb): the C module's output function writes the JSON header and
    # the rows (moz_telemetry_doctype_monitor and the other dashboards send their buffers so)
    host = FakeHost()
    plugin = tmp_path / "plugin.lua"
    plugin.write_text("""
        require "circular_buffer"
        cb = circular_buffer.new(2, 1, 60)
        cb:set_header(1, "Requests")
        function process_message() return 0 end
        function timer_event()
            cb:add(60e9, 1, 5)
            inject_payload("cbuf", "requests", cb)
        end
    """)
    sb, _ = lua_sandbox(plugin, "analysis", host, path=str(tmp_path / "?.lua"))
    sb.run_timer(0, False)
    assert len(host.written) == 1
    assert (b'{"time":0,"rows":2,"columns":1,"seconds_per_row":60,"column_info":[{"name":"Requests",'
            b'"unit":"count","aggregation":"sum"}],"annotations":[]}\nnan\n5\n') in host.written[0]


def test_sax_words_and_windows_as_the_c_library_makes_them(tmp_path: Path) -> None:
    # symtseries' C unit tests (src/symtseries.c) and its README's mindist example, which the Lua
    # test (tests/test_upstream_module_sandboxes.py) does not carry
    sb = run(tmp_path, "analysis", """
        require "sax"
        sample = tostring(sax.word.new({5, 6, 7, -5, -6, -7, 0.25, 0.17, 0.04, -0.04, -0.17, -0.25}, 4, 8))
        nan_inf = tostring(sax.word.new({0/0, 0/0, 1/0, -1/0, 1/0, 1, -1/0, -1, 0/0, -5, 5, 0/0}, 6, 8))
        local a = sax.word.new({10.3, 7, 1, -5, -5, 7.2}, 2, 8)
        local b = sax.window.new(6, 2, 8)
        for _, v in ipairs({-9, -8, -7, -5, -5, 7.2}) do b:add(v) end
        d, above, below = sax.mindist(a, b)
        bad_self = select(2, pcall(function() b:add({1, "a"}) end))
        mismatch = sax.mindist(a, sax.word.new("ABC", 8))
        function process_message() return 0 end
    """)
    g = sb.globals_table()
    assert (g[b"sample"], g[b"nan_inf"]) == (b"HAED", b"##HAAH")
    assert [round(g[k], 6) for k in (b"d", b"above", b"below")] == [1.560325, 1.103316, 1.103316]
    # luaL_argerror names argument 1 of a method: Lua reports it as its self
    assert g[b"bad_self"].endswith(b"calling 'add' on bad self (expected array of numbers as input)")
    assert g[b"mismatch"] is None


def test_sax_objects_are_preserved_as_upstream_writes_them(tmp_path: Path) -> None:
    code = """
        require "sax"
        win = sax.window.new(4, 2, 4)
        empty = sax.window.new(4, 2, 4)
        function process_message()
            win:add({1, 2, 0/0, 1/0, 10.5})
            word = win:get_word()
            return 0
        end
        function timer_event() end
    """
    state = tmp_path / "state.data"
    text = saved_state(tmp_path, code, state)
    lines = text.decode().splitlines()
    at = lines.index('if _G["win"] == nil then _G["win"] = sax.window.new(4, 2, 4) end')
    assert lines[at + 1:at + 3] == ['_G["win"]:clear()', '_G["win"]:add({2,0/0,1/0,10.5})']
    assert 'if _G["empty"] == nil then _G["empty"] = sax.window.new(4, 2, 4) end' in lines
    assert '_G["empty"]:clear()' not in lines  # a window of NaNs only: nothing to add
    assert 'if _G["word"] == nil then _G["word"] = sax.word.new("AD", 4) end' in lines

    sb2 = run(tmp_path, "analysis", code, preserve_data=True, state_path=state)
    text2, err = sb2._control.serialize_state()
    assert err is None and sorted(text2.decode().splitlines()) == sorted(lines)  # restored as it was
