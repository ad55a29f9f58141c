-- maxminddb for hindsight-py: the API of the lua-maxminddb C module lua_sandbox_extensions builds
-- (on libmaxminddb), in Lua: a reader of MaxMind DB (.mmdb) files, GeoIP2/GeoLite2 and others.
--
-- maxminddb.open(filename)   -> db; raises libmaxminddb's message when the file cannot be read
--                               or is not a MaxMind DB
-- db:lookup(address)         -> result for an IPv4/IPv6 text address; raises getaddrinfo's text
--                               for what is no numeric address, "Success." when the database has
--                               no entry for it (as the C module does: libmaxminddb's status)
-- result:get(key...)         -> the string, number of the value at that path (map keys, array
--                               indexes as strings or numbers, from 0; negative from the end);
--                               raises on a missing path or a map/array/boolean/64-bit value
--
-- The file is read once into memory. Lookups decode only what the path names. It is loaded with
-- the host's io.open (env.lua), so that analysis plugins, which have no io, can open databases as
-- with the C module. Errors are raised at the plugin's call (env.lua's wrapper), as luaL_error.

local _, host_api = ...
local string = require "string"
local math = require "math"
local sbyte, ssub, sfind, smatch, sformat = string.byte, string.sub, string.find, string.match, string.format
local ldexp, floor, huge = math.ldexp, math.floor, math.huge
local open = host_api and host_api.io_open or require("io").open
local pairs, setmetatable, getmetatable, tonumber, tostring, type, error, select = pairs, setmetatable,
    getmetatable, tonumber, tostring, type, error, select

local M = {}

local ERR_OPEN = "Error opening the specified MaxMind DB file"
local ERR_METADATA = "The MaxMind DB file contains invalid metadata"
local ERR_CORRUPT = "The MaxMind DB file's search tree is corrupt"
local ERR_DATA = "The MaxMind DB file's data section contains bad data (unknown data type or corrupt data)"
local ERR_PATH = "The lookup path does not match the data (key that doesn't exist, array index bigger than "
    .. "the array, expected array or map where none exists)"
local ERR_IPV6_IN_V4 = "You attempted to look up an IPv6 address in an IPv4-only database"
local ERR_NONAME = "Name or service not known"
local ERR_UNSUPPORTED = "Unsupported maxmind data type"

local METADATA_MARKER = "\171\205\239MaxMind.com"

-- big-endian unsigned integer of bytes [i, i + n)
local function uint(s, i, n)
    local v = 0
    for k = i, i + n - 1 do v = v * 256 + (sbyte(s, k) or 0) end
    return v
end

local function to_double(s, i)
    local b1, b2 = sbyte(s, i, i + 1)
    local sign = b1 >= 128 and -1 or 1
    local exp = (b1 % 128) * 16 + floor(b2 / 16)
    local mant = (b2 % 16) * 2 ^ 48 + uint(s, i + 2, 6)
    if exp == 2047 then return mant == 0 and sign * huge or 0 / 0 end
    if exp == 0 then return sign * ldexp(mant, -1074) end
    return sign * ldexp(mant + 2 ^ 52, exp - 1075)
end

local function to_float(s, i)
    local b1, b2 = sbyte(s, i, i + 1)
    local sign = b1 >= 128 and -1 or 1
    local exp = (b1 % 128) * 2 + floor(b2 / 128)
    local mant = (b2 % 128) * 65536 + uint(s, i + 2, 2)
    if exp == 255 then return mant == 0 and sign * huge or 0 / 0 end
    if exp == 0 then return sign * ldexp(mant, -149) end
    return sign * ldexp(mant + 2 ^ 23, exp - 150)
end

-- Data section decoding. `base` is the 1-based position of the data section in the file string;
-- offsets are 0-based from it. decode_header returns type, size, next offset.
local T_POINTER, T_STRING, T_DOUBLE, T_BYTES, T_U16, T_U32, T_MAP, T_I32, T_U64, T_U128, T_ARRAY, T_BOOL, T_FLOAT =
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15

local function header(s, base, off)
    local ctrl = sbyte(s, base + off)
    if not ctrl then error(ERR_DATA, 0) end
    off = off + 1
    local t = floor(ctrl / 32)
    if t == 0 then
        local ext = sbyte(s, base + off)
        if not ext then error(ERR_DATA, 0) end
        t = 7 + ext
        off = off + 1
    end
    if t == T_POINTER then
        local ss, vvv = floor(ctrl / 8) % 4, ctrl % 8
        local p
        if ss == 0 then
            p = vvv * 256 + uint(s, base + off, 1)
        elseif ss == 1 then
            p = vvv * 65536 + uint(s, base + off, 2) + 2048
        elseif ss == 2 then
            p = vvv * 16777216 + uint(s, base + off, 3) + 526336
        else
            p = uint(s, base + off, 4)
        end
        return t, p, off + ss + 1
    end
    local size = ctrl % 32
    if size == 29 then
        size = 29 + uint(s, base + off, 1)
        off = off + 1
    elseif size == 30 then
        size = 285 + uint(s, base + off, 2)
        off = off + 2
    elseif size == 31 then
        size = 65821 + uint(s, base + off, 3)
        off = off + 3
    end
    return t, size, off
end

local skip -- forward

-- the value at `off`: type, Lua value (nil for maps and arrays), the offset after it; a pointer is
-- followed (the returned offset is the one after the pointer)
local function value_at(s, base, off)
    local t, size, nxt = header(s, base, off)
    local after = nil
    if t == T_POINTER then
        after = nxt
        t, size, nxt = header(s, base, size)
        if t == T_POINTER then error(ERR_DATA, 0) end
    end
    local v
    local p = base + nxt
    if t == T_STRING or t == T_BYTES then
        v = ssub(s, p, p + size - 1)
    elseif t == T_DOUBLE then
        if size ~= 8 then error(ERR_DATA, 0) end
        v = to_double(s, p)
    elseif t == T_FLOAT then
        if size ~= 4 then error(ERR_DATA, 0) end
        v = to_float(s, p)
    elseif t == T_U16 or t == T_U32 or t == T_U64 or t == T_U128 then
        v = uint(s, p, size)
    elseif t == T_I32 then
        v = uint(s, p, size)
        if size == 4 and v >= 2147483648 then v = v - 4294967296 end
    elseif t == T_BOOL then
        v = size ~= 0
        size = 0
    elseif t == T_MAP or t == T_ARRAY then
        return t, size, after or nxt, nxt -- size: entries; 4th: where the entries start
    else
        error(ERR_DATA, 0)
    end
    return t, v, after or (nxt + size)
end

function skip(s, base, off)
    local t, v, nxt, first = value_at(s, base, off)
    if t == T_MAP or t == T_ARRAY then
        local o = first
        for _ = 1, (t == T_MAP and 2 or 1) * v do o = skip(s, base, o) end
        if nxt == first then return o end -- inline container: ends after its entries
        return nxt -- reached through a pointer: continue after the pointer
    end
    return nxt
end

-- fully decoded value (maps and arrays as tables): for the metadata
local function decode(s, base, off)
    local t, v, nxt, first = value_at(s, base, off)
    if t ~= T_MAP and t ~= T_ARRAY then return v, nxt end
    local r, o = {}, first
    for i = 1, v do
        if t == T_MAP then
            local k
            k, o = decode(s, base, o)
            r[k], o = decode(s, base, o)
        else
            r[i], o = decode(s, base, o)
        end
    end
    if nxt == first then nxt = o end
    return r, nxt
end

----------------------------------------------------------------------------------------------------
-- Databases
----------------------------------------------------------------------------------------------------
local DB = {}
local db_mt = { __index = DB, __metatable = "MMDB_s" }
local Result = {}
local result_mt = { __index = Result, __metatable = "MMDB_lookup_result_s" }

function M.open(filename)
    if type(filename) ~= "string" and type(filename) ~= "number" then
        error(sformat("bad argument #1 to 'open' (string expected, got %s)",
            select("#", filename) == 0 and "no value" or type(filename)), 0)
    end
    local fh = open(tostring(filename), "rb")
    if not fh then error(ERR_OPEN, 0) end
    local s = fh:read("*a")
    fh:close()
    if not s then error(ERR_OPEN, 0) end
    -- the metadata follows the last marker, within the last 128 KiB
    local mpos, from = nil, #s - 131072
    if from < 1 then from = 1 end
    while true do
        local i = sfind(s, METADATA_MARKER, from, true)
        if not i then break end
        mpos, from = i, i + 1
    end
    if not mpos then error(ERR_METADATA, 0) end
    local mbase = mpos + #METADATA_MARKER
    local ok, meta = pcall(decode, s, mbase, 0)
    if not ok or type(meta) ~= "table" then error(ERR_METADATA, 0) end
    local nodes, rsize, ipv = meta.node_count, meta.record_size, meta.ip_version
    if type(nodes) ~= "number" or (rsize ~= 24 and rsize ~= 28 and rsize ~= 32) or (ipv ~= 4 and ipv ~= 6) then
        error(ERR_METADATA, 0)
    end
    local node_bytes = rsize / 4
    local tree_size = nodes * node_bytes
    local db = setmetatable({
        s = s,
        nodes = nodes,
        rsize = rsize,
        node_bytes = node_bytes,
        ip_version = ipv,
        data_base = tree_size + 16 + 1,
        metadata = meta,
    }, db_mt)
    return db
end

local function record(db, node, right)
    local s, p = db.s, node * db.node_bytes + 1
    local rsize = db.rsize
    if rsize == 24 then
        return uint(s, p + (right and 3 or 0), 3)
    elseif rsize == 32 then
        return uint(s, p + (right and 4 or 0), 4)
    end
    local middle = sbyte(s, p + 3)
    if right then
        return (middle % 16) * 16777216 + uint(s, p + 4, 3)
    end
    return floor(middle / 16) * 16777216 + uint(s, p, 3)
end

-- address text -> array of 4 (IPv4) or 16 (IPv6) bytes, or nil
local function parse_ipv4(a)
    local b1, b2, b3, b4 = smatch(a, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not b1 then return nil end
    local t = { tonumber(b1), tonumber(b2), tonumber(b3), tonumber(b4) }
    for i = 1, 4 do if t[i] > 255 then return nil end end
    return t
end

local function parse_ipv6(a)
    if not sfind(a, ":", 1, true) or sfind(a, "[^%x:%.]") then return nil end
    local head, tail = a, nil
    local dc = sfind(a, "::", 1, true)
    if dc then
        head, tail = ssub(a, 1, dc - 1), ssub(a, dc + 2)
        if sfind(tail, "::", 1, true) then return nil end
    end
    local function groups(part, allow_v4)
        local g = {}
        if part == "" then return g end
        local n = 0
        for piece in (part .. ":"):gmatch("([^:]*):") do
            n = n + 1
            if piece == "" then return nil end
            if allow_v4 and sfind(piece, ".", 1, true) then
                if piece ~= smatch(part, "[^:]*$") then return nil end
                local v4 = parse_ipv4(piece)
                if not v4 then return nil end
                g[#g + 1] = v4[1] * 256 + v4[2]
                g[#g + 1] = v4[3] * 256 + v4[4]
            else
                if #piece > 4 or sfind(piece, "[^%x]") then return nil end
                g[#g + 1] = tonumber(piece, 16)
            end
        end
        return g
    end
    local hg = groups(head, tail == nil)
    local tg = tail and groups(tail, true) or {}
    if not hg or not tg then return nil end
    local all = {}
    if tail then
        if #hg + #tg > 7 then return nil end
        for i = 1, #hg do all[#all + 1] = hg[i] end
        for _ = 1, 8 - #hg - #tg do all[#all + 1] = 0 end
        for i = 1, #tg do all[#all + 1] = tg[i] end
    else
        if #hg ~= 8 then return nil end
        all = hg
    end
    local bytes = {}
    for i = 1, 8 do
        bytes[2 * i - 1] = floor(all[i] / 256)
        bytes[2 * i] = all[i] % 256
    end
    return bytes
end

function DB:lookup(address)
    if getmetatable(self) ~= "MMDB_s" then
        error("bad argument #1 to 'lookup' (MMDB_s expected, got " .. type(self) .. ")", 0)
    end
    if type(address) ~= "string" and type(address) ~= "number" then
        error(sformat("bad argument #2 to 'lookup' (string expected, got %s)",
            address == nil and "no value" or type(address)), 0)
    end
    address = tostring(address)
    local bytes = parse_ipv4(address)
    local v4 = bytes ~= nil
    if not bytes then bytes = parse_ipv6(address) end
    if not bytes then error(ERR_NONAME, 0) end
    local nodes = self.nodes
    local node = 0
    if self.ip_version == 4 then
        if not v4 then error(ERR_IPV6_IN_V4, 0) end
    elseif v4 then
        -- IPv4 addresses live under ::/96 in an IPv6 tree
        for _ = 1, 96 do
            if node >= nodes then break end
            node = record(self, node, false)
        end
    end
    for i = 1, #bytes do
        local b = bytes[i]
        for bit = 7, 0, -1 do
            if node >= nodes then break end
            local set = floor(b / 2 ^ bit) % 2 == 1
            node = record(self, node, set)
        end
        if node >= nodes then break end
    end
    if node == nodes then error("Success.", 0) end -- no entry: the C module raises libmaxminddb's status
    if node < nodes then error(ERR_CORRUPT, 0) end
    local off = node - nodes - 16
    return setmetatable({ db = self, off = off }, result_mt)
end

function Result:get(...)
    if getmetatable(self) ~= "MMDB_lookup_result_s" then
        error("bad argument #1 to 'get' (MMDB_lookup_result_s expected, got " .. type(self) .. ")", 0)
    end
    local db = self.db
    local s, base = db.s, db.data_base
    local off = self.off
    local n = select("#", ...)
    if n > 13 then n = 13 end -- the C module reads at most 13 keys
    for i = 1, n do
        local key = select(i, ...)
        if type(key) ~= "string" and type(key) ~= "number" then
            error(sformat("bad argument #%d to 'get' (string expected, got %s)", i + 1, type(key)), 0)
        end
        key = tostring(key)
        local t, count, _, first = value_at(s, base, off)
        if t == T_MAP then
            local o, found = first, nil
            for _ = 1, count do
                local _, k, vo = value_at(s, base, o)
                if k == key then
                    found = vo
                    break
                end
                o = skip(s, base, vo)
            end
            if not found then error(ERR_PATH, 0) end
            off = found
        elseif t == T_ARRAY then
            local idx = smatch(key, "^%-?%d+$") and tonumber(key)
            if not idx then error(ERR_PATH, 0) end
            if idx < 0 then idx = count + idx end
            if idx < 0 or idx >= count then error(ERR_PATH, 0) end
            local o = first
            for _ = 1, idx do o = skip(s, base, o) end
            off = o
        else
            error(ERR_PATH, 0)
        end
    end
    local t, v = value_at(s, base, off)
    if t == T_STRING or t == T_BYTES or t == T_DOUBLE or t == T_FLOAT or t == T_U16 or t == T_U32
        or t == T_I32 then
        return v
    end
    error(ERR_UNSUPPORTED, 0)
end

-- in the sandbox: uncounted, as upstream's C (env.lua)
if host_api then
    for k, f in pairs(M) do M[k] = host_api.uncounted(f) end
    for k, f in pairs(DB) do DB[k] = host_api.uncounted(f) end
    for k, f in pairs(Result) do Result[k] = host_api.uncounted(f) end
end

return M
