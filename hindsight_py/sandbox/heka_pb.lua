-- The Heka protobuf message codec, Lua side (docs/upstream-formats.md §3.2, §5).
--
-- Loaded once per plugin runtime by env.lua, as host code; returns a table of functions:
--   encode(t, env[, framed])       -> protobuf of message table t (inject_message/encode_message)
--   encode_into(buf, n, t, env)    -> n2, size, framed_size: the same, framed, as pieces in buf
--   frame(s), frame_header(len)    -> stream framing (0x1E, H, 0x08 varint(len), 0x1F)
--   decode(s)                      -> decode_message's table
--   read(s, name, fi, ai)          -> read_message against raw message s
--   valid(s)                       -> the queue/stream readers' check (lsb_decode_heka_message)
--   find_framed(buf, max, decode)  -> found, consumed, raw: the stream reader's scan
-- Everything it needs from the standard library is captured at load time: once loaded, host code
-- reads no globals (env.lua; tests/test_sandbox_security.py checks the bytecode). Pure Lua 5.1
-- with doubles only: int64 values travel as doubles, and varints are built and read in 28-bit
-- halves so that every step is exact (a timestamp of ~1.7e18 needs 61 bits; a double holds 53).
--
-- Errors are raised with error(msg, 0) and carry lua_sandbox's texts without the
-- "encode_message() failed: " style prefix, which the caller adds. The one exception is
-- the output_limit overflow: upstream leaves its error message empty there and every
-- caller words it differently (inject_message from an input: "exceeded output_limit";
-- encode_message: "buffer full"; analysis inject_message: nothing), so it raises "".
--
-- Not reentrant: a metamethod of a message table that encodes another message while this
-- one is being encoded would mix the two.

local byte, char, sub, find, smatch = string.byte, string.char, string.sub, string.find, string.match
local concat = table.concat
local floor, ceil, ldexp, frexp, huge = math.floor, math.ceil, math.ldexp, math.frexp, math.huge
local type, tostring, tonumber, next, rawget, error, unpack = type, tostring, tonumber, next, rawget, error, unpack

local M = {}

local P7 = { [0] = 1, 128, 16384, 2097152, 268435456, 34359738368 } -- 2^(7i)
local P28 = 268435456
local P32 = 4294967296
local P35 = 34359738368
local P36 = 68719476736
local P52 = 4503599627370496
local P63 = 9223372036854775808
local P64 = 18446744073709551616
local INT64_MIN = -P63
local NAN_BYTES_NEG = "\0\0\0\0\0\0\248\255" -- what 0/0 yields on x86
local NAN_BYTES_POS = "\0\0\0\0\0\0\248\127"

local CHR = {}
for i = 0, 255 do CHR[i] = char(i) end

----------------------------------------------------------------------------------------------------
-- Numbers: C conversion semantics (x86-64), varints and doubles
----------------------------------------------------------------------------------------------------

-- (long long)d: truncation toward zero; NaN and out-of-range values give INT64_MIN as cvttsd2si does.
local function to_int64(d)
    if d ~= d or d >= P63 or d < INT64_MIN then return INT64_MIN end
    if d >= 0 then return floor(d) end
    return ceil(d)
end

-- (unsigned long long)d as gcc compiles it: values in [2^63, 2^64) keep their magnitude.
local function to_uint64(d)
    if d >= P63 then
        if d >= P64 then return 0 end
        return d
    end
    return to_int64(d)
end

-- (int)(long long) truncation: keep the low 32 bits, signed.
local function to_int32(v)
    v = v % P32
    if v >= 2147483648 then v = v - P32 end
    return v
end

local vbuf = {}

-- Appends v's remaining base-128 groups to vbuf after position n (the last one without the
-- continuation bit) and returns the varint.
local function finish_varint(n, v)
    while v >= 128 do
        local g = v % 128
        n = n + 1; vbuf[n] = g + 128
        v = (v - g) / 128
    end
    n = n + 1; vbuf[n] = v
    return char(unpack(vbuf, 1, n))
end

-- Varint of a 64-bit pattern given as lo (< 2^28, bits 0..27) and rest (< 2^36, bits 28..63).
-- Doubles are exact only up to 2^53, so the two halves are emitted separately: lo always
-- fills exactly four 7-bit groups when rest is not zero.
local function varint_split(lo, rest)
    if rest == 0 then return finish_varint(0, lo) end
    for n = 1, 4 do
        local g = lo % 128
        vbuf[n] = g + 128
        lo = (lo - g) / 128
    end
    return finish_varint(4, rest)
end

-- Varint of an integer-valued double: [0, 2^64) as unsigned, [-2^63, 0) as int64 two's complement.
local function varint(x)
    if x < 128 then
        if x >= 0 then return CHR[x] end
        -- 2^64 - n split into 32-bit halves, each step exact
        local n = -x
        local lo32 = n % P32
        local hi32 = (n - lo32) / P32
        if lo32 == 0 then
            hi32 = P32 - hi32
        else
            lo32 = P32 - lo32
            hi32 = P32 - 1 - hi32
        end
        local lo = lo32 % P28
        return varint_split(lo, (lo32 - lo) / P28 + hi32 * 16)
    end
    if x < 16384 then return char(x % 128 + 128, floor(x / 128)) end
    local lo = x % P28
    return varint_split(lo, (x - lo) / P28)
end

-- Reads a varint at p (bounded by e, exclusive) as lsb_pb_read_varint does: at most 10 bytes,
-- bits past 63 dropped. Returns lo (bits 0..27), hi (bits 28..63, unsigned) and the next
-- position, or nil.
local function varint_parts(s, p, e)
    local lo, hi = 0, 0
    for i = 0, 9 do
        if p >= e then return nil end
        local b = byte(s, p)
        p = p + 1
        local g = b % 128
        if i < 4 then
            lo = lo + g * P7[i]
        else
            if i == 9 then g = g % 2 end
            hi = hi + g * P7[i - 4]
        end
        if b < 128 then return lo, hi, p end
    end
    return nil
end

-- The varint at p as an int64 (rounded once to a double, like (lua_Number)long long), and the
-- next position; nil on a bad varint. Unrolled: one string.byte call fetches every byte a
-- varint can have.
local function read_varint(s, p, e)
    local b0, b1, b2, b3, b4, b5, b6, b7, b8, b9 = byte(s, p, p + 9)
    if b0 == nil then return nil end
    if b0 < 128 then
        if p >= e then return nil end
        return b0, p + 1
    end
    if b1 == nil then return nil end
    if b1 < 128 then
        if p + 1 >= e then return nil end
        return b0 - 128 + b1 * 128, p + 2
    end
    if b2 == nil then return nil end
    local lo = b0 - 128 + (b1 - 128) * 128
    if b2 < 128 then
        if p + 2 >= e then return nil end
        return lo + b2 * 16384, p + 3
    end
    if b3 == nil then return nil end
    lo = lo + (b2 - 128) * 16384
    if b3 < 128 then
        if p + 3 >= e then return nil end
        return lo + b3 * 2097152, p + 4
    end
    lo = lo + (b3 - 128) * 2097152
    -- bits 28 and up
    local hi, n
    if b4 == nil then return nil end
    if b4 < 128 then
        hi, n = b4, 5
    else
        if b5 == nil then return nil end
        hi = b4 - 128
        if b5 < 128 then
            hi, n = hi + b5 * 128, 6
        else
            if b6 == nil then return nil end
            hi = hi + (b5 - 128) * 128
            if b6 < 128 then
                hi, n = hi + b6 * 16384, 7
            else
                if b7 == nil then return nil end
                hi = hi + (b6 - 128) * 16384
                if b7 < 128 then
                    hi, n = hi + b7 * 2097152, 8
                else
                    if b8 == nil then return nil end
                    hi = hi + (b7 - 128) * 2097152
                    if b8 < 128 then
                        hi, n = hi + b8 * P28, 9
                    else
                        if b9 == nil or b9 >= 128 then return nil end
                        hi, n = hi + (b8 - 128) * P28 + (b9 % 2) * P35, 10
                    end
                end
            end
        end
    end
    if p + n - 1 >= e then return nil end
    if hi >= P35 then hi = hi - P36 end
    return hi * P28 + lo, p + n
end

-- (int) of the varint at p: the low 32 bits, signed.
local function read_varint_int32(s, p, e)
    local v, np2 = read_varint(s, p, e)
    if not np2 then return nil end
    if v >= 2147483648 or v < -2147483648 then
        -- past 2^53 the double lost the low bits: take them from the bytes
        local lo, hi = varint_parts(s, p, e)
        v = lo + (hi % 16) * P28
        if v >= 2147483648 then v = v - P32 end
    end
    return v, np2
end

-- LuaJIT prints every NaN as "nan": its NaNs are taken for what 0/0 yields in C (and in lua_sandbox)
local NAN_SIGN_UNKNOWN = rawget(_G, "jit") ~= nil

local function double_bytes(x)
    if x ~= x then
        if NAN_SIGN_UNKNOWN or byte(tostring(x), 1) == 45 then return NAN_BYTES_NEG end
        return NAN_BYTES_POS
    end
    local sign = 0
    if x < 0 or (x == 0 and 1 / x < 0) then
        sign = 128
        x = -x
    end
    if x == 0 then return "\0\0\0\0\0\0\0" .. CHR[sign] end
    if x == huge then return "\0\0\0\0\0\0\240" .. CHR[127 + sign] end
    local m, e = frexp(x)
    local exp = e + 1022
    local mant
    if exp <= 0 then
        mant = ldexp(m, e + 1074) -- subnormal: x / 2^-1074
        exp = 0
    else
        mant = (m * 2 - 1) * P52
    end
    local b1 = mant % 256; mant = (mant - b1) / 256
    local b2 = mant % 256; mant = (mant - b2) / 256
    local b3 = mant % 256; mant = (mant - b3) / 256
    local b4 = mant % 256; mant = (mant - b4) / 256
    local b5 = mant % 256; mant = (mant - b5) / 256
    local b6 = mant % 256; mant = (mant - b6) / 256
    return char(b1, b2, b3, b4, b5, b6, mant + (exp % 16) * 16, floor(exp / 16) + sign)
end

local function read_double(s, p)
    local b1, b2, b3, b4, b5, b6, b7, b8 = byte(s, p, p + 7)
    local exp = (b8 % 128) * 16 + floor(b7 / 16)
    local mant = (((((b7 % 16) * 256 + b6) * 256 + b5) * 256 + b4) * 256 + b3) * 65536 + b2 * 256 + b1
    local v
    if exp == 0 then
        v = ldexp(mant, -1074)
    elseif exp == 2047 then
        if mant == 0 then v = huge else return 0 / 0 end
    else
        v = ldexp(mant + P52, exp - 1075)
    end
    if b8 >= 128 then v = -v end
    return v
end

----------------------------------------------------------------------------------------------------
-- Framing
----------------------------------------------------------------------------------------------------

-- The stream header for a message of len bytes: 0x1E, H, 0x08 varint(len), 0x1F (H = 1 + varint size).
local function frame_header(len)
    if len < 128 then return char(30, 2, 8, len, 31) end
    if len < 16384 then return char(30, 3, 8, len % 128 + 128, floor(len / 128), 31) end
    local v = varint(len)
    return char(30, #v + 1, 8) .. v .. "\31"
end

M.frame_header = frame_header

function M.frame(s)
    return frame_header(#s) .. s
end

----------------------------------------------------------------------------------------------------
-- Encoding (heka_encode_message_table)
----------------------------------------------------------------------------------------------------

-- The output under construction: parts[..np], pos bytes of protobuf so far.
local parts
local np = 0
local pos = 0

local function put(x)
    np = np + 1
    parts[np] = x
    pos = pos + #x
end

-- key + length prefix of a length-delimited value
local function put_len_key(key, len)
    local h
    if len < 128 then
        h = char(key, len)
    elseif len < 16384 then
        h = char(key, len % 128 + 128, floor(len / 128))
    else
        h = CHR[key] .. varint(len)
    end
    np = np + 1
    parts[np] = h
    pos = pos + #h
end

local function put_str(key, s)
    put_len_key(key, #s)
    np = np + 1
    parts[np] = s
    pos = pos + #s
end

local function as_string(v)
    local tv = type(v)
    if tv == "string" then return v end
    if tv == "number" then return tostring(v) end
    return nil
end

-- lua_isnumber: numbers and strings that convert
local function as_number(v)
    local tv = type(v)
    if tv == "number" then return v end
    if tv == "string" then return tonumber(v) end
    return nil
end

local output_userdata -- env.output_userdata of the encode in progress

local encode_value -- forward

local function invalid_vt(kind, vt)
    return "invalid " .. kind .. " value_type: " .. tostring(vt)
end

-- A field whose value is an array (arr[1] has Lua type t).
local function encode_array(arr, t, rep, vt)
    local alen = #arr
    if t == "string" then
        if vt == -1 then
            vt = 0
        elseif vt ~= 0 and vt ~= 1 then
            return invalid_vt("string", vt)
        end
        if vt == 1 then put("\16\1") end
        if rep then put_str(26, rep) end
        local key = vt == 1 and 42 or 34
        put_str(key, arr[1])
        for i = 2, alen do
            local v = rawget(arr, i)
            if type(v) ~= "string" then return "array has mixed types" end
            put_str(key, v)
        end
    elseif t == "number" then
        if vt == -1 then
            vt = 3
        elseif vt ~= 2 and vt ~= 3 then
            return invalid_vt("numeric", vt)
        end
        put(vt == 2 and "\16\2" or "\16\3")
        if rep then put_str(26, rep) end
        if vt == 2 then
            if alen == 1 then
                put("\48")
                put(varint(to_int64(arr[1])))
                return nil
            end
            put("\50")
            np = np + 1
            local slot = np
            parts[slot] = ""
            local start = pos
            put(varint(to_int64(arr[1])))
            for i = 2, alen do
                local v = rawget(arr, i)
                if type(v) ~= "number" then return "array has mixed types" end
                put(varint(to_int64(v)))
            end
            local lv = varint(pos - start)
            parts[slot] = lv
            pos = pos + #lv
        else
            if alen == 1 then
                put("\57")
            else
                put("\58")
                put(varint(alen * 8))
            end
            put(double_bytes(arr[1]))
            for i = 2, alen do
                local v = rawget(arr, i)
                if type(v) ~= "number" then return "array has mixed types" end
                put(double_bytes(v))
            end
        end
    else -- boolean
        if vt ~= -1 and vt ~= 4 then return invalid_vt("boolean", vt) end
        put("\16\4")
        if rep then put_str(26, rep) end
        if alen == 1 then
            put("\64")
        else
            put("\66")
            put(varint(alen))
        end
        put(arr[1] and "\1" or "\0")
        for i = 2, alen do
            local v = rawget(arr, i)
            if type(v) ~= "boolean" then return "array has mixed types" end
            put(v and "\1" or "\0")
        end
    end
    return nil
end

-- {value=, value_type=, representation=}
local function encode_object(o)
    local rep = as_string(o.representation)
    local vt = as_number(o.value_type)
    if vt then vt = to_int32(to_int64(vt)) else vt = -1 end
    return encode_value(o.value, rep, vt)
end

-- One field value (upstream's encode_field_value with first == 1); returns an error text or nil.
encode_value = function(v, rep, vt)
    local tv = type(v)
    if tv == "string" then
        if vt == -1 then
            vt = 0
        elseif vt ~= 0 and vt ~= 1 then
            return invalid_vt("string", vt)
        end
        if vt == 1 then put("\16\1") end
        if rep then put_str(26, rep) end
        put_str(vt == 1 and 42 or 34, v)
    elseif tv == "number" then
        if vt == -1 then
            vt = 3
        elseif vt ~= 2 and vt ~= 3 then
            return invalid_vt("numeric", vt)
        end
        if vt == 2 then
            put("\16\2")
            if rep then put_str(26, rep) end
            put("\48")
            put(varint(to_int64(v)))
        else
            put("\16\3")
            if rep then put_str(26, rep) end
            put("\57")
            put(double_bytes(v))
        end
    elseif tv == "boolean" then
        if vt ~= -1 and vt ~= 4 then return invalid_vt("boolean", vt) end
        put("\16\4")
        if rep then put_str(26, rep) end
        put(v and "\64\1" or "\64\0")
    elseif tv == "table" then
        -- a Lua stand-in for a C module's userdata (an rjson doc, a hyperloglog): its lsb_output bytes
        local bytes = output_userdata and output_userdata(v)
        if bytes ~= nil then
            put("\16\1")
            if rep then put_str(26, rep) end
            put_str(42, bytes)
            return nil
        end
        local a1 = rawget(v, 1)
        if a1 == nil then return encode_object(v) end
        local t = type(a1)
        if t == "string" or t == "number" or t == "boolean" then
            return encode_array(v, t, rep, vt)
        end
        return "unsupported array type: " .. t
    elseif tv == "userdata" then
        local bytes = output_userdata and output_userdata(v)
        if type(bytes) ~= "string" then return "userdata object does not implement lsb_output" end
        put("\16\1")
        if rep then put_str(26, rep) end
        put_str(42, bytes)
    else
        return "unsupported type: " .. tv
    end
    return nil
end

-- Opens a Fields record: key, then a slot for its length filled in by close_field.
local function open_field()
    np = np + 2
    parts[np - 1] = "\82"
    parts[np] = ""
    pos = pos + 1
    return np, pos
end

local function close_field(slot, start)
    local lv = varint(pos - start)
    parts[slot] = lv
    pos = pos + #lv
end

local function encode_fields(fields)
    local f = rawget(fields, 1)
    if type(f) == "table" then
        local i = 1
        repeat
            local slot, start = open_field()
            local name = type(f) == "table" and as_string(f.name) or nil
            if not name then return "field name must be a string" end
            put_str(10, name)
            local err = encode_object(f)
            if err then return err end
            close_field(slot, start)
            i = i + 1
            f = rawget(fields, i)
        until f == nil
    else
        for k, v in next, fields do
            local slot, start = open_field()
            local name = as_string(k)
            if not name then return "field name must be a string" end
            put_str(10, name)
            local err = encode_value(v, nil, -1)
            if err then return err end
            close_field(slot, start)
        end
    end
    return nil
end

-- The largest buffer size upstream's writer asks for while producing s: each varint write
-- reserves 10 bytes, and a length it fills in afterwards starts as a 1-byte placeholder, so
-- everything inside that record sat (length bytes - 1) lower while it was written. Only
-- matters in the few bytes just under output_limit.
local function peak_in(s, p, e, shift, in_field, peak)
    while p < e do
        local key = byte(s, p)
        local wt = key % 8
        local up = p - 1 - shift -- upstream's 0-based position of this key
        if wt == 0 or wt == 2 then
            if up + 11 > peak then peak = up + 11 end
        end
        p = p + 1
        if wt == 0 then
            local _, np2 = read_varint(s, p, e)
            if not np2 then return peak end
            p = np2
        elseif wt == 1 then
            p = p + 8
        elseif wt == 2 then
            local len, np2 = read_varint(s, p, e)
            if not np2 then return peak end
            local k = np2 - p
            if key == 82 then
                peak = peak_in(s, np2, np2 + len, shift + k - 1, true, peak)
            elseif key == 50 and in_field then -- packed integers inside a field record
                local q, qe, inner = np2, np2 + len, shift + k - 1
                while q < qe do
                    if q - 1 - inner + 10 > peak then peak = q - 1 - inner + 10 end
                    local _, nq = read_varint(s, q, qe)
                    if not nq then break end
                    q = nq
                end
            end
            p = np2 + len
        else
            return peak
        end
    end
    return peak
end

local function over_limit(s, limit)
    local peak = peak_in(s, 1, #s + 1, 0, false, #s + 1)
    return peak > limit
end

-- One-entry caches of encoded headers: in a pipeline the same Logger, Hostname, Pid, Type
-- and Timestamp (now, refreshed per batch) repeat message after message.
local c_ts, c_ts_enc = nil, nil
local c_type, c_type_enc = nil, nil
local c_logger, c_logger_enc = nil, nil
local c_sev, c_sev_enc = nil, nil
local c_env, c_env_enc = nil, nil
local c_pid, c_pid_enc = nil, nil
local c_host, c_host_enc = nil, nil

local function header_str(key, v)
    local s = as_string(v)
    if not s then return nil end
    local len = #s
    if len < 128 then return char(key, len) .. s end
    if len < 16384 then return char(key, len % 128 + 128, floor(len / 128)) .. s end
    return CHR[key] .. varint(len) .. s
end

local function header_int(key, v)
    local n = as_number(v)
    if not n then return nil end
    return CHR[key] .. varint(to_uint64(n))
end

-- "\10\16" .. 16 random bytes as a version 4 uuid (byte 6 gets 0x4_, byte 8 gets 0xA_).
local function random_uuid_key(env)
    local r = env.random16()
    local b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, b16 = byte(r, 1, 16)
    return char(10, 16, b1, b2, b3, b4, b5, b6, b7 % 16 + 64, b8, b9 % 16 + 160, b10, b11, b12, b13, b14, b15,
        b16)
end

local UUID_PATTERN = "^(%x%x)(%x%x)(%x%x)(%x%x)%-(%x%x)(%x%x)%-(%x%x)(%x%x)%-(%x%x)(%x%x)%-" ..
    "(%x%x)(%x%x)(%x%x)(%x%x)(%x%x)(%x%x)$"

local function uuid_from_text(u)
    local a = { smatch(u, UUID_PATTERN) }
    if #a ~= 16 then return nil end
    for i = 1, 16 do a[i] = tonumber(a[i], 16) end
    return char(10, 16, unpack(a))
end

--- encode_into(buf, n, t, env) -> n2, size, framed_size
-- Encodes message table t and appends the framed message to buf as pieces buf[n + 1 .. n2]
-- (size: the protobuf's length, framed_size: with the stream header),
-- without building its string: a batch is then copied once, by the caller's table.concat.
-- env: restricted, logger, hostname, pid, now_ns, output_limit (0 = none), and a random
-- source: random_uuid() -> 16 bytes with the v4 version/variant bits already set (cheapest)
-- or random16() -> 16 random bytes; optionally output_userdata(ud) -> string|nil for
-- userdata field values. Fills in t's Logger/Hostname/Pid as upstream does. On error buf
-- may hold leftovers past n.
local function encode_into(buf, n, t, env)
    parts = buf
    np = n + 2 -- buf[n + 1] waits for the stream header
    local first = np
    local ts, logger, hostname, pid
    local u
    if not env.restricted then
        u = t.Uuid
        if u ~= nil then
            u = as_string(u)
            local ul = u and #u
            if ul == 16 then
                buf[np] = "\10\16"
                np = np + 1
            elseif ul == 36 then
                u = uuid_from_text(u)
            else
                u = nil
            end
        end
    end
    if u == nil then
        local rnd = env.random_uuid
        if rnd then
            buf[np] = "\10\16"
            np = np + 1
            u = rnd()
        else
            u = random_uuid_key(env)
        end
    end
    buf[np] = u
    pos = 18

    if env.restricted then
        ts = env.now_ns
        logger, hostname, pid = env.logger, env.hostname, env.pid
        t.Logger = logger
        t.Hostname = hostname
        t.Pid = pid
    else
        ts = t.Timestamp
        if ts == nil then
            ts = env.now_ns
        elseif type(ts) ~= "number" then
            ts = as_number(ts) or env.now_ns
        end
        logger = t.Logger
        if logger == nil then
            logger = env.logger
            if logger ~= nil then t.Logger = logger end
        end
        hostname = t.Hostname
        if hostname == nil then
            hostname = env.hostname
            if hostname ~= nil then t.Hostname = hostname end
        end
        pid = t.Pid
        if pid == nil then
            pid = env.pid
            t.Pid = pid
        end
    end

    if ts ~= c_ts then
        c_ts = ts
        c_ts_enc = "\16" .. varint(to_int64(ts))
    end
    np = np + 1; buf[np] = c_ts_enc; pos = pos + #c_ts_enc

    local v = t.Type
    if v ~= nil then
        if v ~= c_type then c_type, c_type_enc = v, header_str(26, v) end
        if c_type_enc then np = np + 1; buf[np] = c_type_enc; pos = pos + #c_type_enc end
    end
    if logger ~= nil then
        if logger ~= c_logger then c_logger, c_logger_enc = logger, header_str(34, logger) end
        if c_logger_enc then np = np + 1; buf[np] = c_logger_enc; pos = pos + #c_logger_enc end
    end
    v = t.Severity
    if v ~= nil then
        if v ~= c_sev then c_sev, c_sev_enc = v, header_int(40, v) end
        if c_sev_enc then np = np + 1; buf[np] = c_sev_enc; pos = pos + #c_sev_enc end
    end
    v = t.Payload
    if v ~= nil then
        if type(v) ~= "string" then v = as_string(v) end
        if v then
            local len = #v
            local h
            if len < 128 then
                h = char(50, len)
            elseif len < 16384 then
                local lo = len % 128
                h = char(50, lo + 128, (len - lo) / 128)
            else
                h = "\50" .. varint(len)
            end
            buf[np + 1] = h
            buf[np + 2] = v
            np = np + 2
            pos = pos + #h + len
        end
    end
    v = t.EnvVersion
    if v ~= nil then
        if v ~= c_env then c_env, c_env_enc = v, header_str(58, v) end
        if c_env_enc then np = np + 1; buf[np] = c_env_enc; pos = pos + #c_env_enc end
    end
    if pid ~= nil then
        if pid ~= c_pid then c_pid, c_pid_enc = pid, header_int(64, pid) end
        if c_pid_enc then np = np + 1; buf[np] = c_pid_enc; pos = pos + #c_pid_enc end
    end
    if hostname ~= nil then
        if hostname ~= c_host then c_host, c_host_enc = hostname, header_str(74, hostname) end
        if c_host_enc then np = np + 1; buf[np] = c_host_enc; pos = pos + #c_host_enc end
    end

    local limit = env.output_limit or 0
    v = t.Fields
    if v ~= nil and type(v) == "table" then
        output_userdata = env.output_userdata
        local err = encode_fields(v)
        output_userdata = nil
        if err then
            -- upstream stops at the first failing write, so an earlier overflow wins
            if limit > 0 and pos + 1 > limit then error("", 0) end
            error(err, 0)
        end
    end
    if limit > 0 and pos + 9 > limit then
        if pos + 1 > limit or over_limit(concat(buf, "", first, np), limit) then error("", 0) end
    end

    local len = pos
    local h
    if len < 128 then
        h = char(30, 2, 8, len, 31)
    elseif len < 16384 then
        local lo = len % 128
        h = char(30, 3, 8, lo + 128, (len - lo) / 128, 31)
    else
        h = frame_header(len)
    end
    buf[n + 1] = h
    return np, len, len + #h
end
M.encode_into = encode_into

local own_parts = {}

--- encode(t, env[, framed]) -> the protobuf of message table t, with the stream header when
-- framed is true. See encode_into for env; errors: see the top of this file.
function M.encode(t, env, framed)
    local n2 = encode_into(own_parts, 0, t, env)
    return concat(own_parts, "", framed and 1 or 2, n2)
end

----------------------------------------------------------------------------------------------------
-- decode_message
----------------------------------------------------------------------------------------------------

local function read_string(s, wt, p, e)
    if wt ~= 2 then return nil end
    local len, np2 = read_varint(s, p, e)
    if not np2 or len < 0 or len > e - np2 then return nil end
    return sub(s, np2, np2 + len - 1), np2 + len
end

-- One Fields record (upstream's process_fields in message.c, including how far it reads:
-- packed values run to the end of the record, and a varint value is bounded by `len`).
local function decode_field(s, p, stop)
    local len
    len, p = read_varint(s, p, stop)
    if not p or len < 0 or len > stop - p or len == 0 then return nil end
    local e = p + len
    local f, vals, nv, has_name = {}, {}, 0, false
    local v
    repeat
        local key = byte(s, p)
        local tag, wt = floor(key / 8), key % 8
        p = p + 1
        if tag == 1 then
            v, p = read_string(s, wt, p, e)
            if p then
                f.name = v
                has_name = true
            end
        elseif tag == 2 then
            if wt == 0 then
                v, p = read_varint(s, p, e)
                if p then f.value_type = v end
            else
                p = nil
            end
        elseif tag == 3 then
            v, p = read_string(s, wt, p, e)
            if p then f.representation = v end
        elseif tag == 4 or tag == 5 then
            v, p = read_string(s, wt, p, e)
            if p then
                nv = nv + 1
                vals[nv] = v
            end
        elseif tag == 6 or tag == 8 then
            local is_bool = tag == 8
            if wt == 0 then
                local bound = p + len
                if bound > stop then bound = stop end
                if is_bool then v, p = read_varint_int32(s, p, bound) else v, p = read_varint(s, p, bound) end
                if p then
                    nv = nv + 1
                    if is_bool then vals[nv] = v ~= 0 else vals[nv] = v end
                end
            elseif wt == 2 then
                len, p = read_varint(s, p, e)
                if not p or len < 0 or len > e - p then
                    p = nil
                else
                    repeat
                        local bound = p + len
                        if bound > stop then bound = stop end
                        if is_bool then v, p = read_varint_int32(s, p, bound) else v, p = read_varint(s, p, bound) end
                        if p then
                            nv = nv + 1
                            if is_bool then vals[nv] = v ~= 0 else vals[nv] = v end
                        end
                    until not p or p >= e
                end
            else
                p = nil
            end
        elseif tag == 7 then
            if wt == 1 then
                if p + 8 > e then
                    p = nil
                else
                    nv = nv + 1
                    vals[nv] = read_double(s, p)
                    p = p + 8
                end
            elseif wt == 2 then
                len, p = read_varint(s, p, e)
                if not p or len < 0 or len > e - p or len % 8 ~= 0 then
                    p = nil
                else
                    repeat
                        if p + 8 > stop then
                            p = nil
                        else
                            nv = nv + 1
                            vals[nv] = read_double(s, p)
                            p = p + 8
                        end
                    until not p or p >= e
                end
            else
                p = nil
            end
        else
            p = nil
        end
    until not p or p >= e
    f.value = vals
    if p and has_name then return f, p end
    return nil
end

local HEADER_STRING = { [3] = "Type", [4] = "Logger", [6] = "Payload", [7] = "EnvVersion", [9] = "Hostname" }
local HEADER_VARINT = { [2] = "Timestamp", [5] = "Severity", [8] = "Pid" }

--- decode_message(s): the message table, or an error with upstream's text.
function M.decode(s)
    if type(s) ~= "string" then
        error("bad argument #1 to 'decode_message' (string or userdata expected, got " .. type(s) .. ")", 0)
    end
    local e = #s + 1
    if e - 1 < 20 then error("invalid message, too short", 0) end
    local msg = {}
    local p, lp = 1, 1
    local tag, wt, v, name
    local has_uuid, has_ts = false, false
    local fields, nf = nil, 0
    repeat
        local key = byte(s, p)
        tag, wt = floor(key / 8), key % 8
        p = p + 1
        if tag == 1 then
            v, p = read_string(s, wt, p, e)
            if p and p - lp == 18 then
                msg.Uuid = v
                has_uuid = true
            else
                p = nil
            end
        elseif tag == 10 then
            if wt ~= 2 then
                p = nil
            else
                v, p = decode_field(s, p, e)
                if p then
                    if nf == 0 then fields = {} end
                    nf = nf + 1
                    fields[nf] = v
                end
            end
        else
            name = HEADER_STRING[tag]
            if name then
                v, p = read_string(s, wt, p, e)
                if p then msg[name] = v end
            else
                name = HEADER_VARINT[tag]
                if name and wt == 0 then
                    v, p = read_varint(s, p, e)
                    if p then
                        msg[name] = v
                        if tag == 2 then has_ts = true end
                    end
                else
                    p = nil
                end
            end
        end
        if p then lp = p end
    until not p or p >= e
    if not p then
        error("error in tag: " .. tag .. " wiretype: " .. wt .. " offset: " .. (lp - 1), 0)
    end
    if not has_uuid or not has_ts then
        error("missing required field uuid: " .. (has_uuid and "found" or "not found") .. " timestamp: " ..
            (has_ts and "found" or "not found"), 0)
    end
    if nf > 0 then msg.Fields = fields end
    return msg
end

----------------------------------------------------------------------------------------------------
-- read_message: offsets into the current raw message (lsb_decode_heka_message's view)
----------------------------------------------------------------------------------------------------

-- The message the offsets below describe; read() rescans only when handed another string.
-- The scan is one pass over the top-level keys that skips every value (Fields records are
-- only looked into when a field is asked for); a repeated header keeps its last value.
local cur = nil
local cur_e = 1 -- #cur + 1
local scan_bad = false -- the scan met bytes that are not a valid message
local uuid_seen, ts_seen = false, false
-- header string bounds by tag (start index, end index); varint headers by position
local ha, hb = {}, {}
local ts_p, sev_p, pid_p = nil, nil, nil
-- Fields records: bounds, then (once a field is asked for) name, value_type and values start
local nf = 0
local fa, fb = {}, {}
local fields_parsed = false
local fname, fvt, fva = {}, {}, {}

local function scan_fail()
    scan_bad = true
end

-- tag of each length-delimited top-level key
local LENGTH_KEYS = { [10] = 1, [26] = 3, [34] = 4, [50] = 6, [58] = 7, [74] = 9, [82] = 10 }

local function scan(s)
    cur = s
    local e = #s + 1
    cur_e = e
    scan_bad = false
    uuid_seen, ts_seen = false, false
    ha[1], ha[3], ha[4], ha[6], ha[7], ha[9] = nil, nil, nil, nil, nil, nil
    ts_p, sev_p, pid_p = nil, nil, nil
    nf = 0
    fields_parsed = false
    local p = 1
    while p < e do
        local key, len, l2 = byte(s, p, p + 2)
        local tag = LENGTH_KEYS[key]
        if tag then
            if len == nil then return scan_fail() end
            if len < 128 then
                p = p + 2
            elseif l2 and l2 < 128 then
                len = len - 128 + l2 * 128
                p = p + 3
            else
                len, p = read_varint(s, p + 1, e)
                if not p or len < 0 then return scan_fail() end
            end
            if len > e - p then return scan_fail() end
            if tag == 10 then
                if len == 0 then return scan_fail() end
                nf = nf + 1
                fa[nf], fb[nf] = p, p + len
            else
                if tag == 1 then
                    if len ~= 16 then return scan_fail() end
                    uuid_seen = true
                end
                ha[tag], hb[tag] = p, p + len - 1
            end
            p = p + len
        else
            if key == 16 then
                ts_p, ts_seen = p + 1, true
            elseif key == 40 then
                sev_p = p + 1
            elseif key == 64 then
                pid_p = p + 1
            else
                return scan_fail()
            end
            -- the varint's last byte (below 128), at most 10 bytes on; a loop over bytes compiles
            -- where a string.find pattern stops the trace
            local q = p + 1
            local b = byte(s, q)
            while b and b > 127 do
                q = q + 1
                if q - p > 10 then return scan_fail() end
                b = byte(s, q)
            end
            if not b then return scan_fail() end
            p = q + 1
        end
    end
end

-- One Fields record as heka_message.c's process_fields sees it; false when invalid.
local function parse_field(s, i)
    local p, e = fa[i], fb[i]
    local name, vt, va = nil, 0, nil
    local v, wt
    repeat
        local key = byte(s, p)
        local tag = floor(key / 8)
        wt = key % 8
        p = p + 1
        if tag == 1 then
            v, p = read_string(s, wt, p, e)
            if p then name = v end
        elseif tag == 2 then
            if wt == 0 then
                v, p = read_varint_int32(s, p, e)
                if p then vt = v end
            else
                p = nil
            end
        elseif tag == 3 then
            v, p = read_string(s, wt, p, e)
        elseif tag == 4 or tag == 5 then
            if wt ~= 2 then
                p = nil
            else
                va = p - 1
                p = e
            end
        elseif tag >= 6 and tag <= 8 then
            if (tag == 7 and wt ~= 1 and wt ~= 2) or (tag ~= 7 and wt ~= 0 and wt ~= 2) then
                p = nil
            else
                if wt == 2 then
                    local len
                    len, p = read_varint(s, p, e)
                    if p and (len < 0 or len > e - p) then p = nil end
                end
                if p then
                    va = p
                    p = e
                end
            end
        else
            p = nil
        end
    until not p or p >= e
    fname[i], fvt[i], fva[i] = name, vt, va
    return p ~= nil and name ~= nil
end

local function parse_fields(s)
    fields_parsed = true
    for i = 1, nf do
        if not parse_field(s, i) then
            nf = i - 1 -- what follows an invalid record is unknown
            return false
        end
    end
    return true
end

--- valid(s): true when s decodes as a Heka message the way the queue and stream readers and
-- inject_message(string) check it (lsb_decode_heka_message: no minimum length, Fields values
-- not looked into). Also primes read() for s.
function M.valid(s)
    if s == "" then return false end
    scan(s)
    if scan_bad or not uuid_seen or not ts_seen then return false end
    return parse_fields(s)
end

local function field_value(s, i, ai)
    local p = fva[i]
    if not p then return nil end
    local e = fb[i]
    local vt = fvt[i]
    if vt == 0 or vt == 1 then
        local k = 0
        while p < e do
            local key = byte(s, p)
            if key % 8 ~= 2 then return nil end
            local len, np2 = read_varint(s, p + 1, e)
            if not np2 or len < 0 or len > e - np2 then return nil end
            if k == ai then return sub(s, np2, np2 + len - 1) end
            k = k + 1
            p = np2 + len
        end
    elseif vt == 2 or vt == 4 then
        local k = 0
        while p < e do
            local v, np2 = read_varint(s, p, e)
            if not np2 then return nil end
            if k == ai then
                if vt == 4 then return v ~= 0 end
                return v
            end
            k = k + 1
            p = np2
        end
    elseif vt == 3 then
        p = p + 8 * ai
        if p + 8 > e then return nil end
        return read_double(s, p)
    end
    return nil
end

-- "Fields[name]" -> "name" (false for other names); plugins ask for the same few names
local field_names = {}
local n_field_names = 0

local function field_name(name)
    local fn
    if #name >= 8 and sub(name, 1, 7) == "Fields[" and byte(name, -1) == 93 then
        fn = sub(name, 8, -2)
    else
        fn = false
    end
    if n_field_names >= 256 then
        field_names = {}
        n_field_names = 0
    end
    field_names[name] = fn
    n_field_names = n_field_names + 1
    return fn
end

local function check_index(v, argn, what)
    if v == nil then return 0 end
    local n = as_number(v)
    if not n then
        error("bad argument #" .. argn .. " to 'read_message' (number expected, got " .. type(v) .. ")", 0)
    end
    n = to_int32(to_int64(n))
    if n < 0 then error("bad argument #" .. argn .. " to 'read_message' (" .. what .. " must be >= 0)", 0) end
    return n
end

local STRING_HEADERS = { Uuid = 1, Type = 3, Logger = 4, Payload = 6, EnvVersion = 7, Hostname = 9 }

--- read(s, name, fi, ai): read_message(name, fi, ai) against the raw message s, which is
-- expected to be valid (the reader checked it). fi and ai are zero-based; pass 0 for absent.
function M.read(s, name, fi, ai)
    if fi ~= 0 then fi = check_index(fi, 2, "field index") end
    if ai ~= 0 then ai = check_index(ai, 3, "array index") end
    if s ~= cur then scan(s) end
    local tag = STRING_HEADERS[name]
    if tag then
        local a = ha[tag]
        if a then return sub(s, a, hb[tag]) end
        return nil
    end
    if name == "Timestamp" then
        if ts_p then return (read_varint(s, ts_p, cur_e)) end
        return 0
    end
    if name == "Severity" then
        if sev_p then return (read_varint_int32(s, sev_p, cur_e)) end
        return 7
    end
    if name == "Pid" then
        if pid_p then
            local v = read_varint_int32(s, pid_p, cur_e)
            if v ~= -2147483648 then return v end
        end
        return nil
    end
    if name == "raw" then return s end
    if name == "size" then return #s end
    if name == "framed" then return frame_header(#s) .. s end
    local fn = field_names[name]
    if fn == nil then
        local tn = type(name)
        if tn == "number" then
            name = tostring(name)
        elseif tn ~= "string" then
            error("bad argument #1 to 'read_message' (string expected, got " .. tn .. ")", 0)
        end
        fn = field_name(name)
    end
    if not fn then
        error("heka_read_message() field: '" .. name .. "' not supported/recognized", 0)
    end
    if not fields_parsed then parse_fields(s) end
    local k = 0
    for i = 1, nf do
        if fname[i] == fn then
            if k == fi then return field_value(s, i, ai) end
            k = k + 1
        end
    end
    return nil
end

--- timestamp(s): the Timestamp header of the valid raw message s as a number (0 when it has none
-- or it cannot be read), for the data-time timer, which reads it from every message of a batch
-- (control.lua): read()'s answer without its argument checks and name dispatch.
function M.timestamp(s)
    if s ~= cur then scan(s) end
    if ts_p then return read_varint(s, ts_p, cur_e) or 0 end
    return 0
end

----------------------------------------------------------------------------------------------------
-- Stream scanning (lsb_find_heka_message)
----------------------------------------------------------------------------------------------------

--- find_framed(buf, max_message_size, decode=true) -> found, consumed, raw
-- Looks for the first framed message in buf. consumed is how many leading bytes of buf are done
-- with: skipped garbage plus the message when found; when nothing is found the unconsumed tail
-- may still start a message. Headers that don't end in 0x1F, lengths of 0 or over
-- max_message_size and (with decode) messages that fail valid() are skipped one byte at a time.
function M.find_framed(buf, max_size, decode)
    local n = #buf
    local from = 1
    while true do
        local p = find(buf, "\30", from, true)
        if not p then return false, n, nil end
        if p + 1 > n then return false, p - 1, nil end
        local hlen = byte(buf, p + 1)
        local hend = p + hlen + 2 -- where the 0x1F must be
        if hend > n then return false, p - 1, nil end
        local msglen = 0
        if byte(buf, hend) == 31 and hlen >= 2 and byte(buf, p + 2) == 8 then
            local v, np2 = read_varint(buf, p + 3, hend)
            if np2 and v > 0 and v <= max_size then msglen = v end
        end
        if msglen > 0 then
            local mend = hend + msglen
            if mend > n then return false, p - 1, nil end
            local raw = sub(buf, hend + 1, mend)
            if decode == false or M.valid(raw) then return true, mend, raw end
        end
        from = p + 1
    end
end

-- exposed for tests
M._varint = varint
M._double_bytes = double_bytes
M._read_double = read_double

return M
