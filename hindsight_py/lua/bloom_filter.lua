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

local function argerror(narg, fname, msg)
    error(sformat("bad argument #%d to '%s' (%s)", narg, fname, msg), 0)
end

local function check(self, nargs, given, fname)
    if getmetatable(self) ~= MT_NAME then
        argerror(1, fname, sformat("%s expected, got %s", MT_NAME, type(self)))
    end
    if given ~= nargs then argerror(0, fname, "incorrect number of arguments") end
end

local function key_string(key, fname)
    local t = type(key)
    if t == "string" then return key end
    if t == "number" then return double_string(key) end
    argerror(2, fname, "must be a string or number")
end

local preserve -- below: what preserve_data writes

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
    if host_api then host_api.preserve(bf, preserve) end
    return bf
end

function M.version() return "1.0.0" end

function BF:add(...)
    check(self, 2, select("#", ...) + 1, "add")
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
    check(self, 2, select("#", ...) + 1, "query")
    local key = key_string((...), "query")
    local set, bits = self.set, self.bits
    for i = 0, self.hashes - 1 do
        if not set[xxh32(key, i) % bits] then return false end
    end
    return true
end

function BF:count(...)
    check(self, 1, select("#", ...) + 1, "count")
    return self.cnt
end

function BF:clear(...)
    check(self, 1, select("#", ...) + 1, "clear")
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

-- lsb_serialize_binary: the bytes in a Lua string literal, only \n \r " \\ escaped
local function binary_literal(bytes)
    return (string.gsub(bytes, '[\n\r"\\]', { ["\n"] = "\\n", ["\r"] = "\\r", ['"'] = '\\"', ["\\"] = "\\\\" }))
end

-- what preserve_data writes for it (upstream's serialize function), under `key`
function preserve(self, key)
    local cnt, bytes = BF.tostring(self)
    return sformat("if %s == nil then %s = %s end\n%s:fromstring(%d, \"%s\")", key, key, sformat("bloom_filter.new(%d, %s)", self.items, sformat("%g", self.probability)), key, cnt,
        binary_literal(bytes))
end

-- in the sandbox: uncounted, as upstream's C (env.lua)
if host_api then
    for k, f in pairs(M) do M[k] = host_api.uncounted(f) end
    for k, f in pairs(BF) do BF[k] = host_api.uncounted(f) end
end

return M
