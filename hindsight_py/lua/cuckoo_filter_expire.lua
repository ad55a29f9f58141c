-- cuckoo_filter_expire for hindsight-py: the API of lua_sandbox_extensions' C module, in Lua, with
-- its hashing (XXH64, seed 1), 32-bit fingerprints, 4-entry buckets, 256 time intervals and
-- kick-out sequence (glibc's rand()).
--
-- cuckoo_filter_expire.new(items, interval_minutes)
--                               -> filter for at least `items` (> 256) items; entries expire
--                                  after 256 intervals (1 <= interval_minutes <= 1440)
-- cuckoo_filter_expire.version() -> "1.1.1"
-- cf:add(key, ns)               -> true, 0 if added; false, delta (intervals between this and the
--                                  earlier sighting) if (probably) present; false if `ns` is older
--                                  than the filter's window
-- cf:query(key)                 -> true, interval if (probably) present, else false
-- cf:delete(key)                -> true if it was found and removed
-- cf:count(), cf:clear(), cf:current_interval() -> ns of the interval's start, interval index
-- cf:fromstring(count, bytes)   -> restores the buckets (the C module's layout: per bucket 4
--                                  little-endian uint32 fingerprints, then 4 interval bytes)
-- cf:tostring()                 -> count, bytes (hindsight-py's preservation)
--
-- An entry is kept as one number, fingerprint * 256 + interval.

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local xxh = require "hindsight_py.xxh64"
local hash_key, hash_u32 = xxh.key, xxh.u32
local bxor = require "bit".bxor
local floor, ceil = math.floor, math.ceil
local sbyte, schar, sformat = string.byte, string.char, string.format
local tconcat = table.concat
local pairs, type, error, select, setmetatable, getmetatable = pairs, type, error, select, setmetatable,
    getmetatable

local BUCKET_SIZE = 4
local MAX_INTERVALS = 256
local MT_NAME = "mozsvc.cuckoo_filter_expire"

local M = {}
local CF = {}
local mt = { __index = CF, __metatable = MT_NAME }

local standin = require "hindsight_py.standin"
local clp2, log2, argerror = standin.clp2, standin.log2, standin.argerror
local function check(self, nargs, given, fname) standin.check(self, MT_NAME, nargs, given, fname) end

local function toint(v, narg, fname, default)
    if v == nil and default then return default end
    if type(v) ~= "number" then
        argerror(narg, fname, sformat("number expected, got %s", v == nil and "no value" or type(v)))
    end
    return v >= 0 and floor(v) or ceil(v)
end

local function clear(cf)
    cf.interval = MAX_INTERVALS - 1
    cf.lru_interval = -1
    cf.cnt = 0
    cf.timet = (MAX_INTERVALS - 1) * cf.interval_size
    cf.e = {}
end

local preserve = standin.preserver(function(self)
    return sformat("cuckoo_filter_expire.new(%d, %d)", self.items, self.interval_size / 60)
end)

function M.new(...)
    if select("#", ...) ~= 2 then argerror(0, "new", "incorrect number of arguments") end
    local items, mins = ...
    items = toint(items, 1, "new")
    if not (items > MAX_INTERVALS) then argerror(1, "new", "items must be > 256") end
    mins = toint(mins, 2, "new", 1)
    if not (mins > 0 and mins <= 1440) then argerror(2, "new", "0 < interval size <= 1440") end
    local buckets = clp2(floor(items / BUCKET_SIZE))
    local cf = setmetatable({
        items = buckets * BUCKET_SIZE,
        num_buckets = buckets,
        shift = 2 ^ (32 - log2(buckets)),
        interval_size = 60 * mins,
        rand = xxh.glibc_rand(),
    }, mt)
    clear(cf)
    return standin.track(host_api, cf, preserve)
end

function M.version() return "1.1.1" end

local function r2v(cf, idx)
    idx = idx - (cf.interval + 1) % MAX_INTERVALS
    if idx < 0 then idx = idx + MAX_INTERVALS end
    return idx
end

local function v2r(cf, idx)
    return (idx + (cf.interval + 1) % MAX_INTERVALS) % MAX_INTERVALS
end

local function alt(cf, i, fp)
    local h = hash_u32(fp, 1)
    return bxor(i, floor(h / cf.shift)) % 4294967296
end

local function locate(cf, key, fname)
    local h, l = hash_key(key, 1)
    if not h then argerror(2, fname, "must be a string or number") end
    local fp = h == 0 and 1 or h
    return fp, l % cf.num_buckets
end

-- an entry of `fp` in bucket b: its slot, or nil
local function find(e, b, fp)
    b = b * 4
    for j = b + 1, b + 4 do
        local v = e[j]
        if v and v ~= 0 and floor(v / 256) == fp then return j end
    end
    return nil
end

local function insert_empty(e, b, fp, interval)
    b = b * 4
    for j = b + 1, b + 4 do
        local v = e[j]
        if v == nil or v == 0 then
            e[j] = fp * 256 + interval
            return true
        end
    end
    return false
end

-- a duplicate in bucket b: false, delta (and the newer interval kept)
local function insert_lookup(cf, b, fp, interval)
    local j = find(cf.e, b, fp)
    if not j then return nil end
    local prev = cf.e[j] % 256
    local cidx, pidx = r2v(cf, interval), r2v(cf, prev)
    if cidx > pidx then
        cf.e[j] = fp * 256 + interval
        return cidx - pidx
    end
    return pidx - cidx
end

local function prune_range(cf, first, last)
    local e = cf.e
    local lru = MAX_INTERVALS - 1
    for j = 1, cf.num_buckets * BUCKET_SIZE do
        local v = e[j]
        if v and v ~= 0 then
            local interval = v % 256
            if (last >= first and interval >= first and interval <= last)
                or (last < first and (interval >= first or interval <= last)) then
                e[j] = 0
                cf.cnt = cf.cnt - 1
            end
            local vidx = r2v(cf, interval)
            if vidx < lru then lru = vidx end
        end
    end
    return v2r(cf, lru)
end

function CF:add(...)
    check(self, 3, standin.count(...), "add")
    local key, ns = ...
    local fp, i1 = locate(self, key, "add")
    if type(ns) ~= "number" then
        argerror(3, "add", sformat("number expected, got %s", ns == nil and "no value" or type(ns)))
    end
    local timet = ns / 1e9
    timet = timet >= 0 and floor(timet) or ceil(timet)
    local size = self.interval_size
    timet = timet - math.fmod(timet, size)
    if timet < self.timet - size * (MAX_INTERVALS - 1) then return false end
    local interval = math.fmod(timet / size, MAX_INTERVALS)
    if interval < 0 then interval = interval + MAX_INTERVALS end -- C's % on a negative time_t
    if self.interval ~= interval and timet > self.timet then -- expire due to time
        local oldest = (self.interval + 1) % MAX_INTERVALS
        if self.cnt > 0 then self.lru_interval = prune_range(self, oldest, interval) end
        self.interval = interval
        self.timet = timet
    end
    if self.cnt / self.items >= 0.8 then -- expire due to capacity
        if self.lru_interval == -1 then self.lru_interval = (self.interval + 1) % MAX_INTERVALS end
        self.lru_interval = prune_range(self, self.lru_interval, self.lru_interval)
    end
    local i2 = alt(self, i1, fp)
    local d = insert_lookup(self, i1, fp, interval) or insert_lookup(self, i2, fp, interval)
    if d then return false, d end
    local e = self.e
    if not (insert_empty(e, i1, fp, interval) or insert_empty(e, i2, fp, interval)) then
        local rand = self.rand
        local ri = rand() % 2 == 1 and i1 or i2
        local done = false
        for _ = 1, 512 do
            local slot = ri * 4 + rand() % BUCKET_SIZE + 1
            local v = e[slot]
            e[slot] = fp * 256 + interval
            fp, interval = floor(v / 256), v % 256
            ri = alt(self, ri, fp)
            d = insert_lookup(self, ri, fp, interval)
            if d then return false, d end
            if insert_empty(e, ri, fp, interval) then
                done = true
                break
            end
        end
        if not done then error("the cuckoo filter is full", 0) end
    end
    self.cnt = self.cnt + 1
    return true, 0
end

function CF:query(...)
    check(self, 2, standin.count(...), "query")
    local fp, i1 = locate(self, (...), "query")
    local e = self.e
    local j = find(e, i1, fp) or find(e, alt(self, i1, fp), fp)
    if j then return true, e[j] % 256 end
    return false
end

function CF:delete(...)
    check(self, 2, standin.count(...), "delete")
    local fp, i1 = locate(self, (...), "delete")
    local e = self.e
    local j = find(e, i1, fp) or find(e, alt(self, i1, fp), fp)
    if j then
        e[j] = 0
        self.cnt = self.cnt - 1
        return true
    end
    return false
end

function CF:count(...)
    check(self, 1, standin.count(...), "count")
    return self.cnt
end

function CF:clear(...)
    check(self, 1, standin.count(...), "clear")
    clear(self)
end

function CF:current_interval(...)
    check(self, 1, standin.count(...), "current_interval")
    return self.timet * 1e9, self.interval
end

local function u32(s, i)
    local b1, b2, b3, b4 = sbyte(s, i, i + 3)
    return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end

function CF:fromstring(...)
    local n = select("#", ...)
    local cnt, s = ...
    if n == 3 then cnt, s = select(1, ...), select(3, ...) end -- interval_size was removed from the API
    check(self, 3, (n == 3 and 2 or n) + 1, "fromstring")
    if type(cnt) ~= "number" then argerror(2, "fromstring", "number expected, got " .. type(cnt)) end
    if type(s) ~= "string" then argerror(3, "fromstring", "string expected, got " .. type(s)) end
    local bytes = self.num_buckets * 20
    if #s ~= bytes then error(sformat("fromstring() bytes found: %d, expected %d", #s, bytes), 0) end
    local e = {}
    for b = 0, self.num_buckets - 1 do
        local p = b * 20 + 1
        for k = 1, 4 do
            local fp = u32(s, p + (k - 1) * 4)
            if fp ~= 0 then e[b * 4 + k] = fp * 256 + sbyte(s, p + 16 + k - 1) end
        end
    end
    self.e = e
    self.cnt = floor(cnt)
end

function CF:tostring()
    local parts, e = {}, self.e
    for b = 0, self.num_buckets - 1 do
        local fps, ivs = {}, {}
        for k = 1, 4 do
            local v = e[b * 4 + k] or 0
            local fp = floor(v / 256)
            fps[k] = schar(fp % 256, floor(fp / 256) % 256, floor(fp / 65536) % 256, floor(fp / 16777216))
            ivs[k] = schar(fp == 0 and 0 or v % 256)
        end
        parts[#parts + 1] = tconcat(fps) .. tconcat(ivs)
    end
    return self.cnt, tconcat(parts)
end


standin.finish(host_api, M, CF) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
