-- The current message, as analysis and output plugins read it: read_message and its zero-copy
-- references, decode_message, message matchers, and what userdata (zero-copy references, the C
-- module stand-ins' objects) write where a string is expected, io.write in outputs included.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Adapts the io library for outputs
-- (builtin_libs, modules.lua); returns the API functions (message_inject.lua installs them) and what
-- control.lua needs: set_current, zero_copy_value, flush_written_files.

local S = ...
local host, pb, guard, plugin_type, builtin_libs = S.host, S.pb, S.guard, S.plugin_type, S.builtin_libs
local argerror, typeerror, check_index, fileops = S.argerror, S.typeerror, S.check_index, S.fileops

local type, pairs, error, pcall, tostring, select, setmetatable, getmetatable, rawget, unpack = type, pairs,
    error, pcall, tostring, select, setmetatable, getmetatable, rawget, unpack
local sfind, ssub, sformat = string.find, string.sub, string.format
local io_open, io_type, io_write = io.open, io.type, io.write
local newproxy = newproxy
local debug_getmetatable = debug.getmetatable

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

local function decode_message(...)
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

-- outputs: the host compiles the expression (message_matcher's syntax); Lua holds it behind the guard
local function create_message_matcher(expr, ...)
    if type(expr) ~= "string" and type(expr) ~= "number" then typeerror(1, "string", 0, expr, ...) end
    local m = guard(host.create_matcher(tostring(expr)))
    if not m then error("invalid message matcher expression", 2) end
    local ud = newproxy(matcher_proto)
    matchers[ud] = m
    return ud
end

-- the message process_message runs for (control.lua): raw protobuf, or nil between calls
local function set_current(raw)
    current = raw
end

-- what lua_sandbox's test function read_message_zc does with a zero-copy reference
local function zero_copy_value(ud)
    if type(ud) ~= "userdata" or not zc_refs[ud] then error("bad argument #1 to '?' (no zero copy support)", 0) end
    return zc_value(ud)
end

return {
    read_message = read_message, userdata_output = userdata_output, decode_message = decode_message,
    create_message_matcher = create_message_matcher, set_current = set_current, zero_copy_value = zero_copy_value,
    flush_written_files = flush_written_files,
}
