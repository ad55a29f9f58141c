-- streaming_algorithms.p2 for hindsight-py: trink/streaming_algorithms' P² (piecewise-parabolic)
-- quantile and histogram estimators (Jain and Chlamtac) with their Lua API, in Lua: the same
-- estimates, the same serialized bytes.
--
-- p2.quantile(p)        -> q (0 < p < 1; kept as a C float); q:add(x) -> the current estimate
-- p2.histogram(buckets) -> h (4 <= buckets < 65535); h:add(x)
-- q:count(marker), q:estimate(marker) (markers 0-4; a histogram's 0-buckets), :clear()
-- :fromstring(bytes) / tostring(obj) -> the C struct's bytes

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local floor = math.floor
local sformat = string.format
local tconcat, tsort = table.concat, table.sort
local select, setmetatable = select, setmetatable

local MARKERS = 5
local Q_MT, H_MT = "trink.streaming_algorithms.p2_quantile", "trink.streaming_algorithms.p2_histogram"
local M = {}
local Q, H = {}, {}
local q_mt = { __index = Q, __metatable = Q_MT }
local h_mt = { __index = H, __metatable = H_MT }
local argerror, checknumber, checkstring = standin.argerror, standin.checknumber, standin.checkstring
local le_uint, le_double, read_double = standin.le_uint, standin.le_double, standin.read_double
local preserve_quantile, preserve_histogram -- below

-- q and n are 0-based arrays of marker heights and positions
local function parabolic(i, d, q, n)
    return q[i] + d / (n[i + 1] - n[i - 1]) * ((n[i] - n[i - 1] + d) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
        + (n[i + 1] - n[i] - d) * (q[i] - q[i - 1]) / (n[i] - n[i - 1]))
end

local function linear(i, d, q, n)
    return q[i] + d * (q[i + d] - q[i]) / (n[i + d] - n[i])
end

-- move marker i toward its desired position n1 (both estimators)
local function adjust(i, n1, q, n)
    local d = n1 - n[i]
    if (d >= 1 and n[i + 1] - n[i] > 1) or (d <= -1 and n[i - 1] - n[i] < -1) then
        d = d > 0 and 1 or -1
        local q1 = parabolic(i, d, q, n)
        if q[i - 1] < q1 and q1 < q[i + 1] then q[i] = q1 else q[i] = linear(i, d, q, n) end
        n[i] = n[i] + d
    end
end

-- qsort of the first `count` samples (0-based), in place
local function sort0(q, count)
    local t = {}
    for i = 0, count - 1 do t[i + 1] = q[i] end
    tsort(t)
    for i = 0, count - 1 do q[i] = t[i + 1] end
end

-- the cell of x among markers 0..last (k: the first position to increment), widening the ends
local function cell(x, q, last)
    if x < q[0] then
        q[0] = x
        return 1
    end
    for i = 0, last - 2 do
        if q[i] <= x and x < q[i + 1] then return i + 1 end
    end
    if q[last - 1] <= x and x <= q[last] then return last end
    if q[last] < x then
        q[last] = x
        return last
    end
    return 0 -- x is NaN: every position moves
end

local function init_quantile(self)
    local p = self.p
    self.cnt = MARKERS
    self.q = { [0] = 0, 0, 0, 0, 0 }
    self.n = { [0] = 1, 2, 3, 4, 5 }
    self.n1 = { [0] = 1, 1 + 2 * p, 1 + 4 * p, 3 + 2 * p, 5 }
end

function M.quantile(...)
    local n = select("#", ...)
    if n ~= 1 then argerror(0, "quantile", "incorrect number of arguments") end
    local p = checknumber((...), 1, n, "quantile")
    if not (0 < p and p < 1) then argerror(1, "quantile", "0 < quantile < 1") end
    local self = setmetatable({ p = standin.float32(p) }, q_mt)
    init_quantile(self)
    return standin.track(host_api, self, preserve_quantile)
end

local function check_q(self, nargs, given, fname) standin.check(self, Q_MT, nargs, given, fname) end
local function check_h(self, nargs, given, fname) standin.check(self, H_MT, nargs, given, fname) end

function Q.add(...)
    local self, x = ...
    local given = select("#", ...)
    check_q(self, 2, given, "add")
    x = checknumber(x, 2, given, "add")
    local q, n, n1, p = self.q, self.n, self.n1, self.p
    if self.cnt > 0 then
        self.cnt = self.cnt - 1
        q[self.cnt] = x
        if self.cnt == 0 then
            sort0(q, MARKERS)
            return n[2]
        end
        return 0 / 0
    end
    for i = cell(x, q, MARKERS - 1), MARKERS - 1 do n[i] = n[i] + 1 end
    n1[1] = n1[1] + p / 2
    n1[2] = n1[2] + p
    n1[3] = n1[3] + (1 + p) / 2
    n1[4] = n1[4] + 1
    for i = 1, MARKERS - 2 do adjust(i, n1[i], q, n) end
    return q[2]
end

local function init_histogram(self)
    local b = self.b
    self.cnt = b + 1
    self.q, self.n = {}, {}
    for i = 0, b do
        self.q[i] = 0
        self.n[i] = i + 1
    end
end

function M.histogram(...)
    local n = select("#", ...)
    if n ~= 1 then argerror(0, "histogram", "incorrect number of arguments") end
    local b = checknumber((...), 1, n, "histogram")
    if not (4 <= b and b < 65535) then argerror(1, "histogram", "4 <= buckets < 65535") end
    local self = setmetatable({ b = floor(b) }, h_mt)
    init_histogram(self)
    return standin.track(host_api, self, preserve_histogram)
end

function H.add(...)
    local self, x = ...
    local given = select("#", ...)
    check_h(self, 2, given, "add")
    x = checknumber(x, 2, given, "add")
    local q, n, b = self.q, self.n, self.b
    if self.cnt > 0 then
        self.cnt = self.cnt - 1
        q[self.cnt] = x
        if self.cnt == 0 then sort0(q, b + 1) end
        return
    end
    for i = cell(x, q, b), b do n[i] = n[i] + 1 end
    for i = 1, b - 1 do adjust(i, 1 + i * (n[b] - 1) / b, q, n) end
end

-- the methods both share: count, estimate, clear, tostring, fromstring
local function shared(methods, check, last, init, tostring_obj, fromstring_obj)
    local function marker(fname, ...)
        local self, m = ...
        local given = select("#", ...)
        check(self, 2, given, fname)
        m = checknumber(m, 2, given, fname)
        if not (m >= 0 and m <= last(self)) then argerror(2, fname, "marker out of range") end
        return self, floor(m)
    end
    function methods.count(...)
        local self, m = marker("count", ...)
        if self.cnt ~= 0 then return 0 end
        return floor(self.n[m])
    end
    function methods.estimate(...)
        local self, m = marker("estimate", ...)
        if self.cnt ~= 0 then return 0 / 0 end
        return self.q[m]
    end
    function methods.clear(...)
        local self = ...
        check(self, 1, select("#", ...), "clear")
        init(self)
    end
    function methods.__tostring(...)
        local self = ...
        check(self, 1, select("#", ...), "__tostring")
        return tostring_obj(self)
    end
    function methods.fromstring(...)
        local self, s = ...
        local given = select("#", ...)
        check(self, 2, given, "fromstring")
        s = checkstring(s, 2, given, "fromstring")
        if not fromstring_obj(self, s) then
            init(self)
            error("invalid serialization", 0)
        end
    end
end

local function doubles(out, t, first, last)
    for i = first, last do out[#out + 1] = le_double(t[i]) end
end

local function read_doubles(s, p, t, first, last)
    for i = first, last do
        t[i] = read_double(s, p)
        p = p + 8
    end
    return p
end

-- sa_serialize_p2_quantile: cnt (2 bytes), p (a float), then q, n and n1 (5 doubles each)
local Q_SIZE = 2 + 4 + 8 * MARKERS * 3

local function tostring_quantile(self)
    local out = { le_uint(self.cnt, 2), standin.le_float(self.p) }
    doubles(out, self.q, 0, MARKERS - 1)
    doubles(out, self.n, 0, MARKERS - 1)
    doubles(out, self.n1, 0, MARKERS - 1)
    return tconcat(out)
end

local function fromstring_quantile(self, s)
    if #s ~= Q_SIZE then return false end
    local cnt = standin.read_le_uint(s, 1, 2)
    if cnt > MARKERS or standin.read_float(s, 3) ~= self.p then return false end
    self.cnt = cnt
    local p = read_doubles(s, 7, self.q, 0, MARKERS - 1)
    p = read_doubles(s, p, self.n, 0, MARKERS - 1)
    read_doubles(s, p, self.n1, 0, MARKERS - 1)
    return true
end

-- struct sa_p2_histogram's serialization: cnt (2 bytes), then the b + 1 heights and positions
local function tostring_histogram(self)
    local out = { le_uint(self.cnt, 2) }
    doubles(out, self.q, 0, self.b)
    doubles(out, self.n, 0, self.b)
    return tconcat(out)
end

local function fromstring_histogram(self, s)
    if #s ~= 2 + 16 * (self.b + 1) then return false end
    local cnt = standin.read_le_uint(s, 1, 2)
    if cnt > self.b + 1 then return false end
    self.cnt = cnt
    read_doubles(s, read_doubles(s, 3, self.q, 0, self.b), self.n, 0, self.b)
    return true
end

shared(Q, check_q, function() return MARKERS - 1 end, init_quantile, tostring_quantile, fromstring_quantile)
shared(H, check_h, function(self) return self.b end, init_histogram, tostring_histogram, fromstring_histogram)
q_mt.__tostring = standin.uncounted(host_api, function(self) return tostring_quantile(self) end) -- as the C ones, uncounted
h_mt.__tostring = standin.uncounted(host_api, function(self) return tostring_histogram(self) end)

function preserve_quantile(self, key)
    return standin.restore_text(key, sformat("streaming_algorithms.p2.quantile(%s)", sformat("%g", self.p)),
        tostring_quantile(self))
end

function preserve_histogram(self, key)
    return standin.restore_text(key, sformat("streaming_algorithms.p2.histogram(%d)", self.b), tostring_histogram(self))
end

standin.finish(host_api, M, Q, H) -- in the sandbox: uncounted, as upstream's C (env.lua)
streaming_algorithms = streaming_algorithms or setmetatable({}, {}) -- a metatable: not preserved
streaming_algorithms.p2 = M

return M
