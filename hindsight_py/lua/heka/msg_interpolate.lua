-- heka.msg_interpolate for hindsight-py: fills `%{...}` placeholders in a string from the
-- message being processed (API of lua_sandbox_extensions' heka.msg_interpolate).
--
-- A placeholder name is tried, in order, as
--   1. a header: Uuid, Timestamp, Type, Logger, Severity, Payload, EnvVersion, Pid, Hostname;
--   2. a field: `%{name}` reads Fields[name] (`%{Fields[name]}` is accepted too);
--   3. a strftime format, e.g. `%{%Y.%m.%d}`, applied to `secs` (or now), in UTC as the
--      sandbox's TZ is UTC. It counts only if it changed the text.
-- A placeholder that none of these resolves is left as it is.
--
-- Deliberate difference: Uuid is written as a canonical, zero-padded UUID (upstream's format
-- drops leading zeros of each byte).

local os     = require "os"
local math   = require "math"
local string = require "string"

local date, floor = os.date, math.floor
local find, format, byte, gsub = string.find, string.format, string.byte, string.gsub
local tostring, type = tostring, type

local M = {}

-- read_message is resolved at call time: a module may be loaded before the sandbox defines it.
local function read(name)
    return read_message(name)
end

function M.get_uuid(uuid)
    if type(uuid) ~= "string" or #uuid ~= 16 then return nil end
    return format("%02X%02X%02X%02X-%02X%02X-%02X%02X-%02X%02X-%02X%02X%02X%02X%02X%02X", byte(uuid, 1, 16))
end

-- ns -> "YYYY-mm-ddTHH:MM:SS.nnnnnnnnnZ"
function M.get_timestamp(ns)
    local secs = floor(ns / 1e9)
    return format("%s.%09dZ", date("!%Y-%m-%dT%H:%M:%S", secs), ns - secs * 1e9)
end

-- ns -> "YYYY-mm-ddTHH:MM:SS.mmmZ"
function M.get_timestamp_ms(ns)
    local secs = floor(ns / 1e9)
    return format("%s.%03dZ", date("!%Y-%m-%dT%H:%M:%S", secs), floor((ns - secs * 1e9) / 1e6))
end

M.header_fields = {
    Uuid       = function() return M.get_uuid(read("Uuid")) end,
    Timestamp  = function()
        local ns = read("Timestamp")
        if ns then return M.get_timestamp(ns) end
    end,
    Type       = function() return read("Type") end,
    Logger     = function() return read("Logger") end,
    Severity   = function() return read("Severity") end,
    Payload    = function() return read("Payload") end,
    EnvVersion = function() return read("EnvVersion") end,
    Pid        = function() return read("Pid") end,
    Hostname   = function() return read("Hostname") end,
}

local function resolve(name, secs)
    local header = M.header_fields[name]
    if header then return header() end

    local value
    if find(name, "^Fields%[.*%]$") then
        value = read(name)
    else
        value = read("Fields[" .. name .. "]")
    end
    if value ~= nil then
        if type(value) == "boolean" then return tostring(value) end
        return value
    end

    -- "!" makes os.date use UTC whatever the process TZ is; the sandbox runs in UTC anyway.
    local fmt = name
    if byte(fmt, 1) ~= 33 then fmt = "!" .. fmt end
    local text = date(fmt, secs)
    if type(text) == "string" and text ~= name then return text end
    return nil
end

-- Returns the interpolated string and the number of placeholders seen (string.gsub's results).
function M.interpolate(value, secs)
    if type(value) == "string" and not find(value, "%{", 1, true) then return value, 0 end
    return gsub(value, "%%{(.-)}", function(name) return resolve(name, secs) end)
end

return M
