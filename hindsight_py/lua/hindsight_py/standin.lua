-- hindsight_py.standin: what hindsight-py's Lua stand-ins for lua_sandbox_extensions' C modules
-- share: their argument checks (luaL_argcheck's texts), sizes, and the sandbox's host API (uncounted
-- calls, preserve_data), see env.lua.

local string = require "string"
local sformat, sgsub = string.format, string.gsub
local pairs, type, error, getmetatable, select, tonumber, tostring = pairs, type, error, getmetatable, select,
    tonumber, tostring
local math = require "math"
local floor, huge, frexp, ldexp = math.floor, math.huge, math.frexp, math.ldexp
local sbyte, schar = string.byte, string.char
local unpack = unpack

local M = {}

-- luaL_checknumber / luaL_optnumber / luaL_checkint / luaL_checkstring / luaL_checkoption on
-- argument `narg` (value v; `given` arguments in all, to tell "no value" from nil)
local function typename(v, narg, given)
    if narg > given then return "no value" end
    return type(v)
end

function M.checknumber(v, narg, given, fname)
    local n = tonumber(v)
    if type(v) == "number" then return v end
    if type(v) == "string" and n then return n end
    M.argerror(narg, fname, sformat("number expected, got %s", typename(v, narg, given)))
end

function M.optnumber(v, narg, given, fname, default)
    if v == nil then return default end
    return M.checknumber(v, narg, given, fname)
end

function M.checkint(v, narg, given, fname)
    local n = M.checknumber(v, narg, given, fname)
    return n >= 0 and floor(n) or -floor(-n) -- lua_tointeger truncates
end

function M.checkstring(v, narg, given, fname)
    if type(v) == "string" then return v end
    if type(v) == "number" then return tostring(v) end
    M.argerror(narg, fname, sformat("string expected, got %s", typename(v, narg, given)))
end

-- options: name -> value; default used for nil (nil: the argument is required)
function M.checkoption(v, narg, given, fname, options, default)
    if v == nil and default ~= nil then v = default end
    local name = M.checkstring(v, narg, given, fname)
    local value = options[name]
    if value == nil then M.argerror(narg, fname, sformat("invalid option '%s'", name)) end
    return value
end

-- lsb_outputd: a double as lua_sandbox writes it into output and preserved data
function M.outputd(x)
    if x ~= x then return "nan" end
    if x == huge then return "inf" end
    if x == -huge then return "-inf" end
    if x < -2147483648 or x > 2147483647 then return sformat("%.17g", x) end
    if x == floor(x) then return sformat("%d", x) end
    return (sgsub(sgsub(sformat("%.8f", x), "0+$", ""), "%.$", ""))
end

-- The C modules' serialized numbers, little-endian as on x86: unsigned integers of n bytes, int32,
-- IEEE doubles and floats
function M.le_uint(x, n)
    local b = {}
    for i = 1, n do
        b[i] = x % 256
        x = floor(x / 256)
    end
    return schar(unpack(b))
end

function M.read_le_uint(s, p, n)
    local x = 0
    for i = p + n - 1, p, -1 do x = x * 256 + sbyte(s, i) end
    return x
end

function M.le_int32(x)
    return M.le_uint(x < 0 and x + 4294967296 or x, 4)
end

function M.read_le_int32(s, p)
    local x = M.read_le_uint(s, p, 4)
    return x >= 2147483648 and x - 4294967296 or x
end

function M.le_double(x)
    return require("hindsight_py.xxh64").double_string(x)
end

-- an IEEE value of `ebits` exponent bits and `mbits` mantissa bits from its bytes at p
local function read_ieee(s, p, nbytes, ebits, mbits)
    local hi = sbyte(s, p + nbytes - 1)
    local sign = hi >= 128 and -1 or 1
    local mant, e
    if nbytes == 8 then -- in two halves: 64 bits do not fit a double exactly
        local lo = M.read_le_uint(s, p, 4)
        local h = M.read_le_uint(s, p + 4, 4) % 2147483648
        e = floor(h / 1048576)
        mant = (h % 1048576) * 4294967296 + lo
    else
        local bits = M.read_le_uint(s, p, nbytes) % 2 ^ (nbytes * 8 - 1)
        e = floor(bits / 2 ^ mbits)
        mant = bits % 2 ^ mbits
    end
    local emax = 2 ^ ebits - 1
    local bias = 2 ^ (ebits - 1) - 1
    if e == emax then
        if mant ~= 0 then return 0 / 0 end
        return sign * huge
    end
    if e == 0 then return sign * ldexp(mant, 1 - bias - mbits) end
    return sign * ldexp(mant + 2 ^ mbits, e - bias - mbits)
end

function M.read_double(s, p) return read_ieee(s, p, 8, 11, 52) end

function M.read_float(s, p) return read_ieee(s, p, 4, 8, 23) end

-- (float)x: x rounded to a float's 24 significant bits (fewer below 2^-126), ties to even
function M.float32(x)
    if x == 0 or x ~= x or x == huge or x == -huge then return x end
    local _, e = frexp(x)
    local shift = e - 24 < -149 and -149 or e - 24 -- the weight of the last bit kept
    local scaled = ldexp(x, -shift)
    local r = floor(scaled + 0.5)
    if r - scaled == 0.5 and r % 2 == 1 then r = r - 1 end
    local f = ldexp(r, shift)
    if f >= 2 ^ 128 then return huge elseif f <= -2 ^ 128 then return -huge end
    return f
end

-- the 4 bytes of (float)x
function M.le_float(x)
    x = M.float32(x)
    if x ~= x then return M.le_uint(0x7fc00000, 4) end
    local sign = (x < 0 or 1 / x < 0) and 2147483648 or 0
    if x < 0 then x = -x end
    if x == huge then return M.le_uint(sign + 0x7f800000, 4) end
    if x < 2 ^ -126 then return M.le_uint(sign + ldexp(x, 149), 4) end -- subnormal (or zero)
    local m, e = frexp(x)
    return M.le_uint(sign + (e + 126) * 8388608 + (m * 16777216 - 8388608), 4)
end

-- least power of 2 >= x, and log2 of a power of 2
function M.clp2(x)
    local p = 1
    while p < x do p = p * 2 end
    return p
end

function M.log2(x)
    local n = 0
    while x > 1 do
        x = x / 2
        n = n + 1
    end
    return n
end

-- luaL_argerror's text (env.lua's wrapper renumbers a method's arguments and adds the position)
function M.argerror(narg, fname, msg)
    error(sformat("bad argument #%d to '%s' (%s)", narg, fname, msg), 0)
end

-- luaL_checkudata and the modules' "incorrect number of arguments" check: `given` counts self
function M.check(self, mt_name, nargs, given, fname)
    if getmetatable(self) ~= mt_name then
        M.argerror(1, fname, sformat("%s expected, got %s", mt_name, type(self)))
    end
    if given ~= nargs then M.argerror(0, fname, "incorrect number of arguments") end
end

-- the bytes the C modules hash for a key: a string's, or a number's double (8 bytes, little-endian)
function M.key_bytes(key, fname)
    local t = type(key)
    if t == "string" then return key end
    if t == "number" then return require("hindsight_py.xxh64").double_string(key) end
    M.argerror(2, fname, "must be a string or number")
end

-- the number of the varargs plus self, for check()
function M.count(...)
    return select("#", ...) + 1
end

-- lsb_serialize_binary: the bytes in a Lua string literal, only \n \r " \\ escaped
local ESCAPES = { ["\n"] = "\\n", ["\r"] = "\\r", ['"'] = '\\"', ["\\"] = "\\\\" }
function M.binary_literal(bytes)
    return (sgsub(bytes, '[\n\r"\\]', ESCAPES))
end

-- What preserve_data writes for an object under `key` (upstream's serialize functions): create it
-- with `ctor` (a constructor call) if the plugin did not, then restore it: `key:fromstring(args)`,
-- `bytes` last as a string literal. Concatenated, not formatted: Lua 5.1's %s stops at a zero byte.
function M.restore_text(key, ctor, bytes, args)
    return sformat("if %s == nil then %s = %s end\n%s:fromstring(%s\"", key, key, ctor, key, args or "")
        .. M.binary_literal(bytes) .. '")'
end

-- the same for the filters: `ctor(self)` is the constructor call, self:tostring() the count and
-- bytes for fromstring
function M.preserver(ctor)
    return function(self, key)
        local cnt, bytes = self:tostring()
        return M.restore_text(key, ctor(self), bytes, sformat("%d, ", cnt))
    end
end

-- In the sandbox (host_api set): register `object` for preserve_data
function M.track(host_api, object, preserve)
    if host_api then host_api.preserve(object, preserve) end
    return object
end

-- In the sandbox: f runs uncounted, as upstream's C (for metamethods: __tostring, __lsb_output, __eq)
function M.uncounted(host_api, f)
    return host_api and host_api.uncounted(f) or f
end

-- In the sandbox: the module's functions and methods run uncounted, as upstream's C
function M.finish(host_api, ...)
    if not host_api then return end
    for i = 1, select("#", ...) do
        local t = select(i, ...)
        for k, f in pairs(t) do t[k] = host_api.uncounted(f) end
    end
end

return M
