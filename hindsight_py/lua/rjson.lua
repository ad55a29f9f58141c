-- rjson for hindsight-py: the API of lua_sandbox_extensions' RapidJSON module, in Lua.
--
-- rjson.parse(json[, validate_utf8])   -> doc, or raises "failed to parse offset:N <reason>"
--                                         (RapidJSON's offsets and reason texts)
-- rjson.parse_message([reader,] name[, fi[, ai[, validate_utf8]]]) -> doc from Payload/Fields[x]
-- rjson.version()                      -> the rjson API version this module follows
-- rjson.parse_schema(json)             -> schema (JSON Schema draft-04: hindsight_py.json_schema)
-- doc:validate(schema)                 -> true | false, err, report (RapidJSON's texts)
--
-- doc:find([h,] key...)      -> handle or nil (string keys index objects, numbers index arrays
--                               from 0); no keys returns the root
-- doc:value([h])             -> string, number, boolean or nil (null); raises on object/array
-- doc:type([h])              -> "string" "number" "boolean" "object" "array" "null"
-- doc:size([h])              -> members, elements or string bytes; raises on other types
-- doc:iter([h])              -> iterator of key/handle (objects, document order) or
--                               0-based index/handle (arrays)
-- doc:remove([h,] key...)    -> the removed value as a new doc (deep copy), or nil
-- doc:remove_shallow([h,] key...) -> the removed value as a handle of this doc, or nil
-- doc:make_field([h])        -> {value = <compact JSON text>, value_type = 1 (bytes),
--                               representation = "json"}: what inject_message writes for
--                               upstream's field userdata
-- doc:parse(json[, validate]) / doc:parse_message(...) -> reuse doc (old handles stop working)
--
-- Handles are Lua tables instead of lightuserdata. A handle works only with the doc that
-- returned it, until that doc is parsed again or the value is removed ("invalid value"), as in
-- upstream. `h == h2` holds for two finds of the same value.
--
-- Differences: numbers written by make_field come out in Lua's shortest exact form (an integral 1.0
-- is written 1); JSON Schema validation covers draft-04's keywords (hindsight_py.json_schema).

local string = require "string"
local table  = require "table"
local math   = require "math"

local byte, char, find, format, gsub, sub = string.byte, string.char, string.find, string.format,
    string.gsub, string.sub
local concat, tremove = table.concat, table.remove
local floor, huge = math.floor, math.huge
local error, pcall, select, setmetatable, getmetatable, tonumber, type =
    error, pcall, select, setmetatable, getmetatable, tonumber, type

local API_VERSION = "1.1.4"

-- JSON null inside containers (nil cannot be stored in a Lua array)
local NULL = setmetatable({}, {__tostring = function() return "rjson.null" end})

----------------------------------------------------------------------------------------------------
-- Values
--
-- A container is a node table {t = "object"|"array", o = owner, ...}. An array holds its elements
-- at [1..n]; an object holds member i's name at [2i-1] and its value at [2i] (document order, as
-- RapidJSON keeps it). Optional caches: x = name -> value slot of its first member, b = slot -> primitive
-- handle. Values are Lua strings, numbers, booleans, NULL or nodes. A node is its own handle; a
-- primitive gets a box {t = type, o = owner, v = value}. `o` is the owning doc's epoch table; a
-- handle whose `o` is not its doc's current epoch is invalid.
----------------------------------------------------------------------------------------------------

local function primitive_type(v)
    if v == NULL then return "null" end
    return type(v) -- "string" | "number" | "boolean"
end

local function is_node(v)
    return type(v) == "table" and v ~= NULL
end

local function box(v, owner)
    return {t = primitive_type(v), o = owner, v = v}
end

-- the handle of the value in slot i of node c
local function child_handle(c, i, owner)
    local v = c[i]
    if is_node(v) then return v end
    local boxes = c.b
    if not boxes then
        boxes = {}
        c.b = boxes
    end
    local h = boxes[i]
    if not h or h.o ~= owner then
        h = box(v, owner)
        boxes[i] = h
    end
    return h
end

-- the raw child value of a handle
local function raw_of(h)
    if h.t == "object" or h.t == "array" then return h end
    return h.v
end

-- slot of the value of member `key`, or nil
local function member_slot(node, key)
    local index = node.x
    if not index then
        index = {}
        for i = #node - 1, 1, -2 do index[node[i]] = i + 1 end -- the first of duplicate names wins
        node.x = index
    end
    return index[key]
end

-- slot of array element `key` (0-based), or nil
local function element_slot(node, key)
    if key ~= key or key < 0 then return nil end
    local i = floor(key) + 1
    if i > #node then return nil end
    return i
end

local function size_of(node)
    if node.t == "object" then return #node / 2 end
    return #node
end

local function deep_copy(v, owner)
    if not is_node(v) then return v end
    local copy = {t = v.t, o = owner}
    for i = 1, #v do copy[i] = deep_copy(v[i], owner) end
    return copy
end

----------------------------------------------------------------------------------------------------
-- Parser (RapidJSON's grammar, error offsets and messages)
----------------------------------------------------------------------------------------------------

local ERR_EMPTY        = "The document is empty."
local ERR_NOT_SINGULAR = "The document root must not be followed by other values."
local ERR_VALUE        = "Invalid value."
local ERR_MISS_NAME    = "Missing a name for object member."
local ERR_MISS_COLON   = "Missing a colon after a name of object member."
local ERR_OBJECT_SEP   = "Missing a comma or '}' after an object member."
local ERR_ARRAY_SEP    = "Missing a comma or ']' after an array element."
local ERR_HEX          = "Incorrect hex digit after \\u escape in string."
local ERR_SURROGATE    = "The surrogate pair in string is invalid."
local ERR_ESCAPE       = "Invalid escape character in string."
local ERR_QUOTE        = "Missing a closing quotation mark in string."
local ERR_ENCODING     = "Invalid encoding in string."
local ERR_TOO_BIG      = "Number too big to be stored in double."
local ERR_FRACTION     = "Miss fraction part in number."
local ERR_EXPONENT     = "Miss exponent in number."

-- state of the parse in progress (parsing never re-enters)
local src, src_len, check_utf8, owner

local function fail(reason, offset) -- offset: 0-based, as RapidJSON reports it
    error(format("failed to parse offset:%.14g %s", offset, reason), 0)
end

local function skip_space(p)
    local c = byte(src, p)
    if c == 32 or c == 10 or c == 13 or c == 9 then
        return find(src, "[^ \n\r\t]", p + 1) or src_len + 1
    end
    return p
end

-- position of the first byte of an invalid UTF-8 sequence in src[i..j], or nil
local function bad_utf8(i, j)
    local p = find(src, "[\128-\255]", i)
    while p and p <= j do
        local c = byte(src, p)
        local n, lo, hi = 0, 0x80, 0xBF
        if c >= 0xC2 and c <= 0xDF then n = 1
        elseif c == 0xE0 then n, lo = 2, 0xA0
        elseif c == 0xED then n, hi = 2, 0x9F
        elseif c >= 0xE1 and c <= 0xEF then n = 2
        elseif c == 0xF0 then n, lo = 3, 0x90
        elseif c == 0xF4 then n, hi = 3, 0x8F
        elseif c >= 0xF1 and c <= 0xF3 then n = 3
        else return p end
        if p + n > j then return p end
        local c2 = byte(src, p + 1)
        if c2 < lo or c2 > hi then return p end
        for q = p + 2, p + n do
            local cq = byte(src, q)
            if cq < 0x80 or cq > 0xBF then return p end
        end
        p = find(src, "[\128-\255]", p + n + 1)
    end
    return nil
end

local function utf8_char(cp)
    if cp < 0x80 then return char(cp) end
    if cp < 0x800 then return char(0xC0 + floor(cp / 0x40), 0x80 + cp % 0x40) end
    if cp < 0x10000 then
        return char(0xE0 + floor(cp / 0x1000), 0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
    end
    return char(0xF0 + floor(cp / 0x40000), 0x80 + floor(cp / 0x1000) % 0x40,
        0x80 + floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local SIMPLE_ESCAPES = {
    [34] = '"', [92] = "\\", [47] = "/", [98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r",
    [116] = "\t",
}

local function hex4(at, escape_offset)
    local digits = sub(src, at, at + 3)
    if not find(digits, "^%x%x%x%x$") then fail(ERR_HEX, escape_offset) end
    return tonumber(digits, 16)
end

-- `\u` escape whose backslash is at i -> text, position after it
local function unicode_escape(i)
    local cp = hex4(i + 2, i - 1)
    if cp >= 0xD800 and cp <= 0xDBFF then
        if sub(src, i + 6, i + 7) ~= "\\u" then fail(ERR_SURROGATE, i - 1) end
        local low = hex4(i + 8, i - 1)
        if low < 0xDC00 or low > 0xDFFF then fail(ERR_SURROGATE, i - 1) end
        return utf8_char(0x10000 + (cp - 0xD800) * 0x400 + (low - 0xDC00)), i + 12
    end
    return utf8_char(cp), i + 6
end

-- string whose opening quote is at p -> value, position after the closing quote
local function parse_string(p)
    local segment = p + 1 -- start of the raw run not yet copied
    local scan = segment
    local parts, n = nil, 0
    while true do
        local i = find(src, '[%c"\\]', scan)
        if not i then fail(ERR_QUOTE, src_len) end
        local c = byte(src, i)
        if c == 127 then
            scan = i + 1 -- DEL needs no escaping
        else
            if c ~= 34 and c ~= 92 then fail(ERR_ENCODING, i - 1) end -- raw control character
            if check_utf8 then
                local bad = bad_utf8(segment, i - 1)
                if bad then fail(ERR_ENCODING, bad - 1) end
            end
            if c == 34 then
                if not parts then return sub(src, segment, i - 1), i + 1 end
                n = n + 1
                parts[n] = sub(src, segment, i - 1)
                return concat(parts, "", 1, n), i + 1
            end
            parts = parts or {}
            n = n + 1
            parts[n] = sub(src, segment, i - 1)
            local e = byte(src, i + 1)
            local simple = SIMPLE_ESCAPES[e]
            n = n + 1
            if simple then
                parts[n] = simple
                segment = i + 2
            elseif e == 117 then
                parts[n], segment = unicode_escape(i)
            else
                fail(ERR_ESCAPE, i - 1)
            end
            scan = segment
        end
    end
end

local function parse_number(p)
    local q = p
    if byte(src, q) == 45 then q = q + 1 end
    local c = byte(src, q)
    if c == 48 then
        q = q + 1
    elseif c and c >= 49 and c <= 57 then
        local _, e = find(src, "^%d*", q + 1)
        q = e + 1
    else
        fail(ERR_VALUE, q - 1)
    end
    c = byte(src, q)
    if c == 46 then
        local _, e = find(src, "^%d+", q + 1)
        if not e then fail(ERR_FRACTION, q) end
        q = e + 1
        c = byte(src, q)
    end
    if c == 101 or c == 69 then
        local r = q + 1
        local sign = byte(src, r)
        if sign == 43 or sign == 45 then r = r + 1 end
        local _, e = find(src, "^%d+", r)
        if not e then fail(ERR_EXPONENT, r - 1) end
        q = e + 1
    end
    local v = tonumber(sub(src, p, q - 1))
    if v == huge or v == -huge then fail(ERR_TOO_BIG, p - 1) end
    return v, q
end

local function parse_literal(p, word, value)
    for k = 2, #word do
        if byte(src, p + k - 1) ~= byte(word, k) then fail(ERR_VALUE, p + k - 2) end
    end
    return value, p + #word
end

local parse_value

local function parse_object(p)
    local node = {t = "object", o = owner}
    p = skip_space(p + 1)
    if byte(src, p) == 125 then return node, p + 1 end
    local n = 0
    while true do
        if byte(src, p) ~= 34 then fail(ERR_MISS_NAME, p - 1) end
        local key, value
        key, p = parse_string(p)
        p = skip_space(p)
        if byte(src, p) ~= 58 then fail(ERR_MISS_COLON, p - 1) end
        value, p = parse_value(skip_space(p + 1))
        node[n + 1] = key
        node[n + 2] = value
        n = n + 2
        p = skip_space(p)
        local c = byte(src, p)
        if c == 44 then
            p = skip_space(p + 1)
        elseif c == 125 then
            return node, p + 1
        else
            fail(ERR_OBJECT_SEP, p - 1)
        end
    end
end

local function parse_array(p)
    local node = {t = "array", o = owner}
    p = skip_space(p + 1)
    if byte(src, p) == 93 then return node, p + 1 end
    local n = 0
    while true do
        local value
        value, p = parse_value(p)
        n = n + 1
        node[n] = value
        p = skip_space(p)
        local c = byte(src, p)
        if c == 44 then
            p = skip_space(p + 1)
        elseif c == 93 then
            return node, p + 1
        else
            fail(ERR_ARRAY_SEP, p - 1)
        end
    end
end

function parse_value(p)
    local c = byte(src, p)
    if c == 34 then return parse_string(p) end
    if c == 123 then return parse_object(p) end
    if c == 91 then return parse_array(p) end
    if c == 116 then return parse_literal(p, "true", true) end
    if c == 102 then return parse_literal(p, "false", false) end
    if c == 110 then return parse_literal(p, "null", NULL) end
    return parse_number(p)
end

local function parse_text(text)
    src, src_len = text, #text
    local p = skip_space(1)
    if p > src_len then fail(ERR_EMPTY, src_len) end
    local value
    value, p = parse_value(p)
    p = skip_space(p)
    if p <= src_len then fail(ERR_NOT_SINGULAR, p - 1) end
    return value
end

----------------------------------------------------------------------------------------------------
-- Fast path: the same grammar as an LPeg pattern building the same nodes in C. It gives up
-- (no match) on anything it does not cover exactly, and the parser above then decides: every
-- error, and numbers with over 200 integer digits or a 3+ digit exponent (so that the fast path
-- can never produce an infinity, which is an error). Without LPeg only the parser above is used.
----------------------------------------------------------------------------------------------------

local has_lpeg, lpeg = pcall(require, "lpeg")

local function build_fast_grammar(validate)
    local P, R, S, C, Cc, Cs, Ct, Cg, Carg, V =
        lpeg.P, lpeg.R, lpeg.S, lpeg.C, lpeg.Cc, lpeg.Cs, lpeg.Ct, lpeg.Cg, lpeg.Carg, lpeg.V

    local space = S" \t\n\r"^0
    local hex = R("09", "af", "AF")
    local char_run
    if validate then
        local cont = R"\128\191"
        char_run = (R"\32\127" - S'"\\'
            + R"\194\223" * cont
            + P"\224" * R"\160\191" * cont
            + (R"\225\236" + R"\238\239") * cont * cont
            + P"\237" * R"\128\159" * cont
            + P"\240" * R"\144\191" * cont * cont
            + R"\241\243" * cont * cont * cont
            + P"\244" * R"\128\143" * cont * cont)^1
    else
        char_run = (P(1) - S'"\\' - R"\0\31")^1
    end
    local function from_hex(h) return utf8_char(tonumber(h, 16)) end
    local function from_pair(hi, lo)
        return utf8_char(0x10000 + (tonumber(hi, 16) - 0xD800) * 0x400 + (tonumber(lo, 16) - 0xDC00))
    end
    local high = S"dD" * S"89abAB" * hex * hex
    local low = S"dD" * R("cf", "CF") * hex * hex
    -- each alternative spans its backslash, so that Cs replaces the whole escape
    local escape = P'\\"' / '"' + P"\\\\" / "\\" + P"\\/" / "/" + P"\\b" / "\b" + P"\\f" / "\f"
        + P"\\n" / "\n" + P"\\r" / "\r" + P"\\t" / "\t"
        + (P"\\u" * C(high) * P"\\u" * C(low)) / from_pair
        + (P"\\u" * (C(hex * hex * hex * hex) - high)) / from_hex
    local string_value = P'"' * C(char_run^-1) * P'"' + P'"' * Cs((char_run + escape)^0) * P'"'

    local digit = R"09"
    local int = P"0" + R"19" * digit^-199
    local number = C(P"-"^-1 * int * (P"." * digit^1)^-1 * (S"eE" * S"+-"^-1 * digit * digit^-1)^-1)
        / tonumber

    return P{
        "document",
        document = space * V"value" * space * -1,
        value = string_value + number + V"object" + V"array"
            + P"true" * Cc(true) + P"false" * Cc(false) + P"null" * Cc(NULL),
        member = string_value * space * P":" * space * V"value",
        object = Ct(Cg(Cc"object", "t") * Cg(Carg(1), "o") * P"{" * space
            * (V"member" * (space * P"," * space * V"member")^0)^-1 * space * P"}"),
        array = Ct(Cg(Cc"array", "t") * Cg(Carg(1), "o") * P"[" * space
            * (V"value" * (space * P"," * space * V"value")^0)^-1 * space * P"]"),
    }
end

local fast_grammar, fast_grammar_utf8, lpeg_match
if has_lpeg and type(lpeg) == "table" and lpeg.version then
    lpeg_match = lpeg.match
    fast_grammar = build_fast_grammar(false)
    fast_grammar_utf8 = build_fast_grammar(true)
end

-- -> the root value (node or raw primitive) owned by `epoch`
local function parse_root(text, validate, epoch)
    if type(text) == "number" then text = format("%.14g", text) end
    if type(text) ~= "string" then
        error(format("bad argument #1 to 'parse' (string expected, got %s)", type(text)), 3)
    end
    -- RapidJSON reads a C string: it ends at the first NUL
    local nul = find(text, "\0", 1, true)
    if nul then text = sub(text, 1, nul - 1) end
    if lpeg_match then
        local ok, value = pcall(lpeg_match, validate and fast_grammar_utf8 or fast_grammar, text, 1, epoch)
        if ok and value ~= nil then return value end
    end
    check_utf8, owner = validate and true or false, epoch
    local ok, result = pcall(parse_text, text)
    src, owner = nil, nil
    if not ok then error(result, 0) end
    return result
end

----------------------------------------------------------------------------------------------------
-- Serialisation (make_field): compact JSON as RapidJSON's Writer produces it
----------------------------------------------------------------------------------------------------

local WRITE_ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
    ["\r"] = "\\r", ["\t"] = "\\t"}
for c = 0, 31 do
    local ch = char(c)
    if not WRITE_ESCAPES[ch] then WRITE_ESCAPES[ch] = format("\\u%04X", c) end
end

local function number_text(v)
    if v == floor(v) and v >= -9007199254740992 and v <= 9007199254740992 then
        if v == 0 and 1 / v < 0 then return "-0.0" end
        return format("%.0f", v)
    end
    local text
    for digits = 15, 17 do
        text = format("%." .. digits .. "g", v)
        if tonumber(text) == v then break end
    end
    return (gsub(text, "e([-+])0*(%d)", function(sign, d)
        if sign == "+" then sign = "" end
        return "e" .. sign .. d
    end))
end

local function write(v, out, n)
    local t = type(v)
    if t == "string" then
        n = n + 1
        out[n] = '"' .. gsub(v, '[%c"\\]', WRITE_ESCAPES) .. '"'
    elseif t == "number" then
        n = n + 1
        out[n] = number_text(v)
    elseif t == "boolean" then
        n = n + 1
        out[n] = v and "true" or "false"
    elseif v == NULL then
        n = n + 1
        out[n] = "null"
    elseif v.t == "object" then
        n = n + 1
        out[n] = "{"
        for i = 1, #v, 2 do
            if i > 1 then
                n = n + 1
                out[n] = ","
            end
            n = n + 1
            out[n] = '"' .. gsub(v[i], '[%c"\\]', WRITE_ESCAPES) .. '":'
            n = write(v[i + 1], out, n)
        end
        n = n + 1
        out[n] = "}"
    else
        n = n + 1
        out[n] = "["
        for i = 1, #v do
            if i > 1 then
                n = n + 1
                out[n] = ","
            end
            n = write(v[i], out, n)
        end
        n = n + 1
        out[n] = "]"
    end
    return n
end

----------------------------------------------------------------------------------------------------
-- Documents
----------------------------------------------------------------------------------------------------

local Doc = {}
Doc.__index = Doc

local function new_doc(root_raw, epoch)
    local root = root_raw
    if not is_node(root) then root = box(root_raw, epoch) end
    return setmetatable({epoch = epoch, root = root}, Doc)
end

-- the handle argument of value/type/size/iter/make_field: none -> root, nil -> nil
local function handle_arg(doc, fn, ...)
    local n = select("#", ...)
    if n == 0 then return doc.root end
    if n > 1 then error(format("bad argument #2 to '%s' (invalid number of arguments)", fn), 3) end
    local h = ...
    if h == nil then return nil end
    if type(h) ~= "table" then
        error(format("bad argument #1 to '%s' (rjson value expected, got %s)", fn, type(h)), 3)
    end
    if h.o == nil or h.o ~= doc.epoch then error("invalid value", 0) end
    return h
end

-- leading handle argument of find/remove: -> start value, index of the first key
local function start_of(doc, first)
    if type(first) == "table" then
        if first.o == nil or first.o ~= doc.epoch then error("invalid value", 0) end
        return first, 2
    end
    return doc.root, 1
end

function Doc:find(...)
    local h, start = start_of(self, (...))
    local n = select("#", ...)
    if start > n then return h end
    local epoch = self.epoch
    local node = raw_of(h)
    for i = start, n do
        if not is_node(node) then return nil end
        local key = select(i, ...)
        local kt = type(key)
        local pos
        if kt == "string" then
            if node.t ~= "object" then return nil end
            pos = member_slot(node, key)
        elseif kt == "number" then
            if node.t ~= "array" then return nil end
            pos = element_slot(node, key)
        end
        if not pos then return nil end
        if i == n then return child_handle(node, pos, epoch) end
        node = node[pos]
    end
end

function Doc:type(...)
    local h = handle_arg(self, "type", ...)
    if h then return h.t end
    return nil
end

function Doc:value(...)
    local h = handle_arg(self, "value", ...)
    if not h then return nil end
    local t = h.t
    if t == "object" then error("value() not allowed on an object", 0) end
    if t == "array" then error("value() not allowed on an array", 0) end
    if t == "null" then return nil end
    return h.v
end

local SIZE_ERRORS = {
    number = "attempt to get length of a number",
    boolean = "attempt to get length of a boolean",
    null = "attempt to get length of a NULL",
}

function Doc:size(...)
    local h = handle_arg(self, "size", ...)
    if not h then return nil end
    local t = h.t
    if t == "string" then return #h.v end
    if t == "object" or t == "array" then return size_of(h) end
    error(SIZE_ERRORS[t], 0)
end

function Doc:iter(...)
    local node = handle_arg(self, "iter", ...)
    if not node then return nil end
    local t = node.t
    if t ~= "object" and t ~= "array" then error("iter() not allowed on a primitive type", 0) end
    local doc, i = self, 0
    if t == "object" then
        return function()
            local epoch = doc.epoch
            if node.o ~= epoch then error("iterator has been invalidated", 0) end
            i = i + 2
            if i > #node then return nil, nil end
            return node[i - 1], child_handle(node, i, epoch)
        end
    end
    return function()
        local epoch = doc.epoch
        if node.o ~= epoch then error("iterator has been invalidated", 0) end
        i = i + 1
        if i > #node then return nil, nil end
        return i - 1, child_handle(node, i, epoch)
    end
end

-- Takes the addressed value out of its container -> the raw value, or nil
local function detach(doc, ...)
    local h, start = start_of(doc, (...))
    local n = select("#", ...)
    if start > n then error("cannot remove the root", 0) end
    local node = raw_of(h)
    for i = start, n do
        local key = select(i, ...)
        local kt = type(key)
        local pos
        if kt == "string" then
            if not is_node(node) or node.t ~= "object" then return nil end
            pos = member_slot(node, key)
        elseif kt == "number" then
            if not is_node(node) or node.t ~= "array" then return nil end
            pos = element_slot(node, key)
        end
        -- any other key type is passed over, as upstream does
        if kt == "string" or kt == "number" then
            if not pos then return nil end
            if i == n then
                local v = node[pos]
                local boxes = node.b
                if is_node(v) then
                    v.o = false -- its handle is no longer valid in this doc
                elseif boxes and boxes[pos] then
                    boxes[pos].o = false
                end
                tremove(node, pos)
                if node.t == "object" then tremove(node, pos - 1) end -- the member's name
                node.x, node.b = nil, nil
                return v
            end
            node = node[pos]
        end
    end
    return nil
end

function Doc:remove(...)
    local v = detach(self, ...)
    if v == nil then return nil end
    local epoch = {}
    return new_doc(deep_copy(v, epoch), epoch)
end

function Doc:remove_shallow(...)
    local v = detach(self, ...)
    if v == nil then return nil end
    if not is_node(v) then return box(v, self.epoch) end
    -- a new handle for the same members; the old one was invalidated by detach
    local moved = {t = v.t, o = self.epoch}
    for i = 1, #v do moved[i] = v[i] end
    return moved
end

function Doc:make_field(...)
    local h = handle_arg(self, "make_field", ...)
    if not h then return nil end
    local out = {}
    local n = write(raw_of(h), out, 0)
    return {value = concat(out, "", 1, n), value_type = 1, representation = "json"}
end

function Doc:parse(text, validate)
    local epoch = {}
    self.epoch = epoch
    self.root = box(NULL, epoch) -- a failed parse leaves a null document, as upstream
    local ok, root = pcall(parse_root, text, validate, epoch)
    if not ok then error(root, 0) end
    if not is_node(root) then root = box(root, epoch) end
    self.root = root
    return self
end

local function message_text(...)
    local reader, name, fi, ai, validate
    if type((...)) == "string" then
        name, fi, ai, validate = ...
    else
        reader, name, fi, ai, validate = ...
    end
    if type(name) ~= "string" then
        error(format("bad argument #%d to 'parse_message' (string expected, got %s)",
            reader and 2 or 1, type(name)), 3)
    end
    local text
    if name == "Payload" or find(name, "^Fields%[.+%]$") then
        if reader then
            text = reader:read_message(name, fi or 0, ai or 0)
        else
            text = read_message(name, fi or 0, ai or 0)
        end
    end
    if type(text) ~= "string" then
        if not reader and read_message("Uuid") == nil then
            error("parse_message() no active message", 0)
        end
        error("field not found", 0)
    end
    if #text > 2 and byte(text, 1) == 0x1f and byte(text, 2) == 0x8b then
        -- gzip'ed JSON is inflated, as upstream does (with Debian's lua-zlib)
        local ok, inflated = pcall(function() return require("zlib").inflate(31)(text) end)
        if not ok or type(inflated) ~= "string" then error("ungzip failed", 0) end
        text = inflated
    elseif text == "" then
        -- upstream copies the field's length + 1 bytes out of the message, so an empty field is
        -- parsed as the message byte that follows it (a protobuf tag): never a JSON value
        error("failed to parse offset:0 Invalid value.", 0)
    end
    return text, validate
end

function Doc:parse_message(...)
    return self:parse(message_text(...))
end

-- a doc as a Fields value of inject_message (upstream's lsb_output of the rjson userdata): its JSON
Doc.__lsb_output = function(doc) return doc:make_field().value end

local SCHEMA = "mozsvc.rjson_schema"
local schema_mt = {__metatable = SCHEMA}

-- doc:validate(schema) -> true | false, "SchemaURI: ... Keyword: ... DocumentURI: ...", report
-- (hindsight_py.json_schema: RapidJSON's draft-04 validation and texts)
function Doc:validate(schema)
    if getmetatable(schema) ~= SCHEMA then
        error(format("bad argument #1 to 'validate' (%s expected, got %s)", SCHEMA, type(schema)), 2)
    end
    local root = self.root
    local value = root
    if not is_node(root) then value = root.v end
    local ok, err, report = require("hindsight_py.json_schema").validate(schema.compiled, value)
    if ok then return true, nil end
    return false, err, report
end

----------------------------------------------------------------------------------------------------
-- Module
----------------------------------------------------------------------------------------------------

local M = {}

function M.parse(text, validate)
    local epoch = {}
    return new_doc(parse_root(text, validate, epoch), epoch)
end

function M.parse_message(...)
    return M.parse(message_text(...))
end

function M.parse_schema(json)
    local raw = parse_root(json, false, {})
    local compiled = require("hindsight_py.json_schema").compile(raw, NULL)
    return setmetatable({compiled = compiled}, schema_mt)
end

function M.version()
    return API_VERSION
end

return M
