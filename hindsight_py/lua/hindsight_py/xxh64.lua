-- hindsight_py.xxh64: the 64-bit xxHash (XXH64, and XXH32) in Lua, for the modules that stand in for
-- lua_sandbox_extensions' C modules hashing with it (cuckoo filters), so that their results (which
-- items collide, which bucket an item lands in) are the C modules' own.
--
-- A 64-bit value is a pair of numbers (hi, lo), each in [0, 2^32): exact in Lua 5.1's doubles.
-- Multiplication works on 16-bit limbs; xor uses the `bit` library (LuaJIT's own, or LuaBitOp).
--
-- M.string(s, seed_lo[, seed_hi]) -> hi, lo of XXH64(s, #s, seed_hi * 2^32 + seed_lo)
-- M.u64(hi, lo, seed_lo)    -> XXH64 of 8 bytes holding that little-endian 64-bit value
-- M.u32(v, seed_lo)         -> XXH64 of 4 bytes holding that little-endian 32-bit value
-- M.u16(v, seed_lo)         -> XXH64 of 2 bytes holding that little-endian 16-bit value
-- M.double_bits(x)          -> hi, lo: the IEEE 754 bits of the number x (as C's double)
-- M.key(key, seed)          -> hi, lo: XXH64 of a filter key as the C modules hash it (a string's
--                              bytes, a number's 8 double bytes); nil for any other type
-- M.double_string(x)        -> those bits as the 8 bytes C hashes for a number key
-- M.xxh32(s, seed)          -> XXH32(s, #s, seed)
-- M.mul64, M.add64, M.xor64 -> (hi, lo) arithmetic modulo 2^64

local _, host_api = ...
local string = require "string"
local math = require "math"
local bit = require "bit"
local bxor = bit.bxor
local sbyte = string.byte
local pairs, type = pairs, type
local floor, frexp, ldexp, huge = math.floor, math.frexp, math.ldexp, math.huge

local M = {}

local TWO32 = 4294967296

local P1H, P1L = 0x9E3779B1, 0x85EBCA87
local P2H, P2L = 0xC2B2AE3D, 0x27D4EB4F
local P3H, P3L = 0x165667B1, 0x9E3779F9
local P4H, P4L = 0x85EBCA77, 0xC2B2AE63
local P5H, P5L = 0x27D4EB2F, 0x165667C5

local function mul(ah, al, bh, bl)
    local a0 = al % 65536
    local a1 = (al - a0) / 65536
    local a2 = ah % 65536
    local a3 = (ah - a2) / 65536
    local b0 = bl % 65536
    local b1 = (bl - b0) / 65536
    local b2 = bh % 65536
    local b3 = (bh - b2) / 65536
    local r1 = a0 * b1 + a1 * b0
    local r1l = r1 % 65536
    local lo = a0 * b0 + r1l * 65536
    local carry = floor(lo / TWO32)
    lo = lo - carry * TWO32
    local r3 = (a0 * b3 + a1 * b2 + a2 * b1 + a3 * b0) % 65536
    local hi = ((r1 - r1l) / 65536 + a0 * b2 + a1 * b1 + a2 * b0 + r3 * 65536 + carry) % TWO32
    return hi, lo
end

local function add(ah, al, bh, bl)
    local lo = al + bl
    local c = 0
    if lo >= TWO32 then
        lo = lo - TWO32
        c = 1
    end
    return (ah + bh + c) % TWO32, lo
end

local function rotl(h, l, n)
    if n >= 32 then
        h, l = l, h
        n = n - 32
    end
    if n == 0 then return h, l end
    local p = 2 ^ n
    local q = 2 ^ (32 - n)
    local hq, lq = h % q, l % q
    return hq * p + (l - lq) / q, lq * p + (h - hq) / q
end

local function xor(ah, al, bh, bl)
    return bxor(ah, bh) % TWO32, bxor(al, bl) % TWO32
end

-- acc = rotl(acc + input * P2, 31) * P1
local function round(ah, al, ih, il)
    local h, l = mul(ih, il, P2H, P2L)
    h, l = add(ah, al, h, l)
    h, l = rotl(h, l, 31)
    return mul(h, l, P1H, P1L)
end

local function avalanche(h, l)
    -- h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32
    h, l = xor(h, l, 0, floor(h / 2))
    h, l = mul(h, l, P2H, P2L)
    h, l = xor(h, l, floor(h / 536870912), (h % 536870912) * 8 + floor(l / 536870912))
    h, l = mul(h, l, P3H, P3L)
    return xor(h, l, 0, h)
end

-- the 8-byte step of the tail: h ^= round(0, k); h = rotl(h, 27) * P1 + P4
local function step8(h, l, kh, kl)
    local rh, rl = round(0, 0, kh, kl)
    h, l = xor(h, l, rh, rl)
    h, l = rotl(h, l, 27)
    h, l = mul(h, l, P1H, P1L)
    return add(h, l, P4H, P4L)
end

-- the 4-byte step: h ^= k * P1; h = rotl(h, 23) * P2 + P3
local function step4(h, l, k)
    local mh, ml = mul(0, k, P1H, P1L)
    h, l = xor(h, l, mh, ml)
    h, l = rotl(h, l, 23)
    h, l = mul(h, l, P2H, P2L)
    return add(h, l, P3H, P3L)
end

-- the 1-byte step: h ^= b * P5; h = rotl(h, 11) * P1
local function step1(h, l, b)
    local mh, ml = mul(0, b, P5H, P5L)
    h, l = xor(h, l, mh, ml)
    h, l = rotl(h, l, 11)
    return mul(h, l, P1H, P1L)
end

local function start(seed, len, seed_hi)
    local h, l = add(seed_hi or 0, seed or 0, P5H, P5L)
    return add(h, l, 0, len)
end

local function read32(s, i)
    local b1, b2, b3, b4 = sbyte(s, i, i + 3)
    return b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end

function M.string(s, seed, seed_hi)
    seed, seed_hi = seed or 0, seed_hi or 0
    local len = #s
    local p = 1
    local h, l
    if len >= 32 then
        local v1h, v1l = add(seed_hi, seed, P1H, P1L)
        v1h, v1l = add(v1h, v1l, P2H, P2L)
        local v2h, v2l = add(seed_hi, seed, P2H, P2L)
        local v3h, v3l = seed_hi, seed
        -- seed - P1
        local v4h, v4l = add(seed_hi, seed, (TWO32 - P1H - 1) % TWO32, (TWO32 - P1L) % TWO32)
        while p + 31 <= len do
            v1h, v1l = round(v1h, v1l, read32(s, p + 4), read32(s, p))
            v2h, v2l = round(v2h, v2l, read32(s, p + 12), read32(s, p + 8))
            v3h, v3l = round(v3h, v3l, read32(s, p + 20), read32(s, p + 16))
            v4h, v4l = round(v4h, v4l, read32(s, p + 28), read32(s, p + 24))
            p = p + 32
        end
        local ah, al = rotl(v1h, v1l, 1)
        local bh, bl = rotl(v2h, v2l, 7)
        h, l = add(ah, al, bh, bl)
        bh, bl = rotl(v3h, v3l, 12)
        h, l = add(h, l, bh, bl)
        bh, bl = rotl(v4h, v4l, 18)
        h, l = add(h, l, bh, bl)
        for _, v in ipairs { { v1h, v1l }, { v2h, v2l }, { v3h, v3l }, { v4h, v4l } } do
            local rh, rl = round(0, 0, v[1], v[2])
            h, l = xor(h, l, rh, rl)
            h, l = mul(h, l, P1H, P1L)
            h, l = add(h, l, P4H, P4L)
        end
        h, l = add(h, l, 0, len)
    else
        h, l = start(seed, len, seed_hi)
    end
    while p + 7 <= len do
        h, l = step8(h, l, read32(s, p + 4), read32(s, p))
        p = p + 8
    end
    if p + 3 <= len then
        h, l = step4(h, l, read32(s, p))
        p = p + 4
    end
    while p <= len do
        h, l = step1(h, l, sbyte(s, p))
        p = p + 1
    end
    return avalanche(h, l)
end

function M.u64(kh, kl, seed)
    local h, l = start(seed, 8)
    h, l = step8(h, l, kh, kl)
    return avalanche(h, l)
end

function M.u32(k, seed)
    local h, l = start(seed, 4)
    h, l = step4(h, l, k)
    return avalanche(h, l)
end

function M.u16(k, seed)
    local h, l = start(seed, 2)
    h, l = step1(h, l, k % 256)
    h, l = step1(h, l, floor(k / 256))
    return avalanche(h, l)
end

function M.double_bits(x)
    if x ~= x then return 0xFFF80000, 0 end -- x86's default NaN
    local sign = 0
    if x < 0 or (x == 0 and 1 / x < 0) then
        sign = 0x80000000
        x = -x
    end
    if x == 0 then return sign, 0 end
    if x == huge then return sign + 0x7FF00000, 0 end
    local m, e = frexp(x) -- x = m * 2^e, 0.5 <= m < 1
    local biased = e + 1022
    local mant
    if biased >= 1 then
        mant = (m * 2 - 1) * 4503599627370496 -- 2^52
    else
        biased = 0
        mant = ldexp(x, 1074)
    end
    local mhi = floor(mant / TWO32)
    return sign + biased * 1048576 + mhi, mant - mhi * TWO32
end

-- the 64-bit arithmetic on (hi, lo) pairs, for the other hashes of the stand-ins (MurmurHash64A)
M.mul64, M.add64, M.xor64 = mul, add, xor

-- XXH32 (the 32-bit xxHash), for bloom_filter: 32-bit words, products on 16-bit limbs
local Q1, Q2, Q3, Q4, Q5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393

local function mul32(a, b)
    local a0 = a % 65536
    local a1 = (a - a0) / 65536
    local b0 = b % 65536
    local b1 = (b - b0) / 65536
    return (a0 * b0 + ((a0 * b1 + a1 * b0) % 65536) * 65536) % TWO32
end

local function rotl32(x, n)
    local q = 2 ^ (32 - n)
    local xq = x % q
    return xq * 2 ^ n + (x - xq) / q
end

local function round32(acc, input)
    acc = (acc + mul32(input, Q2)) % TWO32
    return mul32(rotl32(acc, 13), Q1)
end

function M.key(key, seed)
    local t = type(key)
    if t == "string" then return M.string(key, seed) end
    if t == "number" then
        local h, l = M.double_bits(key)
        return M.u64(h, l, seed)
    end
end

function M.xxh32(s, seed)
    seed = seed or 0
    local len = #s
    local p = 1
    local h
    if len >= 16 then
        local v1 = (seed + Q1 + Q2) % TWO32
        local v2 = (seed + Q2) % TWO32
        local v3 = seed % TWO32
        local v4 = (seed - Q1) % TWO32
        while p + 15 <= len do
            v1 = round32(v1, read32(s, p))
            v2 = round32(v2, read32(s, p + 4))
            v3 = round32(v3, read32(s, p + 8))
            v4 = round32(v4, read32(s, p + 12))
            p = p + 16
        end
        h = (rotl32(v1, 1) + rotl32(v2, 7) + rotl32(v3, 12) + rotl32(v4, 18)) % TWO32
    else
        h = (seed + Q5) % TWO32
    end
    h = (h + len) % TWO32
    while p + 3 <= len do
        h = mul32(rotl32((h + mul32(read32(s, p), Q3)) % TWO32, 17), Q4)
        p = p + 4
    end
    while p <= len do
        h = mul32(rotl32((h + mul32(sbyte(s, p), Q5)) % TWO32, 11), Q1)
        p = p + 1
    end
    h = mul32(bxor(h, floor(h / 32768)) % TWO32, Q2)
    h = mul32(bxor(h, floor(h / 8192)) % TWO32, Q3)
    return bxor(h, floor(h / 65536)) % TWO32
end

-- the 8 bytes of a double, little-endian (what C hashes for a number key)
function M.double_string(x)
    local h, l = M.double_bits(x)
    local b = {}
    for i = 1, 4 do
        b[i] = l % 256
        l = floor(l / 256)
        b[i + 4] = h % 256
        h = floor(h / 256)
    end
    return string.char(b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8])
end

-- glibc's rand() (srand(1)'s sequence: the additive feedback generator of random(3)), for the
-- modules whose C code draws from it
function M.glibc_rand()
    local r = { [0] = 1 }
    for i = 1, 30 do
        local v = (16807 * r[i - 1]) % 2147483647
        r[i] = v
    end
    for i = 31, 33 do r[i] = r[i - 31] end
    local n = 34
    local function nextv()
        local v = (r[n - 31] + r[n - 3]) % TWO32
        r[n] = v
        r[n - 34] = nil
        n = n + 1
        return v
    end
    for _ = 34, 343 do nextv() end
    return function() return floor(nextv() / 2) end
end

-- in the sandbox: uncounted, as upstream's C (env.lua)
if host_api then
    for k, f in pairs(M) do M[k] = host_api.uncounted(f) end
end

return M
