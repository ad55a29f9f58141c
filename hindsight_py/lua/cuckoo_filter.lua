-- cuckoo_filter for hindsight-py: the API of lua_sandbox_extensions' C module, in Lua, with the
-- same hashing (XXH64, seed 1), 16-bit fingerprints, 4-entry buckets and kick-out sequence
-- (glibc's rand()), so that the same items collide and the same counts come out.
--
-- cuckoo_filter.new(items)      -> filter for at least `items` (> 4) items
-- cuckoo_filter.version()       -> "1.1.1"
-- cf:add(key)                   -> true if added, false if (probably) present; raises "the
--                                  cuckoo filter is full"
-- cf:query(key)                 -> true if (probably) present
-- cf:delete(key)                -> true if it was found and removed
-- cf:count()                    -> items added less those deleted
-- cf:clear()
-- cf:fromstring(count, bytes)   -> restores the buckets (the C module's memory layout: 4
--                                  little-endian uint16 per bucket), as preserved data does
-- cf:tostring()                 -> count, bytes: the other half (hindsight-py's preservation)
-- Keys are strings or numbers (a number hashes as the 8 bytes of its double).

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local xxh = require "hindsight_py.xxh64"
local hash_key, hash_u16 = xxh.key, xxh.u16
local bxor = require "bit".bxor
local floor, ceil = math.floor, math.ceil
local sbyte, schar, sformat = string.byte, string.char, string.format
local tconcat = table.concat
local pairs, type, error, select, setmetatable, getmetatable, tostring = pairs, type, error, select, setmetatable,
    getmetatable, tostring

local BUCKET_SIZE = 4
local MT_NAME = "mozsvc.cuckoo_filter"

local M = {}
local CF = {}
local mt = { __index = CF, __metatable = MT_NAME }

local standin = require "hindsight_py.standin"
local clp2, log2, argerror = standin.clp2, standin.log2, standin.argerror
local function check(self, nargs, given, fname) standin.check(self, MT_NAME, nargs, given, fname) end

local function key_hash(key, fname)
    local h, l = hash_key(key, 1)
    if not h then argerror(2, fname, "must be a string or number") end
    return h, l
end

local preserve = standin.preserver(function(self) return sformat("cuckoo_filter.new(%d)", self.items) end)

function M.new(...)
    local n = select("#", ...)
    if n ~= 1 then argerror(0, "new", "incorrect number of arguments") end
    local items = ...
    if type(items) ~= "number" then
        argerror(1, "new", sformat("number expected, got %s", items == nil and "nil" or type(items)))
    end
    items = items >= 0 and floor(items) or ceil(items)
    if not (items > 4) then argerror(1, "new", "items must be > 4") end
    local buckets = clp2(floor(items / BUCKET_SIZE))
    local cf = setmetatable({
        items = buckets * BUCKET_SIZE,
        num_buckets = buckets,
        shift = 2 ^ (32 - log2(buckets)), -- hash >> (nlz + 32), on the high word
        cnt = 0,
        e = {}, -- entries: [bucket * 4 + slot], 0-based bucket, slot 1..4; 0 = empty
        rand = xxh.glibc_rand(),
    }, mt)
    return standin.track(host_api, cf, preserve)
end

function M.version() return "1.1.1" end

local function alt(cf, i, fp)
    local h = hash_u16(fp, 1)
    return bxor(i, floor(h / cf.shift)) % 4294967296
end

local function lookup(e, b, fp)
    b = b * 4
    return e[b + 1] == fp or e[b + 2] == fp or e[b + 3] == fp or e[b + 4] == fp
end

local function insert_empty(e, b, fp)
    b = b * 4
    for j = b + 1, b + 4 do
        local v = e[j]
        if v == nil or v == 0 then
            e[j] = fp
            return true
        end
    end
    return false
end

local function locate(cf, key, fname)
    local h, l = key_hash(key, fname)
    local fp = floor(h / 65536)
    if fp == 0 then fp = 1 end
    local i1 = l % cf.num_buckets
    return fp, i1
end

function CF:add(...)
    check(self, 2, standin.count(...), "add")
    local fp, i1 = locate(self, (...), "add")
    local i2 = alt(self, i1, fp)
    local e = self.e
    -- a fingerprint already in either bucket counts as a duplicate
    if lookup(e, i1, fp) or lookup(e, i2, fp) then return false end
    if insert_empty(e, i1, fp) or insert_empty(e, i2, fp) then
        self.cnt = self.cnt + 1
        return true
    end
    local rand = self.rand
    local ri = rand() % 2 == 1 and i1 or i2
    for _ = 1, 512 do
        local slot = ri * 4 + rand() % BUCKET_SIZE + 1
        fp, e[slot] = e[slot], fp
        ri = alt(self, ri, fp)
        if lookup(e, ri, fp) then return false end
        if insert_empty(e, ri, fp) then
            self.cnt = self.cnt + 1
            return true
        end
    end
    error("the cuckoo filter is full", 0)
end

function CF:query(...)
    check(self, 2, standin.count(...), "query")
    local fp, i1 = locate(self, (...), "query")
    local e = self.e
    if lookup(e, i1, fp) then return true end
    return lookup(e, alt(self, i1, fp), fp)
end

local function remove(e, b, fp)
    b = b * 4
    for j = b + 1, b + 4 do
        if e[j] == fp then
            e[j] = 0
            return true
        end
    end
    return false
end

function CF:delete(...)
    check(self, 2, standin.count(...), "delete")
    local fp, i1 = locate(self, (...), "delete")
    local e = self.e
    local deleted = remove(e, i1, fp) or remove(e, alt(self, i1, fp), fp)
    if deleted then self.cnt = self.cnt - 1 end
    return deleted
end

function CF:count(...)
    check(self, 1, standin.count(...), "count")
    return self.cnt
end

function CF:clear(...)
    check(self, 1, standin.count(...), "clear")
    self.e = {}
    self.cnt = 0
end

function CF:fromstring(...)
    check(self, 3, standin.count(...), "fromstring")
    local cnt, s = ...
    if type(cnt) ~= "number" then argerror(2, "fromstring", "number expected, got " .. type(cnt)) end
    if type(s) ~= "string" then argerror(3, "fromstring", "string expected, got " .. type(s)) end
    local bytes = self.num_buckets * BUCKET_SIZE * 2
    if #s ~= bytes then error(sformat("fromstring() bytes found: %d, expected %d", #s, bytes), 0) end
    local e = {}
    for j = 1, self.num_buckets * BUCKET_SIZE do
        local lo, hi = sbyte(s, 2 * j - 1, 2 * j)
        local v = lo + hi * 256
        if v ~= 0 then e[j] = v end
    end
    self.e = e
    self.cnt = floor(cnt)
end

function CF:tostring()
    local parts, e = {}, self.e
    for j = 1, self.num_buckets * BUCKET_SIZE do
        local v = e[j] or 0
        parts[j] = schar(v % 256, floor(v / 256))
    end
    return self.cnt, tconcat(parts)
end


standin.finish(host_api, M, CF) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
