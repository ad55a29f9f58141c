-- date for hindsight-py: the API of the `date` module lua_sandbox_extensions' taskcluster decoders
-- require (trink/lua_date, a C++ wrapper of Howard Hinnant's date/tz library), in Lua, for the UTC
-- time zone. Times are nanoseconds since the Unix epoch (numbers).
--
-- date.format(ns, fmt[, tz[, locale]])  -> text; %S and %T carry the nanoseconds ("05.123456789")
-- date.time()                           -> now
-- date.time(text, fmt[, tz[, locale]])  -> parsed (%Y %m %d %H %M %S[.fraction] %j %b %a %Z %z %%);
--                                          raises "parse failed"
-- date.time({year=, month=, day=, hour=, min=, sec=, sec_frac=}[, tz]) -> normalised as date does
--                                          (month 9 day 31 is October 1st)
-- date.floor(ns[, "day"|"hour"|"minute"|"second"[, tz]])
-- date.get(ns, "year"|"month"|"day"|"hour"|"min"|"sec"|"sec_frac"|"wday" | table[, tz])
--
-- Only "UTC" (and "Etc/UTC", "GMT", "Etc/GMT", "Z") is known: another zone raises
-- "<zone> not found in timezone database", and a locale other than "C" raises as std::locale does.

local _, host_api = ...
local string = require "string"
local math = require "math"
local os = require "os"
local standin = require "hindsight_py.standin"
local floor = math.floor
local sformat, ssub, sfind, smatch, sbyte = string.format, string.sub, string.find, string.match, string.byte
local type, select, tonumber, tostring, error, pairs = type, select, tonumber, tostring, error, pairs

local M = {}

local UTC = { UTC = true, ["Etc/UTC"] = true, GMT = true, ["Etc/GMT"] = true, Z = true, ["Etc/Zulu"] = true }
local DAYS = { "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday" }
local MONTHS = { "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December" }

local function zone(tz)
    if tz == nil then return "UTC" end
    if type(tz) ~= "string" then error("bad argument (string expected, got " .. type(tz) .. ")", 0) end
    if not UTC[tz] then error(tz .. " not found in timezone database", 0) end
    return tz
end

local function locale(l)
    if l ~= nil and l ~= "C" and l ~= "POSIX" then
        error("locale::facet::_S_create_c_locale name not valid", 0)
    end
end

-- days since 1970-01-01 of a proleptic Gregorian date, and back (Hinnant's algorithms)
local function days_from_civil(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = floor(y / 400)
    local yoe = y - era * 400
    local mp = (m + 9) % 12
    local doy = floor((153 * mp + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

local function civil_from_days(z)
    z = z + 719468
    local era = floor(z / 146097)
    local doe = z - era * 146097
    local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
    local y = yoe + era * 400
    local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
    local mp = floor((5 * doy + 2) / 153)
    local d = doy - floor((153 * mp + 2) / 5) + 1
    local m = mp < 10 and mp + 3 or mp - 9
    if m <= 2 then y = y + 1 end
    return y, m, d
end

-- ns -> fields (UTC)
local function fields(ns)
    local sec = floor(ns / 1e9)
    local frac_ns = ns - sec * 1e9
    local days = floor(sec / 86400)
    local sod = sec - days * 86400
    local y, m, d = civil_from_days(days)
    return {
        year = y, month = m, day = d,
        hour = floor(sod / 3600), min = floor(sod % 3600 / 60), sec = sod % 60,
        ns = frac_ns, wday = (days + 4) % 7, -- 0 = Sunday
        yday = days - days_from_civil(y, 1, 1) + 1,
    }
end

local function check_number(v, narg, fname)
    if type(v) == "string" then v = tonumber(v) end
    if type(v) ~= "number" then
        standin.argerror(narg, fname, "number expected, got " .. (v == nil and "no value" or type(v)))
    end
    return v
end

local function secfrac(f)
    return sformat("%02d.%09d", f.sec, floor(f.ns + 0.5) >= 1e9 and 999999999 or floor(f.ns + 0.5))
end

local CONV = {
    Y = function(f) return sformat("%04d", f.year) end,
    y = function(f) return sformat("%02d", f.year % 100) end,
    C = function(f) return sformat("%02d", floor(f.year / 100)) end,
    m = function(f) return sformat("%02d", f.month) end,
    d = function(f) return sformat("%02d", f.day) end,
    e = function(f) return sformat("%2d", f.day) end,
    H = function(f) return sformat("%02d", f.hour) end,
    I = function(f) return sformat("%02d", (f.hour + 11) % 12 + 1) end,
    M = function(f) return sformat("%02d", f.min) end,
    S = secfrac,
    p = function(f) return f.hour < 12 and "AM" or "PM" end,
    j = function(f) return sformat("%03d", f.yday) end,
    a = function(f) return ssub(DAYS[f.wday + 1], 1, 3) end,
    A = function(f) return DAYS[f.wday + 1] end,
    b = function(f) return ssub(MONTHS[f.month], 1, 3) end,
    h = function(f) return ssub(MONTHS[f.month], 1, 3) end,
    B = function(f) return MONTHS[f.month] end,
    u = function(f) return tostring(f.wday == 0 and 7 or f.wday) end,
    w = function(f) return tostring(f.wday) end,
    Z = function() return "UTC" end,
    z = function() return "+0000" end,
    n = function() return "\n" end,
    t = function() return "\t" end,
    ["%"] = function() return "%" end,
}
CONV.F = function(f) return CONV.Y(f) .. "-" .. CONV.m(f) .. "-" .. CONV.d(f) end
CONV.T = function(f) return CONV.H(f) .. ":" .. CONV.M(f) .. ":" .. secfrac(f) end
CONV.R = function(f) return CONV.H(f) .. ":" .. CONV.M(f) end
CONV.D = function(f) return CONV.m(f) .. "/" .. CONV.d(f) .. "/" .. CONV.y(f) end
CONV.c = function(f)
    return CONV.a(f) .. " " .. CONV.b(f) .. " " .. CONV.e(f) .. " " .. CONV.H(f) .. ":" .. CONV.M(f) .. ":"
        .. sformat("%02d", f.sec) .. " " .. CONV.Y(f)
end

function M.format(...)
    local ns, fmt, tz, loc = ...
    ns = check_number(ns, 1, "format")
    if type(fmt) ~= "string" then
        standin.argerror(2, "format", "string expected, got " .. (select("#", ...) < 2 and "no value" or type(fmt)))
    end
    zone(tz)
    locale(loc)
    local f = fields(ns >= 0 and floor(ns) or -floor(-ns)) -- the C++ truncates to whole nanoseconds
    return (fmt:gsub("%%[EO]?(.)", function(c)
        local conv = CONV[c]
        if conv then return conv(f) end
        return nil
    end))
end

local MONTH_NUM = {}
for i, name in pairs(MONTHS) do MONTH_NUM[ssub(name, 1, 3):lower()] = i end

-- parse text by fmt: fields, or nil
local function parse(text, fmt)
    local f = { year = 1970, month = 1, day = 1, hour = 0, min = 0, sec = 0, frac = 0, offset = 0 }
    local p, i = 1, 1
    while i <= #fmt do
        local c = ssub(fmt, i, i)
        if c == "%" then
            local spec = ssub(fmt, i + 1, i + 1)
            if spec == "E" or spec == "O" then
                i = i + 1
                spec = ssub(fmt, i + 1, i + 1)
            end
            i = i + 2
            local num = function(maxw)
                local s, e = sfind(text, "^[+-]?%d+", p)
                if not s then return nil end
                if e - s + 1 > maxw then e = s + maxw - 1 end
                local v = tonumber(ssub(text, s, e))
                p = e + 1
                return v
            end
            local v
            if spec == "Y" then v = num(4); f.year = v
            elseif spec == "m" then v = num(2); f.month = v
            elseif spec == "d" or spec == "e" then
                p = sfind(text, "%S", p) or p
                v = num(2); f.day = v
            elseif spec == "H" then v = num(2); f.hour = v
            elseif spec == "M" then v = num(2); f.min = v
            elseif spec == "S" then
                v = num(2); f.sec = v
                local fr = smatch(text, "^%.(%d+)", p)
                if fr then
                    f.frac = tonumber("0." .. fr)
                    p = p + 1 + #fr
                end
            elseif spec == "j" then v = num(3); f.yday = v
            elseif spec == "b" or spec == "h" or spec == "B" then
                local w = smatch(text, "^%a+", p)
                v = w and MONTH_NUM[ssub(w, 1, 3):lower()]
                if v then f.month = v; p = p + #w end
            elseif spec == "a" or spec == "A" then
                local w = smatch(text, "^%a+", p)
                v = w
                if w then p = p + #w end
            elseif spec == "Z" then
                local w = smatch(text, "^[%w/_+-]+", p)
                v = w
                if w then p = p + #w end
            elseif spec == "z" then
                local sign, hh, mm = smatch(text, "^([+-])(%d%d):?(%d%d)", p)
                if sign then
                    v = true
                    f.offset = (tonumber(hh) * 3600 + tonumber(mm) * 60) * (sign == "-" and -1 or 1)
                    p = p + #smatch(text, "^[+-]%d%d:?%d%d", p)
                end
            elseif spec == "T" then
                local h, m, s = smatch(text, "^(%d%d?):(%d%d):(%d%d)", p)
                if h then
                    v = true
                    f.hour, f.min, f.sec = tonumber(h), tonumber(m), tonumber(s)
                    p = p + #smatch(text, "^%d%d?:%d%d:%d%d", p)
                    local fr = smatch(text, "^%.(%d+)", p)
                    if fr then f.frac = tonumber("0." .. fr); p = p + 1 + #fr end
                end
            elseif spec == "%" then
                v = ssub(text, p, p) == "%" or nil
                p = p + 1
            elseif spec == "n" or spec == "t" then
                v = true
                p = sfind(text, "%S", p) or #text + 1
            else
                return nil
            end
            if v == nil then return nil end
        elseif sfind(c, "%s") then
            p = sfind(text, "%S", p) or #text + 1
            i = i + 1
        else
            if ssub(text, p, p) ~= c then return nil end
            p = p + 1
            i = i + 1
        end
    end
    if f.month < 1 or f.month > 12 or f.day < 1 or f.day > 31 or f.hour > 24 or f.min > 59 or f.sec > 60 then
        return nil
    end
    return f
end

local function to_ns(y, m, d, h, mi, s, frac)
    -- month and day overflow as date::year_month_day does through sys_days
    y = y + floor((m - 1) / 12)
    m = (m - 1) % 12 + 1
    local days = days_from_civil(y, m, 1) + d - 1
    return ((days * 86400 + h * 3600 + mi * 60 + s) * 1e9) + floor(frac * 1e9 + 0.5)
end

function M.time(...)
    local n = select("#", ...)
    local a, b, c, d = ...
    local t = type(a)
    if n == 0 then return floor(os.time() * 1e9) end -- whole seconds: the sandbox's clock
    if t == "string" then
        if type(b) ~= "string" then
            standin.argerror(2, "time", "string expected, got " .. (n < 2 and "no value" or type(b)))
        end
        zone(c)
        locale(d)
        local f = parse(a, b)
        if not f then error("parse failed", 0) end
        local ns = to_ns(f.year, f.month, f.day, f.hour, f.min, f.sec, f.frac)
        if f.yday then ns = to_ns(f.year, 1, f.yday, f.hour, f.min, f.sec, f.frac) end
        return ns - f.offset * 1e9
    elseif t == "table" then
        zone(b)
        local function int(k) return floor(tonumber(a[k]) or 0) end
        return to_ns(int("year"), int("month"), int("day"), int("hour"), int("min"), int("sec"),
            tonumber(a.sec_frac) or 0)
    end
    standin.argerror(1, "time", "string, table, none expected, got " .. t)
end

local UNITS = { day = 86400e9, hour = 3600e9, minute = 60e9, second = 1e9 }

function M.floor(...)
    local ns, unit, tz = ...
    ns = check_number(ns, 1, "floor")
    unit = unit or "day"
    local size = UNITS[unit]
    if not size then standin.argerror(2, "floor", "invalid option '" .. tostring(unit) .. "'") end
    zone(tz)
    ns = ns >= 0 and floor(ns) or -floor(-ns)
    return floor(ns / size) * size
end

local GET = { year = true, month = true, day = true, hour = true, min = true, sec = true, sec_frac = true, wday = true }

function M.get(...)
    local ns, what, tz = ...
    ns = check_number(ns, 1, "get")
    local t = type(what)
    if t ~= "table" and t ~= "string" then standin.argerror(2, "get", "table, string expected, got " .. t) end
    if t == "string" and not GET[what] then standin.argerror(2, "get", "invalid option '" .. what .. "'") end
    zone(tz)
    local f = fields(ns >= 0 and floor(ns) or -floor(-ns))
    local values = { year = f.year, month = f.month, day = f.day, hour = f.hour, min = f.min, sec = f.sec,
        sec_frac = f.ns / 1e9, wday = f.wday + 1 }
    if t == "string" then return values[what] end
    for k, v in pairs(values) do what[k] = v end
    return what
end

standin.finish(host_api, M) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
