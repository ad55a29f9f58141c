-- hindsight_py.json_schema: JSON Schema (draft-04) validation for rjson's parse_schema/validate,
-- reporting as RapidJSON's SchemaValidator does: the first failure in document order (SAX order:
-- an object's type, its members, then its required members and counts; a string's type, then
-- minLength, maxLength, pattern), as "SchemaURI: # Keyword: k DocumentURI: #/a/0" and a report
-- {"k":{...,"instanceRef":"#/a/0","schemaRef":"#"}}.
--
-- Values are rjson's: objects {t = "object", name1, value1, ...}, arrays {t = "array", ...}, strings,
-- numbers, booleans and the NULL sentinel.
--
-- Supported: type, enum, properties, patternProperties, additionalProperties, required,
-- minProperties, maxProperties, dependencies, items (schema or array), additionalItems,
-- minItems, maxItems, uniqueItems, minLength, maxLength, pattern, minimum, maximum (exclusive),
-- multipleOf, allOf, anyOf, oneOf, not, and $ref within the schema ("#/definitions/x"). Patterns are
-- ECMAScript regular expressions; the subset RapidJSON supports is translated for the matcher below.

local string = require "string"
local table = require "table"
local math = require "math"
local sformat, sgsub, sbyte, ssub, sfind, schar = string.format, string.gsub, string.byte, string.sub, string.find,
    string.char
local tconcat = table.concat
local floor, huge = math.floor, math.huge
local smatch = string.match
local type, pairs, ipairs, error, pcall, tostring, tonumber, setmetatable, getmetatable = type, pairs, ipairs, error,
    pcall, tostring, tonumber, setmetatable, getmetatable

local M = {}

----------------------------------------------------------------------------------------------------
-- JSON text of report values (RapidJSON's Writer)
----------------------------------------------------------------------------------------------------
local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n", ["\r"] = "\\r",
    ["\t"] = "\\t" }
for c = 0, 31 do
    local ch = schar(c)
    if not ESC[ch] then ESC[ch] = sformat("\\u%04X", c) end
end

local function num_text(v)
    if v == floor(v) and v > -2 ^ 63 and v < 2 ^ 64 then return sformat("%.0f", v) end
    local s = sformat("%.17g", v)
    for p = 15, 17 do
        local t = sformat("%." .. p .. "g", v)
        if tonumber(t) == v then
            s = t
            break
        end
    end
    return s
end

-- report values: {o = {k, v, k, v...}} objects, {a = {...}} arrays, strings, numbers, booleans
local function write(v, out)
    local t = type(v)
    if t == "string" then
        out[#out + 1] = '"' .. sgsub(v, '[%c"\\]', ESC) .. '"'
    elseif t == "number" then
        out[#out + 1] = num_text(v)
    elseif t == "boolean" then
        out[#out + 1] = tostring(v)
    elseif v.o then
        out[#out + 1] = "{"
        for i = 1, #v.o, 2 do
            if i > 1 then out[#out + 1] = "," end
            write(v.o[i], out)
            out[#out + 1] = ":"
            write(v.o[i + 1], out)
        end
        out[#out + 1] = "}"
    else
        out[#out + 1] = "["
        for i = 1, #v.a do
            if i > 1 then out[#out + 1] = "," end
            write(v.a[i], out)
        end
        out[#out + 1] = "]"
    end
end

-- JSON pointer as a URI fragment (RFC 6901 escapes, then percent-encoding)
local function fragment(tokens)
    local parts = { "#" }
    for _, tok in ipairs(tokens) do
        tok = sgsub(sgsub(tostring(tok), "~", "~0"), "/", "~1")
        tok = sgsub(tok, "[^%w%-%._~]", function(c) return sformat("%%%02X", sbyte(c)) end)
        parts[#parts + 1] = "/" .. tok
    end
    return tconcat(parts)
end

local compile_regex = require("hindsight_py.ecma_regex").compile

----------------------------------------------------------------------------------------------------
-- Schemas
----------------------------------------------------------------------------------------------------
local NULL

-- rjson object node -> member value by name, and the member names in order
local function obj_get(node, key)
    for i = 1, #node, 2 do
        if node[i] == key then return node[i + 1] end
    end
    return nil
end

local function kind_of(v)
    if v == NULL then return "null" end
    local t = type(v)
    if t == "table" then return v.t end
    if t == "number" then return v == floor(v) and "integer" or "number" end
    return t -- string, boolean
end

local function json_equal(a, b)
    local ka, kb = kind_of(a), kind_of(b)
    if ka == "integer" then ka = "number" end
    if kb == "integer" then kb = "number" end
    if ka ~= kb then return false end
    if ka == "object" then
        if #a ~= #b then return false end
        for i = 1, #a, 2 do
            local other = obj_get(b, a[i])
            if other == nil or not json_equal(a[i + 1], other) then return false end
        end
        return true
    elseif ka == "array" then
        if #a ~= #b then return false end
        for i = 1, #a do
            if not json_equal(a[i], b[i]) then return false end
        end
        return true
    end
    return a == b
end

-- a value of the document as a report value
local function report_value(v)
    local k = kind_of(v)
    if k == "object" then
        local o = {}
        for i = 1, #v, 2 do
            o[#o + 1] = v[i]
            o[#o + 1] = report_value(v[i + 1])
        end
        return { o = o }
    elseif k == "array" then
        local a = {}
        for i = 1, #v do a[i] = report_value(v[i]) end
        return { a = a }
    elseif k == "null" then
        return { a = {} } -- not reached: no keyword reports a null value
    end
    return v
end

local Schema = {}
Schema.__index = Schema

-- compiled schema: { node, ptr (tokens), and compiled children }
local function compile(root, node, ptr, cache)
    if cache[node] then return cache[node] end
    local s = setmetatable({ node = node, ptr = ptr }, Schema)
    cache[node] = s
    if type(node) ~= "table" or node.t ~= "object" then return s end
    local ref = obj_get(node, "$ref")
    if type(ref) == "string" and ssub(ref, 1, 1) == "#" then
        local target, tptr = root, {}
        for tok in sgsub(ssub(ref, 2), "^/", ""):gmatch("[^/]+") do
            tok = sgsub(sgsub(tok, "~1", "/"), "~0", "~")
            tptr[#tptr + 1] = tok
            if type(target) == "table" and target.t == "object" then
                target = obj_get(target, tok)
            elseif type(target) == "table" and target.t == "array" then
                target = target[(tonumber(tok) or -1) + 1]
            else
                target = nil
            end
        end
        if target ~= nil then s.ref = compile(root, target, tptr, cache) end
        return s
    end
    local function sub(key, child)
        local p = {}
        for i = 1, #ptr do p[i] = ptr[i] end
        p[#p + 1] = key
        if child ~= nil then p[#p + 1] = child end
        return p
    end
    local props = obj_get(node, "properties")
    if type(props) == "table" and props.t == "object" then
        s.props = {}
        for i = 1, #props, 2 do s.props[props[i]] = compile(root, props[i + 1], sub("properties", props[i]), cache) end
    end
    local pprops = obj_get(node, "patternProperties")
    if type(pprops) == "table" and pprops.t == "object" then
        s.pprops = {}
        for i = 1, #pprops, 2 do
            s.pprops[#s.pprops + 1] = { compile_regex(pprops[i]),
                compile(root, pprops[i + 1], sub("patternProperties", pprops[i]), cache) }
        end
    end
    local ap = obj_get(node, "additionalProperties")
    if type(ap) == "table" and ap.t == "object" then s.aprops = compile(root, ap, sub("additionalProperties"), cache) end
    local items = obj_get(node, "items")
    if type(items) == "table" and items.t == "object" then
        s.items = compile(root, items, sub("items"), cache)
    elseif type(items) == "table" and items.t == "array" then
        s.tuple = {}
        for i = 1, #items do s.tuple[i] = compile(root, items[i], sub("items", i - 1), cache) end
    end
    local ai = obj_get(node, "additionalItems")
    if type(ai) == "table" and ai.t == "object" then s.aitems = compile(root, ai, sub("additionalItems"), cache) end
    for _, kw in ipairs { "allOf", "anyOf", "oneOf" } do
        local list = obj_get(node, kw)
        if type(list) == "table" and list.t == "array" then
            s[kw] = {}
            for i = 1, #list do s[kw][i] = compile(root, list[i], sub(kw, i - 1), cache) end
        end
    end
    local n = obj_get(node, "not")
    if type(n) == "table" and n.t == "object" then s["not"] = compile(root, n, sub("not"), cache) end
    local deps = obj_get(node, "dependencies")
    if type(deps) == "table" and deps.t == "object" then
        s.deps = {}
        for i = 1, #deps, 2 do
            local d = deps[i + 1]
            if type(d) == "table" and d.t == "object" then
                s.deps[#s.deps + 1] = { deps[i], compile(root, d, sub("dependencies", deps[i]), cache) }
            else
                s.deps[#s.deps + 1] = { deps[i], d }
            end
        end
    end
    local pattern = obj_get(node, "pattern")
    if type(pattern) == "string" then s.pattern = compile_regex(pattern) end
    return s
end

function M.compile(root, null)
    NULL = null
    return compile(root, root, {}, {})
end

----------------------------------------------------------------------------------------------------
-- Validation: raises { keyword, schema ptr, doc ptr, report members } on the first failure
----------------------------------------------------------------------------------------------------
local Fail = {}

local function fail(s, keyword, dptr, members)
    error(setmetatable({ keyword = keyword, sptr = s.ptr, dptr = dptr, members = members or {} }, Fail), 0)
end

local validate

local function type_ok(tspec, k)
    if tspec == k then return true end
    if tspec == "number" and k == "integer" then return true end
    return false
end

local function check_type(s, v, dptr)
    local tspec = obj_get(s.node, "type")
    if tspec == nil then return end
    local k = kind_of(v)
    local wanted = {}
    if type(tspec) == "string" then
        if type_ok(tspec, k) then return end
        wanted[tspec] = true
    elseif type(tspec) == "table" and tspec.t == "array" then
        for i = 1, #tspec do
            if type_ok(tspec[i], k) then return end
            wanted[tspec[i]] = true
        end
    else
        return
    end
    local expected = {} -- in RapidJSON's order
    for _, name in ipairs { "null", "boolean", "object", "array", "string", "number", "integer" } do
        if wanted[name] and not (name == "integer" and wanted.number) then expected[#expected + 1] = name end
    end
    fail(s, "type", dptr, { "expected", { a = expected }, "actual", k })
end

local function child_ptr(dptr, tok)
    local p = {}
    for i = 1, #dptr do p[i] = dptr[i] end
    p[#p + 1] = tok
    return p
end

local function passes(s, v, dptr)
    local ok, e = pcall(validate, s, v, dptr)
    if ok then return true end
    if getmetatable(e) ~= Fail then error(e, 0) end
    return false, e
end

local function sub_errors(list)
    local a = {}
    for _, e in ipairs(list) do
        local members = {}
        for i = 1, #e.members do members[i] = e.members[i] end
        members[#members + 1] = "instanceRef"
        members[#members + 1] = fragment(e.dptr)
        members[#members + 1] = "schemaRef"
        members[#members + 1] = fragment(e.sptr)
        a[#a + 1] = { o = { e.keyword, { o = members } } }
    end
    return { a = a }
end

function validate(s, v, dptr)
    if s.ref then return validate(s.ref, v, dptr) end
    local node = s.node
    if type(node) ~= "table" or node.t ~= "object" then return end
    check_type(s, v, dptr)
    local k = kind_of(v)
    local function num(key) local x = obj_get(node, key); return type(x) == "number" and x or nil end
    if k == "object" then
        local count = #v / 2
        for i = 1, #v, 2 do
            local name, value = v[i], v[i + 1]
            local matched = false
            local ps = s.props and s.props[name]
            local cp = child_ptr(dptr, name)
            if ps then
                matched = true
                validate(ps, value, cp)
            end
            for _, pp in ipairs(s.pprops or {}) do
                if pp[1](name) then
                    matched = true
                    validate(pp[2], value, cp)
                end
            end
            if not matched then
                local ap = obj_get(node, "additionalProperties")
                if ap == false then
                    fail(s, "additionalProperties", dptr, { "disallowed", name })
                elseif s.aprops then
                    validate(s.aprops, value, cp)
                end
            end
        end
        local req = obj_get(node, "required")
        if type(req) == "table" and req.t == "array" then
            local missing = {}
            for i = 1, #req do
                if obj_get(v, req[i]) == nil then missing[#missing + 1] = req[i] end
            end
            if #missing > 0 then fail(s, "required", dptr, { "missing", { a = missing } }) end
        end
        local minp, maxp = num("minProperties"), num("maxProperties")
        if minp and count < minp then fail(s, "minProperties", dptr, { "actual", count, "expected", minp }) end
        if maxp and count > maxp then fail(s, "maxProperties", dptr, { "actual", count, "expected", maxp }) end
        for _, d in ipairs(s.deps or {}) do
            if obj_get(v, d[1]) ~= nil then
                if getmetatable(d[2]) == Schema then
                    local ok, e = passes(d[2], v, dptr)
                    if not ok then fail(s, "dependencies", dptr, { d[1], sub_errors({ e }) }) end
                elseif type(d[2]) == "table" and d[2].t == "array" then
                    local missing = {}
                    for i = 1, #d[2] do
                        if obj_get(v, d[2][i]) == nil then missing[#missing + 1] = d[2][i] end
                    end
                    if #missing > 0 then fail(s, "dependencies", dptr, { d[1], { a = missing } }) end
                end
            end
        end
    elseif k == "array" then
        for i = 1, #v do
            local cp = child_ptr(dptr, i - 1)
            if s.items then
                validate(s.items, v[i], cp)
            elseif s.tuple then
                if s.tuple[i] then
                    validate(s.tuple[i], v[i], cp)
                elseif obj_get(node, "additionalItems") == false then
                    fail(s, "additionalItems", dptr, { "disallowed", i - 1 })
                elseif s.aitems then
                    validate(s.aitems, v[i], cp)
                end
            end
        end
        local mini, maxi = num("minItems"), num("maxItems")
        if mini and #v < mini then fail(s, "minItems", dptr, { "actual", #v, "expected", mini }) end
        if maxi and #v > maxi then fail(s, "maxItems", dptr, { "actual", #v, "expected", maxi }) end
        if obj_get(node, "uniqueItems") == true then
            for i = 1, #v do
                for j = 1, i - 1 do
                    if json_equal(v[i], v[j]) then
                        fail(s, "uniqueItems", dptr, { "duplicates", { a = { j - 1, i - 1 } } })
                    end
                end
            end
        end
    elseif k == "string" then
        local len = 0
        for _ in v:gmatch("[^\128-\191]") do len = len + 1 end -- code points
        local minl, maxl = num("minLength"), num("maxLength")
        if minl and len < minl then fail(s, "minLength", dptr, { "actual", v, "expected", minl }) end
        if maxl and len > maxl then fail(s, "maxLength", dptr, { "actual", v, "expected", maxl }) end
        if s.pattern and not s.pattern(v) then fail(s, "pattern", dptr, { "actual", v }) end
    elseif k == "number" or k == "integer" then
        local min, max = num("minimum"), num("maximum")
        local exmin, exmax = obj_get(node, "exclusiveMinimum") == true, obj_get(node, "exclusiveMaximum") == true
        if min and (v < min or (exmin and v == min)) then
            local m = { "actual", v, "expected", min }
            if exmin then m[5], m[6] = "exclusiveMinimum", true end
            fail(s, "minimum", dptr, m)
        end
        if max and (v > max or (exmax and v == max)) then
            local m = { "actual", v, "expected", max }
            if exmax then m[5], m[6] = "exclusiveMaximum", true end
            fail(s, "maximum", dptr, m)
        end
        local mult = num("multipleOf")
        if mult and mult ~= 0 then
            local q = v / mult
            if q ~= floor(q) then fail(s, "multipleOf", dptr, { "actual", v, "expected", mult }) end
        end
    end
    local enum = obj_get(node, "enum")
    if type(enum) == "table" and enum.t == "array" then
        local found = false
        for i = 1, #enum do
            if json_equal(enum[i], v) then
                found = true
                break
            end
        end
        if not found then fail(s, "enum", dptr, {}) end
    end
    if s.allOf then
        local errs = {}
        for _, sub in ipairs(s.allOf) do
            local ok, e = passes(sub, v, dptr)
            if not ok then errs[#errs + 1] = e end
        end
        if #errs > 0 then fail(s, "allOf", dptr, { "errors", sub_errors(errs) }) end
    end
    if s.anyOf then
        local errs, any = {}, false
        for _, sub in ipairs(s.anyOf) do
            local ok, e = passes(sub, v, dptr)
            if ok then
                any = true
                break
            end
            errs[#errs + 1] = e
        end
        if not any then fail(s, "anyOf", dptr, { "errors", sub_errors(errs) }) end
    end
    if s.oneOf then
        local errs, matched = {}, {}
        for i, sub in ipairs(s.oneOf) do
            local ok, e = passes(sub, v, dptr)
            if ok then matched[#matched + 1] = i - 1 else errs[#errs + 1] = e end
        end
        if #matched == 0 then fail(s, "oneOf", dptr, { "errors", sub_errors(errs) }) end
        if #matched > 1 then fail(s, "oneOf", dptr, { "matches", { a = matched } }) end
    end
    if s["not"] and passes(s["not"], v, dptr) then fail(s, "not", dptr, {}) end
end

-- true | false, "SchemaURI: ... Keyword: ... DocumentURI: ...", report
function M.validate(schema, value)
    local ok, e = pcall(validate, schema, value, {})
    if ok then return true end
    if getmetatable(e) ~= Fail then error(e, 0) end
    local members = {}
    for i = 1, #e.members do
        local x = e.members[i]
        members[i] = (type(x) == "table" and not x.o and not x.a) and report_value(x) or x
    end
    members[#members + 1] = "instanceRef"
    members[#members + 1] = fragment(e.dptr)
    members[#members + 1] = "schemaRef"
    members[#members + 1] = fragment(e.sptr)
    local out = {}
    write({ o = { e.keyword, { o = members } } }, out)
    return false, sformat("SchemaURI: %s Keyword: %s DocumentURI: %s", fragment(e.sptr), e.keyword, fragment(e.dptr)),
        tconcat(out)
end

return M
