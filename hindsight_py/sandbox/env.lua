-- The Lua half of a hindsight-py sandbox.
--
-- Run once per plugin runtime, right after the runtime is created, with:
--   host: a table of Python callables and settings (see sandbox/lua.py)
--   pb_source, cjson_shim_source: the text of heka_pb.lua (the heka protobuf codec) and of
--     cjson_shim.lua (function(cjson_c) -> the sandbox flavour of cjson)
-- It builds the plugin's environment (lua_sandbox's rules: base library only,
-- require limited to the configured paths, per-type removals) and returns a
-- control table the Python side drives. Everything on the per-message path
-- lives here so that Python and Lua cross once per batch, not once per message.
--
-- The boundary (docs/security.md). The runtime's real globals table BECOMES the plugin's globals:
-- it is emptied below and refilled with what lua_sandbox gives a plugin of this type, so that
-- getfenv(0), getfenv(<any level>) and the environment of any C function are the sandbox and
-- nothing more. What the host itself needs (the full standard library, debug, jit, package.loadlib,
-- lupa's `python`, the Python callables) is captured as upvalues of the functions in this file and
-- of the control table, which only Python holds. Host code runs in `host_env`: the standard
-- library while the host files load, then an empty table on which any read or write of a global is
-- an error, so getfenv(<host function>) shows a plugin nothing, and the plugin's globals can never
-- steer host code.

local host, pb_source, cjson_shim_source = ...

local env = getfenv(1) -- the runtime's globals: the plugin's, once emptied below
local std = {} -- the unrestricted standard library, for host code only
for k, v in pairs(env) do std[k] = v end
local host_env_mt = { __index = std, __metatable = false }
local host_env = setmetatable({}, host_env_mt)
setfenv(1, host_env)

local type, pairs, ipairs, next, error, assert, pcall, xpcall, tostring, tonumber, select, setmetatable,
    getmetatable, rawget, rawset, setfenv, getfenv, loadstring, unpack =
    type, pairs, ipairs, next, error, assert, pcall, xpcall, tostring, tonumber, select, setmetatable,
    getmetatable, rawget, rawset, setfenv, getfenv, loadstring, unpack
local sfind, sgsub, ssub, sformat, sbyte, schar, slower, sgmatch = string.find, string.gsub, string.sub,
    string.format, string.byte, string.char, string.lower, string.gmatch
local tconcat = table.concat
local floor, ceil, huge = math.floor, math.ceil, math.huge
local smatch = string.match
local os_time = os.time
local io_open = io.open
local sethook = debug.sethook
local getinfo = debug.getinfo
local newproxy = newproxy
local io_type = io.type
local jit = rawget(env, "jit")

-- Host Lua code is compiled under this chunk name prefix.
local HOST_SOURCE = "=hindsight-py:"
-- Sources that run free of the instruction limit while `internal` is set (the instruction hook
-- tells them apart): the host's own, and those of hindsight-py's stand-ins for C modules, which
-- cost the plugin no instructions, as upstream's C does not. A plugin's file that would get one of
-- these names is loaded under another (loadfile51).
local free_sources = {}
for _, name in ipairs { "env.lua", "heka_pb.lua", "cjson_shim.lua", "privileged" } do
    free_sources[HOST_SOURCE .. name] = true
end

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

local pb, cjson_shim
do
    local function load_host_chunk(source, name)
        local chunk = assert(loadstring(source, HOST_SOURCE .. name))
        setfenv(chunk, host_env)
        return chunk()
    end
    pb = load_host_chunk(pb_source, "heka_pb.lua")
    cjson_shim = load_host_chunk(cjson_shim_source, "cjson_shim.lua")
end

local plugin_type = host.plugin_type -- "input" | "analysis" | "output"
local plugin_name = host.name
local log = host.log
local log_level = host.log_level

-- lua_sandbox's API functions are C functions. Their errors read as luaL_error/luaL_argerror make
-- them: "file:line:" of a Lua caller (none when called through pcall), and argument errors naming
-- the function as the caller knows it ('?' through pcall). `depth` counts the helper frames
-- between argerror and the API function.
local function argerror(narg, extramsg, depth)
    local level = 2 + (depth or 0)
    local ar = getinfo(level, "n")
    local name = ar and ar.name or "?"
    if ar and ar.namewhat == "method" then
        narg = narg - 1
        if narg == 0 then
            error(sformat("calling '%s' on bad self (%s)", name, extramsg), level + 1)
        end
    end
    error(sformat("bad argument #%d to '%s' (%s)", narg, name, extramsg), level + 1)
end

local function typename_of(narg, ...)
    if select("#", ...) < narg then return "no value" end
    return type((select(narg, ...)))
end

local function typeerror(narg, tname, depth, ...)
    argerror(narg, sformat("%s expected, got %s", tname, typename_of(narg, ...)), (depth or 0) + 1)
end

-- Optional host hooks with upstream's callback semantics (the lua_sandbox test harness drives
-- the sandbox through them, tests/lua_harness.py; hindsight-py's runner leaves them unset):
--   inject_callback(pb | nil, checkpoint) -> rv, update_checkpoint_callback(seq | nil) -> rv
local inject_cb = host.inject_callback
local ucp_cb = host.update_checkpoint_callback

----------------------------------------------------------------------------------------------------
-- Limits
----------------------------------------------------------------------------------------------------
-- The count hook fires every HOOK_STEP VM instructions, so the limit is exact to within one step;
-- a per-instruction hook would cost several times the plugin's own work.
local HOOK_STEP = 1000
local hook_budget = 0 -- steps allowed per call; 0 = unlimited
local hook_used = 0
-- set once the limit fires; the call then fails even if the plugin caught the error (and the sandbox's
-- pcall, xpcall and coroutine.resume raise it again at once: a plugin cannot loop on catching it)
local limit_tripped = nil
-- true while the sandbox's own machinery runs (encoding, flushing): upstream does that in C, where it
-- costs the plugin no instructions, and an error in the middle of it would corrupt the flush buffer.
-- Plugin code the machinery calls (a metamethod of a message table) is still counted: the hook
-- looks at what it interrupted.
local internal = false

-- PUC Lua keeps a count hook per coroutine, and a coroutine starts with none: each coroutine of the
-- plugin gets its own (hook_thread), at a finer step; what a coroutine runs between its last hook
-- and a yield is unknown, so each resume is charged one such step too (charge_resume). LuaJIT's
-- hook is one for the whole state.
local per_thread_hooks = not jit
local threads = setmetatable({}, { __mode = "k" }) -- every coroutine the plugin created
local instruction_hook, hook_thread, charge_resume
do
    local CO_STEP = 100

    -- `steps` more hook steps of work; level: where the hook's caller is on the stack (host code
    -- interrupted while `internal` is free, as upstream's C machinery is)
    local function charge(steps, level)
        if internal and level and free_sources[getinfo(level + 1, "S").source] then return end
        hook_used = hook_used + steps
        if hook_budget > 0 and hook_used > hook_budget then
            limit_tripped = "instruction_limit exceeded"
            error(limit_tripped, 0)
        end
    end

    function instruction_hook()
        charge(1, 2)
    end

    local function coroutine_hook()
        charge(CO_STEP / HOOK_STEP, 2)
    end

    function hook_thread(co)
        if hook_budget > 0 then sethook(co, coroutine_hook, "", CO_STEP) else sethook(co) end
    end

    function charge_resume()
        if per_thread_hooks then charge(CO_STEP / HOOK_STEP) end
    end
end

-- LuaJIT's compiled traces never call the count hook. With a limit, every chunk of the plugin and
-- of the modules it loads is kept out of the compiler (loadfile51 below), so all of the plugin's
-- code runs in the interpreter, where the hook counts it; hindsight-py's own machinery (this file,
-- the protobuf codec) is still compiled, as upstream's C costs the plugin no instructions. A trace
-- of the machinery that reaches plugin code stops there (LuaJIT does not record into such code).
local compiled_plugin_code = false -- a plugin chunk was loaded while no limit was set

local function set_instruction_limit(n)
    if n and n > 0 then
        hook_budget = ceil(n / HOOK_STEP)
        if jit and compiled_plugin_code then
            -- code loaded without a limit may be compiled already: nothing may be compiled now
            jit.off()
            jit.flush()
        end
        sethook(instruction_hook, "", HOOK_STEP)
    else
        hook_budget = 0
        sethook()
    end
    if per_thread_hooks then
        for co in pairs(threads) do hook_thread(co) end
    end
end

local function reset_instructions()
    hook_used = 0
    internal = false
end

local output_limit = host.output_limit or 65536

----------------------------------------------------------------------------------------------------
-- Loading Lua 5.1 source under LuaJIT
----------------------------------------------------------------------------------------------------
-- Lua 5.1 reads an unknown escape in a quoted string as the character itself ("\." is "."); LuaJIT
-- refuses it, and gives \x, \z and \u a meaning 5.1 does not have. Plugins and modules written for
-- lua_sandbox are loaded with those backslashes removed, which is what 5.1 makes of them.
local as_lua51
do
    local KEEP_ESCAPE = {}
    for c in ("abfnrtv\\\"'\n\r0123456789"):gmatch(".") do KEEP_ESCAPE[c] = true end

    function as_lua51(src)
        if not sfind(src, "\\", 1, true) then return src end
        local out, n = {}, 0
        local copied = 1 -- src[copied..] is not in out yet
        local pos, len = 1, #src
        while pos <= len do
            local s = sfind(src, "[%-%[\"']", pos)
            if not s then break end
            local c = ssub(src, s, s)
            pos = s + 1
            if c == "-" or c == "[" then
                -- a comment, a long string or a long comment: skipped whole (escapes mean nothing there)
                local open = c == "-" and ssub(src, s, s + 1) == "--" and s + 2 or (c == "[" and s or nil)
                if open then
                    local eq = smatch(src, "^%[(=*)%[", open)
                    if eq then
                        local _, e = sfind(src, "]" .. eq .. "]", open + 2 + #eq, true)
                        pos = (e or len) + 1
                    elseif c == "-" then
                        pos = (sfind(src, "\n", open, true) or len) + 1
                    end
                end
            else
                local p = s + 1
                while true do
                    local q = sfind(src, c == '"' and '[\\\n"]' or "[\\\n']", p)
                    if not q or ssub(src, q, q) ~= "\\" then -- the end of the string (or of a broken one)
                        pos = (q or len) + 1
                        break
                    end
                    if not KEEP_ESCAPE[ssub(src, q + 1, q + 1)] then
                        n = n + 1
                        out[n] = ssub(src, copied, q - 1)
                        copied = q + 1
                    end
                    p = q + 2
                end
            end
        end
        if n == 0 then return src end
        out[n + 1] = ssub(src, copied)
        return tconcat(out)
    end
end

-- Files are read with the io library's own methods, captured now: an output plugin may change the
-- methods of its file handles (they share one metatable), never what the host reads.
local fileops = {} -- read, close, flush, setvbuf: copied, not the shared table itself
for _, k in ipairs { "read", "close", "flush", "setvbuf" } do fileops[k] = getmetatable(io.stdout).__index[k] end

-- The text of a Lua file, or nil and an error. Precompiled chunks are refused: neither Lua nor
-- LuaJIT verifies bytecode, and a crafted chunk can corrupt the interpreter's memory.
local function read_source(path)
    local fh, err = io_open(path, "rb")
    if not fh then return nil, "cannot open " .. err end
    local src = fileops.read(fh, "*a")
    fileops.close(fh)
    if src == nil then return nil, "cannot read " .. path end
    if sbyte(src, 1) == 27 then return nil, path .. ": precompiled chunks are not loaded in the sandbox" end
    if sbyte(src, 1) == 35 then src = sgsub(src, "^[^\n]*", "", 1) end -- a "#!" line, as loadfile skips it
    return src
end

-- The chunk name of a file, as Lua 5.1's loadfile gives it. LuaJIT would keep 56 bytes of a long
-- path in messages where Lua 5.1 keeps the last 52 after "...": error texts then read as upstream's.
local function chunk_name(path)
    if not jit then return "@" .. path end
    return #path > 52 and "=..." .. ssub(path, -52) or "=" .. path
end

-- loadfile, as Lua 5.1 would read the file (sources only). compiled: one of hindsight-py's stand-ins
-- for C modules, which runs compiled and uncounted, as upstream's C does.
local function loadfile51(path, compiled)
    local src, err = read_source(path)
    if not src then return nil, err end
    if jit then src = as_lua51(src) end
    local name = chunk_name(path)
    if compiled then
        free_sources[name] = true
    elseif free_sources[name] then
        name = name .. " "
    end
    local chunk, lerr = loadstring(src, name)
    if chunk and jit then
        if compiled then
            jit.on(chunk, true)
        elseif hook_budget > 0 then
            jit.off(chunk, true) -- the chunk and every function in it: interpreted, counted
        else
            compiled_plugin_code = true
        end
    end
    return chunk, lerr
end

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

env.read_config = function(...)
    local n = select("#", ...)
    if n == 0 or type((...)) ~= "string" and type((...)) ~= "number" then
        typeerror(1, "string", 0, ...)
    end
    if n ~= 1 then argerror(0, "too many arguments") end
    return config[tostring((...))]
end

-- pcall and xpcall as the plugin sees them: once the instruction limit has fired, catching its error
-- does not help: it is raised again as soon as the catching function returns.
local function rethrow(...)
    if limit_tripped then error(limit_tripped, 0) end
    return ...
end
env.pcall = function(f, ...) return rethrow(pcall(f, ...)) end
-- The error handler does not run for the limit's own error: Lua calls it from inside the count hook,
-- where hooks are off, and a handler that never returned would never be stopped.
env.xpcall = function(f, handler)
    if type(handler) == "function" then
        local plugin_handler = handler
        handler = function(e)
            if limit_tripped then return e end
            return plugin_handler(e)
        end
    end
    return rethrow(xpcall(f, handler))
end

local loaded = {}
env.package = setmetatable({ seeall = function(m) setmetatable(m, { __index = env }) end }, {})

local function copy_table(t)
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
end

-- Built-in libraries become globals only when required, as in lua_sandbox; each sandbox gets its own
-- copy, so removals never touch the host's tables.
local string_lib = copy_table(string)
string_lib.gfind = function() error("renamed to string.gmatch", 2) end
remove_entries("string", string_lib)
-- Strings index the sandbox's string table (so ("").dump is nil too). Host code calls no string
-- methods after this point: it uses the functions captured above, whatever the plugin does to the
-- string metatable it shares with it.
getmetatable("").__index = string_lib



local flush_pending -- forward declaration: the inject buffer's flush (below)

local builtin_libs = {
    string = function() return string_lib end,
    table = function() return copy_table(std.table) end,
    math = function()
        local m = copy_table(std.math)
        local erf, erfc = host.erf, host.erfc -- Python's, behind Lua functions
        m.erf = function(x) return erf(x) end
        m.erfc = function(x) return erfc(x) end
        if not m.mod then m.mod = m.fmod end
        return m
    end,
    os = function() return copy_table(std.os) end,
    io = function()
        -- io.popen where the Lua has none (lupa's PUC Lua 5.1 is built without it: its stub raises):
        -- the host runs the command through /bin/sh; "r" reads its whole output, "w" hands it what
        -- was written at close. The pipe is a table with the file methods plugins use (read, lines,
        -- write, close).
        local function host_popen(cmd, mode)
            if type(cmd) ~= "string" and type(cmd) ~= "number" then typeerror(1, "string", 0, cmd) end
            mode = mode or "r"
            if mode ~= "r" and mode ~= "w" then argerror(2, "invalid mode", 0) end
            local out, pos, closed, written = nil, 1, false, {}
            if mode == "r" then
                local ok, data = host.popen_read(tostring(cmd))
                if not ok then return nil, data end
                out = data
            end
            local p = {}
            local function read1(fmt)
                if fmt == nil or fmt == "*l" or fmt == "*L" then
                    if pos > #out then return nil end
                    local e = sfind(out, "\n", pos, true)
                    local line = ssub(out, pos, e and (fmt == "*L" and e or e - 1) or -1)
                    pos = e and e + 1 or #out + 1
                    return line
                elseif fmt == "*a" then
                    local r = ssub(out, pos)
                    pos = #out + 1
                    return r
                elseif fmt == "*n" then
                    local num, e = smatch(out, "^%s*([-+]?[%d%.eExX]+)()", pos)
                    if not num or not tonumber(num) then return nil end
                    pos = e
                    return tonumber(num)
                elseif type(fmt) == "number" then
                    if pos > #out and fmt > 0 then return nil end
                    local r = ssub(out, pos, pos + fmt - 1)
                    pos = pos + fmt
                    return r
                end
                error("bad argument #1 to 'read' (invalid format)", 3)
            end
            function p:read(...)
                if closed then error("attempt to use a closed file", 2) end
                if not out then return nil, "Bad file descriptor", 9 end
                local n = select("#", ...)
                if n == 0 then return read1(nil) end
                local r = {}
                for i = 1, n do
                    r[i] = read1((select(i, ...)))
                    if r[i] == nil then return unpack(r, 1, i) end
                end
                return unpack(r, 1, n)
            end
            function p:lines()
                return function() return p:read("*l") end
            end
            function p:write(...)
                if closed then error("attempt to use a closed file", 2) end
                if mode ~= "w" then return nil, "Bad file descriptor", 9 end
                for i = 1, select("#", ...) do written[#written + 1] = tostring((select(i, ...))) end
                return p
            end
            function p:flush() return p end
            function p:setvbuf() return true end
            function p:close()
                if closed then error("attempt to use a closed file", 2) end
                closed = true
                if mode == "w" then
                    local ok, err = host.popen_write(tostring(cmd), tconcat(written))
                    if not ok then return nil, err end
                end
                return true
            end
            return p
        end
        local t = copy_table(std.io)
        local popen = jit and t.popen or host_popen -- lupa's PUC Lua: "'popen' not supported"
        if popen and plugin_type == "input" then
            -- a plugin that waits on a command (upstream's moz_telemetry_s3 test polls `ls` for the
            -- files its injected messages produce) needs them in the queue first, as upstream writes
            -- each one at once; hindsight-py batches them until process_message returns
            t.popen = function(...)
                flush_pending()
                return popen(...)
            end
        end
        return t
    end,
    -- coroutine, for inputs and outputs: every coroutine gets the count hook (PUC Lua), resume re-raises
    -- a tripped instruction limit like pcall, and a coroutine cannot yield out of the middle of the
    -- sandbox's own machinery (a metamethod of a message being encoded).
    coroutine = function()
        local c = copy_table(std.coroutine)
        local co_create, co_resume, co_yield = c.create, c.resume, c.yield
        local function create(f)
            if type(f) ~= "function" then argerror(1, "Lua function expected") end
            local co = co_create(f)
            if per_thread_hooks then
                threads[co] = true
                hook_thread(co)
            end
            return co
        end
        local function resumed(...)
            charge_resume()
            return rethrow(...)
        end
        local function resume(co, ...)
            if type(co) ~= "thread" then argerror(1, "coroutine expected") end
            return resumed(co_resume(co, ...))
        end
        -- coroutine.wrap's function: a string error gets the caller's position, as Lua's does. unwrap is
        -- tail-called: PUC Lua keeps a frame for the tail call, LuaJIT does not.
        local caller_level = jit and 2 or 3
        local function unwrap(ok, ...)
            if ok then return ... end
            error((...), caller_level)
        end
        c.create = create
        c.resume = resume
        c.yield = function(...)
            if internal then error("attempt to yield across a C-call boundary", 2) end
            return co_yield(...)
        end
        c.wrap = function(f)
            local co = create(f)
            return function(...) return unwrap(resume(co, ...)) end
        end
        return c
    end,
}
-- LuaJIT's own `bit` is LuaBitOp's API (lua_sandbox_extensions' bit module is LuaBitOp)
if std.bit then builtin_libs.bit = function() return copy_table(std.bit) end end

-- where `require` looks, in this order: the configured path and cpath, hindsight-py's own modules,
-- then the system's Lua 5.1 C modules and Lua files
local paths = {}
for key, p in pairs { user = host.path, user_c = host.cpath, bundled = host.bundled_path, system = host.system_path,
    system_c = host.system_cpath } do
    local t = {}
    if type(p) == "string" then
        for entry in sgmatch(p, "[^;]+") do t[#t + 1] = entry end
    end
    paths[key] = t
end
local no_path = (host.path == nil or host.path == "")

local search
do
    local function readable(file)
        local fh = io_open(file, "rb")
        if fh then fileops.close(fh) return true end
        return false
    end

    function search(paths, name)
        local fname = sgsub(name, "%.", "/")
        for _, template in ipairs(paths) do
            local file = sgsub(template, "%?", fname)
            if readable(file) then return file end
        end
        return nil
    end
end

-- hindsight-py's Lua stand-ins for lua_sandbox_extensions' C modules. Upstream's C costs the plugin
-- no instructions, so neither do they: they stay compiled under LuaJIT, and the functions they
-- export run uncounted (raising their errors at the plugin's call, as luaL_error does). Their
-- second argument is that host API, with the host's io.open (maxminddb reads files from analysis
-- plugins too, which have no io; the C module uses fopen).
local c_standins = { maxminddb = true, cuckoo_filter = true, cuckoo_filter_expire = true, bloom_filter = true,
    xxhash = true, hyperloglog = true, gzfile = true, date = true, circular_buffer = true,
    ["streaming_algorithms.cm_sketch"] = true, ["streaming_algorithms.p2"] = true,
    ["streaming_algorithms.running_stats"] = true, ["streaming_algorithms.time_series"] = true,
    ["streaming_algorithms.matrix"] = true, libinjection = true,
    ["hindsight_py.xxh64"] = true, ["hindsight_py.standin"] = true }
-- gzfile reads any file: lua_sandbox_extensions installs it among its io_modules, so analysis plugins
-- get it only from a path of their own
local io_only_standins = plugin_type == "analysis" and { gzfile = true } or {}
-- their sources run free of the count hook: known before any plugin file is loaded (loadfile51)
for name in pairs(c_standins) do
    local file = search(paths.bundled, name)
    if file then free_sources[chunk_name(file)] = true end
end

local preservers = setmetatable({}, { __mode = "k" })
local standin_api
do
    local function pack(...) return { n = select("#", ...), ... } end

    local function uncounted(f)
        return function(...)
            if internal then return f(...) end
            internal = true
            local r = pack(pcall(f, ...))
            internal = false
            if not r[1] then
                local e = r[2]
                -- luaL_argerror: a method's arguments are counted without self
                -- luaL_argerror: the function named as the caller knows it ('?' through pcall), and a
                -- method's arguments counted without self
                local narg, extra = smatch(type(e) == "string" and e or "", "^bad argument #(%-?%d+) to '[^']*' (.*)$")
                if narg then
                    local ar = getinfo(1, "n") -- how this function was called
                    local fname = ar and ar.name or "?"
                    narg = tonumber(narg)
                    if ar and ar.namewhat == "method" then narg = narg - 1 end
                    if narg == 0 and ar and ar.namewhat == "method" then
                        e = sformat("calling '%s' on bad self %s", fname, extra)
                    else
                        e = sformat("bad argument #%d to '%s' %s", narg, fname, extra)
                    end
                end
                error(e, 2)
            end
            return unpack(r, 2, r.n)
        end
    end
    -- objects of the stand-ins that preserve_data writes (as upstream's serialize functions do): object
    -- -> function(object, key) returning the Lua source that restores it under `key`

    standin_api = { io_open = io_open, uncounted = uncounted,
        preserve = function(object, fn) preservers[object] = fn end, libinjection = host.libinjection }
end

local function load_lua_module(file, name, bundled)
    local standin = bundled and c_standins[name]
    local chunk, err = loadfile51(file, standin)
    if not chunk then error(err, 0) end
    setfenv(chunk, env)
    if standin then return chunk(name, standin_api) end
    return chunk(name)
end

local function load_c_module(file, name)
    local sym = "luaopen_" .. sgsub(name, "%.", "_")
    local f, err = std.package.loadlib(file, sym)
    if not f then return nil, err end
    -- a C module registers itself as a global of the running thread: that goes to a scratch table,
    -- and finish_module decides what the plugin's globals get
    local globals = getfenv(0)
    setfenv(0, {})
    local ok, result = pcall(f, name)
    setfenv(0, globals)
    if not ok then error(result, 0) end
    return result
end

-- Modules lua_sandbox ships as C code that hindsight-py provides through Debian's builds
-- (name -> Debian package). lua_sandbox_extensions installs LuaSocket and lfs among its io_modules:
-- analysis plugins never get those from here (only through a cpath of their own).
local system_c_modules = { lpeg = "lua-lpeg", cjson = "lua-cjson", zlib = "lua-zlib", bit = "lua-bitop" }
if plugin_type ~= "analysis" then
    system_c_modules["socket.core"] = "lua-socket"
    system_c_modules["mime.core"] = "lua-socket"
    system_c_modules.lfs = "lua-filesystem"
end

local sandbox_require -- forward declaration: the hooks below load what the upstream versions loaded

local module_hooks -- name -> function(module) -> the module as the sandbox gives it
do
    -- lua_sandbox ships LuaSocket 3.0-rc1; hindsight-py uses Debian's 3.1. Two differences break plugins
    -- written for the former: its mime.lua required "io" (making `io` a global plugins came to rely on),
    -- and http.open(host, port) defaulted its third argument to socket.tcp.
    local function mime_hook(m)
        if not disabled.io then sandbox_require("io") end
        return m
    end

    local function socket_http_hook(m)
        if type(m) ~= "table" or type(rawget(m, "open")) ~= "function" then return m end
        local orig = m.open
        local tcp = sandbox_require("socket").tcp
        m.open = function(host_name, port, create)
            return orig(host_name, port, create or tcp)
        end
        return m
    end

    module_hooks = {
        mime = mime_hook,
        ["socket.http"] = socket_http_hook,
    }
end

-- Output extensions (outputs/extension.py): Lua code an output ships, run as host code, that gives
-- plugins modules of its own (`provides`) and intercepts modules they require (`wraps`, applied
-- after the hooks above). Each gets its Python functions behind the guard, and a small api.
local provided_modules = {} -- name -> function() -> the module
do
    local api = {
        guard = guard,
        require = function(name) return sandbox_require(name) end,
        -- the rest of a file an output reads whole (closed after), with the host's own io methods
        read_file = function(fh)
            local data = fileops.read(fh, "*a") or ""
            fileops.close(fh)
            return data
        end,
        -- the file an ltn12.source.file(fh) closure reads, or nil
        file_of = function(source)
            if type(source) ~= "function" then return nil end
            for i = 1, 4 do
                local name, value = std.debug.getupvalue(source, i)
                if name == nil then break end
                if io_type(value) == "file" then return value end
            end
            return nil
        end,
    }
    for _, ext in ipairs(host.extensions or {}) do
        local fns = {}
        for k, f in pairs(ext.functions) do fns[k] = guard(f) end
        local chunk_name = HOST_SOURCE .. ext.name
        free_sources[chunk_name] = true
        local chunk = assert(loadstring(ext.source, chunk_name))
        setfenv(chunk, host_env)
        local spec = chunk(fns, api)
        for name, make in pairs(spec.provides or {}) do provided_modules[name] = make end
        for name, hook in pairs(spec.wraps or {}) do
            local prev = module_hooks[name]
            module_hooks[name] = prev and function(m) return hook(prev(m) or m) end or hook
        end
    end
end

local function finish_module(name, result)
    if result == nil then result = rawget(loaded, name) or true end
    remove_entries(name, result)
    if type(result) == "table" and getmetatable(result) == nil then
        -- an empty metatable keeps module tables out of preserved state, as lua_sandbox does
        setmetatable(result, {})
    end
    local hook = module_hooks[name]
    if hook then result = hook(result) or result end
    loaded[name] = result
    if not sfind(name, ".", 1, true) and type(result) == "table" and rawget(env, name) == nil then
        env[name] = result -- C modules register themselves as globals; keep that for our replacements
    end
    return result
end

local require_stack = {}

function sandbox_require(name)
    if type(name) ~= "string" then error("bad argument #1 to 'require' (string expected)", 2) end
    if not sfind(name, "^[%w_.]+$") then error("invalid module name '" .. name .. "'", 2) end
    local v = loaded[name]
    if v ~= nil then return v end
    if disabled[name] then error(sformat("module '%s' disabled", name), 2) end

    local lib = builtin_libs[name]
    if lib then
        local t = remove_entries(name, setmetatable(lib(), {}))
        loaded[name] = t
        env[name] = t
        return t
    end
    local provide = provided_modules[name]
    if provide then return finish_module(name, provide()) end
    if no_path then
        error("no 'path' configuration was specified for the sandbox; external modules have been disabled", 2)
    end
    if require_stack[name] then error("loop or previous error loading module '" .. name .. "'", 2) end
    require_stack[name] = true

    local ok, result = pcall(function()
        local file = search(paths.user, name)
        if file then return finish_module(name, load_lua_module(file, name)) end
        file = search(paths.user_c, name)
        if file then
            local r, err = load_c_module(file, name)
            if r ~= nil then return finish_module(name, r) end
            -- a .so built against lua_sandbox's private API cannot load in stock Lua: fall back to ours
            log(7, sformat("%s: %s not usable (%s); using hindsight-py's %s", plugin_name, file, tostring(err), name))
        end
        if not io_only_standins[name] then
            file = search(paths.bundled, name)
            if file then return finish_module(name, load_lua_module(file, name, true)) end
        end
        if system_c_modules[name] then
            file = search(paths.system_c, name)
            if file then
                local r, err = load_c_module(file, name)
                if r == nil then error(err, 0) end
                if name == "cjson" then r = cjson_shim(r, { output_limit = output_limit }) end
                return finish_module(name, r)
            end
        end
        file = search(paths.system, name)
        if file then return finish_module(name, load_lua_module(file, name)) end
        if system_c_modules[name] then
            error(sformat("module '%s' not found in %s (install Debian's %s, "
                .. "or set HINDSIGHT_PY_LUA_CPATH to where Lua 5.1 C modules are)", name, host.system_cpath,
                system_c_modules[name]), 0)
        end
        error(sformat("module '%s' not found", name), 0)
    end)
    require_stack[name] = nil
    if not ok then error(result, 2) end
    return result
end
env.require = sandbox_require

env.module = function(name, ...)
    local m = loaded[name]
    if type(m) ~= "table" then
        m = env
        for part in sgmatch(name, "[^.]+") do
            local child = rawget(m, part)
            if child == nil then
                child = {}
                m[part] = child
            end
            m = child
        end
        loaded[name] = m
    end
    m._NAME = name
    m._M = m
    m._PACKAGE = sgsub(name, "[^.]+$", "")
    for i = 1, select("#", ...) do
        local f = select(i, ...)
        f(m)
    end
    setfenv(2, m)
    return m
end

----------------------------------------------------------------------------------------------------
-- print and the payload buffer
----------------------------------------------------------------------------------------------------
local payload = {}
local payload_len = 0

local function clear_payload()
    if payload_len > 0 or #payload > 0 then
        payload = {}
        payload_len = 0
    end
end

env.print = function(...)
    clear_payload()
    local n = select("#", ...)
    if log_level ~= 7 or n == 0 then return end
    local to_s = rawget(env, "tostring") or tostring -- upstream calls the sandbox's global tostring
    local parts = {}
    for i = 1, n do
        local s = to_s((select(i, ...)))
        if type(s) ~= "string" and type(s) ~= "number" then
            error("'tostring' must return a string to 'print'", 2)
        end
        s = tostring(s)
        local nul = sfind(s, "\0", 1, true)
        if nul then s = ssub(s, 1, nul - 1) end
        parts[i] = sgsub(s, "[^\32-\126]", " ") -- isprint() in the C locale
    end
    log(7, tconcat(parts, "\t"))
end

local function format_number(x)
    if x ~= x then return "nan" end
    if x == huge then return "inf" end
    if x == -huge then return "-inf" end
    if x == floor(x) and x >= -2147483648 and x <= 2147483647 then return sformat("%d", x) end
    if x > 2147483647 or x < -2147483648 then return sformat("%.17g", x) end
    local s = sformat("%.8f", x)
    s = sgsub(s, "0+$", "")
    s = sgsub(s, "%.$", "")
    return s
end

----------------------------------------------------------------------------------------------------
-- The current message and zero-copy references to it (analysis and output)
----------------------------------------------------------------------------------------------------
local current = nil -- the raw protobuf being processed; nil outside process_message

-- read_message(name, fi, ai, true) returns a userdata that reads the CURRENT message whenever it
-- is used (tostring, add_to_payload, a Fields value, decode_message, io.write in outputs).
local zc_refs = setmetatable({}, { __mode = "k" }) -- userdata -> { name, fi, ai }
local zc_proto = newproxy(true)
local ZC_NAMES = { Uuid = true, Type = true, Logger = true, Payload = true, EnvVersion = true, Hostname = true,
    raw = true, framed = true }

local function zc_value(ud)
    local ref = zc_refs[ud]
    if not ref or current == nil then return nil end
    local v = pb.read(current, ref[1], ref[2], ref[3])
    if v ~= nil and type(v) ~= "string" then
        error(sformat("read_message() zc->name.s: '%s' contains an unsupported type", ref[1]), 0)
    end
    return v
end
getmetatable(zc_proto).__tostring = zc_value

-- depth: the frames between check_index and the API function
local function check_index(v, narg, what, depth)
    if v == nil then return 0 end
    local n = tonumber(v)
    if n == nil then typeerror(narg, "number", depth + 1, nil, v, v) end
    if n < 0 then argerror(narg, what .. " must be >= 0", depth + 1) end
    return floor(n)
end

local function read_message_zc(name, fi, ai)
    if type(name) ~= "string" then typeerror(1, "string", 2, name) end
    fi = check_index(fi, 2, "field index", 2)
    ai = check_index(ai, 3, "array index", 2)
    if not (ZC_NAMES[name] or (#name >= 8 and ssub(name, 1, 7) == "Fields[" and ssub(name, -1) == "]")) then
        error(sformat("heka_create_read_message_zc() field: '%s' not supported/recognized", name), 4)
    end
    local ud = newproxy(zc_proto)
    zc_refs[ud] = { name, fi, ai }
    return ud
end

local function read_message_slow(...)
    local n = select("#", ...)
    local name, fi, ai, zc = ...
    if n == 4 then
        if type(zc) ~= "boolean" then typeerror(4, "boolean", 1, ...) end
        if zc then
            local ud = read_message_zc(name, fi, ai) -- no tail call: argerror counts frames
            return ud
        end
        n = 3
    end
    if n < 1 or n > 3 then error("heka_read_message() incorrect number of arguments", 3) end
    if type(name) ~= "string" then typeerror(1, "string", 1, ...) end
    check_index(fi, 2, "field index", 1)
    check_index(ai, 3, "array index", 1)
    if current == nil then return nil end
    return pb.read(current, name, fi or 0, ai or 0)
end

local function read_message(name, fi, ai, zc, ...)
    if zc ~= nil or name == nil then
        local v = read_message_slow(name, fi, ai, zc, ...) -- no tail call: argerror counts frames
        return v
    end
    if current == nil then return nil end
    return pb.read(current, name, fi or 0, ai or 0)
end

-- the bytes a userdata contributes to add_to_payload, a Fields value or io.write; nil if none
local debug_getmetatable = debug.getmetatable
local function userdata_output(ud)
    if type(ud) == "table" then
        -- hindsight-py's Lua stand-ins for C modules' userdata name their lsb_output in __lsb_output
        local mt = debug_getmetatable(ud)
        local out = mt and rawget(mt, "__lsb_output")
        if out then
            local s = out(ud) -- a plugin can set one too: only a string is taken
            if type(s) == "string" then return s end
        end
        return nil
    end
    if zc_refs[ud] then return zc_value(ud) or "" end
    return nil
end

local flush_written_files = function() end -- outputs: see below

-- Outputs: io.write and file:write also take zero-copy references (lua_sandbox's zc_luaopen_io).
if plugin_type == "output" then
    local function zc_args(depth, first, ...)
        local n = select("#", ...)
        local args = { ... }
        for i = 1, n do
            if type(args[i]) == "userdata" then
                local s = userdata_output(args[i])
                if s == nil then argerror(first + i - 1, "no zero copy support", depth + 1) end
                args[i] = s
            end
        end
        return unpack(args, 1, n)
    end
    local file_mt = getmetatable(io.stdout)
    local f_write = file_mt.write
    file_mt.write = function(fh, a, ...)
        -- the usual call, one string (a plugin's batch file takes one per message): no copy of the arguments
        if type(a) ~= "userdata" and select("#", ...) == 0 then return f_write(fh, a) end
        return f_write(fh, zc_args(0, 2, a, ...))
    end
    local io_write = io.write
    -- Files an output writes: flushed before each commit (control.flush_files), so that what a
    -- plugin wrote for the messages it reported done is in the file, not in a buffer a kill -9
    -- would take with it (upstream's elasticsearch_bulk_api.lua keeps its batch in such a file).
    -- Between commits they buffer in bulk instead of every 4 KB.
    local written = setmetatable({}, { __mode = "k" })
    local function open_tracked(path, mode)
        local fh, err, code = io_open(path, mode)
        if fh and type(mode) == "string" and sfind(mode, "[wa+]") then
            fileops.setvbuf(fh, "full", 262144)
            written[fh] = true
        end
        return fh, err, code
    end
    flush_written_files = function()
        for fh in pairs(written) do
            if io_type(fh) == "file" then fileops.flush(fh) else written[fh] = nil end
        end
    end
    local base_io = builtin_libs.io
    builtin_libs.io = function()
        local t = base_io()
        t.write = function(...) return io_write(zc_args(0, 1, ...)) end
        t.open = open_tracked
        return t
    end
end

-- overflow: inject_payload's function(i, s, ...), called before the output_limit error with the
-- part that did not fit (s, the i-th argument) and all the arguments
local function add_to_payload_from(first, depth, overflow, ...)
    for i = first, select("#", ...) do
        local v = select(i, ...)
        local t = type(v)
        local s
        if t == "string" then s = v
        elseif t == "number" then s = format_number(v)
        elseif t == "boolean" then s = v and "true" or "false"
        elseif t == "nil" then s = "nil"
        elseif t == "userdata" then
            s = userdata_output(v)
            if s == nil then argerror(i, "unknown userdata type", depth + 1) end
        else
            -- a table: only a C module stand-in's object (circular_buffer...) writes itself
            s = t == "table" and userdata_output(v)
            if not s then argerror(i, "unsupported type", depth + 1) end
        end
        payload_len = payload_len + #s
        if output_limit > 0 and payload_len > output_limit then
            if overflow then overflow(i, s, ...) end
            error("output_limit exceeded", depth + 3)
        end
        payload[#payload + 1] = s
    end
end

local function add_to_payload(...)
    if select("#", ...) == 0 then argerror(0, "must have at least one argument") end
    add_to_payload_from(1, 0, nil, ...)
end

----------------------------------------------------------------------------------------------------
-- The message codec environment and injection
----------------------------------------------------------------------------------------------------
local random_pool = ""
local random_pos = 1
local penv = {
    restricted = host.restricted_headers,
    logger = host.logger,
    hostname = host.hostname,
    pid = host.pid,
    now_ns = host.now_ns(),
    output_limit = output_limit,
}
penv.random16 = function()
    if random_pos + 15 > #random_pool then
        random_pool = host.random_uuids(1024)
        random_pos = 1
    end
    local s = ssub(random_pool, random_pos, random_pos + 15)
    random_pos = random_pos + 16
    return s
end
penv.random_uuid = penv.random16 -- the pool already carries the v4 version and variant bits
penv.output_userdata = userdata_output

-- Encoded, framed messages wait here until the next flush; one Python crossing carries them all.
local out = {}
local out_n = 0 -- pieces in `out` (a message may take several)
local out_msgs = 0 -- messages in `out`
local out_bytes = 0
local pending_cp = nil
local have_cp = false
local last_flush_sec = os_time()
local running = true
local FLUSH_COUNT = host.flush_count or 1000
local FLUSH_BYTES = host.flush_bytes or (256 * 1024)
local max_message_size = host.max_message_size or 65536

-- hindsight-py: a message the host refuses (a limit, an invalid message table) is not lost, whatever
-- the plugin does with the error (docs/delivery.md). It crosses to the host, which dead-letters it
-- (refused_messages = "dead_letter", the default) or counts it (= "drop"), and then the error is
-- raised as upstream raises it. An input's refusal is written when the plugin moves on: at its next
-- inject (whose checkpoint the record gets) or the next flush, always before a checkpoint passes it.
-- Only the refused path crosses: the normal path pays one nil check per inject.
local host_refused, host_settle = host.refused, host.settle_refused
local take_refused = host_refused ~= nil and host.refused_messages ~= "drop" -- the host keeps what it refuses
local refusal_pending = false
local last_cp = nil -- an input's checkpoint: the one it was started with, then the latest it passed

local function host_call(fn, ...)
    internal = true
    local ok, r = pcall(fn, ...)
    internal = false
    if not ok then
        -- the refused message could not be set aside: the call fails even if the plugin pcalls it
        limit_tripped = "failed to write a refused message to the dead-letter file: " .. tostring(r)
        error(limit_tripped, 0)
    end
    return r
end

local function settle_refusal(next_cp)
    refusal_pending = false
    host_call(host_settle, next_cp)
end

-- msg: a message table, protobuf string, or nil (nothing that can be kept)
local function refuse(msg, reason)
    if host_refused == nil or msg == nil then return end
    if host_call(host_refused, reason, msg, last_cp) then refusal_pending = true end
end

local function flush()
    if refusal_pending then settle_refusal(nil) end
    if out_msgs == 0 and not have_cp then return end
    internal = true
    local data = out_n > 0 and tconcat(out, "", 1, out_n) or ""
    local n = out_msgs
    for i = 1, out_n do out[i] = nil end
    out_n = 0
    out_msgs = 0
    out_bytes = 0
    local cp, hc = pending_cp, have_cp
    have_cp = false
    local keep_running, now_ns = host.flush(data, n, cp, hc)
    running = keep_running
    penv.now_ns = now_ns
    last_flush_sec = os_time()
    internal = false
end

flush_pending = flush

local function queue_framed(framed)
    out_n = out_n + 1
    out[out_n] = framed
    out_msgs = out_msgs + 1
    out_bytes = out_bytes + #framed
    if out_msgs >= FLUSH_COUNT or out_bytes >= FLUSH_BYTES then
        flush()
    elseif out_n % 64 == 0 and os_time() ~= last_flush_sec then
        flush() -- keeps checkpoints and the queue at most about a second behind
    end
end

local encode_into = pb.encode_into

-- Encode a table straight into the flush buffer: no intermediate message string, no extra copy.
-- Errors are raised at the caller of the API function (depth: frames between it and queue_table).
local function queue_table(t, what, depth)
    if internal then error(what .. "() failed: called while a message is being encoded", 3 + (depth or 0)) end
    internal = true
    local ok, n2, size = pcall(encode_into, out, out_n, t, penv)
    if not ok then
        for i = out_n + 1, #out do out[i] = nil end
        internal = false
        local e, detail = n2, ""
        if e == nil or e == "" then e, detail = "exceeded output_limit", sformat(" (output_limit = %d)", output_limit) end
        e = what .. "() failed: " .. tostring(e)
        refuse(t, e .. detail)
        error(e, 3 + (depth or 0))
    end
    if size > max_message_size then
        for i = out_n + 1, n2 do out[i] = nil end
        internal = false
        refuse(t, sformat("%s() failed: exceeded max_message_size (the message is %d bytes, max_message_size = %d)",
            what, size, max_message_size))
        error(what .. "() failed: exceeded max_message_size", 3 + (depth or 0))
    end
    for i = out_n + 1, n2 do out_bytes = out_bytes + #out[i] end
    out_n = n2
    out_msgs = out_msgs + 1
    internal = false
    if out_msgs >= FLUSH_COUNT or out_bytes >= FLUSH_BYTES then
        flush()
    elseif out_msgs % 64 == 0 and os_time() ~= last_flush_sec then
        flush() -- keeps checkpoints and the queue at most about a second behind
    end
end

-- The protobuf of message table t, or an error worded for `what` at the caller of the API function
-- (depth: the frames between encode_checked and that function).
local function encode_checked(t, what, empty_reason, depth, injecting)
    if internal then error(what .. "() failed: called while a message is being encoded", depth + 3) end
    internal = true
    local ok, s = pcall(pb.encode, t, penv)
    internal = false
    if not ok then
        local detail = ""
        if s == nil or s == "" then s, detail = empty_reason, sformat(" (output_limit = %d)", output_limit) end
        s = what .. "() failed: " .. tostring(s)
        if injecting then refuse(t, s .. detail) end
        error(s, depth + 3)
    end
    if #s > max_message_size then
        if injecting then
            refuse(t, sformat("%s() failed: exceeded max_message_size (the message is %d bytes, "
                .. "max_message_size = %d)", what, #s, max_message_size))
        end
        error(what .. "() failed: exceeded max_message_size", depth + 3)
    end
    return s
end

-- upstream's inject callbacks answer with lsb_heka_im_result: 2 checkpoint, 3 limit
local function callback_rejected(rv, depth)
    if rv == 3 and plugin_type ~= "input" then
        error("inject_message() failed: injection limit exceeded", depth + 3)
    elseif rv == 2 and plugin_type == "input" then
        error("inject_message() failed: checkpoint update", depth + 3)
    end
    error(sformat("inject_message() failed: rejected by the callback rv: %d", rv), depth + 3)
end

local inject_budget = -1 -- analysis only; -1 = unlimited
local inject_budget_limit, inject_budget_name = -1, "process_message_inject_limit" -- for the dead letter

local function set_inject_budget(limit, name)
    inject_budget, inject_budget_limit, inject_budget_name = limit, limit, name
end

----------------------------------------------------------------------------------------------------
-- Stream readers (inputs): userdata, as lua_sandbox's, with the state kept here
----------------------------------------------------------------------------------------------------
local readers = setmetatable({}, { __mode = "k" }) -- userdata -> { name, buf, raw }
local reader_proto = newproxy(true)
local READER_TYPE = "lsb.heka_stream_reader"
local R = {}
getmetatable(reader_proto).__index = R

local function check_reader(ud, ...)
    local st = readers[ud]
    if not st then typeerror(1, READER_TYPE, 1, ud, ...) end
    return st
end

local function reader_need(st)
    -- how many more bytes the message at the head of the buffer needs (lsb_input_buffer's arithmetic)
    local b = st.buf
    if sbyte(b, 1) == 30 and #b >= 2 then
        local hlen = sbyte(b, 2)
        if #b >= hlen + 3 and sbyte(b, 3) == 8 then
            local len, shift = 0, 1
            for i = 4, hlen + 2 do
                local c = sbyte(b, i)
                len = len + (c % 128) * shift
                shift = shift * 128
                if c < 128 then break end
            end
            if len > 0 then return len + hlen + 3 - #b end
        end
    end
    return st.cap - #b
end

function R.find_message(...)
    local n = select("#", ...)
    if n < 2 or n > 3 then argerror(0, "incorrect number of arguments") end
    local self, buf, decode = ...
    local st = check_reader(self, ...)
    local fh = nil
    local tb = type(buf)
    if tb == "string" then
        if buf ~= "" then st.buf = st.buf .. buf end
    elseif tb == "userdata" then
        if io_type(buf) == nil then typeerror(2, "FILE*", 0, ...) end
        if io_type(buf) == "closed file" then error("attempt to use a closed file", 2) end
        fh = buf
    elseif tb ~= "nil" then
        error("buffer must be a nil, string, userdata (FILE*)", 2)
    end
    if n == 3 and type(decode) ~= "boolean" then typeerror(3, "boolean", 0, ...) end
    local found, consumed, raw = pb.find_framed(st.buf, max_message_size, decode ~= false)
    st.buf = ssub(st.buf, consumed + 1)
    local need
    if found then
        st.raw = raw
        need = #st.buf > 0 and 0 or st.cap
    else
        need = reader_need(st)
    end
    if fh then
        if found then return true, consumed, 0 end
        local want = need
        if want < 8192 then want = 8192 end
        if want > st.cap - #st.buf then want = st.cap - #st.buf end
        local chunk = want > 0 and fh:read(want) or nil
        if chunk then st.buf = st.buf .. chunk end
        return false, consumed, chunk and #chunk or 0
    end
    return found, consumed, need
end

function R.decode_message(...)
    if select("#", ...) ~= 2 then
        check_reader(...)
        argerror(0, "incorrect number of arguments")
    end
    local self, s = ...
    local st = check_reader(self, s)
    st.raw = nil
    if type(s) ~= "string" then error("buffer must be string", 2) end
    if s == "" then error("empty protobuf string", 2) end
    if not pb.valid(s) then error("invalid protobuf string", 2) end
    st.raw = s
end

function R.read_message(...)
    local n = select("#", ...)
    if n < 1 or n > 4 then error("read_message() incorrect number of arguments", 2) end
    local self, name, fi, ai = ...
    local st = check_reader(self, name, fi, ai)
    if n == 1 then error("heka_read_message() incorrect number of arguments", 2) end
    if type(name) ~= "string" then typeerror(2, "string", 0, ...) end
    fi = check_index(fi, 3, "field index", 0)
    ai = check_index(ai, 4, "array index", 0)
    if st.raw == nil then return nil end
    return pb.read(st.raw, name, fi, ai)
end

local function create_stream_reader(...)
    if select("#", ...) ~= 1 then argerror(0, "incorrect number of arguments") end
    local name = ...
    if type(name) ~= "string" and type(name) ~= "number" then typeerror(1, "string", 0, ...) end
    name = tostring(name)
    if #name >= 255 then argerror(1, "name is too long") end
    local ud = newproxy(reader_proto)
    readers[ud] = { name = name, buf = "", raw = nil, cap = max_message_size + 258 }
    return ud
end

----------------------------------------------------------------------------------------------------
-- inject_message
----------------------------------------------------------------------------------------------------
-- what of an inject_message argument the host can keep: a table, a string, a stream reader's message
local function keepable(msg)
    local t = type(msg)
    if t == "table" or t == "string" then return msg end
    if t == "userdata" and readers[msg] then return readers[msg].raw end
    return nil
end

local function inject_input(msg, cp)
    local ct = type(cp)
    if ct ~= "nil" and ct ~= "number" and ct ~= "string" then
        local e = "inject_message() unsupported checkpoint type: " .. ct
        refuse(keepable(msg), e)
        error(e, 2)
    end
    if refusal_pending then settle_refusal(cp) end -- the plugin moved on: cp is the one that skips it
    local t = type(msg)
    if inject_cb then -- upstream's per-message callback (test harness): encode, ask, then queue
        local raw
        if t == "table" then
            raw = encode_checked(msg, "inject_message", "exceeded output_limit", 0)
        elseif t == "userdata" then
            raw = check_reader(msg, cp).raw
            if not raw then error("inject_message() attempted to inject a nil message", 2) end
        elseif t == "string" then
            if not pb.valid(msg) then error("inject_message() attempted to inject a invalid protobuf string", 2) end
            raw = msg
        elseif t == "nil" then
            if cp == nil then error("inject_message() message cannot be nil without a checkpoint update", 2) end
        else
            error("inject_message() unsupported message type: " .. t, 2)
        end
        local rv = inject_cb(raw, cp)
        if rv ~= 0 then callback_rejected(rv, 0) end
        if raw then queue_framed(pb.frame(raw)) end
    elseif t == "table" then
        queue_table(msg, "inject_message")
    elseif t == "userdata" then
        local raw = check_reader(msg, cp).raw
        if not raw then error("inject_message() attempted to inject a nil message", 2) end
        queue_framed(pb.frame(raw))
    elseif t == "string" then
        if not pb.valid(msg) then
            refuse(msg, "inject_message() attempted to inject a invalid protobuf string")
            error("inject_message() attempted to inject a invalid protobuf string", 2)
        end
        queue_framed(pb.frame(msg))
    elseif t == "nil" then
        if cp == nil then error("inject_message() message cannot be nil without a checkpoint update", 2) end
    else
        error("inject_message() unsupported message type: " .. t, 2)
    end
    if cp ~= nil then
        if ct == "string" and #cp >= 8192 then error("inject_message() failed: checkpoint update", 2) end
        pending_cp = cp
        have_cp = true
        last_cp = cp
        if msg == nil then -- a shutdown sync point (upstream asks its host at every one)
            if out_msgs == 0 then running = host.is_running() end
            if not running then error("shutting down", 0) end -- a clean stop requested here
        end
    end
    -- hindsight-py: the instruction budget restarts at every inject, so a run-once input that reads a
    -- whole file in one call is never cut off in the middle (upstream silently loses lines there).
    hook_used = 0
end

-- analysis (and output with an inject callback): a table only. depth: as queue_table's.
local function inject_table_only(msg, depth)
    depth = depth or 0
    if type(msg) ~= "table" then typeerror(1, "table", depth, msg) end
    if inject_cb then
        local raw = encode_checked(msg, "inject_message", "exceeded output_limit", depth)
        local rv = inject_cb(raw, nil)
        if rv ~= 0 then callback_rejected(rv, depth) end
        queue_framed(pb.frame(raw))
        return
    end
    if inject_budget == 0 then
        refuse(msg, sformat("inject_message() failed: injection limit exceeded (%s = %d)", inject_budget_name,
            inject_budget_limit))
        error("inject_message() failed: injection limit exceeded", 2 + depth)
    end
    if inject_budget > 0 then inject_budget = inject_budget - 1 end
    queue_table(msg, "inject_message", depth)
end

env.decode_message = function(...)
    local n = select("#", ...)
    if n ~= 1 then argerror(n, "incorrect number of arguments") end
    local s = ...
    local t = type(s)
    if t == "userdata" then
        if not zc_refs[s] then argerror(1, "no zero copy support") end
        s = zc_value(s)
        if s == nil then error("invalid message, too short", 2) end
    elseif t ~= "string" then
        typeerror(1, "string or userdata", 0, ...)
    end
    local ok, msg = pcall(pb.decode, s)
    if not ok then error(msg, 2) end
    return msg
end

-- hindsight-py extension: a message a plugin cannot pass on goes to the dead-letter file, with its
-- reason, and is counted; plugins test `if dead_letter then` to stay portable to upstream.
local dead_lettered = false -- the plugin called dead_letter() for the current message (run_batch)
env.dead_letter = function(reason, data)
    if type(reason) ~= "string" then typeerror(1, "string", 0, reason, data) end
    if data ~= nil and type(data) ~= "string" then typeerror(2, "string", 0, reason, data) end
    dead_lettered = true
    host.dead_letter(reason, data or "")
end

----------------------------------------------------------------------------------------------------
-- Per-type globals
----------------------------------------------------------------------------------------------------
local matchers = setmetatable({}, { __mode = "k" }) -- userdata -> compiled predicate
local matcher_proto = newproxy(true)
local M = {}
getmetatable(matcher_proto).__index = M

function M.eval(...)
    local m = matchers[(...)]
    if not m then typeerror(1, "lsb.heka_message_matcher", 0, ...) end
    if current == nil then error("no active message", 2) end
    return m(current)
end

if plugin_type == "input" then
    env.inject_message = inject_input
    env.is_running = function()
        if inject_cb then
            if inject_cb(nil, nil) ~= 0 then error("is_running() failed: rejected by the callback", 2) end
        end
        if out_msgs == 0 then
            running = host.is_running()
        end
        return running
    end
    env.create_stream_reader = create_stream_reader
elseif plugin_type == "analysis" then
    env.inject_message = function(msg) inject_table_only(msg, 1) end
    env.read_message = read_message
    env.add_to_payload = add_to_payload
    env.inject_payload = function(...)
        local n = select("#", ...)
        local ptype, pname = ...
        if n > 0 and type(ptype) ~= "string" then error("inject_payload() payload_type argument must be a string", 2) end
        if n > 1 and type(pname) ~= "string" then error("inject_payload() payload_name argument must be a string", 2) end
        if n > 2 then
            add_to_payload_from(3, 0, function(i, s, ...)
                -- the payload the host was handed goes to the dead-letter file whole: the buffer,
                -- this part and the parts after it (as text, however they would have failed)
                local whole = { tconcat(payload), s }
                for j = i + 1, select("#", ...) do
                    local v = select(j, ...)
                    local tv = type(v)
                    whole[#whole + 1] = tv == "string" and v or tv == "number" and format_number(v)
                        or tv == "userdata" and userdata_output(v) or tostring(v)
                end
                refuse({ Type = "inject_payload", Payload = tconcat(whole),
                    Fields = { payload_type = ptype or "txt", payload_name = pname } },
                    sformat("inject_payload() output_limit exceeded (output_limit = %d)", output_limit))
                if take_refused then clear_payload() end -- the host has it: it is not sent later
            end, ...)
        end
        if payload_len == 0 then return end
        -- built as upstream builds it (two hash slots up front), so `next` gives the same field order
        local fields = { payload_type = ptype or "txt", payload_name = pname }
        local msg = { Type = "inject_payload", Payload = tconcat(payload), Fields = fields }
        clear_payload()
        inject_table_only(msg, 1)
    end
else -- output
    if inject_cb then
        env.inject_message = function(msg) inject_table_only(msg, 1) end -- lsb_heka_create_output_im
    elseif host.inject_input then -- hindsight creates outputs with an inject callback (into the input queue)
        -- hindsight-py: an output may inject into the input queue (a table only)
        env.inject_message = function(msg)
            if type(msg) ~= "table" then typeerror(1, "table", 0, msg) end
            host.inject_input(pb.frame(encode_checked(msg, "inject_message", "exceeded output_limit", 0, true)))
        end
    end
    env.read_message = read_message
    env.encode_message = function(...)
        local n = select("#", ...)
        local t, framed = ...
        if n == 2 then
            if type(framed) ~= "boolean" then typeerror(2, "boolean", 0, ...) end
        elseif n ~= 1 then
            argerror(n, "incorrect number of arguments")
        end
        if type(t) ~= "table" then typeerror(1, "table", 0, ...) end
        local s = encode_checked(t, "encode_message", "buffer full", 0)
        if framed then s = pb.frame(s) end
        return s
    end
    env.create_message_matcher = function(expr, ...)
        if type(expr) ~= "string" and type(expr) ~= "number" then typeerror(1, "string", 0, expr, ...) end
        local m = guard(host.create_matcher(tostring(expr)))
        if not m then error("invalid message matcher expression", 2) end
        local ud = newproxy(matcher_proto)
        matchers[ud] = m
        return ud
    end
end

----------------------------------------------------------------------------------------------------
-- Output checkpointing (batching and async)
----------------------------------------------------------------------------------------------------
local batching = false
local commit_index = 0 -- index into the current batch of the last committable message
local cur_index = 0
local acks = {}
local acks_n = 0
local async_size = host.async_buffer_size or 0
local failures = 0
local seq_counter = 0

if plugin_type == "output" then
    env.update_checkpoint = function(...)
        local n = select("#", ...)
        local seq, fails = ...
        if n > 2 then error(sformat("update_checkpoint() invalid number of args: %d", n), 2) end
        if n == 2 and type(fails) ~= "number" then typeerror(2, "number", 0, ...) end
        if n >= 1 and type(seq) ~= "number" then typeerror(1, "sequence_id", 0, ...) end
        if ucp_cb then
            if ucp_cb(seq) ~= 0 then error("update_checkpoint() failed: rejected by the callback", 2) end
        end
        if n == 0 then
            if batching then
                batching = false
                if cur_index > 0 then
                    commit_index = cur_index -- reported when the batch returns
                else
                    host.commit_now() -- from timer_event: everything processed so far
                end
            end
            return
        end
        acks_n = acks_n + 1
        acks[acks_n] = seq
        if n == 2 then failures = failures + fails end
    end
end

----------------------------------------------------------------------------------------------------
-- Control: what Python calls
----------------------------------------------------------------------------------------------------
local control = {}
function control.flush_files() flush_written_files() end

local PM_NOT_FOUND = "process_message() function was not found"
local PM_LIMIT = "process_message_inject_limit"

-- an error value as lua_tostring sees it
local function error_text(e)
    local t = type(e)
    if t == "string" or t == "number" then return tostring(e) end
    return "<nil error message>"
end

local function check_rc(what, ok, rc, msg)
    -- a plugin that swallowed the instruction limit with pcall still fails the call
    if limit_tripped then return false, what .. "() " .. limit_tripped end
    if not ok then return false, what .. "() " .. error_text(rc) end
    if type(rc) ~= "number" then return false, what .. "() must return a numeric status code" end
    if msg ~= nil and type(msg) ~= "string" then
        return false, what .. "() must return a nil or string error message"
    end
    if rc ~= floor(rc) then rc = rc > 0 and floor(rc) or -floor(-rc) end -- (int)lua_tointeger
    return true, rc, msg
end

function control.load_plugin(source_path)
    local chunk, err = loadfile51(source_path)
    if not chunk then return false, err end
    setfenv(chunk, env)
    reset_instructions()
    local ok, e = pcall(chunk)
    flush() -- what the top-level chunk injected is written, as upstream writes it at once
    if limit_tripped then return false, limit_tripped end
    if not ok then return false, error_text(e) end
    return true, nil -- as upstream, a missing process_message is found out when it is called
end

function control.set_instruction_limit(n)
    set_instruction_limit(n)
end

-- input: one call of process_message(checkpoint)
function control.run_input(cp)
    local pm = rawget(env, "process_message")
    if type(pm) ~= "function" then return false, PM_NOT_FOUND end
    reset_instructions()
    last_cp = cp
    local ok, rc, msg = pcall(pm, cp)
    local good, a, b = check_rc("process_message", ok, rc, msg)
    if not good and a == "process_message() shutting down" then good, a, b = true, 0, nil end
    local flush_ok, flush_err = pcall(flush)
    if not flush_ok then return false, tostring(flush_err) end
    return good, a, b
end

-- analysis and output: process a batch of raw messages handed over in one crossing.
-- Returns: processed, status, err, commit_index, failures, batching
--   status "ok" | "retry" (the message at processed+1 asked for -3) | "terminate" (err set)
-- index: the message of the current batch the timer runs after (0: between batches), so that an
-- update_checkpoint() inside timer_event commits exactly what was processed before it.
local function fire_timer(ns, shutdown, inject_limit, index)
    local te = rawget(env, "timer_event")
    if type(te) ~= "function" then return false, "timer_event() function was not found" end
    reset_instructions()
    set_inject_budget(inject_limit, "timer_event_inject_limit")
    cur_index = index
    local ok, err = pcall(te, ns, shutdown)
    flush()
    if limit_tripped then return false, "timer_event() " .. limit_tripped end
    if not ok then return false, "timer_event() " .. tostring(err) end
    return true, nil
end

function control.run_timer(ns, shutdown, inject_limit)
    return fire_timer(ns, shutdown, inject_limit, 0)
end

-- hindsight_cli's timers run on data time: "now" is the newest message Timestamp seen (whole
-- seconds), the first timer is due at the first message, and the check follows every message.
local ticker = 0
local timer_inject_limit = -1
local next_due = nil
local data_now = 0

function control.set_ticker(seconds, inject_limit)
    ticker = seconds or 0
    timer_inject_limit = inject_limit or -1
end

function control.data_now()
    return data_now
end

local function data_timer(raw, i)
    local ts = pb.read(raw, "Timestamp", 0, 0)
    if ts then
        local secs = floor(ts / 1e9)
        if secs > data_now then data_now = secs end
    end
    if next_due == nil or data_now >= next_due then
        next_due = data_now + ticker
        return fire_timer(data_now * 1e9, false, timer_inject_limit, i)
    end
    return true, nil
end

function control.run_batch(msgs, n, inject_limit)
    local pm = rawget(env, "process_message")
    if type(pm) ~= "function" then return 0, "terminate", PM_NOT_FOUND, 0, 0, batching end
    commit_index = 0
    local fails_before = failures
    for i = 1, n do
        current = msgs[i]
        cur_index = i
        reset_instructions()
        inject_budget, inject_budget_limit, inject_budget_name = inject_limit, inject_limit, PM_LIMIT
        dead_lettered = false
        seq_counter = seq_counter + 1
        local ok, rc, msg = pcall(pm, seq_counter)
        local good, a, b = check_rc("process_message", ok, rc, msg)
        if not good then
            current = nil
            flush()
            return i - 1, "terminate", a, commit_index, failures - fails_before, batching
        end
        rc = a
        if rc == 0 then
            batching = false
            commit_index = i
        elseif rc == -1 or rc == -2 then
            if rc == -1 then
                failures = failures + 1
                if b then log(4, sformat("received: %d msg: %s", rc, b)) end
                -- an output that failed a message has not delivered it: the host keeps it, unless the
                -- plugin dead-lettered it itself (hindsight-py's elasticsearch_bulk_api.lua does)
                if plugin_type == "output" and not dead_lettered then
                    refuse(current, b and "process_message() returned -1: " .. tostring(b)
                        or "process_message() returned -1")
                end
            end
            if not batching and async_size == 0 then commit_index = i end
        elseif rc == -3 then
            current = nil
            flush()
            return i - 1, "retry", b, commit_index, failures - fails_before, batching
        elseif rc == -4 then
            batching = true
        elseif rc == -5 then
            if async_size == 0 then
                current = nil
                return i - 1, "terminate", "cannot use async checkpointing without a configured buffer",
                    commit_index, failures - fails_before, batching
            end
        elseif rc > 0 then
            current = nil
            flush()
            return i - 1, "terminate", "process_message() received a termination status code", commit_index,
                failures - fails_before, batching
        else
            if b then log(4, sformat("received: %d msg: %s", rc, b)) end
        end
        if ticker > 0 then
            local tok, terr = data_timer(msgs[i], i)
            if not tok then
                current = nil
                return i, "terminate", terr, commit_index, failures - fails_before, batching
            end
        end
    end
    current = nil
    flush()
    return n, "ok", nil, commit_index, failures - fails_before, batching
end

function control.take_acks()
    if acks_n == 0 then return nil end
    local a = acks
    acks = {}
    acks_n = 0
    return a
end

function control.seq_counter()
    return seq_counter
end

----------------------------------------------------------------------------------------------------
-- preserve_data: lua_sandbox's .data format (Lua source that rebuilds the globals)
----------------------------------------------------------------------------------------------------
-- lsb_serialize_double / %q / true|false; nil for anything else
local function serialize_value(v)
    local t = type(v)
    if t == "string" then return sformat("%q", v) end
    if t == "number" then
        if v ~= v then return "0/0" end
        if v == huge then return "1/0" end
        if v == -huge then return "-1/0" end
        return format_number(v)
    end
    if t == "boolean" then return v and "true" or "false" end
    return nil
end

--- serialize_state() -> text | nil, err: the plugin's globals as lua_sandbox's preserve_global_data
-- writes them. Skipped values: functions, threads, userdata (none of ours has a serializer), tables
-- with a metatable (module tables, API objects) other than the C module stand-ins' objects (which
-- write themselves, as upstream's serialize functions do) and the globals table itself. A key that cannot be
-- written (a table, a function) fails the whole save, as upstream.
function control.serialize_state()
    sethook() -- lua_sandbox saves with the limits off
    local version = rawget(env, "_PRESERVATION_VERSION")
    version = type(version) == "number" and (version >= 0 and floor(version) or -floor(-version)) or 0
    local lines = { sformat("if _PRESERVATION_VERSION and _PRESERVATION_VERSION ~= %d then return end", version) }
    local seen = {}
    local failure = nil
    local function walk(path, tbl)
        for k, v in next, tbl do
            if failure then return end
            local vt = type(v)
            local preserver = vt == "table" and preservers[v]
            local skip = vt == "function" or vt == "thread" or vt == "userdata" or vt == "nil"
                or (vt == "table" and (v == env or getmetatable(v) ~= nil))
                or (tbl == env and k == "_PRESERVATION_VERSION")
            if preserver or not skip then
                local kl = serialize_value(k)
                if not kl then
                    failure = sformat("serialize_data cannot preserve type '%s'", type(k))
                    return
                end
                local p = path .. "[" .. kl .. "]"
                if vt == "table" then
                    if seen[v] then
                        lines[#lines + 1] = p .. " = " .. seen[v]
                    elseif preserver then -- a stand-in's object writes itself
                        seen[v] = p
                        lines[#lines + 1] = preserver(v, p)
                    else
                        seen[v] = p
                        lines[#lines + 1] = p .. " = {}"
                        walk(p, v)
                    end
                else
                    lines[#lines + 1] = p .. " = " .. serialize_value(v)
                end
            end
        end
    end
    walk("_G", env)
    set_instruction_limit(host.instruction_limit)
    if failure then return nil, failure end
    return tconcat(lines, "\n") .. "\n", nil
end

function control.restore_state(path)
    local src, err = read_source(path)
    local chunk = nil
    if src then chunk, err = loadstring(src, "@" .. path) end
    if not chunk then return false, "restore_global_data " .. tostring(err) end
    setfenv(chunk, env)
    sethook() -- lua_sandbox restores with the limits off
    local ok, e = pcall(chunk)
    set_instruction_limit(host.instruction_limit)
    if not ok then return false, "restore_global_data " .. tostring(e) end
    return true, nil
end

----------------------------------------------------------------------------------------------------
-- Control for test harnesses: upstream's C test API, as tests/lua_harness.py drives it. The runner
-- calls none of these; plugins reach none of them (only Python holds `control`).
----------------------------------------------------------------------------------------------------
-- lsb_heka_pm_*: one process_message call with the given message and arguments (outputs get no
-- sequence id when none is passed). Returns check_rc's values.
function control.pm_direct(raw, ...)
    if type(rawget(env, "process_message")) ~= "function" then return false, PM_NOT_FOUND end
    current = raw
    reset_instructions()
    local ok, rc, msg = pcall(env.process_message, ...)
    current = nil
    flush()
    return check_rc("process_message", ok, rc, msg)
end

-- what lua_sandbox's test function read_message_zc does with a zero-copy reference
function control.zero_copy_value(ud)
    if type(ud) ~= "userdata" or not zc_refs[ud] then error("bad argument #1 to '?' (no zero copy support)", 0) end
    return zc_value(ud)
end

function control.has_timer()
    return type(rawget(env, "timer_event")) == "function"
end

-- the plugin's globals, as lsb_get_lua gives them: to read values, and to add functions as lsb_add_function does
function control.env()
    return env
end

-- Lua run with the unrestricted standard library, e.g. to give a plugin the loadfile
-- lua_sandbox's generic test sandbox has. What it hands the plugin is its own choice.
function control.execute_privileged(source, ...)
    local chunk = assert(loadstring(source, HOST_SOURCE .. "privileged"))
    setfenv(chunk, setmetatable({}, { __index = std }))
    return chunk(...)
end

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
