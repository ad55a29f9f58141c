-- `require` and the libraries it gives: the built-in libraries as per-plugin copies with
-- lua_sandbox's removals, modules searched on the configured paths and then on hindsight-py's own
-- and the system's, Lua and C modules, the Lua stand-ins for C modules, the outputs' Lua extensions,
-- and `module`.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Installs package, require and module;
-- returns builtin_libs (message_read.lua and message_inject.lua adapt the io library) and
-- preservers (the stand-ins' objects preserve_data writes, control.lua).

local S = ...
local host, env, std, guard, run_host_chunk, free_sources = S.host, S.env, S.std, S.guard, S.run_host_chunk,
    S.free_sources
local plugin_type, plugin_name, log, output_limit = S.plugin_type, S.plugin_name, S.log, S.output_limit
local disabled, remove_entries, cjson_shim = S.disabled, S.remove_entries, S.cjson_shim
local argerror, typeerror, uncounted, coroutine_lib = S.argerror, S.typeerror, S.uncounted, S.coroutine_lib
local fileops, chunk_name, loadfile51 = S.fileops, S.chunk_name, S.loadfile51

local type, pairs, ipairs, error, pcall, tostring, tonumber, select, setmetatable, getmetatable, rawget,
    setfenv, getfenv, unpack = type, pairs, ipairs, error, pcall, tostring, tonumber, select, setmetatable,
    getmetatable, rawget, setfenv, getfenv, unpack
local sfind, sgsub, ssub, sformat, sgmatch, smatch = string.find, string.gsub, string.sub, string.format,
    string.gmatch, string.match
local tconcat = table.concat
local io_open, io_type = io.open, io.type
local jit = jit

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
        local t = copy_table(std.io)
        if plugin_type == "input" then
            -- lupa's PUC Lua: "'popen' not supported"; message_inject.lua has inputs flush first
            t.popen = jit and t.popen or host_popen
        end
        return t
    end,
    -- coroutine, for inputs and outputs: under the instruction limit (limits.lua)
    coroutine = coroutine_lib,
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
    ["streaming_algorithms.matrix"] = true, libinjection = true, sax = true,
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
-- objects of the stand-ins that preserve_data writes (as upstream's serialize functions do): object
-- -> function(object, key) returning the Lua source that restores it under `key`
local standin_api = { io_open = io_open, uncounted = uncounted,
    preserve = function(object, fn) preservers[object] = fn end, libinjection = host.libinjection }

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
        local spec = run_host_chunk(ext.source, ext.name, fns, api)
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

return { builtin_libs = builtin_libs, preservers = preservers }
