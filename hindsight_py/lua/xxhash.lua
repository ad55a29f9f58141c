-- xxhash for hindsight-py: the API of lua_sandbox_extensions' C module, in Lua.
--
-- xxhash.h32(item[, seed]) -> XXH32 of a string, or of the 8 bytes of a number's double
--                             (seed: 0 <= seed <= 2^32 - 1)
-- xxhash.h64(item[, seed]) -> XXH64 likewise, as a number (a double: the C module's lua_Number)

local _, host_api = ...
local math = require "math"
local standin = require "hindsight_py.standin"
local xxh = require "hindsight_py.xxh64"
local floor = math.floor
local type, select = type, select

local M = {}

local function item_bytes(fname, ...)
    local item = ...
    local t = type(item)
    if t == "string" then return item end
    if t == "number" then return xxh.double_string(item) end
    standin.argerror(1, fname, "string or number expected, got " .. (select("#", ...) == 0 and "no value" or t))
end

local function seed_of(fname, max, text, ...)
    if select("#", ...) < 2 or select(2, ...) == nil then return 0 end
    local n = select(2, ...)
    if type(n) == "string" then n = tonumber(n) end
    if type(n) ~= "number" then
        standin.argerror(2, fname, "number expected, got " .. type(select(2, ...)))
    end
    if not (n >= 0 and n <= max) then standin.argerror(2, fname, text) end
    return floor(n)
end

function M.h32(...)
    local s = item_bytes("h32", ...)
    return xxh.xxh32(s, seed_of("h32", 4294967295, "seed must be an unsigned int", ...))
end

function M.h64(...)
    local s = item_bytes("h64", ...)
    local seed = seed_of("h64", 18446744073709551615, "seed must be an unsigned long long", ...)
    if seed >= 18446744073709551616 then seed = 0 end -- C's conversion of 2^64 is undefined; x86 gives 0
    local seed_hi = floor(seed / 4294967296)
    local h, l = xxh.string(s, seed - seed_hi * 4294967296, seed_hi)
    return h * 4294967296 + l
end

standin.finish(host_api, M) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
