-- bloom_filter for hindsight-py: the API of lua_sandbox_extensions' C module, in Lua, with its
-- sizing and hashing (XXH32 with seeds 0..hashes-1), so that the same bits are set.
--
-- bloom_filter.new(items, probability) -> filter for `items` (> 1) at that false positive rate
-- bloom_filter.version()               -> "1.0.0"
-- bf:add(key)       -> true if any of its bits was unset (counted as a new item)
-- bf:query(key)     -> true if (probably) added
-- bf:count(), bf:clear()
-- bf:fromstring([count,] bytes) / bf:tostring() -> count, bytes: the bit array (the C module's
--                      layout: bit i is bit i % 8 of byte i // 8), for preserved data
-- Keys are strings or numbers (a number hashes as the 8 bytes of its double).

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local xxh = require "hindsight_py.xxh64"
local xxh32, double_string = xxh.xxh32, xxh.double_string
local floor, ceil, log = math.floor, math.ceil, math.log
local sbyte, schar, sformat = string.byte, string.char, string.format
local tconcat = table.concat
local pairs, type, error, select, setmetatable, getmetatable = pairs, type, error, select, setmetatable,
    getmetatable

local MT_NAME = "mozsvc.bloom_filter"
local M = {}
local BF = {}
local mt = { __index = BF, __metatable = MT_NAME }

local standin = require "hindsight_py.standin"
local clp2, log2, argerror = standin.clp2, standin.log2, standin.argerror
local function check(self, nargs, given, fname) standin.check(self, MT_NAME, nargs, given, fname) end

local key_string = standin.key_bytes

local preserve = standin.preserver(function(self)
    return sformat("bloom_filter.new(%d, %s)", self.items, sformat("%g", self.probability))
end)

function M.new(...)
    if select("#", ...) ~= 2 then argerror(0, "new", "incorrect number of arguments") end
    local items, probability = ...
    if type(items) ~= "number" then
        argerror(1, "new", sformat("number expected, got %s", type(items)))
    end
    items = items >= 0 and floor(items) or ceil(items)
    if not (1 < items) then argerror(1, "new", "items must be > 1") end
    if type(probability) ~= "number" then
        argerror(2, "new", sformat("number expected, got %s", type(probability)))
    end
    if not (0 < probability and 1 > probability) then
        argerror(2, "new", "probability must be between 0 and 1")
    end
    local bits = ceil(items * log(probability) / log(1 / 2 ^ log(2)))
    local hashes = floor(log(2) * bits / items + 0.5)
    local bf = setmetatable({
        items = items,
        bits = bits,
        bytes = ceil(bits / 8),
        hashes = hashes,
        probability = probability,
        cnt = 0,
        set = {}, -- bit index -> true
    }, mt)
    return standin.track(host_api, bf, preserve)
end

function M.version() return "1.0.0" end

function BF:add(...)
    check(self, 2, standin.count(...), "add")
    local key = key_string((...), "add")
    local set, bits = self.set, self.bits
    local added = false
    for i = 0, self.hashes - 1 do
        local b = xxh32(key, i) % bits
        if not set[b] then
            set[b] = true
            added = true
        end
    end
    if added then self.cnt = self.cnt + 1 end
    return added
end

function BF:query(...)
    check(self, 2, standin.count(...), "query")
    local key = key_string((...), "query")
    local set, bits = self.set, self.bits
    for i = 0, self.hashes - 1 do
        if not set[xxh32(key, i) % bits] then return false end
    end
    return true
end

function BF:count(...)
    check(self, 1, standin.count(...), "count")
    return self.cnt
end

function BF:clear(...)
    check(self, 1, standin.count(...), "clear")
    self.set = {}
    self.cnt = 0
end

function BF:fromstring(...)
    local n = select("#", ...)
    local cnt, s
    if n == 1 then
        s = ...
    else
        cnt, s = ...
    end
    check(self, n == 1 and 2 or 3, n + 1, "fromstring")
    if cnt ~= nil and type(cnt) ~= "number" then
        argerror(2, "fromstring", "number expected, got " .. type(cnt))
    end
    if type(s) ~= "string" then argerror(n == 1 and 2 or 3, "fromstring", "string expected, got " .. type(s)) end
    if #s ~= self.bytes then error(sformat("fromstring() bytes found: %d, expected %d", #s, self.bytes), 0) end
    local set = {}
    for i = 1, #s do
        local v = sbyte(s, i)
        local base = (i - 1) * 8
        for k = 0, 7 do
            if v % 2 == 1 then set[base + k] = true end
            v = floor(v / 2)
        end
    end
    self.set = set
    if cnt then self.cnt = floor(cnt) end
end

function BF:tostring()
    local out, set = {}, self.set
    for i = 1, self.bytes do
        local base, v = (i - 1) * 8, 0
        for k = 7, 0, -1 do v = v * 2 + (set[base + k] and 1 or 0) end
        out[i] = schar(v)
    end
    return self.cnt, tconcat(out)
end


standin.finish(host_api, M, BF) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
