-- streaming_algorithms.matrix for hindsight-py: trink/streaming_algorithms' int32 and float
-- matrices with their Lua API, in Lua (float values kept at a C float's precision).
--
-- matrix.new(rows, cols[, "int"|"float"]) -> m (ints start at 0, floats at NaN)
-- m:add(row, col, v) / m:set(row, col, v) -> the new value;  m:get(row, col), m:get_row(row)
-- m:clear_row(row), m:sum(row), m:merge(other[, "add"|"set"]), m:get_configuration()
-- m:pcc(row[, "max"|"min"]) -> the Pearson correlation of the row best (or least) matching
--                              another, and that row; nothing when none has a finite one
-- m:fromstring(bytes) / tostring(m) -> the C bytes (rows, cols, then the values; 4 bytes each)
-- Rows and columns count from 1.

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local sqrt, huge = math.sqrt, math.huge
local sformat = string.format
local tconcat = table.concat
local select, setmetatable, getmetatable, type = select, setmetatable, getmetatable, type

local INT_MT, FLT_MT = "trink.streaming_algorithms.matrix_int", "trink.streaming_algorithms.matrix_flt"
local INT_MAX, INT_MIN = 2147483647, -2147483648
local NAN = 0 / 0
local M = {}
local INT, FLT = {}, {}
local int_mt = { __index = INT, __metatable = INT_MT }
local flt_mt = { __index = FLT, __metatable = FLT_MT }
local argerror, checkint, checknumber = standin.argerror, standin.checkint, standin.checknumber
local float32 = standin.float32
local preserve -- below

local TYPES = { int = "int", float = "float" }

local function init(self)
    local v, zero = {}, self.float and NAN or 0
    for i = 0, self.rows * self.cols - 1 do v[i] = zero end
    self.v = v
end

function M.new(...)
    local n = select("#", ...)
    if n < 2 or n > 3 then argerror(0, "new", "incorrect number of arguments") end
    local rows, cols, kind = ...
    rows = checkint(rows, 1, n, "new")
    if not (rows > 0) then argerror(1, "new", "must be > 0") end
    cols = checkint(cols, 2, n, "new")
    if not (cols > 0) then argerror(2, "new", "must be > 0") end
    local float = standin.checkoption(kind, 3, n, "new", TYPES, "int") == "float"
    local m = setmetatable({ rows = rows, cols = cols, float = float }, float and flt_mt or int_mt)
    init(m)
    return standin.track(host_api, m, preserve)
end

-- each method, on both kinds: check self (and the number of arguments, when `nargs`)
local function method(fname, nargs, f)
    local function checked(mt_name)
        return function(...)
            local self = ...
            local given = select("#", ...)
            if nargs then
                standin.check(self, mt_name, nargs, given, fname)
            elseif getmetatable(self) ~= mt_name then
                argerror(1, fname, sformat("%s expected, got %s", mt_name, given < 1 and "no value" or type(self)))
            end
            return f(given, ...)
        end
    end
    INT[fname], FLT[fname] = checked(INT_MT), checked(FLT_MT)
end

local function check_row(self, row, given, fname)
    row = checkint(row, 2, given, fname)
    if not (row > 0 and row <= self.rows) then argerror(2, fname, "invalid row") end
    return row - 1
end

local function index(self, row, col, given, fname)
    row = check_row(self, row, given, fname)
    col = checkint(col, 3, given, fname)
    if not (col > 0 and col <= self.cols) then argerror(3, fname, "invalid col") end
    return row * self.cols + col - 1
end

-- an int's result: INT_MIN is upstream's out-of-bounds sentinel, returned as nil
local function result(self, x)
    if not self.float and x == INT_MIN then return nil end
    return x
end

local function value(self, v, given, fname)
    if self.float then return float32(checknumber(v, 4, given, fname)) end
    return checkint(v, 4, given, fname)
end

local function add_value(self, i, x)
    local v = self.v
    if self.float then
        v[i] = v[i] ~= v[i] and x or float32(v[i] + x)
    else
        local nv = v[i] + x
        v[i] = nv > INT_MAX and INT_MAX or nv < INT_MIN and INT_MIN or nv
    end
    return v[i]
end

method("add", 4, function(given, self, row, col, v)
    local i = index(self, row, col, given, "add")
    return result(self, add_value(self, i, value(self, v, given, "add")))
end)

method("set", 4, function(given, self, row, col, v)
    local i = index(self, row, col, given, "set")
    self.v[i] = value(self, v, given, "set")
    return result(self, self.v[i])
end)

method("get", 3, function(given, self, row, col)
    return result(self, self.v[index(self, row, col, given, "get")])
end)

method("get_row", 2, function(given, self, row)
    local base = check_row(self, row, given, "get_row") * self.cols
    local out = {}
    for c = 1, self.cols do out[c] = self.v[base + c - 1] end
    return out
end)

method("clear_row", 2, function(given, self, row)
    local base = check_row(self, row, given, "clear_row") * self.cols
    local zero = self.float and NAN or 0
    for c = 0, self.cols - 1 do self.v[base + c] = zero end
end)

method("get_configuration", 1, function(_, self) return self.rows, self.cols end)

method("sum", nil, function(given, self, row)
    if given < 2 or given > 3 then argerror(0, "sum", "incorrect number of arguments") end
    local base = check_row(self, row, given, "sum") * self.cols
    local sum = 0
    for c = 0, self.cols - 1 do
        local x = self.v[base + c]
        if x == x then sum = sum + x end
    end
    return sum
end)

local MERGE_OPS = { add = "add", set = "set" }

method("merge", nil, function(given, self, other, op)
    if given < 2 or given > 3 then argerror(0, "merge", "incorrect number of arguments") end
    local mt_name = self.float and FLT_MT or INT_MT
    if getmetatable(other) ~= mt_name then
        argerror(2, "merge", sformat("%s expected, got %s", mt_name, given < 2 and "no value" or type(other)))
    end
    op = standin.checkoption(op, 3, given, "merge", MERGE_OPS, "add")
    local rows = self.rows < other.rows and self.rows or other.rows
    local cols = self.cols < other.cols and self.cols or other.cols
    for r = 0, rows - 1 do
        for c = 0, cols - 1 do
            local x, i = other.v[r * other.cols + c], r * self.cols + c
            if op == "set" then
                self.v[i] = x
            elseif x == x then -- a float matrix adds only values; an int one every value
                add_value(self, i, x)
            end
        end
    end
end)

-- a row's running statistics (a float matrix counts NaN as 0): count, mean, uncorrected sd
local function row_stats(self, row)
    local count, mean, sum = 0, 0, 0
    local base = row * self.cols
    for c = 0, self.cols - 1 do
        local d = self.v[base + c]
        if d ~= d then d = 0 end
        if d ~= huge and d ~= -huge then
            local old = mean
            count = count + 1
            if count == 1 then
                mean = d
            else
                mean = old + (d - old) / count
                sum = sum + (d - old) * (d - mean)
            end
        end
    end
    return mean, count < 2 and 0 or sqrt(sum / count)
end

local PCC_MATCH = { max = "max", min = "min" }

method("pcc", nil, function(given, self, row, match)
    row = check_row(self, row, given, "pcc")
    match = standin.checkoption(match, 3, given, "pcc", PCC_MATCH, "max")
    local v, cols = self.v, self.cols
    local mean, sd = row_stats(self, row)
    local best, idx = match == "min" and huge or -huge, -1
    for r = 0, self.rows - 1 do
        if r ~= row then
            local mean1, sd1 = row_stats(self, r)
            local d = -huge
            if sd ~= 0 and sd1 ~= 0 then
                d = 0
                for c = 0, cols - 1 do
                    local p = v[row * cols + c] * v[r * cols + c]
                    if p == p then d = d + p end
                end
                d = (d - cols * mean * mean1) / (cols * sd * sd1)
            end
            if (match == "min" and d < best) or (match == "max" and d > best) then best, idx = d, r end
        end
    end
    if best ~= best or best == huge or best == -huge then return end
    return best, idx + 1
end)

local function tostring_matrix(self)
    local out = { standin.le_int32(self.rows), standin.le_int32(self.cols) }
    local pack = self.float and standin.le_float or standin.le_int32
    for i = 0, self.rows * self.cols - 1 do out[#out + 1] = pack(self.v[i]) end
    return tconcat(out)
end

method("__tostring", 1, function(_, self) return tostring_matrix(self) end)
tostring_matrix = standin.uncounted(host_api, tostring_matrix) -- the metamethods below: as the C ones, uncounted
int_mt.__tostring = tostring_matrix
flt_mt.__tostring = tostring_matrix

method("fromstring", 2, function(given, self, s)
    s = standin.checkstring(s, 2, given, "fromstring")
    local cells = self.rows * self.cols
    if #s ~= 8 + 4 * cells or standin.read_le_int32(s, 1) ~= self.rows or standin.read_le_int32(s, 5) ~= self.cols then
        init(self)
        error("invalid serialization", 0)
    end
    local read = self.float and standin.read_float or standin.read_le_int32
    for i = 0, cells - 1 do self.v[i] = read(s, 9 + 4 * i) end
end)

function preserve(self, key)
    return standin.restore_text(key, sformat("streaming_algorithms.matrix.new(%d, %d%s)", self.rows, self.cols,
        self.float and ', "float"' or ""), tostring_matrix(self))
end

standin.finish(host_api, M, INT, FLT) -- in the sandbox: uncounted, as upstream's C (env.lua)
streaming_algorithms = streaming_algorithms or setmetatable({}, {}) -- a metatable: not preserved
streaming_algorithms.matrix = M

return M
