"""The project's own Lua modules (hindsight_py/lua), the cjson shim and the run/ plugins.

They run in a small harness that imitates what a lua_sandbox plugin sees: a base-library-only
environment, a `require` that makes `string`/`table`/... globals only when required, loads
modules with the plugin's globals as their environment, gives cjson through the shim, and stubs
for read_config/read_message/inject_message/... Upstream's own test scripts and modules are run
from the fetched sources (`upstream` marker; tests/upstream_files.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import CLOUDTRAIL_NDJSON
from upstream_files import CLOUDTRACKER, LUA_SANDBOX_EXTENSIONS, read_bytes

from hindsight_py._lupa import SYSTEM_LUA_CPATH, SYSTEM_LUA_PATH, LuaError, LuaRuntime

ROOT = Path(__file__).resolve().parent.parent
LUA_DIR = ROOT / "hindsight_py" / "lua"
SHIM = ROOT / "hindsight_py" / "sandbox" / "cjson_shim.lua"
RUN_DIR = ROOT / "run"
SYSTEM_PATH = SYSTEM_LUA_PATH
SYSTEM_CPATH = SYSTEM_LUA_CPATH  # the machine's multiarch directory

# Builds plugin environments. Arguments: the shim chunk's result.
_HARNESS = r"""
local cjson_shim = ...
package.cpath = CPATH
local lpeg_c = require "lpeg"
local cjson_c = require "cjson"
local builtin = {string = string, table = table, math = math, os = os, io = io, coroutine = coroutine}
local BASE = {"assert", "error", "getfenv", "getmetatable", "ipairs", "next", "pairs", "pcall", "print",
    "rawequal", "rawget", "rawset", "select", "setfenv", "setmetatable", "tonumber", "tostring", "type",
    "unpack", "xpcall", "_VERSION", "collectgarbage", "gcinfo"}

local function search(path, name)
    local file = name:gsub("%.", "/")
    for pattern in path:gmatch("[^;]+") do
        local candidate = pattern:gsub("%?", file)
        local fh = io.open(candidate, "rb")
        if fh then fh:close(); return candidate end
    end
end

-- opts: path, cfg, message, preload, deny, output_limit, inject_limit, dead_letter
return function(opts)
    local env, loaded = {}, {}
    for _, k in ipairs(BASE) do env[k] = _G[k] end
    env._G = env
    local cfg = opts.cfg or {}
    local injected, checkpoints, dead = {}, {}, {}

    function env.require(name)
        local v = loaded[name]
        if v ~= nil then return v end
        local lib = builtin[name]
        if lib then loaded[name] = lib; env[name] = lib; return lib end
        if opts.deny and opts.deny[name] then error("module '" .. name .. "' not found", 2) end
        local result
        if opts.preload and opts.preload[name] ~= nil then
            result = opts.preload[name]
            if type(result) == "function" then result = result(env) end
        elseif name == "lpeg" then
            result = lpeg_c
        elseif name == "cjson" then
            result = cjson_shim(cjson_c.new(), {output_limit = opts.output_limit or 0})
        elseif name == "zlib" then
            result = require "zlib" -- Debian's lua-zlib, as the sandbox loads it
        else
            local file = search(opts.path, name)
            if not file then error("module '" .. name .. "' not found", 2) end
            local chunk = assert(loadfile(file))
            setfenv(chunk, env)
            result = chunk(name)
        end
        if result == nil then result = true end
        loaded[name] = result
        if not name:find(".", 1, true) and type(result) == "table" and rawget(env, name) == nil then
            env[name] = result
        end
        return result
    end

    function env.read_config(k) return cfg[k] end

    function env.read_message(name, fi, ai)
        local msg = opts.message
        if not msg then return nil end
        local field = name:match("^Fields%[(.+)%]$")
        if not field then return msg[name] end
        local v = msg.Fields and msg.Fields[field]
        if type(v) == "table" then return v[(ai or 0) + 1] end
        return v
    end

    function env.inject_message(msg, cp)
        if msg == nil and cp == nil then error("message cannot be nil without a checkpoint update", 2) end
        if msg ~= nil then
            local size = type(msg.Payload) == "string" and #msg.Payload or 0
            if type(msg.Fields) == "table" and type(msg.Fields.data) == "table" then
                size = size + #msg.Fields.data.value
            end
            if opts.inject_limit and size > opts.inject_limit then
                error("inject_message() failed: exceeded output_limit", 0) -- a C function's error: no position
            end
            local copy = {}
            for k, v in pairs(msg) do copy[k] = v end
            if type(msg.Fields) == "table" then
                local f = {}
                for k, v in pairs(msg.Fields) do f[k] = v end
                copy.Fields = f
            end
            injected[#injected + 1] = copy
        end
        if cp ~= nil then checkpoints[#checkpoints + 1] = cp end
    end

    if opts.dead_letter then
        function env.dead_letter(reason, data) dead[#dead + 1] = {reason = reason, data = data} end
    end

    local function run(code, ...)
        local chunk = assert(loadstring(code))
        setfenv(chunk, env)
        return chunk(...)
    end

    local function load_plugin(file)
        local chunk = assert(loadfile(file))
        setfenv(chunk, env)
        chunk()
    end

    return {env = env, run = run, load_plugin = load_plugin, injected = injected,
        checkpoints = checkpoints, dead = dead, loaded = loaded}
end
"""


def _to_lua(rt: LuaRuntime, value: Any) -> Any:
    """Python data as Lua data: str -> bytes, dict/list -> tables (lists 1-based)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, Mapping):
        t = rt.table()
        for k, v in value.items():
            t[_to_lua(rt, k)] = _to_lua(rt, v)
        return t
    if isinstance(value, list | tuple):
        t = rt.table()
        for i, v in enumerate(value, 1):
            t[i] = _to_lua(rt, v)
        return t
    return value


def _to_py(value: Any) -> Any:
    """Lua data as Python: bytes -> str, tables -> dicts (sequences -> lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if hasattr(value, "items") and callable(value.items):
        d = {_to_py(k): _to_py(v) for k, v in value.items()}
        if d and all(isinstance(k, int) for k in d) and sorted(d) == list(range(1, len(d) + 1)):
            return [d[i] for i in range(1, len(d) + 1)]
        return d
    return value


class Sandbox:
    """One plugin environment in its own Lua runtime."""

    def __init__(
        self,
        *,
        path: Iterable[Path | str] = (LUA_DIR / "?.lua", SYSTEM_PATH),
        cfg: Mapping[str, Any] | None = None,
        message: Mapping[str, Any] | None = None,
        preload: Mapping[str, str] | None = None,
        deny: Iterable[str] = (),
        output_limit: int = 0,
        inject_limit: int | None = None,
        dead_letter: bool = False,
    ) -> None:
        self.rt = LuaRuntime(encoding=None, unpack_returned_tuples=True)
        self.rt.execute(f"CPATH = {json.dumps(SYSTEM_CPATH)}")
        shim = self.rt.execute(SHIM.read_text())
        factory = self.rt.execute(_HARNESS, shim)
        opts = self.rt.table()
        opts[b"path"] = ";".join(str(p) for p in path).encode()
        opts[b"cfg"] = _to_lua(self.rt, dict(cfg or {}))
        opts[b"deny"] = _to_lua(self.rt, {name: True for name in deny})
        opts[b"output_limit"] = output_limit
        opts[b"dead_letter"] = dead_letter
        if inject_limit is not None:
            opts[b"inject_limit"] = inject_limit
        if preload:
            modules = self.rt.table()
            for name, code in preload.items():
                modules[name.encode()] = self.rt.execute(code)
            opts[b"preload"] = modules
        self._opts = opts
        self.set_message(message)
        self.h = factory(opts)

    def set_message(self, message: Mapping[str, Any] | None) -> None:
        """The message read_message sees from now on (None: no active message)."""
        self._opts[b"message"] = None if message is None else _to_lua(self.rt, dict(message))

    def run(self, code: str, *args: Any) -> Any:
        """Runs a chunk in the plugin environment; `...` are the args (Python data converted)."""
        return self.h.run(code.encode(), *[_to_lua(self.rt, a) for a in args])

    def load_plugin(self, file: Path) -> None:
        self.h.load_plugin(str(file).encode())

    @property
    def env(self) -> Any:
        return self.h.env

    @property
    def injected(self) -> list[dict[str, Any]]:
        return _to_py(self.h.injected) or []

    @property
    def checkpoints(self) -> list[Any]:
        return _to_py(self.h.checkpoints) or []

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return _to_py(self.h.dead) or []


def _bare_cfg(path: Path) -> dict[str, Any]:
    """A .cfg file evaluated as hindsight does: Lua with no libraries at all."""
    rt = LuaRuntime(encoding=None, unpack_returned_tuples=True)
    run = rt.eval(
        "function(text) local f = assert(loadstring(text)); local env = {}; setfenv(f, env); f(); return env end"
    )
    return _to_py(run(path.read_bytes()))


# 2024-07-30T21:31:21.5Z; a double holds it exactly (as upstream, timestamps are Lua numbers)
ISO_TS_NS = 1722375081 * 10**9 + 500_000_000
CLOUDTRACKER_COMMON = {"es_index_from_timestamp": True, "index": "cloudtrail", "type_name": "doc"}


def _encoder(
    common: Mapping[str, Any] | None, message: Mapping[str, Any] | None = None, **kw: Any
) -> Sandbox:
    cfg = {} if common is None else {"encoders_elasticsearch_common": dict(common)}
    return Sandbox(cfg=cfg, message=message, **kw)


# -- encoders.elasticsearch.common / payload ------------------------------------------------------


def test_action_line_for_the_cloudtracker_cfg() -> None:
    sb = _encoder(CLOUDTRACKER_COMMON, {"Payload": '{"eventID":"x"}', "Timestamp": ISO_TS_NS})
    out = sb.run('return require("encoders.elasticsearch.payload").encode()')
    assert out == b'{"index":{"_index":"cloudtrail","_type":"doc"}}\n{"eventID":"x"}\n'


def test_payload_gets_exactly_one_trailing_newline() -> None:
    sb = _encoder(CLOUDTRACKER_COMMON)
    encode = sb.run('return require("encoders.elasticsearch.payload").encode')
    action = b'{"index":{"_index":"cloudtrail","_type":"doc"}}\n'
    sb.set_message({"Payload": "{}\n"})
    assert encode() == action + b"{}\n"
    sb.set_message({"Payload": "{}"})
    assert encode() == action + b"{}\n"
    sb.set_message({"Payload": "{}\n\n"})
    assert encode() == action + b"{}\n\n"
    sb.set_message({"Type": "no payload"})
    assert encode() is None


def test_index_type_and_id_interpolation() -> None:
    common = {
        "es_index_from_timestamp": True,
        "index": "%{Logger}-%{%Y.%m.%d}",
        "type_name": "%{Type}-%{Hostname}",
        "id": "%{eventID}",
    }
    message = {
        "Payload": "{}",
        "Timestamp": ISO_TS_NS,
        "Logger": "Input.FILE",
        "Type": "CloudTrail",
        "Hostname": "Host.Example",
        "Fields": {"eventID": "AbC-1"},
    }
    sb = _encoder(common, message)
    out = sb.run('return require("encoders.elasticsearch.payload").encode()')
    # only _index is lowercased
    assert (
        out
        == b'{"index":{"_index":"input.file-2024.07.30","_type":"CloudTrail-Host.Example","_id":"AbC-1"}}\n{}\n'
    )
    sb.set_message({**message, "Timestamp": ISO_TS_NS + 86400 * 10**9, "Fields": {"eventID": "two"}})
    out = sb.run('return require("encoders.elasticsearch.payload").encode()')
    assert out.startswith(
        b'{"index":{"_index":"input.file-2024.07.31","_type":"CloudTrail-Host.Example","_id":"two"}}'
    )


def test_strftime_uses_the_current_time_unless_es_index_from_timestamp() -> None:
    import time

    before = time.strftime("%Y", time.gmtime())
    sb = _encoder({"index": "idx-%{%Y}"}, {"Payload": "{}", "Timestamp": 0})
    out = sb.run('return require("encoders.elasticsearch.payload").encode()')
    after = time.strftime("%Y", time.gmtime())
    assert out in (
        f'{{"index":{{"_index":"idx-{before}","_type":"message"}}}}\n{{}}\n'.encode(),
        f'{{"index":{{"_index":"idx-{after}","_type":"message"}}}}\n{{}}\n'.encode(),
    )


def test_load_encoder_cfg_defaults_are_written_into_the_sandbox_cfg() -> None:
    sb = _encoder({})
    got = sb.run(
        """
        local common = require "encoders.elasticsearch.common"
        local cfg = common.load_encoder_cfg()
        local again = read_config("encoders_elasticsearch_common")
        return cfg == again, again.index, again.type_name, again.es_index_from_timestamp, again.id
        """
    )
    assert got == (True, b"heka-%{%Y.%m.%d}", b"message", False, None)


@pytest.mark.parametrize(
    ("common", "error"),
    [
        (None, "encoders_elasticsearch_common must be a table"),
        ({"es_index_from_timestamp": "yes"}, "es_index_from_timestamp must be nil or boolean"),
        ({"index": 5}, "index must be nil or a string"),
        ({"type_name": True}, "type_name must be nil or a string"),
    ],
)
def test_load_encoder_cfg_validation_messages(common: Mapping[str, Any] | None, error: str) -> None:
    sb = _encoder(common)
    ok, err = sb.run('return pcall(require, "encoders.elasticsearch.payload")')
    assert ok is False
    assert err == error.encode()


def test_action_line_keys_escapes_and_nil_keys() -> None:
    sb = _encoder({})
    bulk = sb.run('return require("encoders.elasticsearch.common").bulkapi_index_json')
    assert bulk(None, None, None) == b'{"index":{}}'
    assert bulk(b"Only", None, None) == b'{"index":{"_index":"only"}}'
    assert bulk(None, b"t", b"i") == b'{"index":{"_type":"t","_id":"i"}}'
    # cjson's escaping: "/" and quotes are escaped
    assert bulk(b"A/B", b'say "hi"', None) == b'{"index":{"_index":"a\\/b","_type":"say \\"hi\\""}}'
    # the constant line is cached per argument set, never across different arguments
    assert bulk(b"x", b"doc", None) == b'{"index":{"_index":"x","_type":"doc"}}'
    assert bulk(b"x", None, None) == b'{"index":{"_index":"x"}}'


# -- heka.msg_interpolate ---------------------------------------------------------------------------


def test_interpolate_headers_fields_and_strftime() -> None:
    message = {
        "Uuid": bytes(range(16)),
        "Timestamp": ISO_TS_NS,
        "Type": "t",
        "Logger": "l",
        "Severity": 6,
        "Payload": "p",
        "EnvVersion": "1",
        "Pid": 42,
        "Fields": {"s": "str", "n": 1.5, "b": False, "arr": ["a0", "a1"]},
    }
    sb = Sandbox(message=message)
    mi = sb.run('return require("heka.msg_interpolate")')
    interpolate = mi.interpolate

    def interp(text: str, secs: float | None = None) -> bytes:
        return interpolate(text.encode(), secs)[0]

    assert interp("%{Uuid}") == b"00010203-0405-0607-0809-0A0B0C0D0E0F"
    assert interp("%{Timestamp}") == b"2024-07-30T21:31:21.500000000Z"
    assert interp("%{Type}/%{Logger}/%{Severity}/%{Payload}/%{EnvVersion}/%{Pid}") == b"t/l/6/p/1/42"
    assert interp("%{s}-%{n}-%{b}") == b"str-1.5-false"
    assert interp("%{Fields[s]}") == b"str"
    assert interp("%{arr}") == b"a0"
    # Hostname is absent and "nope" is neither a field nor a strftime pattern: left as written
    assert interp("%{Hostname}|%{nope}") == b"%{Hostname}|%{nope}"
    assert interp("%{%Y-%m-%dT%H:%M:%S}", 86400.9) == b"1970-01-02T00:00:00"
    assert interpolate(b"plain", None) == (b"plain", 0)
    assert interpolate(b"%{Type}%{Type}", None) == (b"tt", 2)
    assert mi.get_timestamp_ms(ISO_TS_NS) == b"2024-07-30T21:31:21.500Z"


def test_interpolate_without_an_active_message_uses_strftime_only() -> None:
    sb = Sandbox(message=None)
    out = sb.run('return (require("heka.msg_interpolate").interpolate("%{Type}-%{%Y}", 0))')
    assert out == b"%{Type}-1970"


# -- decoders.payload / lpeg.sub_decoder_util -------------------------------------------------------


def test_payload_decoder_copies_default_headers() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        local decode = require("decoders.payload").decode
        local defaults = {Type = "cloudtrail", Hostname = "h", Fields = {env = "prod"}}
        decode("line 1", defaults)
        decode("line 2")
        local same = {Type = "reused"}
        decode("line 3", same, true)
        return defaults.Payload, defaults.Fields.Payload, same.Payload
        """
    )
    assert got == (None, None, b"line 3")
    assert sb.injected == [
        {"Type": "cloudtrail", "Hostname": "h", "Payload": "line 1", "Fields": {"env": "prod"}},
        {"Payload": "line 2"},
        {"Type": "reused", "Payload": "line 3"},
    ]


def test_copy_message_and_add_fields() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        local sdu = require "lpeg.sub_decoder_util"
        local a, b = sdu.copy_message(nil), sdu.copy_message(nil)
        local src = {Uuid = "u", Timestamp = 1, Severity = 3, Pid = 9, EnvVersion = "e", Other = "dropped",
            Fields = {x = {value = 1, value_type = 2}}}
        local c = sdu.copy_message(src)
        local fields_shared = c.Fields.x == src.Fields.x and c.Fields ~= src.Fields
        local m = {}
        sdu.add_fields(m, {k = 1})
        sdu.add_fields(m, {k = 2, j = 3})
        return a ~= b and next(a) == nil, c.Other, c.Uuid, c.Pid, fields_shared, m.Fields.k, m.Fields.j,
            sdu.copy_message(src, true) == src, sdu.load_sub_decoder == sdu.load_decoder
        """
    )
    assert got == (True, None, b"u", 9, True, 2, 3, True, True)


GRAMMAR_MODULE = """
local l = require "lpeg"
local pair = l.Cg(l.C((1 - l.S"= ")^1) * "=" * l.C((1 - l.P" ")^0))
return {
    grammar = l.Cf(l.Ct("") * pair * (" " * pair)^0, rawset) * -1,
    status = l.Ct(l.Cg(l.P"Status: " * l.C(l.R"09"^1) / tonumber, "status")),
    with_arg = l.Ct(l.Cg(l.P"x" * l.Carg(1), "arg")),
    build = function(word) return l.Ct(l.Cg(l.C(l.P(word)), "word")) end,
}
"""

XFORM_MODULE = """
return {upper = function(msg, field) msg[field] = string.upper(msg[field]) end,
        tag = function(msg, field) msg.Fields = msg.Fields or {}; msg.Fields[field] = "tagged" end}
"""


def test_load_decoder_with_module_and_grammar_references() -> None:
    sb = Sandbox(preload={"g": GRAMMAR_MODULE, "xform": XFORM_MODULE})
    got = sb.run(
        """
        local sdu = require "lpeg.sub_decoder_util"
        local payload = sdu.load_decoder("decoders.payload")
        local grammar = sdu.load_decoder("g")
        local fail = grammar("not a pair list")
        grammar("a=1 b=2", {Type = "kv"})
        local pick = sdu.load_decoder({ {{"g#status"}, {Type = "xform#upper"}}, {{"g#with_arg", "A"}},
            {{"g#build", "hello"}}, "<<FAIL>>" })
        pick("Status: 200", {Type = "http"})
        pick("x")
        pick("hello")
        local nomatch = pick("nothing")
        local drop = sdu.load_decoder({ {{"g#status"}}, "<<DROP>>" })
        local dropped = drop("nothing")
        local keep = sdu.load_decoder({ {{"g#status"}} })
        keep("unparsed")
        return payload == require("decoders.payload").decode, fail, nomatch, dropped
        """
    )
    assert got == (True, b"parse failed", b"parse failed", None)
    assert sb.injected == [
        {"Type": "kv", "Fields": {"a": "1", "b": "2"}},
        {"Type": "HTTP", "Payload": "Status: 200", "Fields": {"status": 200}},
        {"Payload": "x", "Fields": {"arg": "A"}},
        {"Payload": "hello", "Fields": {"word": "hello"}},
        {"Payload": "unparsed"},
    ]


def test_decoder_transformations_apply_to_what_the_decoder_injects() -> None:
    sb = Sandbox(preload={"xform": XFORM_MODULE})
    sb.run(
        """
        local sdu = require "lpeg.sub_decoder_util"
        local cfg = { {"decoders.payload", {Payload = "xform#upper", origin = "xform#tag"}} }
        local decode = sdu.load_decoder(cfg)
        decode("shout")
        assert(cfg[1][2].Payload == "xform#upper", "the cfg table is left as it is")
        assert(inject_message ~= nil and pcall(inject_message, nil) == false, "the real inject_message is back")
        """
    )
    assert sb.injected == [{"Payload": "SHOUT", "Fields": {"origin": "tagged"}}]


def test_load_sub_decoders_default_entry_and_errors() -> None:
    sb = Sandbox(preload={"g": GRAMMAR_MODULE}, deny=["lpeg.printf"])
    got = sb.run(
        """
        local sdu = require "lpeg.sub_decoder_util"
        local sds = sdu.load_sub_decoders({kv = "g", ["*"] = "decoders.payload"})
        local default_is_payload = sds.anything == require("decoders.payload").decode
        local e = {}
        e[1] = select(2, pcall(sdu.load_decoder, {"a sample message"}))
        e[2] = select(2, pcall(sdu.load_decoder, "g#nothing"))
        e[3] = select(2, pcall(sdu.load_decoder, 5))
        e[4] = select(2, pcall(sdu.load_decoder, { {{"g#status"}, {f = "nomodule"}} }))
        return default_is_payload, sds.kv ~= nil, e[1], e[2], e[3], e[4]
        """
    )
    assert got[:2] == (True, True)
    assert got[2].startswith(b"sample messages and printf specifications need the lpeg.printf module")
    assert got[3:] == (
        b"sub_decoder, no grammar defined: ",
        b"sub_decoder:  invalid type: number",
        b"invalid transformation function f=nomodule",
    )


# -- rjson ------------------------------------------------------------------------------------------

RJSON_DUMP = """
local function dump(doc, h)
    h = h or doc:find()
    local t = doc:type(h)
    if t == "object" or t == "array" then
        local items = {}
        for k, v in doc:iter(h) do items[#items + 1] = {k, dump(doc, v)} end
        return {t = t, n = doc:size(h), items = items}
    elseif t == "string" then
        return {t = t, v = doc:value(h), n = doc:size(h)}
    elseif t == "null" then
        return {t = t, isnil = doc:value(h) == nil}
    end
    return {t = t, v = doc:value(h)}
end
return dump
"""


def _expected_dump(value: Any) -> Any:
    """What RJSON_DUMP gives for a value parsed by json.loads(object_pairs_hook=list)."""
    if isinstance(value, _Obj):
        return {"t": "object", "n": len(value), "items": [[k, _expected_dump(v)] for k, v in value] or {}}
    if isinstance(value, list):
        return {
            "t": "array",
            "n": len(value),
            "items": [[i, _expected_dump(v)] for i, v in enumerate(value)] or {},
        }
    if value is None:
        return {"t": "null", "isnil": True}
    if isinstance(value, bool):
        return {"t": "boolean", "v": value}
    if isinstance(value, int | float):
        return {"t": "number", "v": float(value)}
    return {"t": "string", "v": value, "n": len(value.encode())}


class _Obj(list):
    """A JSON object as its ordered (key, value) pairs."""


def _normalise_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise_numbers(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


@pytest.fixture(scope="module")
def cloudtrail_lines() -> list[bytes]:
    return [line for line in CLOUDTRAIL_NDJSON.read_bytes().split(b"\n") if line]


@pytest.mark.parametrize("with_lpeg", [True, False], ids=["lpeg-fast-path", "pure-lua"])
def test_rjson_walks_real_cloudtrail_records_like_python_json(
    cloudtrail_lines: list[bytes], with_lpeg: bool
) -> None:
    sb = Sandbox(deny=() if with_lpeg else ["lpeg"])
    dump = sb.run(RJSON_DUMP)
    parse = sb.run('require "rjson"; return rjson.parse')
    nulls = 0
    for line in cloudtrail_lines:
        doc = parse(line)
        got = _normalise_numbers(_to_py(dump(doc)))
        expected = _normalise_numbers(_expected_dump(json.loads(line, object_pairs_hook=_Obj)))
        assert got == expected
        nulls += line.count(b":null")
    assert nulls > 0, "the sample must exercise JSON null"


def test_rjson_fast_path_and_pure_lua_build_identical_documents(cloudtrail_lines: list[bytes]) -> None:
    code = 'require "rjson"; return function(s, v) return rjson.parse(s, v):make_field().value end'
    fast = Sandbox().run(code)
    slow = Sandbox(deny=["lpeg"]).run(code)
    for line in cloudtrail_lines:
        text = fast(line, False)
        assert text == slow(line, False) == fast(line, True)
        assert json.loads(text, object_pairs_hook=_Obj) == json.loads(line, object_pairs_hook=_Obj)


def test_rjson_find_value_type_size(cloudtrail_lines: list[bytes]) -> None:
    sb = Sandbox()
    record = next(line for line in cloudtrail_lines if b'"resources":[' in line)
    py = json.loads(record)
    got = sb.run(
        """
        require "rjson"
        local doc = rjson.parse(...)
        local r0 = doc:find("resources", 0)
        local arn = doc:find(r0, "ARN")
        return doc:value(doc:find("eventName")), doc:value(doc:find("userIdentity", "type")),
            doc:type(doc:find("resources")), doc:size(doc:find("resources")), doc:value(arn),
            doc:find("resources", "ARN"), doc:find("eventName", 0), doc:find("resources", -1),
            doc:find("resources", 1e9), doc:find("missing"), doc:find() == doc:find(),
            doc:find("resources", 0) == r0, doc:find("eventName") == doc:find("eventName"),
            doc:size(doc:find("eventName")), doc:type()
        """,
        record,
    )
    assert got == (
        py["eventName"].encode(),
        py["userIdentity"]["type"].encode(),
        b"array",
        len(py["resources"]),
        py["resources"][0]["ARN"].encode(),
        None,
        None,
        None,
        None,
        None,
        True,
        True,
        True,
        len(py["eventName"].encode()),
        b"object",
    )


def test_rjson_null_and_value_errors() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        require "rjson"
        local doc = rjson.parse('{"n":null,"o":{},"a":[],"t":true,"x":1.5}')
        local n = doc:find("n")
        local e = {}
        for i, key in ipairs({"o", "a"}) do e[i] = select(2, pcall(doc.value, doc, doc:find(key))) end
        e[3] = select(2, pcall(doc.size, doc, n))
        e[4] = select(2, pcall(doc.size, doc, doc:find("t")))
        e[5] = select(2, pcall(doc.size, doc, doc:find("x")))
        e[6] = select(2, pcall(doc.iter, doc, doc:find("x")))
        return doc:type(n), doc:value(n), doc:type(doc:find("o")), doc:type(doc:find("a")), doc:size(doc:find("a")),
            doc:value(doc:find("x")), doc:value(nil), unpack(e)
        """
    )
    assert got == (
        b"null",
        None,
        b"object",
        b"array",
        0,
        1.5,
        None,
        b"value() not allowed on an object",
        b"value() not allowed on an array",
        b"attempt to get length of a NULL",
        b"attempt to get length of a boolean",
        b"attempt to get length of a number",
        b"iter() not allowed on a primitive type",
    )


@pytest.mark.parametrize(
    ("text", "offset", "reason"),
    [
        ("", 0, "The document is empty."),
        ("  \n", 3, "The document is empty."),
        ("{", 1, "Missing a name for object member."),
        ('{"a" 1}', 5, "Missing a colon after a name of object member."),
        ('{"a":1 "b":2}', 7, "Missing a comma or '}' after an object member."),
        ("[1 2]", 3, "Missing a comma or ']' after an array element."),
        ("[1,]", 3, "Invalid value."),
        ("tru", 3, "Invalid value."),
        ("nul!", 3, "Invalid value."),
        ("-x", 1, "Invalid value."),
        ("[01]", 2, "Missing a comma or ']' after an array element."),
        ("1.", 2, "Miss fraction part in number."),
        ("1e+", 3, "Miss exponent in number."),
        ("1e400", 0, "Number too big to be stored in double."),
        ("[1] x", 4, "The document root must not be followed by other values."),
        ('"abc', 4, "Missing a closing quotation mark in string."),
        ('["a\\x"]', 3, "Invalid escape character in string."),
        ('"\\u12G4"', 1, "Incorrect hex digit after \\u escape in string."),
        ('"\\uD800\\u0041"', 1, "The surrogate pair in string is invalid."),
        ('"a\tb"', 2, "Invalid encoding in string."),
    ],
)
@pytest.mark.parametrize("with_lpeg", [True, False], ids=["lpeg-fast-path", "pure-lua"])
def test_rjson_parse_errors_are_rapidjson_texts(text: str, offset: int, reason: str, with_lpeg: bool) -> None:
    sb = Sandbox(deny=() if with_lpeg else ["lpeg"])
    ok, err = sb.run('require "rjson"; return pcall(rjson.parse, ...)', text)
    assert ok is False
    assert err == f"failed to parse offset:{offset} {reason}".encode()


@pytest.mark.parametrize("with_lpeg", [True, False], ids=["lpeg-fast-path", "pure-lua"])
def test_rjson_accepts_what_rapidjson_accepts(with_lpeg: bool) -> None:
    sb = Sandbox(deny=() if with_lpeg else ["lpeg"])
    got = sb.run(
        """
        require "rjson"
        local function v(s, ...) local d = rjson.parse(s); return d:value(d:find(...)) end
        return v("[1e308]", 0), v("-0.5e-2"), v('"\\\\u00e9\\\\ud83d\\\\ude00\\\\/\\\\n"'), v('"\\\\udc00"'),
            v("[1]\\0 trailing bytes after a NUL are ignored", 0), v(string.rep("9", 250)) > 1e249,
            v(' {"dup":1,"dup":2} ', "dup"), v('"\\127"'), v("true"), v("false")
        """
    )
    assert got == (
        1e308,
        -0.005,
        "\u00e9\U0001f600/\n".encode(),
        b"\xed\xb0\x80",
        1,
        True,
        1,
        b"\x7f",
        True,
        False,
    )


@pytest.mark.parametrize("with_lpeg", [True, False], ids=["lpeg-fast-path", "pure-lua"])
def test_rjson_utf8_validation_only_when_asked(with_lpeg: bool) -> None:
    sb = Sandbox(deny=() if with_lpeg else ["lpeg"])
    got = sb.run(
        """
        require "rjson"
        local bad = '{"f\\240o":"bar"}'
        local ok1 = pcall(rjson.parse, bad)
        local ok2, err2 = pcall(rjson.parse, bad, true)
        local ok3 = pcall(rjson.parse, '"\\226\\130\\172 \\240\\159\\152\\128"', true)
        local ok4, err4 = pcall(rjson.parse, '"\\192\\128"', true)
        return ok1, ok2, err2, ok3, ok4, err4
        """
    )
    assert got == (
        True,
        False,
        b"failed to parse offset:3 Invalid encoding in string.",
        True,
        False,
        b"failed to parse offset:1 Invalid encoding in string.",
    )


def test_rjson_handles_belong_to_their_doc() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        require "rjson"
        local doc = rjson.parse('{"a":{"b":[1,2,3]},"s":"x"}')
        local other = rjson.parse('{"a":1}')
        local e = {}
        e[1] = select(2, pcall(doc.value, doc, other:find("a")))
        e[2] = select(2, pcall(doc.find, doc, other, "a"))
        local b = doc:find("a", "b")
        local it = doc:iter(b)
        local i1 = it()
        doc:parse('{"new":true}')
        e[3] = select(2, pcall(it))
        e[4] = select(2, pcall(doc.type, doc, b))
        return i1, doc:value(doc:find("new")), unpack(e)
        """
    )
    assert got == (
        0,
        True,
        b"invalid value",
        b"invalid value",
        b"iterator has been invalidated",
        b"invalid value",
    )


def test_rjson_remove_and_remove_shallow() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        require "rjson"
        local doc = rjson.parse('{"keep":1,"obj":{"x":[10,20,30]},"s":"str"}')
        local x = doc:find("obj", "x")
        local removed = doc:remove("obj", "x", 1)            -- deep copy of 20, as a new doc
        local after = {}
        for i, h in doc:iter(x) do after[#after + 1] = doc:value(h) end
        local obj = doc:find("obj")
        local shallow = doc:remove_shallow("obj")          -- a handle of this doc
        local e1 = select(2, pcall(doc.type, doc, obj))    -- the old handle is gone
        local e2 = select(2, pcall(doc.remove, doc))
        local e3 = select(2, pcall(doc.remove, doc, shallow))
        return removed:value(), removed:type(), table.concat(after, ","), doc:size(), doc:type(shallow),
            doc:value(doc:find(shallow, "x", 1)), doc:remove("missing"), doc:remove("keep", "deeper"),
            e1, e2, e3, doc:make_field().value
        """
    )
    assert got == (
        20,
        b"number",
        b"10,30",
        2,
        b"object",
        30,
        None,
        None,
        b"invalid value",
        b"cannot remove the root",
        b"cannot remove the root",
        b'{"keep":1,"s":"str"}',
    )


def test_rjson_make_field_is_a_json_bytes_field() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        require "rjson"
        local doc = rjson.parse('{"z":[1,2.5,-0.0,1e-7,1e21,null,false],"a":"q\\\\"\\\\\\\\/\\\\u0001\\\\n\\\\u00e9"}')
        local f = doc:make_field(doc:find("z"))
        return f.value, f.value_type, f.representation, doc:make_field().value, doc:make_field(nil)
        """
    )
    assert got == (
        b"[1,2.5,-0.0,1e-7,1e21,null,false]",
        1,
        b"json",
        b'{"z":[1,2.5,-0.0,1e-7,1e21,null,false],"a":"q\\"\\\\/\\u0001\\n\xc3\xa9"}',
        None,
    )


def test_rjson_parse_message_schema_objects_empty_and_gzip_fields() -> None:
    import gzip

    sb = Sandbox(message={"Uuid": bytes(16), "Payload": '{"p":1}', "Fields": {
        "j": '{"f":[true]}', "num": 5, "empty": "", "gz": gzip.compress(b'{"z":[1,2]}')}})
    got = sb.run(
        """
        require "rjson"
        local p = rjson.parse_message("Payload")
        local f = rjson.parse_message("Fields[j]")
        local reused = p:parse_message("Fields[j]")
        local g = rjson.parse_message("Fields[gz]")
        local e = {}
        e[1] = select(2, pcall(rjson.parse_message, "Fields[num]"))
        e[2] = select(2, pcall(rjson.parse_message, "Type"))
        e[3] = select(2, pcall(rjson.parse_message, "Fields[empty]"))
        e[4] = select(2, pcall(p.validate, p, nil))
        e[5] = select(2, pcall(rjson.parse_schema, "{"))
        return p:value(p:find("f", 0)), f:value(f:find("f", 0)), reused == p, rjson.version(), g:value(g:find("z", 1)),
            unpack(e)
        """
    )
    assert got[:5] == (True, True, True, b"1.1.4", 2)
    assert got[5:7] == (b"field not found", b"field not found")
    assert got[7] == b"failed to parse offset:0 Invalid value."  # upstream reads the byte after the field
    assert got[8] == b"bad argument #1 to 'validate' (mozsvc.rjson_schema expected, got nil)"
    assert got[9].startswith(b"failed to parse offset:1 ")
    sb.set_message(None)
    assert (
        sb.run('return select(2, pcall(rjson.parse_message, "Payload"))')
        == b"parse_message() no active message"
    )


@pytest.mark.parametrize("schema, doc, err, report", [
    ('{"type":"object","properties":{"a":{"type":"string"}}}', '{"a":1}',
     "SchemaURI: #/properties/a Keyword: type DocumentURI: #/a",
     '{"type":{"expected":["string"],"actual":"integer","instanceRef":"#/a","schemaRef":"#/properties/a"}}'),
    ('{"properties":{"a":{"maxLength":2}}}', '{"a":"abc"}',
     "SchemaURI: #/properties/a Keyword: maxLength DocumentURI: #/a",
     '{"maxLength":{"actual":"abc","expected":2,"instanceRef":"#/a","schemaRef":"#/properties/a"}}'),
    ('{"properties":{"a":{"pattern":"^[a-c]+[0-9]{2}$"}}}', '{"a":"ab123"}',
     "SchemaURI: #/properties/a Keyword: pattern DocumentURI: #/a",
     '{"pattern":{"actual":"ab123","instanceRef":"#/a","schemaRef":"#/properties/a"}}'),
    ('{"additionalProperties":false,"properties":{"a":{}}}', '{"a":1,"b/c":2}',
     "SchemaURI: # Keyword: additionalProperties DocumentURI: #",
     '{"additionalProperties":{"disallowed":"b/c","instanceRef":"#","schemaRef":"#"}}'),
    ('{"definitions":{"n":{"minimum":3}},"items":{"$ref":"#/definitions/n"}}', '[5,2]',
     "SchemaURI: #/definitions/n Keyword: minimum DocumentURI: #/1",
     '{"minimum":{"actual":2,"expected":3,"instanceRef":"#/1","schemaRef":"#/definitions/n"}}'),
    ('{"required":["x","y"],"properties":{"x":{"enum":[1,"a"]}}}', '{"x":"a"}',
     "SchemaURI: # Keyword: required DocumentURI: #",
     '{"required":{"missing":["y"],"instanceRef":"#","schemaRef":"#"}}'),
])
def test_rjson_schema_validation_reports(schema: str, doc: str, err: str, report: str) -> None:
    sb = Sandbox()
    got = sb.run(f"""
        require "rjson"
        local s = rjson.parse_schema([==[{schema}]==])
        local d = rjson.parse([==[{doc}]==])
        return d:validate(s)
    """)
    assert got == (False, err.encode(), report.encode())


def test_rjson_schema_validation_passes() -> None:
    sb = Sandbox()
    assert sb.run("""
        require "rjson"
        local s = rjson.parse_schema([[{"type":"object","required":["a"],"properties":{"a":{"type":["string","null"],
            "minLength":1},"n":{"type":"integer","multipleOf":2}},"patternProperties":{"^x_":{"type":"boolean"}},
            "additionalProperties":{"type":"number"},"anyOf":[{"required":["n"]},{"required":["x_1"]}]}]])
        return rjson.parse([[{"a":"é","n":4,"x_1":true,"other":1.5}]]):validate(s)
    """) == (True, None)


# -- cjson shim -------------------------------------------------------------------------------------


def test_cjson_shim_behaviours() -> None:
    sb = Sandbox()
    got = sb.run(
        """
        require "table"
        local cj = require "cjson"
        local t = cjson.decode('{"a":null,"b":[1,null,3],"c":{"d":null,"e":"null"}}')
        local dropped = t.a == nil and t.b[2] == nil and t.b[3] == 3 and t.c.d == nil and t.c.e == "null"
        local bare = cjson.decode("null")
        local default = cjson.decode_null()
        cjson.decode_null(true)
        local kept = cjson.decode('{"a":null}').a
        local kept_ok = kept == cjson.null and type(kept) == "userdata"
        local now = cjson.decode_null()
        cjson.decode_null(false)
        local present = {}
        for _, name in ipairs({"encode_sparse_array", "encode_max_depth", "decode_max_depth",
                "encode_number_precision", "encode_invalid_numbers", "decode_invalid_numbers", "decode_null"}) do
            present[#present + 1] = type(cjson[name]) == "function"
        end
        return cj == cjson, dropped, bare, default, kept_ok, now, cjson.decode('{"a":null}').a,
            cjson.encode({p = "a/b"}), cjson.encode(0.1 + 0.2), cjson.encode({}), cjson.encode({1, 2, nil, 4}),
            cjson.new, cjson.encode_keep_buffer, cjson._NAME, cjson.decode("[0x10]")[1],
            pcall(cjson.encode, 0 / 0) == false, table.concat({tostring(present[1]), tostring(present[7])}, ",")
        """
    )
    assert got == (
        True, True, None, False, True, True, None,
        b'{"p":"a\\/b"}', b"0.3", b"{}", b"[1,2,null,4]",
        None, None, b"cjson", 16, True, b"true,true",
    )  # fmt: skip


def test_cjson_shim_output_limit() -> None:
    sb = Sandbox(output_limit=16)
    got = sb.run(
        """
        require "cjson"
        local ok, err = pcall(cjson.encode, {"a fairly long string"})
        return cjson.encode({"short"}), ok, err
        """
    )
    assert got == (b'["short"]', False, b"output_limit exceeded")


# -- run/: the project's plugins ------------------------------------------------------------------


def _file_input(path: Path, **kw: Any) -> Sandbox:
    cfg = {"input_filename": str(path), **kw.pop("cfg", {})}
    sb = Sandbox(cfg=cfg, **kw)
    sb.load_plugin(RUN_DIR / "input" / "file.lua")
    return sb


def test_file_input_reads_every_line_and_checkpoints_bytes(tmp_path: Path) -> None:
    data = b'{"a":1}\n' + b"b\r\n" + b"\n" + b"bin\x00\xff\n" + b"z"
    src = tmp_path / "in.json"
    src.write_bytes(data)
    sb = _file_input(src)
    assert sb.env.process_message(None) == (0, b"processed 5 lines")
    assert [m["Payload"].encode("utf-8", "surrogateescape") for m in sb.injected] == [
        b'{"a":1}', b"b\r", b"", b"bin\x00\xff", b"z",
    ]  # fmt: skip
    # the last line has no newline: its checkpoint is the file size, not one past it
    assert sb.checkpoints == [8, 11, 12, 18, 19]
    assert sb.checkpoints[-1] == len(data)

    resumed = _file_input(src)
    assert resumed.env.process_message(11) == (0, b"processed 3 lines")
    assert [m["Payload"] for m in resumed.injected] == ["", "bin\x00\udcff", "z"]
    assert resumed.checkpoints == [12, 18, 19]

    done = _file_input(src)
    assert done.env.process_message(19) == (0, b"processed 0 lines")
    assert done.injected == [] and done.checkpoints == []


def test_file_input_lines_across_read_blocks(tmp_path: Path) -> None:
    big = b"x" * (1024 * 1024 + 512 * 1024)
    huge = b"y" * (2 * 1024 * 1024 + 7)
    src = tmp_path / "in.json"
    src.write_bytes(big + b"\nshort\n" + huge)
    sb = _file_input(src)
    assert sb.env.process_message(None) == (0, b"processed 3 lines")
    assert [len(m["Payload"]) for m in sb.injected] == [len(big), 5, len(huge)]
    assert sb.checkpoints == [len(big) + 1, len(big) + 7, len(big) + 7 + len(huge)]


def test_file_input_dead_letters_what_cannot_be_injected(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_bytes(b"ok\n" + b"L" * 50 + b"\nok2\n")
    sb = _file_input(src, inject_limit=10, dead_letter=True)
    assert sb.env.process_message(None) == (0, b"processed 3 lines")
    assert [m["Payload"] for m in sb.injected] == ["ok", "ok2"]
    assert sb.checkpoints == [3, 54, 58]
    [dead] = sb.dead_letters
    assert dead["data"] == "L" * 50
    assert dead["reason"].startswith("inject_message() failed: exceeded output_limit")
    assert f"(line at byte offset 3 of {src})" in dead["reason"]


def test_file_input_without_dead_letter_injects_error_messages(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_bytes(b"L" * 300 + b"\nbad\n")
    rejecting_decoder = """
    return function(env)
        return {decode = function(data)
            if data == "bad" then return "parse failed" end
            env.inject_message({Payload = data})
        end}
    end
    """
    sb = _file_input(
        src, inject_limit=200, cfg={"decoder_module": "rejecting"}, preload={"rejecting": rejecting_decoder}
    )
    assert sb.env.process_message(None) == (0, b"processed 2 lines")
    too_big, rejected = sb.injected
    # the 300-byte line does not fit even in an error message: its place is reported instead
    assert too_big["Type"] == "error"
    assert too_big["Payload"].startswith(
        "inject_message() failed: exceeded output_limit (line at byte offset 0 of"
    )
    assert too_big["Fields"] == {
        "input_filename": str(src),
        "offset": {"value": 0, "value_type": 2},
        "length": {"value": 300, "value_type": 2},
    }
    assert rejected["Type"] == "error"
    assert rejected["Payload"] == f"parse failed (line at byte offset 301 of {src})"
    assert rejected["Fields"]["data"] == {"value": "bad", "value_type": 1}
    assert sb.checkpoints == [301, 305]


def test_file_input_refuses_a_checkpoint_past_the_end(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_bytes(b"one\n")
    sb = _file_input(src)
    ok, err = sb.run("return pcall(process_message, 100)")
    assert ok is False
    assert b"the checkpoint (byte 100) is past the end of" in err and b"(4 bytes)" in err
    assert sb.injected == []


def test_counter_reports_the_count() -> None:
    sb = Sandbox()
    sb.load_plugin(RUN_DIR / "analysis" / "counter.lua")
    sb.run("payloads = {}; function inject_payload(...) payloads[#payloads + 1] = {...} end")
    assert [sb.env.process_message() for _ in range(3)] == [0, 0, 0]
    sb.env.timer_event(5e9, False)
    sb.env.process_message()
    sb.env.timer_event(10e9, True)
    assert _to_py(sb.env.payloads) == [
        ["txt", "count", "3 message analysed"],
        ["txt", "count", "4 message analysed"],
    ]


FAKE_SENDER = """
return function(env)
    local M = {sent = {}, cfgs = {}, fail = false}
    function M.sender(cfg)
        M.cfgs[#M.cfgs + 1] = cfg
        local s = {}
        function s:send(body, n)
            if M.fail then error("stopped while sending", 2) end
            M.sent[#M.sent + 1] = {body = body, n = n}
            return n, 0
        end
        return s
    end
    env.fake_es = M
    return M
end
"""


def _es_output(**overrides: Any) -> Sandbox:
    cfg = _bare_cfg(RUN_DIR / "output" / "elasticsearch_bulk_api.cfg")
    cfg.update(overrides)
    dead = cfg.pop("_dead_letter", False)
    preload = {"hindsight.elasticsearch": FAKE_SENDER, **cfg.pop("_preload", {})}
    sb = Sandbox(cfg=cfg, preload=preload, dead_letter=dead)
    sb.run("commits = 0; function update_checkpoint() commits = commits + 1 end")
    sb.load_plugin(RUN_DIR / "output" / "elasticsearch_bulk_api.lua")
    return sb


def _docs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"Payload": f'{{"i":{i}}}', "Logger": "input.file", "Timestamp": ISO_TS_NS}
        for i in range(start, start + n)
    ]


ACTION = '{"index":{"_index":"cloudtrail","_type":"doc"}}\n'


def test_es_output_batches_and_commits_only_after_sending() -> None:
    sb = _es_output(flush_count=3)
    codes = []
    for msg in [*_docs(2), {"Logger": "input.file"}, *_docs(2, 2)]:
        sb.set_message(msg)
        codes.append(sb.env.process_message())
    assert codes == [-4, -4, -2, 0, -4]
    sent = _to_py(sb.env.fake_es.sent)
    assert sent == [{"body": "".join(f'{ACTION}{{"i":{i}}}\n' for i in range(3)), "n": 3}]
    assert sb.env.commits == 0

    sb.set_message(None)
    sb.env.timer_event(0, False)  # the first timer (the first message's, on data time) starts the clock
    assert len(_to_py(sb.env.fake_es.sent)) == 1
    sb.env.timer_event(10e9, False)  # ticker_interval later: the remaining document goes, then the commit
    assert _to_py(sb.env.fake_es.sent)[1] == {"body": f'{ACTION}{{"i":3}}\n', "n": 1}
    assert sb.env.commits == 1
    sb.env.timer_event(20e9, False)  # nothing buffered: no request, no commit
    assert len(_to_py(sb.env.fake_es.sent)) == 2 and sb.env.commits == 1

    cfg = _to_py(sb.env.fake_es.cfgs)[0]
    assert {k: cfg[k] for k in ("address", "port", "timeout", "max_retry", "flush_count")} == {
        "address": "127.0.0.1", "port": 9200, "timeout": 60, "max_retry": 1, "flush_count": 3,
    }  # fmt: skip
    assert cfg["discard_on_error"] is False and cfg["abort_on_error"] is False


@pytest.mark.parametrize("flush_on_shutdown", [True, False])
def test_es_output_shutdown_flush(flush_on_shutdown: bool) -> None:
    sb = _es_output(flush_on_shutdown=flush_on_shutdown)
    sb.set_message(_docs(1)[0])
    assert sb.env.process_message() == -4
    sb.env.timer_event(0, True)
    assert len(_to_py(sb.env.fake_es.sent) or []) == (1 if flush_on_shutdown else 0)
    # without the flush the checkpoint stays where it was: the document is re-read on the next start
    assert sb.env.commits == (1 if flush_on_shutdown else 0)


def test_es_output_send_failure_keeps_the_batch_uncommitted() -> None:
    sb = _es_output(flush_count=2)
    sb.env.fake_es.fail = True
    sb.set_message(_docs(1)[0])
    assert sb.env.process_message() == -4
    ok, err = sb.run("return pcall(process_message)")
    assert ok is False and b"stopped while sending" in err
    assert sb.env.commits == 0


def test_es_output_encode_failures_are_counted_and_dead_lettered() -> None:
    broken = 'return function() return {encode = function() error("no index for this one", 0) end} end'
    sb = _es_output(encoder_module="broken", _preload={"broken": broken}, _dead_letter=True)
    sb.set_message(_docs(1)[0])
    assert sb.env.process_message() == (-1, b"no index for this one")
    assert sb.dead_letters == [{"reason": "encode failed: no index for this one", "data": '{"i":0}'}]


def test_es_output_refuses_contradictory_cfg() -> None:
    with pytest.raises(LuaError, match="abort_on_error and discard_on_error are mutually exclusive"):
        _es_output(abort_on_error=True, discard_on_error=True)
    with pytest.raises(LuaError, match="flush_count must be greater than zero"):
        _es_output(flush_count=0)


def test_run_cfgs() -> None:
    file_cfg = _bare_cfg(RUN_DIR / "input" / "file.cfg")
    assert file_cfg["filename"] == "file.lua" and file_cfg["instruction_limit"] == 0
    assert isinstance(file_cfg["input_filename"], str)
    assert _bare_cfg(RUN_DIR / "analysis" / "counter.cfg") == {
        "filename": "counter.lua", "message_matcher": "TRUE", "ticker_interval": 5,
    }  # fmt: skip
    es = _bare_cfg(RUN_DIR / "output" / "elasticsearch_bulk_api.cfg")
    assert es["message_matcher"] == "TRUE"  # the input queue holds only input.file's lines
    assert es["encoders_elasticsearch_common"] == CLOUDTRACKER_COMMON
    assert (es["flush_count"], es["ticker_interval"], es["memory_limit"]) == (500, 10, 200e6)

    main = _bare_cfg(RUN_DIR / "hindsight.cfg")
    assert (main["output_path"], main["sandbox_run_path"], main["sandbox_load_path"]) == ("output", "run", "")
    assert main["io_lua_path"].startswith(main["analysis_lua_path"] + ";")
    assert {"input_defaults", "analysis_defaults", "output_defaults"} <= main.keys()
    assert main["max_message_size"] >= main["input_defaults"]["output_limit"]


# -- upstream test scripts and modules, run from the fetched sources ----------------------------------


@pytest.fixture(scope="module")
def upstream_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Upstream's versions of the modules hindsight-py re-implements, as a module tree."""
    root = tmp_path_factory.mktemp("upstream_lua")
    files = {
        "heka/modules/heka/msg_interpolate.lua": "heka/msg_interpolate.lua",
        "elasticsearch/io_modules/encoders/elasticsearch/common.lua": "encoders/elasticsearch/common.lua",
        "elasticsearch/io_modules/encoders/elasticsearch/payload.lua": "encoders/elasticsearch/payload.lua",
        "heka/io_modules/decoders/payload.lua": "decoders/payload.lua",
        "lpeg/io_modules/lpeg/sub_decoder_util.lua": "lpeg/sub_decoder_util.lua",
        "lpeg/modules/lpeg/printf.lua": "lpeg/printf.lua",
        "lpeg/modules/lpeg/escape_sequences.lua": "lpeg/escape_sequences.lua",
    }
    for src, dst in files.items():
        target = root / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(LUA_SANDBOX_EXTENSIONS, src))
    return root


@pytest.mark.upstream
@pytest.mark.parametrize("with_lpeg", [True, False], ids=["lpeg-fast-path", "pure-lua"])
def test_upstream_rjson_test_script(with_lpeg: bool) -> None:
    # the whole script, JSON Schema validation included (hindsight_py.json_schema)
    script = read_bytes(LUA_SANDBOX_EXTENSIONS, "rjson/tests/test.lua").decode()
    sb = Sandbox(deny=() if with_lpeg else ["lpeg"])
    sb.run(script)


@pytest.mark.upstream
def test_upstream_cjson_core_test() -> None:
    Sandbox().run(read_bytes(LUA_SANDBOX_EXTENSIONS, "cjson/tests/test.lua").decode())


@pytest.mark.upstream
def test_upstream_cjson_limited_and_unlimited() -> None:
    limited = Sandbox(output_limit=64)
    limited.run(read_bytes(LUA_SANDBOX_EXTENSIONS, "cjson/tests/limited.lua").decode())
    assert limited.env.process() == 0

    unlimited = Sandbox(output_limit=0)
    unlimited.run("written = 0; function write_output(s) written = written + #s end")
    unlimited.run(read_bytes(LUA_SANDBOX_EXTENSIONS, "cjson/tests/unlimited.lua").decode())
    assert unlimited.env.process() == 0
    assert unlimited.env.written == 103001


@pytest.mark.upstream
@pytest.mark.xfail(
    strict=True, reason="stock Lua cannot tell a decoded [] (or {nil}) from {}: both encode as {}"
)
def test_upstream_cjson_empty_array() -> None:
    sb = Sandbox()
    sb.run(read_bytes(LUA_SANDBOX_EXTENSIONS, "cjson/tests/empty_array.lua").decode())
    sb.env.process()


DIFFERENTIAL_MESSAGES = [
    {"Payload": '{"x":1}', "Timestamp": ISO_TS_NS, "Logger": "Input.File", "Type": "CT", "Hostname": "H1",
     "Severity": 7, "Pid": 12, "EnvVersion": "0.8", "Fields": {"eventID": "Ab/1", "flag": True, "n": 3}},
    {"Payload": "line\n", "Timestamp": ISO_TS_NS + 3 * 86400 * 10**9, "Logger": "l", "Fields": {}},
    {"Payload": "", "Timestamp": 0, "Type": 'q"uote'},
    {"Timestamp": 5},
]  # fmt: skip

DIFFERENTIAL_CFGS = [
    CLOUDTRACKER_COMMON,
    {},
    {"es_index_from_timestamp": True, "index": "%{Logger}-%{%Y.%m.%d}", "type_name": "%{Type}-%{Hostname}"},
    {"es_index_from_timestamp": True, "index": "X-%{Severity}-%{Pid}-%{EnvVersion}-%{flag}-%{n}-%{missing}",
     "type_name": "%{Timestamp}", "id": "%{eventID}"},
]  # fmt: skip


@pytest.mark.upstream
@pytest.mark.parametrize("common", DIFFERENTIAL_CFGS)
def test_encoder_matches_upstream_modules(upstream_modules: Path, common: Mapping[str, Any]) -> None:
    def outputs(path: tuple[Path | str, ...]) -> list[Any]:
        sb = _encoder(common, path=path)
        encode = sb.run('return require("encoders.elasticsearch.payload").encode')
        results = []
        for message in DIFFERENTIAL_MESSAGES:
            sb.set_message(message)
            results.append(encode())
        return results

    def readable(result: Any) -> Any:
        # the action line is cjson output, whose key order is the table's: compare it as JSON
        if not isinstance(result, bytes):
            return result
        action, rest = result.split(b"\n", 1)
        return json.loads(action), rest

    ours = outputs((LUA_DIR / "?.lua", SYSTEM_PATH))
    theirs = outputs((upstream_modules / "?.lua", SYSTEM_PATH))
    assert [readable(r) for r in ours] == [readable(r) for r in theirs]
    assert ours[-1] is None


@pytest.mark.upstream
def test_interpolate_matches_upstream_module(upstream_modules: Path) -> None:
    templates = [
        "%{Type}|%{Logger}|%{Hostname}|%{Severity}|%{Pid}|%{EnvVersion}|%{Payload}|%{Timestamp}",
        "%{eventID}-%{flag}-%{n}-%{missing}-%{%Y/%j %H:%M}-%{}-%{%}",
        "no placeholders",
    ]

    def outputs(path: tuple[Path | str, ...]) -> list[Any]:
        sb = Sandbox(path=path)
        interpolate = sb.run('return require("heka.msg_interpolate").interpolate')
        results = []
        for message in DIFFERENTIAL_MESSAGES:
            sb.set_message(message)
            results += [interpolate(t.encode(), 1e9) for t in templates]
        return results

    assert outputs((LUA_DIR / "?.lua",)) == outputs((upstream_modules / "?.lua",))


@pytest.mark.upstream
def test_payload_decoder_matches_upstream_module(upstream_modules: Path) -> None:
    code = """
    local decode = require("decoders.payload").decode
    local defaults = {Type = "t", Fields = {a = 1}}
    decode("one", defaults)
    decode("two")
    decode("three", defaults, true)
    local sdu = require "lpeg.sub_decoder_util"
    local m = sdu.copy_message({Logger = "l", Fields = {x = "y"}, Extra = 1})
    sdu.add_fields(m, {z = 2})
    return m.Logger, m.Extra, m.Fields.x, m.Fields.z
    """

    def outputs(path: tuple[Path | str, ...]) -> tuple[Any, list[Any]]:
        sb = Sandbox(path=path)
        return sb.run(code), sb.injected

    assert outputs((LUA_DIR / "?.lua", SYSTEM_PATH)) == outputs((upstream_modules / "?.lua", SYSTEM_PATH))


@pytest.mark.upstream
def test_file_input_matches_cloudtrackers_on_a_well_formed_file(tmp_path: Path) -> None:
    theirs_lua = tmp_path / "cloudtracker_file.lua"
    theirs_lua.write_bytes(read_bytes(CLOUDTRACKER, "hindsight/run/input/file.lua"))
    src = tmp_path / "in.json"
    src.write_bytes(CLOUDTRAIL_NDJSON.read_bytes()[:20000].rsplit(b"\n", 1)[0] + b"\n\n{}\n")

    def run(plugin: Path) -> tuple[Any, list[Any], list[Any]]:
        sb = Sandbox(cfg={"input_filename": str(src)})
        sb.load_plugin(plugin)
        return sb.env.process_message(None), sb.injected, sb.checkpoints

    ours, theirs = run(RUN_DIR / "input" / "file.lua"), run(theirs_lua)
    assert ours == theirs
    assert ours[2][-1] == src.stat().st_size
