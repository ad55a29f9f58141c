-- hyperloglog for hindsight-py: the API of lua_sandbox_extensions' C module (Redis's HyperLogLog:
-- 16384 6-bit registers, MurmurHash64A, Redis's estimator and bias correction), in Lua, so that
-- the same estimates come out and the serialized form is the C module's bytes.
--
-- hyperloglog.new()               -> an empty counter
-- hyperloglog.count(h1, h2, ...)  -> the estimated cardinality of their union
-- hyperloglog.version()           -> "1.0.1"
-- hll:add(key)                    -> true if a register changed
-- hll:count()                     -> the estimated cardinality (cached until the next change)
-- hll:merge(other)                -> hll, holding the union
-- hll:clear()
-- hll:fromstring(bytes) / tostring(hll) -> Redis's dense representation ("HYLL" header, cached
--                                    cardinality, registers): 12304 bytes
-- Keys are strings or numbers (a number hashes as the 8 bytes of its double).

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local xxh = require "hindsight_py.xxh64"
local mul64, xor64, double_string = xxh.mul64, xxh.xor64, xxh.double_string
local floor, log = math.floor, math.log
local sbyte, schar, sformat, ssub = string.byte, string.char, string.format, string.sub
local tconcat = table.concat
local pairs, type, select, setmetatable, getmetatable, error = pairs, type, select, setmetatable, getmetatable,
    error

local MT_NAME = "mozsvc.hyperloglog"
local REGISTERS = 16384
local HEADER = "HYLL\0\0\0\0"
local SIZE = 12304 -- sizeof(hyperloglog) - 1: header 16, registers 12288

local M = {}
local H = {}
local mt = { __index = H, __metatable = MT_NAME }

local argerror = standin.argerror
-- check_hll: the number of arguments first, reported as that number
local function check(self, nargs, given, fname)
    if given ~= nargs then argerror(given, fname, "incorrect number of arguments") end
    standin.check(self, MT_NAME, nargs, given, fname)
end

-- MurmurHash64A(key, #key, 0xadc83b19) -> hi, lo
local MH, ML = 0xc6a4a793, 0x5bd1e995

local function shr47_xor(h, l)
    return xor64(h, l, 0, floor(h / 32768))
end

local function murmur64a(s)
    local len = #s
    local h, l = mul64(0, len, MH, ML)
    h, l = xor64(h, l, 0, 0xadc83b19)
    local p = 1
    local n8 = len - len % 8
    while p <= n8 do
        local b1, b2, b3, b4, b5, b6, b7, b8 = sbyte(s, p, p + 7)
        local kh, kl = mul64(b5 + b6 * 256 + b7 * 65536 + b8 * 16777216, b1 + b2 * 256 + b3 * 65536 + b4 * 16777216,
            MH, ML)
        kh, kl = shr47_xor(kh, kl)
        kh, kl = mul64(kh, kl, MH, ML)
        h, l = xor64(h, l, kh, kl)
        h, l = mul64(h, l, MH, ML)
        p = p + 8
    end
    local rest = len - n8
    if rest > 0 then
        local th, tl = 0, 0
        for i = rest, 1, -1 do
            local b = sbyte(s, n8 + i)
            if i > 4 then th = th + b * 256 ^ (i - 5) else tl = tl + b * 256 ^ (i - 1) end
        end
        h, l = xor64(h, l, th, tl)
        h, l = mul64(h, l, MH, ML)
    end
    h, l = shr47_xor(h, l)
    h, l = mul64(h, l, MH, ML)
    return shr47_xor(h, l)
end

-- the register a key lands in, and the length of its run of zeros (from bit 14) plus one
local function pattern(s)
    local h, l = murmur64a(s)
    local index = l % REGISTERS
    local count = 1
    local rest = floor(l / REGISTERS) -- bits 14..31
    for _ = 14, 31 do
        if rest % 2 == 1 then return index, count end
        rest = floor(rest / 2)
        count = count + 1
    end
    if h < 2147483648 then h = h + 2147483648 end -- bit 63 set: the run ends
    while h % 2 == 0 do
        h = h / 2
        count = count + 1
    end
    return index, count
end

local function new()
    return setmetatable({ r = {}, card = nil }, mt) -- r: register (0-based) -> value, absent = 0
end

local preserve -- below: what preserve_data writes

function M.new(...)
    local n = select("#", ...)
    if n ~= 0 then argerror(n, "new", "incorrect number of arguments") end
    return standin.track(host_api, new(), preserve)
end

function M.version() return "1.0.1" end

-- 2^-j
local PE = {}
for j = 0, 63 do PE[j] = 1 / 2 ^ j end

-- Redis's hllCount, on the sum of 2^-register and the number of zero registers
local function estimate(E, ez)
    local m = REGISTERS
    local alpha = 0.7213 / (1 + 1.079 / m)
    E = (1 / E) * alpha * m * m
    if E < m * 2.5 and ez ~= 0 then
        E = m * log(m / ez)
    elseif m == 16384 and E < 72000 then
        local bias = 5.9119 * 1.0e-18 * (E * E * E * E)
            - 1.4253 * 1.0e-12 * (E * E * E) +
            1.2940 * 1.0e-7 * (E * E)
            - 5.2921 * 1.0e-3 * E +
            83.3216
        E = E - E * (bias / 100)
    end
    return floor(E)
end

-- hllDenseSum: 16 registers a step, summed in the C code's order
local function dense_count(r)
    local E, ez = 0, 0
    for base = 0, REGISTERS - 1, 16 do
        local p = {}
        for i = 0, 15 do
            local v = r[base + i] or 0
            if v == 0 then ez = ez + 1 end
            p[i] = PE[v]
        end
        E = E + ((p[0] + p[1]) + (p[2] + p[3]) + (p[4] + p[5]) + (p[6] + p[7]) + (p[8] + p[9]) + (p[10] + p[11])
            + (p[12] + p[13]) + (p[14] + p[15]))
    end
    return estimate(E, ez)
end

-- hllRawSum: 8 registers a word; an all-zero word only counts its zeros. As the C module builds
-- it for hyperloglog.count(), register i sits at byte i + 2 of what is summed (its HLL_HDR_SIZE is
-- 18, the struct's header 16): the sum sees two zeros, then registers 0..16381.
local function raw_count(r)
    local E, ez = 0, 0
    for base = -2, REGISTERS - 3, 8 do
        local any = false
        for i = base, base + 7 do
            if (r[i] or 0) ~= 0 then
                any = true
                break
            end
        end
        if any then
            for i = base, base + 7 do
                local v = r[i] or 0
                if v ~= 0 then E = E + PE[v] else ez = ez + 1 end
            end
        else
            ez = ez + 8
        end
    end
    return estimate(E + ez, ez)
end

local key_string = standin.key_bytes

-- (the methods count their arguments as the C module does, self included: H.f(...))
function H.add(...)
    local self, key = ...
    check(self, 2, select("#", ...), "add")
    local index, count = pattern(key_string(key, "add"))
    local r = self.r
    if count > (r[index] or 0) then
        r[index] = count
        self.card = nil
        return true
    end
    return false
end

function H.count(...)
    local self = ...
    check(self, 1, select("#", ...), "count")
    if not self.card then self.card = dense_count(self.r) end
    return self.card
end

function H.merge(...)
    local self, src = ...
    check(self, 2, select("#", ...), "merge")
    if getmetatable(src) ~= MT_NAME then
        argerror(2, "merge", sformat("%s expected, got %s", MT_NAME, type(src)))
    end
    if src == self then return self end
    local r = self.r
    for i, v in pairs(src.r) do
        if v > (r[i] or 0) then r[i] = v end
    end
    self.card = nil
    return self
end

function H.clear(...)
    local self = ...
    check(self, 1, select("#", ...), "clear")
    self.r = {}
    self.card = nil
end

function M.count(...)
    local n = select("#", ...)
    if not (n > 1) then argerror(n, "count", "incorrect number of arguments") end
    local max = {}
    for i = 1, n do
        local h = select(i, ...)
        if getmetatable(h) ~= MT_NAME then
            argerror(i, "count", sformat("%s expected, got %s", MT_NAME, type(h)))
        end
        for k, v in pairs(h.r) do
            if v > (max[k] or 0) then max[k] = v end
        end
    end
    return raw_count(max)
end

-- the dense bytes: register i's 6 bits start at bit 6i, least significant bits first
local function tostring_hll(self)
    local r = self.r
    local bytes = {}
    for b = 0, 12287, 3 do -- 4 registers in 3 bytes
        local i = b / 3 * 4
        local v = (r[i] or 0) + (r[i + 1] or 0) * 64 + (r[i + 2] or 0) * 4096 + (r[i + 3] or 0) * 262144
        bytes[#bytes + 1] = schar(v % 256, floor(v / 256) % 256, floor(v / 65536))
    end
    local card = {}
    local c = self.card
    for i = 1, 8 do
        card[i] = c and c % 256 or 0
        if c then c = floor(c / 256) end
    end
    if not self.card then card[8] = card[8] + 128 end -- the cache's invalid bit
    return HEADER .. schar(card[1], card[2], card[3], card[4], card[5], card[6], card[7], card[8]) .. tconcat(bytes)
end

function H.fromstring(...)
    local self, s = ...
    check(self, 2, select("#", ...), "fromstring")
    if type(s) ~= "string" and type(s) ~= "number" then
        argerror(2, "fromstring", "string expected, got " .. type(s))
    end
    s = "" .. s
    if #s ~= SIZE then error(sformat("fromstring() bytes found: %d, expected %d", #s, SIZE), 0) end
    if ssub(s, 1, 4) ~= "HYLL" then error("fromstring() HYLL header not found", 0) end
    if sbyte(s, 6) ~= 0 then error("fromstring() invalid encoding", 0) end -- (the C module reads byte 6)
    local r = {}
    for b = 0, 12287, 3 do
        local b1, b2, b3 = sbyte(s, 17 + b, 19 + b)
        local v = b1 + b2 * 256 + b3 * 65536
        local i = b / 3 * 4
        for k = 0, 3 do
            local x = v % 64
            if x ~= 0 then r[i + k] = x end
            v = floor(v / 64)
        end
    end
    self.r = r
    local c8 = sbyte(s, 16)
    if c8 >= 128 then
        self.card = nil
    else
        local c = 0
        for i = 16, 9, -1 do c = c * 256 + sbyte(s, i) end
        self.card = c
    end
end

mt.__tostring = standin.uncounted(host_api, function(self) return tostring_hll(self) end)
mt.__lsb_output = standin.uncounted(host_api, tostring_hll) -- add_to_payload / a Fields value: the C module's bytes
-- what preserve_data writes (upstream: hll:fromstring("<bytes>"), without a count)
function preserve(self, key)
    return standin.restore_text(key, "hyperloglog.new()", tostring_hll(self))
end

standin.finish(host_api, M, H) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
