-- The Lua half of a hindsight-py sandbox: the boundary, and the assembly of the parts.
--
-- Run once per plugin runtime, right after the runtime is created, with:
--   host: a table of Python callables and settings (see sandbox/lua.py)
--   sources: the text of the sandbox's Lua files, by file name: heka_pb.lua (the heka protobuf
--     codec), cjson_shim.lua (function(cjson_c) -> the sandbox flavour of cjson) and the parts below
-- It builds the plugin's environment (lua_sandbox's rules: base library only,
-- require limited to the configured paths, per-type removals) and returns a
-- control table the Python side drives. Everything on the per-message path
-- lives in Lua so that Python and Lua cross once per batch, not once per message.
--
-- The parts, each one concept, loaded in this order (each may use what those before it export):
--   limits.lua          argument errors, the instruction limit, how a plugin call ends, loadfile
--   modules.lua         require: built-in libraries, module search, Lua and C modules, stand-ins
--   stream_reader.lua   inputs' stream readers
--   message_read.lua    the current message: read_message, zero-copy references, matchers
--   message_inject.lua  payloads, inject_message, the flush buffer, refused messages, per-type globals
--   control.lua         the control table: run_batch, run_input, timers, preserve_data
-- Each part is a chunk called with the shared table `S` (what this file and the parts before it
-- export); it captures what it needs into locals as it loads and returns its exports. S is emptied
-- once all are loaded: at run time every part works on its own upvalues only.
--
-- The boundary (docs/security.md). The runtime's real globals table BECOMES the plugin's globals:
-- it is emptied below and refilled with what lua_sandbox gives a plugin of this type, so that
-- getfenv(0), getfenv(<any level>) and the environment of any C function are the sandbox and
-- nothing more. What the host itself needs (the full standard library, debug, jit, package.loadlib,
-- lupa's `python`, the Python callables) is captured as upvalues of the functions in the host's files
-- and of the control table, which only Python holds. Host code runs in `host_env`: the standard
-- library while the host files load, then an empty table on which any read or write of a global is
-- an error, so getfenv(<host function>) shows a plugin nothing, and the plugin's globals can never
-- steer host code.

local host, sources = ...

local env = getfenv(1) -- the runtime's globals: the plugin's, once emptied below
local std = {} -- the unrestricted standard library, for host code only
for k, v in pairs(env) do std[k] = v end
local host_env_mt = { __index = std, __metatable = false }
local host_env = setmetatable({}, host_env_mt)
setfenv(1, host_env)

local type, pairs, ipairs, next, error, assert, pcall, tostring, select, setmetatable, rawset, setfenv,
    loadstring = type, pairs, ipairs, next, error, assert, pcall, tostring, select, setmetatable, rawset, setfenv,
    loadstring

-- Host Lua code is compiled under this chunk name prefix.
local HOST_SOURCE = "=hindsight-py:"
-- Sources that run free of the instruction limit while the sandbox's machinery runs (the
-- instruction hook tells them apart, limits.lua): the host's own (each registered as it loads), and
-- those of hindsight-py's stand-ins for C modules, which cost the plugin no instructions, as
-- upstream's C does not. A plugin's file that would get one of these names is loaded under another
-- (loadfile51).
local free_sources = { [HOST_SOURCE .. "env.lua"] = true, [HOST_SOURCE .. "privileged"] = true }

-- Python callables as Lua functions. A Python exception raised into Lua is a Python object: with
-- it, Lua code could walk to Python's builtins (e.__traceback__.tb_frame.f_globals...). So every
-- callable of the host is called through pcall, and what it raises reaches Lua as a string (Python
-- keeps the exception itself: sandbox/lua.py). Values the callables return are plain (numbers,
-- strings, booleans, nil), except create_matcher's and those of output extensions, which stay in upvalues
-- here.
local guard
do
    local function settle(ok, ...)
        if ok then return ... end
        local e = ...
        if type(e) ~= "string" then
            local tok, text = pcall(tostring, e)
            e = tok and type(text) == "string" and text or "error in a host function"
        end
        error(e, 0)
    end

    function guard(f)
        if f == nil then return nil end
        return function(...) return settle(pcall(f, ...)) end
    end
end

do
    local callables = {}
    for k, v in pairs(host) do
        if type(v) == "userdata" then callables[k] = v end
    end
    for k, v in pairs(callables) do host[k] = guard(v) end
end

-- Runs host Lua code (a file of the sandbox, an output's extension) in host_env, free of the count.
local function run_host_chunk(source, name, ...)
    local chunk_name = HOST_SOURCE .. name
    free_sources[chunk_name] = true
    local chunk = assert(loadstring(source, chunk_name))
    setfenv(chunk, host_env)
    return chunk(...)
end

local pb = run_host_chunk(sources["heka_pb.lua"], "heka_pb.lua")
local cjson_shim = run_host_chunk(sources["cjson_shim.lua"], "cjson_shim.lua")

local plugin_type = host.plugin_type -- "input" | "analysis" | "output"
local plugin_name = host.name

----------------------------------------------------------------------------------------------------
-- Config (read_config): the runtime cfg plus what lua_sandbox adds to it
----------------------------------------------------------------------------------------------------
local config = {}
-- What lua_sandbox takes from a plugin of this type (hindsight's set_restrictions): entries removed
-- from the base library ("") and from modules once loaded, and modules `require` refuses. Private
-- copies: read_config hands the plugin the config's own tables, which it may change.
local restrictions = {}
local disabled = {}
do
    local chunk, err = loadstring(host.runtime_cfg, "=" .. plugin_name .. ".rtc")
    if not chunk then error(err, 0) end
    local evaluated = {}
    setfenv(chunk, evaluated)
    chunk()
    -- what lua_sandbox copies from the cfg's state into the sandbox: strings, numbers, booleans and
    -- tables of them (a function defined in a cfg would be code no limit was ever set up for)
    local function data_only(t, copies)
        local copy = {}
        copies[t] = copy
        for k, v in next, t do
            local kt, vt = type(k), type(v)
            if kt == "string" or kt == "number" then
                if vt == "table" then
                    copy[k] = copies[v] or data_only(v, copies)
                elseif vt == "string" or vt == "number" or vt == "boolean" then
                    copy[k] = v
                end
            end
        end
        return copy
    end
    config = data_only(evaluated, {})
    for k, v in pairs { input_limit = 65536, output_limit = 65536, memory_limit = 8388608,
        instruction_limit = 1000000, log_level = 3 } do
        if config[k] == nil then config[k] = v end
    end
    local mms = config.max_message_size
    if type(mms) ~= "number" or mms <= 0 then config.max_message_size = host.max_message_size or 65536 end
    -- what hindsight's set_restrictions writes, whatever the user said
    local base = { "dofile", "load", "loadfile", "loadstring", "newproxy" }
    local os_entries = { "exit", "setlocale" }
    if plugin_type == "analysis" then
        base = { "collectgarbage", "dofile", "load", "loadfile", "loadstring", "newproxy", "print" }
        os_entries = { "getenv", "execute", "exit", "remove", "rename", "setlocale", "tmpname" }
        config.disable_modules = { io = true, coroutine = true }
    end
    config.remove_entries = { [""] = base, os = os_entries, string = { "dump" } }
    for name, list in pairs(config.remove_entries) do
        local copy = {}
        for i, entry in ipairs(list) do copy[i] = entry end
        restrictions[name] = copy
    end
    if type(config.disable_modules) == "table" then
        for name in pairs(config.disable_modules) do -- any value disables, as lua_sandbox's is_disabled
            if type(name) == "string" then disabled[name] = true end
        end
    end
end

-- lua_sandbox's remove_entries: applied to every module as `require` loads it
local function remove_entries(name, t)
    local list = restrictions[name]
    if list and type(t) == "table" then
        for _, entry in ipairs(list) do rawset(t, entry, nil) end
    end
    return t
end

----------------------------------------------------------------------------------------------------
-- The environment: the runtime's real globals, emptied, then given lua_sandbox's base library
----------------------------------------------------------------------------------------------------
for k in pairs(std) do env[k] = nil end

-- luaopen_base's functions; `print` is replaced below, `require` and `module` come with package
for _, k in ipairs { "assert", "collectgarbage", "dofile", "error", "gcinfo", "getfenv", "getmetatable",
    "ipairs", "load", "loadfile", "loadstring", "newproxy", "next", "pairs", "pcall", "rawequal", "rawget", "rawset",
    "select", "setfenv", "setmetatable", "tonumber", "tostring", "type", "unpack", "xpcall", "_VERSION" } do
    env[k] = std[k]
end
env._G = env
remove_entries("", env)

local argerror, typeerror -- limits.lua's, once loaded (read_config is first called by the plugin)
env.read_config = function(...)
    local n = select("#", ...)
    if n == 0 or type((...)) ~= "string" and type((...)) ~= "number" then
        typeerror(1, "string", 0, ...)
    end
    if n ~= 1 then argerror(0, "too many arguments") end
    return config[tostring((...))]
end

----------------------------------------------------------------------------------------------------
-- The parts
----------------------------------------------------------------------------------------------------
local S = {
    host = host, env = env, std = std, pb = pb, cjson_shim = cjson_shim, guard = guard,
    run_host_chunk = run_host_chunk, HOST_SOURCE = HOST_SOURCE, free_sources = free_sources,
    plugin_type = plugin_type, plugin_name = plugin_name, log = host.log, log_level = host.log_level,
    output_limit = host.output_limit or 65536, max_message_size = host.max_message_size or 65536,
    disabled = disabled, remove_entries = remove_entries,
    -- Optional host hooks with upstream's callback semantics (the lua_sandbox test harness drives
    -- the sandbox through them, tests/lua_harness.py; hindsight-py's runner leaves them unset):
    --   inject_callback(pb | nil, checkpoint) -> rv, update_checkpoint_callback(seq | nil) -> rv
    inject_cb = host.inject_callback, ucp_cb = host.update_checkpoint_callback,
}
for _, name in ipairs { "limits.lua", "modules.lua", "stream_reader.lua", "message_read.lua", "message_inject.lua" } do
    for k, v in pairs(run_host_chunk(sources[name], name, S)) do
        if S[k] ~= nil then error(name .. " exports '" .. k .. "', which another part exports", 0) end
        S[k] = v
    end
end
argerror, typeerror = S.argerror, S.typeerror
local control = run_host_chunk(sources["control.lua"], "control.lua", S)
for k in next, S do S[k] = nil end

-- The memory limit holds inside the calls that run plugin code, and is lifted as they return: Python
-- keeps it off (sandbox/lua.py), so that lupa never meets a full state outside a protected call.
do
    local set_memory_limit = host.memory_limit -- nil: no memory limit
    local function lifted(...)
        set_memory_limit(false)
        return ...
    end
    if set_memory_limit then
        for _, name in ipairs { "load_plugin", "run_input", "run_batch", "run_timer", "pm_direct" } do
            local call = control[name]
            control[name] = function(...)
                set_memory_limit(true)
                return lifted(call(...))
            end
        end
    end
end

-- From here on host code reads and writes no globals: any attempt is a bug, and an error.
do
    local function no_globals(_, k)
        error("no globals here ('" .. tostring(k) .. "')", 2)
    end
    host_env_mt.__index = no_globals
    host_env_mt.__newindex = no_globals
end

return control
