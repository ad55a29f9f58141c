"""Hostile Lua plugins: the sandbox is a security boundary (docs/security.md).

Plugins of each type try what lua_sandbox does not give them: to run a command, write a file, reach
Python, load C or bytecode, leave their environment, change another plugin's state, and outrun
every limit. They run as the runner runs them (LuaSandbox built as sandbox/__init__.py builds it,
tests/sandbox_fakes.py) and once through hindsight_cli. Each attempt must end in an error or a
termination (with upstream's text for the limits), and the file it aims at must not exist
afterwards. What lua_sandbox does give inputs and outputs (io, os.execute, coroutines) must still
work.

Every attempt runs in a forked child: a hang or a crash fails that one test (a generous guard,
not a timing assertion) instead of taking the suite with it, and the child then checks that a
fresh plugin in the same process still works. The file is in scripts/test.sh's lua51 rerun list:
the suite holds for LuaJIT and for PUC Lua 5.1.
"""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import hindsight_cli
from sandbox_fakes import FakeHost, lua_sandbox
from test_sandbox_lua import GEN, cli_layout, raw_message
from upstream_files import lua_string

from hindsight_py._lupa import LuaRuntime
from hindsight_py.sandbox.base import PluginError

ALL = ("input", "analysis", "output")
IO = ("input", "output")
ANALYSIS = ("analysis",)
HANG_GUARD = 300  # seconds; a hung attempt fails its test instead of the CI job
LIMIT = "instruction_limit exceeded"
MEMORY = "not enough memory"


# ------------------------------------------------------------------------------------------------
# running one plugin in a child process
# ------------------------------------------------------------------------------------------------
def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException:
        conn.send((False, traceback.format_exc()))


def isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child; its result, or the test fails with the child's traceback."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        if not receive.poll(HANG_GUARD):
            proc.kill()
            pytest.fail("the plugin hung: no limit stopped it")
        try:
            ok, value = receive.recv()
        except EOFError:
            proc.join()
            pytest.fail(f"the process died (exit code {proc.exitcode})")
    finally:
        proc.join()
    if not ok:
        pytest.fail(value, pytrace=False)
    return value


class HostileHost(FakeHost):
    """A host whose dead_letter fails on request: a Python exception raised into the plugin."""

    def dead_letter(self, reason: str, data: bytes) -> None:
        if reason == "raise":
            raise ValueError("the host failed")
        super().dead_letter(reason, data)


# The attempts share this prelude: the marker they aim at, and `use(t, where)`, which exploits
# anything of the host found in table t (so that a hole shows as a file on disk and an ESCAPED error).
PRELUDE = r"""
local M = read_config("marker")
local CMD = "touch " .. M
local function use(t, where)
    if type(t) ~= "table" then return end
    local os_ = rawget(t, "os")
    if type(os_) == "table" and rawget(os_, "execute") then
        os_.execute(CMD)
        error("ESCAPED: os.execute through " .. where, 0)
    end
    local io_ = rawget(t, "io")
    if type(io_) == "table" and rawget(io_, "open") then
        local f = io_.open(M, "w")
        if f then f:close() end
        error("ESCAPED: io through " .. where, 0)
    end
    for _, k in ipairs { "python", "debug", "jit", "dofile", "loadstring", "load", "loadfile", "newproxy" } do
        if rawget(t, k) ~= nil then error("ESCAPED: " .. k .. " through " .. where, 0) end
    end
    local pkg = rawget(t, "package")
    if type(pkg) == "table" and (rawget(pkg, "loadlib") or rawget(pkg, "loaded") or rawget(pkg, "loaders")) then
        error("ESCAPED: package internals through " .. where, 0)
    end
end
"""

ENTRY = """
function process_message()
    attempt()
    return 0
end
function timer_event() end
"""


@dataclass
class Attempt:
    name: str
    kinds: tuple[str, ...]
    body: str  # the body of attempt(), run by process_message; or the plugin's top level (at_load)
    expect: str  # a regex the termination message must match
    limits: dict[str, int] = field(default_factory=dict)
    at_load: bool = False


def plugin_source(attempt: Attempt) -> str:
    body = textwrap.dedent(attempt.body)
    if attempt.at_load:
        return PRELUDE + body + "\nlocal function attempt() end\n" + ENTRY
    return PRELUDE + "local function attempt()\n" + body + "\nend\n" + ENTRY


def run_plugin(tmp: Path, kind: str, source: str, limits: dict[str, int]) -> str:
    """Runs one plugin as the runner would (load, then one call); what became of it."""
    (tmp / "mods").mkdir(exist_ok=True)
    f = tmp / f"{kind}.lua"
    f.write_text(source)
    cfg = f"marker = {lua_string(str(tmp / 'marker'))}\nspin = function() local x = 0 for i = 1, 1e15 do x = x + i end end\n"
    kw: dict[str, Any] = {"cfg": cfg,
                          "path": f"{tmp}/mods/?.lua", "cpath": f"{tmp}/mods/?.so", **limits}
    try:
        sb, _ = lua_sandbox(f, kind, HostileHost(), **kw)
    except PluginError as e:
        return f"load: {e}"
    return call_once(sb, kind)


def call_once(sb: Any, kind: str) -> str:
    """One call as the runner makes it (an input's process_message, or a batch of one message):
    "returned <status>" or "terminated: <error>"."""
    if kind == "input":
        try:
            rc, _msg = sb.run_input(None)
        except PluginError as e:
            return f"terminated: {e}"
        return f"returned {rc}"
    res = sb.run_batch([raw_message(Payload="p")])
    if res.status == "terminate":
        return f"terminated: {res.error}"
    return f"returned {res.status}"


def a_fresh_plugin_still_works(tmp: Path) -> None:
    f = tmp / "benign.lua"
    f.write_text("""
        function process_message()
            local s = require "string"
            inject_message({Type = ("benign"):upper(), Payload = s.format("%d", 42)})
            return 0
        end
    """)
    sb, host = lua_sandbox(f, "analysis")
    res = sb.run_batch([raw_message()])
    assert res.status == "ok", res
    (msg,) = host.messages()
    assert (msg.type, msg.payload) == ("BENIGN", "42")


def attempt_in_child(tmp: Path, kind: str, attempt: Attempt) -> str:
    outcome = run_plugin(tmp, kind, plugin_source(attempt), attempt.limits)
    a_fresh_plugin_still_works(tmp)
    return outcome


def prepare_modules(tmp: Path) -> None:
    """Files a hostile plugin may `require`: a hot loop, bytecode, a C library that is no module."""
    mods = tmp / "mods"
    mods.mkdir()
    (mods / "hot.lua").write_text("return function() local x = 0 for i = 1, 1e15 do x = x + i * 2 end return x end\n")
    # modules that try to hand the plugin what its type forbids
    (mods / "grab_io.lua").write_text('local io = require "io"\nreturn io\n')
    (mods / "grab_os.lua").write_text('local os = require "os"\nreturn { execute = os.execute, G = _G, env = getfenv(1) }\n')
    bytecode = LuaRuntime(encoding=None).execute(
        f"return string.dump(loadstring('os.execute([[touch {tmp / 'marker'}]])'))")
    assert bytecode[:1] == b"\x1b"
    (mods / "bc.lua").write_bytes(bytecode)
    libc = next(p for p in (Path("/lib/x86_64-linux-gnu/libc.so.6"), Path("/usr/lib/x86_64-linux-gnu/libc.so.6"))
                if p.exists())
    (mods / "evil.so").symlink_to(libc)  # a link: dlopen finds the libc already loaded, not a second one


# ------------------------------------------------------------------------------------------------
# the attempts
# ------------------------------------------------------------------------------------------------
ATTEMPTS = [
    # -- commands and files: lua_sandbox takes them from analysis plugins only
    Attempt("os.execute", ANALYSIS, 'require("os").execute(CMD)', r"attempt to call"),
    Attempt("os.tmpname", ANALYSIS, 'require("os").tmpname()', r"attempt to call"),
    Attempt("os.rename", ANALYSIS, 'require("os").rename(M, M .. "2")', r"attempt to call"),
    Attempt("io.popen", ANALYSIS, 'require("io").popen(CMD)', r"module 'io' disabled"),
    Attempt("io.open", ANALYSIS, 'require("io").open(M, "w")', r"module 'io' disabled"),
    Attempt("LuaSocket", ANALYSIS, 'require("socket.core")', r"module 'socket.core' not found"),
    Attempt("the bulk sender", ANALYSIS, 'require("hindsight.elasticsearch")',
            r"module 'hindsight.elasticsearch' not found"),
    Attempt("io through a module", ANALYSIS, 'require("grab_io").open(M, "w")', r"module 'io' disabled"),
    Attempt("os through a module", ANALYSIS, """
        local m = require "grab_os"
        use(m.G, "a module's _G")
        use(m.env, "a module's environment")
        m.G.os.execute(CMD)
    """, r"attempt to call"),
    Attempt("os.exit through a module", IO, 'require("grab_os").G.os.exit(1)', r"attempt to call"),
    Attempt("os.execute through a module", ANALYSIS, 'require("grab_os").execute(CMD)', r"attempt to call"),
    Attempt("gzfile", ANALYSIS, 'require("gzfile").string("/etc/passwd")', r"module 'gzfile' not found"),
    Attempt("lfs", ANALYSIS, 'require("lfs").touch(M)', r"module 'lfs' not found"),
    Attempt("os.exit", IO, 'require("os").exit(1)', r"attempt to call"),
    Attempt("os.setlocale", IO, 'require("os").setlocale("C")', r"attempt to call"),
    Attempt("dofile and loadfile", ALL, 'local f = loadfile or dofile\nf(M)', r"attempt to call"),
    # -- leaving the environment
    Attempt("getfenv(0)", ALL, 'use(getfenv(0), "getfenv(0)")\ngetfenv(0).os.execute(CMD)', r"attempt to index"),
    Attempt("getfenv of every level", ALL, """
        for level = 0, 50 do
            local ok, e = pcall(getfenv, level)
            if ok then use(e, "pcall(getfenv, " .. level .. ")") end
            ok, e = pcall(function() return getfenv(level) end)
            if ok then use(e, "getfenv(" .. level .. ")") end
        end
        error("no way out", 0)
    """, r"no way out"),
    Attempt("getfenv of every function", ALL, """
        local mods = { _G = _G, string = require "string", table = require "table", math = require "math",
            lpeg = require "lpeg", cjson = require "cjson", re = require "re", package = package }
        for mname, m in pairs(mods) do
            for k, f in pairs(m) do
                if type(f) == "function" then
                    use(getfenv(f), "getfenv(" .. mname .. "." .. tostring(k) .. ")")
                    local ok, e = pcall(function() return getfenv(f).os end)
                    if ok and e then use({ os = e }, "getfenv(" .. mname .. "." .. tostring(k) .. ").os") end
                end
            end
        end
        error("no way out", 0)
    """, r"no way out"),
    Attempt("rawget on _G", ALL, """
        for _, k in ipairs { "os", "io", "debug", "jit", "python", "dofile", "loadstring", "require" } do
            local v = rawget(_G, k)
            if type(v) == "table" then use({ [k] = v }, "rawget(_G, " .. k .. ")") end
        end
        rawget(_G, "os").execute(CMD)
    """, r"attempt to index"),
    Attempt("setfenv on the sandbox's functions", ALL, """
        local seen = {}
        local spy = setmetatable({}, { __index = function(_, k) seen[#seen + 1] = k end,
            __newindex = function(_, k) seen[#seen + 1] = k end })
        for k, f in pairs(_G) do
            if type(f) == "function" then pcall(setfenv, f, spy) end
        end
        setfenv(0, spy)
        pcall(setfenv, 2, spy)
        read_config("marker"); print("x"); pcall(decode_message, "")
        require "string"; require "cjson"
        if #seen > 0 then error("ESCAPED: the host read " .. tostring(seen[1]) .. " from a plugin's table", 0) end
        error("no way out", 0)
    """, r"no way out"),
    Attempt("the string metatable", ALL, """
        local mt = getmetatable("")
        use(mt, "the string metatable")
        use(mt.__index, "the string methods")
        local dump = ("").dump
        dump(function() end)
    """, r"attempt to call"),
    Attempt("metatables of the API's objects", ALL, """
        local objs = {}
        if create_stream_reader then objs[#objs + 1] = create_stream_reader("r") end
        if read_message then objs[#objs + 1] = read_message("Payload", 0, 0, true) end
        if create_message_matcher then objs[#objs + 1] = create_message_matcher("TRUE") end
        for i, o in ipairs(objs) do
            local mt = getmetatable(o)
            use(mt, "metatable " .. i)
            if type(mt) == "table" and type(mt.__index) == "table" then
                use(mt.__index, "methods " .. i)
                for k, f in pairs(mt.__index) do use(getfenv(f), "getfenv(method " .. k .. ")") end
            end
        end
        error("no way out", 0)
    """, r"no way out"),
    Attempt("debug", ALL, 'require("debug").getregistry()', r"module 'debug' not found"),
    Attempt("debug as a global", ALL, "debug.getregistry()", r"attempt to index"),
    Attempt("ffi", ALL, 'require("ffi").C.system(CMD)', r"module 'ffi' not found"),
    Attempt("jit", ALL, "jit.on()", r"attempt to index"),
    # -- Python
    Attempt("python.eval", ALL, "python.eval(\"__import__('os').system('touch ' + '\" .. M .. \"')\")",
            r"attempt to index"),
    Attempt("Python through math.erf", ALL, """
        local erf = require("math").erf
        local mod = erf.__self__
        mod.__loader__.load_module("os").system(CMD)
    """, r"attempt to index"),
    Attempt("a Python exception", ALL, """
        local ok, e = pcall(dead_letter, "raise", "")
        assert(not ok)
        if type(e) ~= "string" then
            local os = e.__traceback__.tb_frame.f_globals.get("os")
            os.system(CMD)
        end
        error("caught a " .. type(e) .. ": " .. e, 0)
    """, r"caught a string: the host failed"),
    Attempt("a Python exception from the bulk sender", IO, """
        local ok, e = pcall(require("hindsight.elasticsearch").sender, {})
        assert(not ok)
        if type(e) ~= "string" then e.__class__.__init__.__globals__.get("os").system(CMD) end
        error("caught a " .. type(e), 0)
    """, r"caught a string"),
    # -- C and bytecode
    Attempt("package.loadlib", ALL, 'package.loadlib("libc.so.6", "system")', r"attempt to call"),
    Attempt("require of a .so by path", ALL, 'require("/lib/x86_64-linux-gnu/libc.so.6")', r"invalid module name"),
    Attempt("require of a C library that is no module", ALL, 'require("evil")', r"module 'evil' not found"),
    Attempt("string.dump", ALL, 'require("string").dump(function() end)', r"attempt to call"),
    Attempt("load of a binary chunk", ALL, 'local l = load or loadstring\nl("\\27LuaQ")', r"attempt to call"),
    Attempt("require of a precompiled module", ALL, 'require("bc")', r"precompiled chunks are not loaded"),
    # -- the instruction limit
    Attempt("an endless loop", ALL, "while true do end", LIMIT),
    Attempt("a loop LuaJIT would compile", ALL, "local x = 0\nfor i = 1, 1e15 do x = x + i end", LIMIT),
    Attempt("a loop in a required module", ALL, 'require("hot")()', LIMIT),
    Attempt("catching the limit with pcall", ALL, "while true do pcall(function() while true do end end) end", LIMIT),
    Attempt("catching the limit with xpcall", ALL,
            "while true do xpcall(function() while true do end end, function(e) return e end) end", LIMIT),
    Attempt("an endless error handler", ALL, 'xpcall(function() error("x") end, function() while true do end end)',
            LIMIT),
    Attempt("a C function calling back", ALL,
            'local s = require("string").rep("a", 1000)\nwhile true do s:gsub("a", function() end) end', LIMIT),
    Attempt("an endless coroutine", IO, 'require("coroutine").wrap(function() while true do end end)()', LIMIT),
    Attempt("coroutines swallowing the limit", IO, """
        require "coroutine"
        while true do coroutine.resume(coroutine.create(function() while true do end end)) end
    """, LIMIT),
    Attempt("many short coroutines", IO, """
        require "coroutine"
        while true do coroutine.wrap(function() for i = 1, 90 do end end)() end
    """, LIMIT),
    Attempt("coroutines", ANALYSIS, 'require("coroutine")', r"module 'coroutine' disabled"),
    Attempt("a function from the cfg", ALL, 'read_config("spin")()', r"attempt to call"),
    Attempt("a metamethod run by the encoder", ("input", "analysis"),
            "inject_message(setmetatable({}, { __index = function() while true do end end }))", LIMIT),
    Attempt("a metamethod run by the encoder", ("output",),
            "encode_message(setmetatable({}, { __index = function() while true do end end }))", LIMIT),
    Attempt("a forged stand-in object", ("input", "analysis"), """
        local forged = setmetatable({}, { __lsb_output = function() while true do end end })
        inject_message({ Fields = { x = forged } })
    """, LIMIT),
    Attempt("a forged stand-in object", ("output",), """
        local forged = setmetatable({}, { __lsb_output = function() while true do end end })
        encode_message({ Fields = { x = forged } })
    """, LIMIT),
    Attempt("plugin code run by a stand-in", ALL,
            'require("date").floor(0, setmetatable({}, { __tostring = function() while true do end end }))', LIMIT),
    Attempt("a yield out of the encoder", IO, """
        local coroutine = require "coroutine"
        local co = coroutine.wrap(function()
            local m = setmetatable({}, { __index = function() coroutine.yield() end })
            if encode_message then encode_message(m) else inject_message(m) end
        end)
        co()
        error("the encoder was left in the middle", 0)
    """, r"called while a message is being encoded|attempt to yield"),
    # -- the memory limit (no instruction limit: memory alone must stop them)
    Attempt("a growing table", ALL, "local t = {}\nwhile true do t[#t + 1] = {} end", MEMORY,
            {"instruction_limit": 0}),
    Attempt("string.rep", ALL, 'local s = require("string").rep("x", 2^30)', MEMORY, {"instruction_limit": 0}),
    Attempt("table.concat", ALL, """
        local s = require("string").rep("x", 2^20)
        local t = {}
        for i = 1, 64 do t[i] = s end
        local big = require("table").concat(t)
    """, MEMORY, {"instruction_limit": 0}),
    # (PUC Lua's string.rep copies up to the limit before it fails: small limits keep this quick)
    Attempt("catching the memory error", ALL, 'while true do pcall(require("string").rep, "x", 2^30) end', LIMIT,
            {"memory_limit": 1_000_000, "instruction_limit": 20_000}),
    Attempt("deep recursion", ALL, "local function f(n) return 1 + f(n + 1) end\nf(1)", r"stack overflow",
            {"instruction_limit": 0}),
    Attempt("recursion through metamethods", ALL, """
        local t = setmetatable({}, {})
        getmetatable(t).__index = function(t, k) return t[k] end
        local x = t.x
    """, r"stack overflow", {"instruction_limit": 0}),
    Attempt("a huge table constructor", ALL, "local t = {" + "1," * 3_000_000 + "}\n",
            f"{MEMORY}|{LIMIT}", at_load=True),
    # -- the output limit
    Attempt("add_to_payload", ANALYSIS, 'for i = 1, 1e5 do add_to_payload("0123456789") end', r"output_limit exceeded"),
    Attempt("a huge message", ("input", "analysis"), 'inject_message({Payload = require("string").rep("x", 2^20)})',
            r"output_limit|max_message_size"),
    Attempt("a huge message", ("output",), 'encode_message({Payload = require("string").rep("x", 2^20)})',
            r"buffer full|output_limit|max_message_size"),
    Attempt("a huge JSON text", ALL, 'require("cjson").encode({require("string").rep("x", 2^20)})',
            r"output_limit exceeded"),
]

CASES = [pytest.param(kind, a, id=f"{kind}: {a.name}") for a in ATTEMPTS for kind in a.kinds]


@pytest.fixture
def hostile_tmp(tmp_path: Path) -> Path:
    prepare_modules(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("kind", "attempt"), CASES)
def test_hostile_plugin_gets_nothing(hostile_tmp: Path, kind: str, attempt: Attempt) -> None:
    outcome = isolated(attempt_in_child, hostile_tmp, kind, attempt)
    assert "ESCAPED" not in outcome, outcome
    if attempt.expect in (LIMIT, MEMORY):  # the plugin is terminated with upstream's text
        assert outcome == f"terminated: process_message() {attempt.expect}", outcome
    assert outcome.startswith("load: " if attempt.at_load else "terminated: "), outcome
    assert re.search(attempt.expect, outcome), outcome
    assert not (hostile_tmp / "marker").exists(), f"{kind} plugin wrote the marker: {outcome}"


def full_memory_in_child(tmp: Path, kind: str) -> list[str]:
    """A plugin that fills its memory and keeps it; the host then goes on calling into its state."""
    f = tmp / "full.lua"
    f.write_text("""
        hoard = {}
        function process_message()
            pcall(function() while true do hoard[#hoard + 1] = {} end end)
            return 0
        end
        function timer_event() end
    """)
    sb, _ = lua_sandbox(f, kind, instruction_limit=0, async_buffer_size=10 if kind == "output" else 0)
    out = [call_once(sb, kind) for _ in range(3)]
    out.append(f"{sb.seq_counter()} {sb.take_acks()} {sb.data_now()} {sb.has_timer()}")
    try:
        sb.run_timer(0, True)
    except PluginError as e:
        out.append(str(e))
    a_fresh_plugin_still_works(tmp)
    return out


@pytest.mark.parametrize("kind", ALL)
def test_a_plugin_at_its_memory_limit_cannot_abort_the_process(tmp_path: Path, kind: str) -> None:
    # Lua aborts the process when an allocation fails outside a protected call: the host's own
    # calls into a full state must never be the ones that fail
    outcome = isolated(full_memory_in_child, tmp_path, kind)
    assert f"terminated: process_message() {MEMORY}" in outcome[:3], outcome


# ------------------------------------------------------------------------------------------------
# the whole reachable world of a plugin
# ------------------------------------------------------------------------------------------------
# Names of what lua_sandbox gives no plugin of the type, and of the host's own things.
NEVER = ("python eval builtins as_attrgetter as_itemgetter as_function iterex debug getregistry getupvalue "
         "setupvalue sethook gethook getlocal jit ffi dofile load loadfile loadstring newproxy loadlib loaders "
         "dump exit setlocale").split()
NOT_IN_ANALYSIS = "execute popen getenv rename tmpname collectgarbage io coroutine tcp udp".split()

WALK = r"""
-- Everything a plugin can reach: its globals, every module it may require, getfenv of every level
-- and function, metatables of all of them and of strings; keys in NEVER must not be among them.
local never = {}
for name in NEVER:gmatch("%S+") do never[name] = true end
local seen, queue, n = {}, {}, 0
local function push(v, path)
    local t = type(v)
    if (t == "table" or t == "function" or t == "userdata" or t == "thread") and not seen[v] then
        seen[v] = path
        queue[#queue + 1] = v
    end
end
for _, name in ipairs(MODULES) do
    local ok, m = pcall(require, name)
    assert(ok, m)
    push(m, name)
end
push(_G, "_G")
push(getmetatable(""), "string metatable")
for level = 0, 20 do
    local ok, e = pcall(getfenv, level)
    if ok then push(e, "getfenv(" .. level .. ")") end
end
while #queue > 0 do
    local v = table.remove(queue)
    n = n + 1
    local path = seen[v]
    local t = type(v)
    if t == "table" then
        for k, x in next, v do
            if never[k] then error("reached " .. path .. "." .. tostring(k), 0) end
            push(k, path .. "[key]")
            push(x, path .. "." .. tostring(k))
        end
    elseif t == "function" then
        push(getfenv(v), "getfenv(" .. path .. ")")
    end
    local mt = getmetatable(v)
    if mt ~= nil then push(mt, "getmetatable(" .. path .. ")") end
end
error("walked " .. n, 0)
"""


def walk_in_child(tmp: Path, kind: str) -> str:
    modules = ["string", "table", "math", "os", "lpeg", "cjson", "re", "rjson", "heka.msg_interpolate",
               "encoders.elasticsearch.common", "lpeg.sub_decoder_util", "decoders.payload", "zlib", "bit",
               "date", "bloom_filter", "cuckoo_filter", "cuckoo_filter_expire", "hyperloglog", "xxhash",
               "maxminddb", "hindsight_py.standin"]
    never = NEVER + (NOT_IN_ANALYSIS if kind == "analysis" else [])
    if kind != "analysis":
        modules += ["io", "coroutine", "socket", "socket.http", "ltn12", "mime", "hindsight.elasticsearch", "lfs",
                    "gzfile"]
    src = (f"table = require 'table'\nNEVER = {lua_string(' '.join(never))}\n"
           f"MODULES = {{{', '.join(lua_string(m) for m in modules)}}}\n"
           f"function process_message()\n{WALK}\nend\n")
    f = tmp / "walk.lua"
    f.write_text(src)
    sb, _ = lua_sandbox(f, kind, HostileHost(), instruction_limit=0, path=f"{tmp}/?.lua")
    return call_once(sb, kind)


@pytest.mark.parametrize("kind", ALL)
def test_nothing_forbidden_is_reachable(tmp_path: Path, kind: str) -> None:
    outcome = isolated(walk_in_child, tmp_path, kind)
    # the walk ends with an error that says how much it saw
    found = re.fullmatch(r"terminated: process_message\(\) walked (\d+)", outcome)
    assert found and int(found[1]) > 100, outcome


# ------------------------------------------------------------------------------------------------
# two plugins in one process
# ------------------------------------------------------------------------------------------------
VANDAL = r"""
-- changes everything it can reach
local s = require "string"
local cjson = require "cjson"
require "lpeg"
getmetatable("").__index.upper = function() return "pwned" end
getmetatable("").__add = function() return "pwned" end
s.format = function() return "pwned" end
cjson.encode = function() return "pwned" end
cjson.encode_number_precision(3)
local seen = {}
local function spoil(t)
    if type(t) == "function" then return spoil(getfenv(t)) end
    if type(t) ~= "table" or seen[t] then return end
    seen[t] = true
    for k, v in next, t do spoil(v) end
    rawset(t, "pwned", true)
    local mt = getmetatable(t)
    if type(mt) == "table" then spoil(mt) end
end
spoil(_G)
spoil(getmetatable(""))
function process_message() return 0 end
"""

VICTIM = r"""
local s = require "string"
local cjson = require "cjson"
local lpeg = require "lpeg"
function process_message()
    assert(("x"):upper() == "X", "string methods changed")
    assert(not pcall(function() return "a" + {} end), "string arithmetic changed")
    assert(s.format("%d", 7) == "7", "string.format changed")
    assert(cjson.encode({1.23456}) == "[1.23456]", "cjson changed")
    assert(lpeg.match(lpeg.P("a"), "a") == 2)
    local seen = {}
    local function clean(t, path)
        if type(t) ~= "table" or seen[t] then return end
        seen[t] = true
        if rawget(t, "pwned") ~= nil then error("another plugin changed " .. path, 0) end
        for k, v in next, t do clean(v, path .. "." .. tostring(k)) end
        local mt = getmetatable(t)
        if type(mt) == "table" then clean(mt, "getmetatable(" .. path .. ")") end
    end
    clean(_G, "_G")
    clean(getmetatable(""), "the string metatable")
    inject_message({Type = "clean"})
    return 0
end
"""


def two_plugins_in_child(tmp: Path, vandal_kind: str) -> list[str]:
    (tmp / "victim.lua").write_text(VICTIM)
    (tmp / "vandal.lua").write_text(VANDAL)
    path = f"{tmp}/?.lua"
    victim, vhost = lua_sandbox(tmp / "victim.lua", "analysis", path=path)  # loaded before the vandal
    vandal, _ = lua_sandbox(tmp / "vandal.lua", vandal_kind, path=path)
    later, lhost = lua_sandbox(tmp / "victim.lua", "analysis", path=path)  # and one after
    out = [call_once(vandal, vandal_kind)]
    for sb, host in ((victim, vhost), (later, lhost)):
        out.append(f"{call_once(sb, 'analysis')} {[m.type for m in host.messages()]}")
    return out


@pytest.mark.parametrize("vandal_kind", ALL)
def test_a_plugin_cannot_change_another(tmp_path: Path, vandal_kind: str) -> None:
    vandal, *victims = isolated(two_plugins_in_child, tmp_path, vandal_kind)
    assert vandal in ("returned 0", "returned ok")
    assert victims == ["returned ok ['clean']"] * 2


# ------------------------------------------------------------------------------------------------
# not over-tightened: what lua_sandbox gives inputs and outputs, and Lua's own semantics
# ------------------------------------------------------------------------------------------------
IO_ALLOWED = r"""
local os, io = require "os", require "io"
function process_message()
    local rc = os.execute("touch " .. read_config("marker"))
    assert(rc == 0 or rc == true, rc)
    local f = assert(io.open(read_config("written"), "w"))
    f:write("written")
    f:close()
    local ok, p = pcall(io.popen, "echo popen")
    if ok then -- lupa builds PUC Lua 5.1 without popen: "'popen' not supported"
        assert(p:read("*l") == "popen")
        p:close()
    else
        assert(p:find("'popen' not supported", 1, true), p)
    end
    assert(type(os.getenv("PATH")) == "string" and collectgarbage("count") > 0)
    local co = require "coroutine"
    local gen = co.wrap(function(a) local b = co.yield(a + 1); return b * 2 end)
    assert(gen(1) == 2 and gen(5) == 10)
    local c = co.create(function() error({code = 7}) end)
    local ok, e = co.resume(c)
    assert(not ok and e.code == 7 and co.status(c) == "dead")
    local ok2, e2 = pcall(co.wrap(function() error("inside", 0) end))
    assert(not ok2 and e2 == "inside", e2)
    local w = co.wrap(function() error("boom") end)
    ok2, e2 = pcall(function()
        w() -- Lua puts this line's position in front
    end)
    assert(e2:match("^.-io%.lua:%d+: .-io%.lua:%d+: boom$"), e2)
    ok2, e2 = pcall(co.create, 1)
    assert(e2 == "bad argument #1 to '?' (Lua function expected)", e2)
    assert(require("socket.core") and require("hindsight.elasticsearch").sender)
    return 0
end
"""


def io_allowed_in_child(tmp: Path, kind: str) -> str:
    f = tmp / "io.lua"
    f.write_text(IO_ALLOWED)
    cfg = f"marker = {lua_string(str(tmp / 'marker'))}\nwritten = {lua_string(str(tmp / 'written'))}\n"
    sb, _ = lua_sandbox(f, kind, cfg=cfg, path=f"{tmp}/?.lua")
    return call_once(sb, kind)


@pytest.mark.parametrize("kind", IO)
def test_inputs_and_outputs_keep_io_os_execute_and_coroutines(tmp_path: Path, kind: str) -> None:
    outcome = isolated(io_allowed_in_child, tmp_path, kind)
    assert outcome in ("returned 0", "returned ok"), outcome
    assert (tmp_path / "marker").exists() and (tmp_path / "written").read_text() == "written"


SEMANTICS = r"""
local s = require "string"
function process_message()
    assert(select("#", pcall(function() return 1, nil, 3, nil end)) == 5)
    local ok, e = pcall(error, {code = 1})
    assert(not ok and e.code == 1)
    ok, e = xpcall(function() error("x", 0) end, function(m) return "handled " .. m end)
    assert(not ok and e == "handled x")
    assert(select("#", xpcall(function() return nil, 2 end, print)) == 3)
    assert(getmetatable("").__index == s and ("abc"):upper() == "ABC" and s.dump == nil)
    assert(getfenv(0) == _G and getfenv(1) == _G and getfenv(process_message) == _G)
    local f = function() return x_global end
    setfenv(f, {x_global = 5})
    assert(f() == 5)
    assert(require("lpeg").match(require("re").compile("{[a-z]+}"), "abc1") == "abc")
    assert(require("cjson").decode('{"a":1}').a == 1)
    return 0
end
"""


def semantics_in_child(tmp: Path, kind: str) -> str:
    f = tmp / "sem.lua"
    f.write_text(SEMANTICS)
    sb, _ = lua_sandbox(f, kind, path=f"{tmp}/?.lua")
    return call_once(sb, kind)


@pytest.mark.parametrize("kind", ALL)
def test_the_sandboxs_pcall_getfenv_and_strings_behave_as_lua(tmp_path: Path, kind: str) -> None:
    assert isolated(semantics_in_child, tmp_path, kind) in ("returned 0", "returned ok")


# ------------------------------------------------------------------------------------------------
# defence in depth: Python objects, host code
# ------------------------------------------------------------------------------------------------
def python_object_in_child(tmp: Path) -> str:
    f = tmp / "py.lua"
    f.write_text("""
        function process_message()
            local ok, e = pcall(function() return pyfunc.__globals__ end)
            assert(not ok, "read an attribute of a Python object")
            ok, e = pcall(function() pyfunc.x = 1 end)
            assert(not ok, "set an attribute of a Python object")
            return pyfunc(2)
        end
    """)
    sb, _ = lua_sandbox(f, "input", load=False)
    sb.globals_table()[b"pyfunc"] = lambda n: n - 2  # as the upstream test harness adds functions
    sb.load()
    return call_once(sb, "input")


def test_lua_reads_no_attribute_of_a_python_object(tmp_path: Path) -> None:
    assert isolated(python_object_in_child, tmp_path) == "returned 0"


GLOBALS_CHECK = r"""
import sys
import lupa.luajit21 as lj
rt = lj.LuaRuntime(encoding=None)
check = rt.execute('''
local util, bit = require "jit.util", require "bit"
local function first_proto(src)
    local f = assert(loadstring(src))
    for n = -1, -100, -1 do local k = util.funck(f, n) if type(k) == "proto" then return k end end
end
local function op(p, pc) return bit.band(util.funcbc(p, pc), 0xff) end
local GGET, GSET = op(first_proto("return function() return g end"), 1), op(first_proto("return function() g = 1 end"), 2)
return function(src, name)
    local out = {}
    local function walk(p, depth)
        local pc = 0
        while util.funcbc(p, pc) do
            local o = op(p, pc)
            if depth > 0 and (o == GGET or o == GSET) then
                local k = util.funck(p, -bit.rshift(util.funcbc(p, pc), 16) - 1)
                out[#out + 1] = name .. ":" .. util.funcinfo(p, pc).currentline .. " " .. tostring(k)
            end
            pc = pc + 1
        end
        for n = -1, -1e6, -1 do
            local k = util.funck(p, n)
            if k == nil then break end
            if type(k) == "proto" then walk(k, depth + 1) end
        end
    end
    walk(assert(loadstring(src)), 0)
    return table.concat(out, " ")
end
''')
for path in sys.argv[1:]:
    print(check(open(path, "rb").read(), path.encode()).decode())
"""


def test_host_lua_reads_no_global_at_run_time() -> None:
    """Only the top level of the host's Lua files (run once, before any plugin code) reads globals
    (the outputs' Lua extensions are host code too):
    a function of theirs that did would read the plugin's (and fail on the empty host_env)."""
    package = Path(__file__).resolve().parent.parent / "hindsight_py"
    files = [str(p) for p in sorted((package / "sandbox").glob("*.lua"))]  # env.lua, its parts, the codecs
    files += [str(p) for p in sorted((package / "outputs").glob("*.lua"))]  # outputs' Lua extensions
    # LuaJIT's bytecode tells global reads apart; one flavour per process, so in a child
    out = subprocess.run([sys.executable, "-c", GLOBALS_CHECK, *files], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [], out.stdout


# ------------------------------------------------------------------------------------------------
# hindsight_cli
# ------------------------------------------------------------------------------------------------
def test_cli_hostile_analysis_plugin_is_terminated_and_the_others_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    root = cli_layout(tmp_path, {
        **GEN,
        "analysis/hostile.cfg": f'filename = "hostile.lua"\nmessage_matcher = "TRUE"\nmarker = {lua_string(str(marker))}\n',
        "analysis/hostile.lua": PRELUDE + """
            function process_message()
                pcall(function() getfenv(0).os.execute(CMD) end)
                pcall(function() python.eval("__import__('os').system('touch " .. M .. "')") end)
                for k, f in pairs(_G) do
                    if type(f) == "function" then use(getfenv(f), k) end
                end
                require("io").open(M, "w")
            end
            function timer_event() end
        """,
    })
    # this checkout's hindsight_cli (beside the interpreter), whatever PATH holds
    result = subprocess.run([hindsight_cli(), "hindsight.cfg"], cwd=root, capture_output=True, text=True,
                            timeout=HANG_GUARD, stdin=subprocess.DEVNULL)
    assert result.returncode == 4, result.stderr
    err = (root / "run" / "analysis" / "hostile.err").read_text().split("\t", 1)[1].strip()
    assert "module 'io' disabled" in err and "ESCAPED" not in err, err
    assert f"analysis.hostile terminated: {err}" in result.stderr
    assert not marker.exists()
    assert "output.sink" not in "".join(line for line in result.stderr.splitlines() if "[error]" in line)
