-- circular_buffer for hindsight-py: the API of lua_sandbox_extensions' C module (1.0.2, its sandbox
-- build) in Lua: a time series of `rows` rows of `seconds_per_row` seconds, `columns` values each,
-- with the change of each value since the last cbufd output kept beside it.
--
-- circular_buffer.new(rows, columns, seconds_per_row) -> cb (rows > 1, 0 < columns <= 256)
-- circular_buffer.version()                  -> "1.0.2"
-- cb:add(ns, column, value) / cb:set(ns, column, value) -> the row's new value; nil when ns is
--                                               before the buffer (a later ns advances it)
-- cb:get(ns, column) / cb:get_delta(ns, column)
-- cb:get_range(column[, start_ns[, end_ns]]) / cb:get_range_delta(...) -> array, or nil
-- cb:set_header(column, name[, unit[, "sum"|"min"|"max"|"none"]]) -> column
-- cb:get_header(column) -> name, unit, aggregation
-- cb:get_configuration() -> rows, columns, seconds_per_row;  cb:current_time() -> ns
-- cb:annotate(ns, column, "info"|"alert", text[, delta])
-- cb:format("cbuf"|"cbufd") -> cb: what add_to_payload/write_output writes (the whole buffer, or
--                              the rows changed since the last cbufd output, whose deltas it clears)
-- cb:fromstring(text) -> the restoration preserve_data writes (the C module's serialization)
-- Upstream stores the annotations in the module table; here each buffer keeps its own (the same
-- output: they are written in time order, as upstream's small integer keys iterate).

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local argerror, checknumber, optnumber, checkint = standin.argerror, standin.checknumber, standin.optnumber,
    standin.checkint
local checkstring, checkoption, outputd = standin.checkstring, standin.checkoption, standin.outputd
local fmod, floor, huge = math.fmod, math.floor, math.huge
local sformat, sgsub, sbyte, ssub, sgmatch, slower = string.format, string.gsub, string.byte, string.sub,
    string.gmatch, string.lower
local tconcat, tsort = table.concat, table.sort
local type, select, setmetatable, getmetatable, tonumber, pairs, ipairs = type, select, setmetatable, getmetatable,
    tonumber, pairs, ipairs

local MT_NAME = "mozsvc.circular_buffer"
local AGGREGATIONS = { sum = "sum", min = "min", max = "max", none = "none" }
local FORMATS = { cbuf = "cbuf", cbufd = "cbufd" }
local ANNOTATION_TYPES = { info = "info", alert = "alert" }
local NAN = 0 / 0

local M = {}
local CB = {}
local preserve -- cb_serialize, below
local mt = { __index = CB, __metatable = MT_NAME }

-- check_circular_buffer: self first, then at least `min` arguments (self included)
local function check(self, min, given, fname)
    if getmetatable(self) ~= MT_NAME then
        argerror(1, fname, sformat("%s expected, got %s", MT_NAME, given < 1 and "no value" or type(self)))
    end
    if given < min then argerror(0, fname, "incorrect number of arguments") end
end

local function trunc(x) return x >= 0 and floor(x) or -floor(-x) end

-- the 0-based row of ns, advancing the buffer to it when `advance`; -1 outside the buffer
local function check_row(self, ns, advance)
    local spr, rows = self.spr, self.rows
    local t = trunc(ns / 1e9)
    t = t - fmod(t, spr)
    local current_row = trunc(self.time / spr)
    local requested_row = trunc(t / spr)
    local row_delta = requested_row - current_row
    local row = fmod(requested_row, rows)
    if row_delta > 0 and advance then
        local v, tcols = self.v, self.cols * 2
        for k = 1, row_delta < rows and row_delta or rows do
            local base = ((self.row + k) % rows) * tcols
            for i = base + 1, base + tcols do v[i] = NAN end
        end
        self.time = t
        self.row = row
    elseif requested_row > current_row or (row_delta < 0 and -row_delta or row_delta) >= rows then
        return -1
    end
    return row
end

local function check_column(self, v, narg, given, fname)
    local column = checkint(v, narg, given, fname)
    if not (1 <= column and column <= self.cols) then argerror(narg, fname, "column out of range") end
    return column - 1
end

local function start_time(self) return self.time - self.spr * (self.rows - 1) end

function M.new(...)
    local n = select("#", ...)
    if n ~= 3 then argerror(0, "new", "incorrect number of arguments") end
    local rows, columns, spr = ...
    rows = checkint(rows, 1, n, "new")
    if not (1 < rows) then argerror(1, "new", "rows must be > 1") end
    columns = checkint(columns, 2, n, "new")
    if not (0 < columns and columns <= 256) then argerror(2, "new", "columns must be > 0 and <= 256") end
    spr = checkint(spr, 3, n, "new")
    if not (0 < spr) then argerror(3, "new", "seconds_per_row is out of range") end
    local headers = {}
    for c = 1, columns do headers[c] = { name = "Column_" .. c, unit = "count", agg = "sum" } end
    local v = {}
    for i = 1, rows * columns * 2 do v[i] = NAN end
    local cb = setmetatable({
        rows = rows, cols = columns, spr = spr,
        time = spr * (rows - 1), row = rows - 1,
        v = v, -- row r, column c (0-based): value at r * 2 * cols + 2 * c + 1, its delta next
        headers = headers,
        output_format = "cbuf",
        annotations = {}, -- second -> column -> { type, text (escaped), delta }
    }, mt)
    return standin.track(host_api, cb, preserve)
end

function M.version() return "1.0.2" end

-- add and set: their arguments checked (upstream's messages), and the value's slot in self.v
-- (nil when ns falls outside the buffer)
local function cell_args(name, ...)
    local self, ns, column, value = ...
    local n = select("#", ...)
    check(self, 4, n, name)
    ns = checknumber(ns, 2, n, name)
    local row = check_row(self, ns, true)
    column = check_column(self, column, 3, n, name)
    value = checknumber(value, 4, n, name)
    if row == -1 then return nil end
    return self.v, row * self.cols * 2 + column * 2 + 1, column, value
end

function CB.add(...)
    local self = ...
    local v, i, column, value = cell_args("add", ...)
    if v == nil then return nil end
    local old = v[i]
    if old ~= old then
        v[i] = value
    else
        if value ~= value then error("cannot uninitialize a value", 0) end
        v[i] = old + value
        if v[i] ~= v[i] then error("add produced a NAN", 0) end
    end
    local new = v[i]
    if old == new then return new end
    local agg = self.headers[column + 1].agg
    if agg == "sum" then
        local d = v[i + 1]
        v[i + 1] = d ~= d and value or d + value
    elseif agg == "min" or agg == "max" then
        v[i + 1] = new
    end
    return new
end

function CB.set(...)
    local self = ...
    local v, i, column, value = cell_args("set", ...)
    if v == nil then return nil end
    local old = v[i]
    if value ~= value and old == old then error("cannot uninitialize a value", 0) end
    local agg = self.headers[column + 1].agg
    if agg == "sum" then
        v[i] = value
        local change = value
        if old == old and old ~= huge and old ~= -huge then change = value - old end
        if not (old == old and old ~= huge and old ~= -huge and change == 0) then
            local d = v[i + 1]
            v[i + 1] = d ~= d and change or d + change
        end
    elseif agg == "min" then
        if old ~= old or value < old then v[i], v[i + 1] = value, value end
    elseif agg == "max" then
        if old ~= old or value > old then v[i], v[i + 1] = value, value end
    else
        v[i] = value
    end
    return v[i]
end

local function getter(fname, offset)
    return function(...)
        local self, ns, column = ...
        local n = select("#", ...)
        check(self, 3, n, fname)
        local row = check_row(self, checknumber(ns, 2, n, fname), false)
        column = check_column(self, column, 3, n, fname)
        if row == -1 then return nil end
        return self.v[row * self.cols * 2 + column * 2 + 1 + offset]
    end
end
CB.get = getter("get", 0)
CB.get_delta = getter("get_delta", 1)

local function range_getter(fname, offset)
    return function(...)
        local self, column, start_ns, end_ns = ...
        local n = select("#", ...)
        check(self, 2, n, fname)
        column = check_column(self, column, 2, n, fname)
        start_ns = optnumber(start_ns, 3, n, fname, start_time(self) * 1e9)
        end_ns = optnumber(end_ns, 4, n, fname, self.time * 1e9)
        if not (end_ns >= start_ns) then argerror(4, fname, "end must be >= start") end
        local start_row, end_row = check_row(self, start_ns, false), check_row(self, end_ns, false)
        if start_row == -1 or end_row == -1 then return nil end
        local out, v, tcols, rows = {}, self.v, self.cols * 2, self.rows
        local row = start_row
        while true do
            if row == rows then row = 0 end
            out[#out + 1] = v[row * tcols + column * 2 + 1 + offset]
            if row == end_row then break end
            row = row + 1
        end
        return out
    end
end
CB.get_range = range_getter("get_range", 0)
CB.get_range_delta = range_getter("get_range_delta", 1)

function CB.get_configuration(...)
    local self = ...
    check(self, 1, select("#", ...), "get_configuration")
    return self.rows, self.cols, self.spr
end

function CB.current_time(...)
    local self = ...
    check(self, 0, select("#", ...), "current_time")
    return self.time * 1e9
end

-- strncpy into the C module's 16 and 8 byte fields, other characters as '_'
local function label(s, size, keep)
    return (sgsub(ssub(s, 1, size - 1), keep, "_"))
end

function CB.set_header(...)
    local self, column, name, unit, agg = ...
    local n = select("#", ...)
    check(self, 3, n, "set_header")
    column = check_column(self, column, 2, n, "set_header")
    name = checkstring(name, 3, n, "set_header")
    unit = unit == nil and "count" or checkstring(unit, 4, n, "set_header")
    agg = checkoption(agg, 5, n, "set_header", AGGREGATIONS, "sum")
    local h = self.headers[column + 1]
    h.name = label(name, 16, "%W")
    h.unit = label(unit, 8, "[^%w/*]")
    h.agg = agg
    return column + 1
end

function CB.get_header(...)
    local self, column = ...
    local n = select("#", ...)
    check(self, 2, n, "get_header")
    local h = self.headers[check_column(self, column, 2, n, "get_header") + 1]
    return h.name, h.unit, h.agg
end

-- the annotation as upstream stores it: JSON escapes, other unprintable bytes as spaces
local ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["/"] = "\\/", ["\b"] = "\\b", ["\t"] = "\\t", ["\n"] = "\\n",
    ["\f"] = "\\f", ["\r"] = "\\r" }
local function escape_annotation(s)
    return (sgsub(s, "[%z\1-\31\127-\255\\\"/]", function(c) return ESCAPES[c] or " " end))
end

function CB.annotate(...)
    local self, ns, column, atype, text, delta = ...
    local n = select("#", ...)
    check(self, 5, n, "annotate")
    ns = checknumber(ns, 2, n, "annotate")
    local row = check_row(self, ns, false)
    column = check_column(self, column, 3, n, "annotate")
    atype = checkoption(atype, 4, n, "annotate", ANNOTATION_TYPES)
    text = checkstring(text, 5, n, "annotate")
    if delta == nil then
        delta = true
    elseif type(delta) ~= "boolean" then
        argerror(6, "annotate", "delta must be boolean")
    end
    if row == -1 then return end
    local t = trunc(ns / 1e9)
    t = t - fmod(t, self.spr)
    local at = self.annotations[t]
    if not at then
        at = {}
        self.annotations[t] = at
    end
    local a = at[column + 1]
    if not a then
        a = {}
        at[column + 1] = a
    end
    a.type, a.text = atype, escape_annotation(text)
    if delta then a.delta = true end
end

function CB.format(...)
    local self, fmt = ...
    local n = select("#", ...)
    check(self, 2, n, "format")
    if n ~= 2 then argerror(0, "format", "incorrect number of arguments") end
    self.output_format = checkoption(fmt, 2, n, "format", FORMATS)
    return self
end

-- strtod's numbers, as the C module reads them back (nan, inf and -inf included)
local function read_numbers(s)
    local out = {}
    for word in sgmatch(s, "%S+") do
        local lw = slower(word)
        local x = tonumber(word)
        if lw == "nan" or lw == "-nan" then x = NAN
        elseif lw == "inf" or lw == "+inf" then x = huge
        elseif lw == "-inf" then x = -huge end
        if x == nil then break end
        out[#out + 1] = x
    end
    return out
end

function CB.fromstring(...)
    local self, s = ...
    local n = select("#", ...)
    check(self, 2, n, "fromstring")
    s = checkstring(s, 2, n, "fromstring")
    local nums = read_numbers(s)
    self.time = trunc(nums[1] or 0)
    self.row = trunc(nums[2] or 0)
    local len = self.rows * self.cols
    local v = self.v
    local k = 2
    for pos = 0, len - 1 do
        local x = nums[k + 1]
        if x == nil then error(sformat("fromstring() too few values: %d, expected %d", pos, len), 0) end
        v[pos * 2 + 1] = x
        k = k + 1
    end
    -- then the deltas: rows of a time (seconds) and a delta per column
    local pos, row = 0, -1
    local cols = self.cols
    while nums[k + 1] ~= nil do
        local x = nums[k + 1]
        if pos == 0 then
            row = check_row(self, x * 1e9, false)
        elseif row ~= -1 then
            v[row * cols * 2 + (pos - 1) * 2 + 2] = x
        end
        pos = pos == cols and 0 or pos + 1
        k = k + 1
    end
    if pos ~= 0 then error("fromstring() invalid delta", 0) end
end

-- output_cbufd: the rows with a delta, each as its time and deltas, which it clears
local function cbufd_rows(self, out, sep, eol)
    local v, cols, rows = self.v, self.cols, self.rows
    local t = start_time(self)
    local row = self.row + 1
    for _ = 1, rows do
        if row >= rows then row = 0 end
        local base = row * cols * 2
        local dirty = false
        for c = 0, cols - 1 do
            local d = v[base + c * 2 + 2]
            if d == d then
                dirty = true
                break
            end
        end
        if dirty then
            out[#out + 1] = sformat("%d", t)
            for c = 0, cols - 1 do
                local i = base + c * 2 + 2
                out[#out + 1] = sep
                out[#out + 1] = outputd(v[i])
                v[i] = NAN
            end
            out[#out + 1] = eol
        end
        t = t + self.spr
        row = row + 1
    end
end

-- the annotations in time order, pruning those before the buffer; each(t, column, a)
local function each_annotation(self, each)
    local st = start_time(self)
    local times = {}
    for t in pairs(self.annotations) do
        if t < st then self.annotations[t] = nil else times[#times + 1] = t end
    end
    tsort(times)
    for _, t in ipairs(times) do
        local at = self.annotations[t]
        for c = 1, self.cols do
            if at[c] then each(t, c, at[c]) end
        end
    end
end

-- cb_output: the JSON header, then the rows (cbuf) or the changed rows (cbufd; nothing at all
-- when nothing changed)
local function output(self)
    local out = { sformat('{"time":%d,"rows":%d,"columns":%d,"seconds_per_row":%d,"column_info":[',
        start_time(self), self.rows, self.cols, self.spr) }
    for c, h in ipairs(self.headers) do
        if c > 1 then out[#out + 1] = "," end
        out[#out + 1] = sformat('{"name":"%s","unit":"%s","aggregation":"%s"}', h.name, h.unit, h.agg)
    end
    out[#out + 1] = '],"annotations":['
    local cbufd = self.output_format == "cbufd"
    local annotations = 0
    each_annotation(self, function(t, c, a)
        if cbufd then
            if not a.delta then return end
            a.delta = nil
        end
        annotations = annotations + 1
        if annotations > 1 then out[#out + 1] = "," end
        out[#out + 1] = sformat('{"x":%d,"col":%d,"shortText":"%s","text":"%s"}', t * 1000, c, ssub(a.type, 1, 1),
            a.text)
    end)
    out[#out + 1] = "]}\n"
    if cbufd then
        local header = #out
        cbufd_rows(self, out, "\t", "\n")
        if #out == header and annotations == 0 then return "" end
        return tconcat(out)
    end
    local v, cols, rows = self.v, self.cols, self.rows
    local row = self.row + 1
    for _ = 1, rows do
        if row >= rows then row = 0 end
        local base = row * cols * 2
        for c = 0, cols - 1 do
            if c > 0 then out[#out + 1] = "\t" end
            out[#out + 1] = outputd(v[base + c * 2 + 1])
        end
        out[#out + 1] = "\n"
        row = row + 1
    end
    return tconcat(out)
end
mt.__lsb_output = standin.uncounted(host_api, output) -- add_to_payload: as the C output function, uncounted

-- cb_serialize: what preserve_data writes for a buffer under `key`
function preserve(self, key)
    local out = { sformat("if %s == nil then %s = circular_buffer.new(%d, %d, %d) end\n", key, key, self.rows,
        self.cols, self.spr) }
    for c, h in ipairs(self.headers) do
        out[#out + 1] = sformat('%s:set_header(%d, "%s", "%s", "%s")\n', key, c, h.name, h.unit, h.agg)
    end
    out[#out + 1] = sformat('%s:fromstring("%d %d', key, self.time, self.row)
    local v = self.v
    for i = 1, self.rows * self.cols do
        out[#out + 1] = " "
        out[#out + 1] = outputd(v[i * 2 - 1])
    end
    out[#out + 1] = " "
    cbufd_rows(self, out, " ", " ")
    if out[#out] == " " then out[#out] = nil end
    out[#out + 1] = '")\n'
    each_annotation(self, function(t, c, a)
        out[#out + 1] = sformat('%s:annotate(%g, %d, "%s", "%s", %s)\n', key, t * 1e9, c, a.type, a.text,
            a.delta and "true" or "false")
    end)
    -- env.lua joins the preserved globals with newlines
    local text = tconcat(out)
    if sbyte(text, #text) == 10 then text = ssub(text, 1, -2) end
    return text
end

standin.finish(host_api, M, CB) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
