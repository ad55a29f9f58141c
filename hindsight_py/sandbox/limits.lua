-- Running plugin code: argument errors as lua_sandbox's C API raises them, the instruction limit
-- (and the sandbox's own machinery, which it does not count), how a plugin call ends, and loading
-- Lua 5.1 files.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Installs the sandbox's pcall and xpcall;
-- returns the functions below for the parts loaded after it.

local S = ...
local env, free_sources = S.env, S.free_sources

local type, ipairs, pairs, error, pcall, xpcall, tostring, tonumber, select, setmetatable, getmetatable,
    loadstring, unpack = type, ipairs, pairs, error, pcall, xpcall, tostring, tonumber, select, setmetatable,
    getmetatable, loadstring, unpack
local sfind, sgsub, ssub, sformat, sbyte, smatch = string.find, string.gsub, string.sub, string.format,
    string.byte, string.match
local tconcat = table.concat
local floor, ceil = math.floor, math.ceil
local io_open = io.open
local sethook, getinfo = debug.sethook, debug.getinfo
local jit = jit
local co_lib = coroutine

----------------------------------------------------------------------------------------------------
-- Argument errors
----------------------------------------------------------------------------------------------------

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

-- depth: the frames between check_index and the API function
local function check_index(v, narg, what, depth)
    if v == nil then return 0 end
    local n = tonumber(v)
    if n == nil then typeerror(narg, "number", depth + 1, nil, v, v) end
    if n < 0 then argerror(narg, what .. " must be >= 0", depth + 1) end
    return floor(n)
end

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
-- code runs in the interpreter, where the hook counts it; hindsight-py's own machinery (the host's
-- files, the protobuf codec) is still compiled, as upstream's C costs the plugin no instructions. A trace
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

-- The budget restarts: an input's every inject_message (message_inject.lua).
local function restart_count()
    hook_used = 0
end

-- The instruction limit's error once it has fired in this call, else nil.
local function tripped()
    return limit_tripped
end

-- Fails the plugin's call with `reason`, as the instruction limit does: even if the plugin catches
-- the error, the call fails.
local function trip(reason)
    limit_tripped = reason
    error(reason, 0)
end

-- Marks the sandbox's own machinery running (true) or done (false), where it cannot go through
-- machinery() below (the inject buffer's flush, a call of the host).
local function set_internal(on)
    internal = on
end

-- f(...) as the sandbox's own machinery (encoding a message): uncounted, and not re-entered: nil
-- (nothing else) when the machinery is running already (plugin code it called, such as a metamethod
-- of the message, called it again). f raises no error (machinery(pcall, g, ...) for a g that may).
local function leave(...)
    internal = false
    return ...
end
local function machinery(f, ...)
    if internal then return nil end
    internal = true
    return leave(f(...))
end

-- The function of a C module stand-in (modules.lua), run uncounted as upstream's C is; its errors
-- are raised at the plugin's call, as luaL_error and luaL_argerror raise them.
local uncounted
do
    local function pack(...) return { n = select("#", ...), ... } end

    function uncounted(f)
        return function(...)
            if internal then return f(...) end
            internal = true
            local r = pack(pcall(f, ...))
            internal = false
            if not r[1] then
                local e = r[2]
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

-- coroutine, for inputs and outputs (modules.lua builds the library from this): every coroutine gets
-- the count hook (PUC Lua), resume re-raises a tripped instruction limit like pcall, and a coroutine
-- cannot yield out of the middle of the sandbox's own machinery (a metamethod of a message being
-- encoded).
local function coroutine_lib()
    local c = {}
    for k, v in pairs(co_lib) do c[k] = v end
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
end

----------------------------------------------------------------------------------------------------
-- How a call of plugin code ended
----------------------------------------------------------------------------------------------------
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

return {
    argerror = argerror, typeerror = typeerror, check_index = check_index,
    set_instruction_limit = set_instruction_limit, reset_instructions = reset_instructions,
    restart_count = restart_count, tripped = tripped, trip = trip, set_internal = set_internal,
    machinery = machinery, uncounted = uncounted, coroutine_lib = coroutine_lib, rethrow = rethrow,
    error_text = error_text, check_rc = check_rc,
    fileops = fileops, read_source = read_source, chunk_name = chunk_name, loadfile51 = loadfile51,
}
