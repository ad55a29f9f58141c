-- libinjection for hindsight-py: the API of lua_sandbox_extensions' SWIG binding of libinjection
-- (client9), the checks done by libinjection's C through the `libinjection-python` package
-- (hindsight_py/sandbox/python_standins.py): one host call per check.
--
-- libinjection.xss(s, len)                    -> 1 if s[1..len] is an XSS attack, else 0
-- libinjection.sqli_state()                   -> a state: .s, .slen, .flags, .fingerprint
-- libinjection.sqli_init(state, s, len, flags)
-- libinjection.is_sqli(state)                 -> 1 if SQLi, else 0; sets state.fingerprint
-- libinjection.sqli(s, len, fingerprint)      -> 1 if SQLi, else 0
-- Flags other than 0 are not passed on: libinjection-python checks with libinjection's defaults
-- (every quoting context), which is what flags 0 asks for. Text goes through the binding as UTF-8
-- (invalid sequences as U+FFFD).

local name, host_api = ...
local string = require "string"
local math = require "math"
local standin = require "hindsight_py.standin"
local sformat, ssub = string.format, string.sub
local floor = math.floor
local type, select, setmetatable, getmetatable, error = type, select, setmetatable, getmetatable, error

local check = host_api and host_api.libinjection
if not check then
    error(sformat("module '%s' needs the Python package libinjection-python: pip install 'hindsight-py[libinjection]'",
        name), 0)
end

local STATE = "struct libinjection_sqli_state *"
local M = {}
local state_mt = { __metatable = "libinjection_sqli_state" }

-- SWIG's checks and texts (raised without a position, as SWIG's lua_error)
local function swig_type(v)
    if getmetatable(v) == "libinjection_sqli_state" then return "userdata" end
    return type(v)
end

local function nargs(fname, a, b, given)
    if given < a or given > b then error(sformat("Error in %s expected %d..%d args, got %d", fname, a, b, given), 0) end
end

local function check_arg(fname, n, expected, v, ok)
    if not ok then error(sformat("Error in %s (arg %d), expected '%s' got '%s'", fname, n, expected, swig_type(v)), 0) end
end

local function is_string(v) return v == nil or type(v) == "string" or type(v) == "number" end

-- s[1..len]: the C functions read len bytes
local function text(s, len)
    return ssub(s == nil and "" or "" .. s, 1, floor(len))
end

function M.sqli_state(...)
    nargs("libinjection_sqli_state::libinjection_sqli_state", 0, 0, select("#", ...))
    return setmetatable({ s = "", slen = 0, flags = 0, fingerprint = "" }, state_mt)
end

function M.sqli_init(...)
    local state, s, len, flags = ...
    local fname = "libinjection_sqli_init"
    nargs(fname, 4, 4, select("#", ...))
    check_arg(fname, 1, STATE, state, getmetatable(state) == "libinjection_sqli_state")
    check_arg(fname, 2, "char const *", s, is_string(s))
    check_arg(fname, 3, "size_t", len, type(len) == "number")
    check_arg(fname, 4, "int", flags, type(flags) == "number")
    state.s, state.slen, state.flags, state.fingerprint = text(s, len), floor(len), flags, ""
end

function M.is_sqli(...)
    local state = ...
    nargs("libinjection_is_sqli", 1, 1, select("#", ...))
    check_arg("libinjection_is_sqli", 1, STATE, state, getmetatable(state) == "libinjection_sqli_state")
    local found, fingerprint = check("sqli", state.s)
    state.fingerprint = fingerprint
    return found and 1 or 0
end

function M.sqli(...)
    local s, len, fingerprint = ...
    local fname = "libinjection_sqli"
    nargs(fname, 3, 3, select("#", ...))
    check_arg(fname, 1, "char const *", s, is_string(s))
    check_arg(fname, 2, "size_t", len, type(len) == "number")
    check_arg(fname, 3, "char []", fingerprint, is_string(fingerprint))
    return (check("sqli", text(s, len))) and 1 or 0
end

function M.xss(...)
    local s, len = ...
    local fname = "libinjection_xss"
    nargs(fname, 2, 2, select("#", ...))
    check_arg(fname, 1, "char const *", s, is_string(s))
    check_arg(fname, 2, "size_t", len, type(len) == "number")
    if len < 0 then error("number must not be negative", 0) end
    return (check("xss", text(s, len))) and 1 or 0
end

standin.finish(host_api, M) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
