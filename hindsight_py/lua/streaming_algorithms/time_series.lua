-- streaming_algorithms.time_series for hindsight-py: trink/streaming_algorithms' integer time
-- series (a ring of `rows` int32 values of ns_per_row nanoseconds each) with its Lua API, in Lua,
-- its matrix profile (SCRIMP, diagonals in glibc rand()'s shuffle) included.
--
-- time_series.new(rows, ns_per_row) -> ts
-- ts:add(ns, v) / ts:set(ns, v) -> the row's new value (a later ns advances the series; nil before it)
-- ts:get(ns), ts:get_range(ns|nil, n) -> array, ts:merge(other[, "add"|"set"])
-- ts:stats(ns|nil, n[, "sum"|"min"|"max"|"avg"|"sd"|"usd"[, include_zero]]) -> value, rows
-- ts:matrix_profile(ns|nil, n, m, percent[, "anomaly"|"anomaly_current"|"mp"|"mpi"])
-- ts:current_time(), ts:get_configuration() -> rows, ns_per_row
-- ts:fromstring(bytes) / tostring(ts) -> the C struct's bytes
-- Times are doubles, as the plugins pass them: exact integers, ns values above 2^53 included.

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local welford = require "hindsight_py.welford"
local p2 = require "streaming_algorithms.p2"
local glibc_rand = require("hindsight_py.xxh64").glibc_rand
local fmod, floor, sqrt, abs, huge = math.fmod, math.floor, math.sqrt, math.abs, math.huge
local sformat = string.format
local tconcat = table.concat
local select, setmetatable, type = select, setmetatable, type

local MT_NAME = "trink.streaming_algorithms.time_series_int"
local UINT64_MAX = 18446744073709551615
local INT_MAX, INT_MIN = 2147483647, -2147483648
local M = {}
local TS = {}
local mt = { __index = TS, __metatable = MT_NAME }
local argerror, checknumber, checkint = standin.argerror, standin.checknumber, standin.checkint
local preserve -- serialize_ts_int, below
local rand = glibc_rand() -- the process's rand(), as upstream's shuffle draws from it

local function check(self, nargs, given, fname) standin.check(self, MT_NAME, nargs, given, fname) end

local function check_object(self, narg, given, fname)
    if getmetatable(self) ~= MT_NAME then
        argerror(narg, fname, sformat("%s expected, got %s", MT_NAME, narg > given and "no value" or type(self)))
    end
end

local function check_ns(v, narg, given, fname)
    local d = checknumber(v, narg, given, fname)
    if not (d >= 0 and d <= UINT64_MAX) then argerror(narg, fname, "must be 0 - UINT64_MAX") end
    return d - fmod(d, 1)
end

-- integer division of exact integers
local function div(a, b) return (a - fmod(a, b)) / b end

local function init(self)
    self.time = self.npr * (self.rows - 1)
    local v = {}
    for i = 0, self.rows - 1 do v[i] = 0 end
    self.v = v
end

-- the 0-based row of ns, advancing the series to it when `advance`; -1 outside it
local function find_index(self, ns, advance)
    local npr, rows, v = self.npr, self.rows, self.v
    local current_row = div(self.time, npr)
    local requested_row = div(ns, npr)
    local row_delta = requested_row - current_row
    if row_delta > 0 and advance then
        if row_delta >= rows then
            for i = 0, rows - 1 do v[i] = 0 end
        else
            local oidx = fmod(current_row, rows) + 1
            for k = 0, row_delta - 1 do v[(oidx + k) % rows] = 0 end
        end
        self.time = ns - fmod(ns, npr)
    elseif requested_row > current_row or abs(row_delta) >= rows then
        return -1
    end
    return fmod(requested_row, rows)
end

local function get_idx(self, ns)
    local current_row, requested_row = div(self.time, self.npr), div(ns, self.npr)
    if requested_row > current_row or abs(requested_row - current_row) >= self.rows then return -1 end
    return fmod(requested_row, self.rows)
end

local function add_value(self, ns, value)
    local idx = find_index(self, ns, true)
    if idx == -1 then return INT_MIN end
    local nv = self.v[idx] + value
    if nv > INT_MAX then nv = INT_MAX elseif nv < INT_MIN then nv = INT_MIN end
    self.v[idx] = nv
    return nv
end

local function set_value(self, ns, value)
    local idx = find_index(self, ns, true)
    if idx == -1 then return INT_MIN end
    self.v[idx] = value
    return value
end

function M.new(...)
    local n = select("#", ...)
    if n ~= 2 then argerror(0, "new", "incorrect number of arguments") end
    local rows, ns = ...
    rows = checkint(rows, 1, n, "new")
    if not (rows > 1) then argerror(1, "new", "must be > 1") end
    ns = checknumber(ns, 2, n, "new")
    if not (ns > 0 and ns <= UINT64_MAX) then argerror(2, "new", "must be 1 - UINT64_MAX") end
    local ts = setmetatable({ rows = rows, npr = ns - fmod(ns, 1) }, mt)
    init(ts)
    return standin.track(host_api, ts, preserve)
end

local function updater(fname, fn)
    return function(...)
        local self, ns, value = ...
        local n = select("#", ...)
        check(self, 3, n, fname)
        ns = check_ns(ns, 2, n, fname)
        local rv = fn(self, ns, checkint(value, 3, n, fname))
        if rv == INT_MIN then return nil end
        return rv
    end
end
TS.add = updater("add", add_value)
TS.set = updater("set", set_value)

function TS.get(...)
    local self, ns = ...
    local n = select("#", ...)
    check(self, 2, n, "get")
    local idx = find_index(self, check_ns(ns, 2, n, "get"), false)
    if idx == -1 or self.v[idx] == INT_MIN then return nil end
    return self.v[idx]
end

function TS.current_time(...)
    local self = ...
    check(self, 1, select("#", ...), "current_time")
    return self.time
end

function TS.get_configuration(...)
    local self = ...
    check(self, 1, select("#", ...), "get_configuration")
    return self.rows, self.npr
end

-- the start of a range: nil for the oldest row, else ns down to its row
local function range_start(self, ns, given, fname)
    if ns == nil then return self.time - self.npr * (self.rows - 1) end
    ns = check_ns(ns, 2, given, fname)
    return ns - fmod(ns, self.npr)
end

local function sequence_length(self, n, given, fname)
    n = checkint(n, 3, given, fname)
    if not (n <= self.rows) then argerror(3, fname, "invalid sequence length") end
    return n
end

function TS.get_range(...)
    local self, ns, n = ...
    local given = select("#", ...)
    check(self, 3, given, "get_range")
    ns = range_start(self, ns, given, "get_range")
    n = sequence_length(self, n, given, "get_range")
    local idx = get_idx(self, ns)
    if idx == -1 then return end
    local out, v, rows = {}, self.v, self.rows
    for i = 1, n do
        if idx == rows then idx = 0 end
        out[i] = v[idx]
        idx = idx + 1
    end
    return out
end

local MERGE_OPS = { add = add_value, set = set_value }

function TS.merge(...)
    local self, other, op = ...
    local given = select("#", ...)
    if given < 2 or given > 3 then argerror(0, "merge", "incorrect number of arguments") end
    check_object(self, 1, given, "merge")
    check_object(other, 2, given, "merge")
    local fn = standin.checkoption(op, 3, given, "merge", MERGE_OPS, "add")
    if not (self.npr <= other.npr) then
        argerror(3, "merge", "the resolution of the time series being merged must be greater than or equal to "
            .. "the destination")
    end
    local rows, npr = other.rows, other.npr
    local start = other.time - npr * (rows - 1)
    local idx = fmod(div(other.time, npr), rows) + 1
    for i = 0, rows - 1 do
        if idx == rows then idx = 0 end
        fn(self, start + i * npr, other.v[idx])
        idx = idx + 1
    end
end

-- Welford's running statistics (sa_running_stats)
local function new_stats() return welford.init({}) end
local add_stat, sd, usd = welford.add, welford.sd, welford.usd

local STATS = { sum = "sum", min = "min", max = "max", avg = "avg", sd = "sd", usd = "usd" }

function TS.stats(...)
    local self, ns, n, stat, include_zero = ...
    local given = select("#", ...)
    if given < 3 or given > 5 then argerror(0, "stats", "incorrect number of arguments") end
    check_object(self, 1, given, "stats")
    ns = range_start(self, ns, given, "stats")
    n = sequence_length(self, n, given, "stats")
    stat = standin.checkoption(stat, 4, given, "stats", STATS, "sum")
    include_zero = include_zero ~= nil and include_zero ~= false
    local idx = get_idx(self, ns)
    if idx == -1 then return end
    local v, rows = self.v, self.rows
    local count, sum, min, max = 0, 0, INT_MAX, INT_MIN
    local rs = new_stats()
    for _ = 1, n do
        if idx == rows then idx = 0 end
        local x = v[idx]
        if x ~= 0 or include_zero then
            count = count + 1
            sum = sum + x
            if x < min then min = x end
            if x > max then max = x end
            add_stat(rs, x)
        end
        idx = idx + 1
    end
    local result
    if stat == "sum" then result = sum
    elseif stat == "min" then result = min
    elseif stat == "max" then result = max
    elseif stat == "avg" then result = count ~= 0 and sum / count or 0
    elseif stat == "sd" then result = sd(rs)
    else result = usd(rs) end
    return result, count
end

-- the matrix profile of the n values from row sidx, subsequences of m: distances and indexes (0-based)
local function matrix_profile(self, sidx, n, m, percent)
    local v, rows = self.v, self.rows
    local mp_len = n - m + 1
    local exclude = div(m, 4)
    local order = {}
    for i = 0, mp_len - exclude - 2 do order[i] = exclude + 1 + i end
    local rand_len = mp_len - exclude - 1
    for i = 0, rand_len - 2 do -- shuffle_idx
        local j = i + div(rand(), div(2147483647, rand_len - i) + 1)
        order[i], order[j] = order[j], order[i]
    end
    -- compute_stats: each window's mean and uncorrected standard deviation
    local stats = {}
    local rs = new_stats()
    local window = 0
    local idx = sidx
    for i = 0, n - 1 do
        if idx == rows then idx = 0 end
        if i >= m then
            stats[window * 2], stats[window * 2 + 1] = rs.mean, usd(rs)
            window = window + 1
            local fi = idx - m
            if fi < 0 then fi = fi + rows end
            local pm = rs.mean
            rs.mean = rs.mean + (v[idx] - v[fi]) / rs.n
            rs.sum = rs.sum + (v[idx] - pm) * (v[idx] - rs.mean) - (v[fi] - pm) * (v[fi] - rs.mean)
        else
            add_stat(rs, v[idx])
        end
        idx = idx + 1
    end
    stats[window * 2], stats[window * 2 + 1] = rs.mean, usd(rs)

    local function at(j)
        local k = j + sidx
        return v[k >= rows and k - rows or k]
    end
    local mp, mpi, dp = {}, {}, {}
    for i = 0, mp_len - 1 do
        mp[i] = huge
        mpi[i] = 0
    end
    local stop = floor(percent / 100 * mp_len + 1)
    local function consider(j, i, lastz)
        local d = 2 * (m - (lastz - m * stats[j * 2] * stats[i * 2]) / (stats[j * 2 + 1] * stats[i * 2 + 1]))
        if d < mp[j] then mp[j], mpi[j] = d, i end
        if d < mp[i] then mp[i], mpi[i] = d, j end
    end
    for ri = 0, rand_len - 1 do
        local diag = order[ri]
        for j = diag, n - 1 do dp[j] = at(j) * at(j - diag) end
        local lastz = 0
        for j = 0, m - 1 do lastz = lastz + dp[j + diag] end
        consider(diag, 0, lastz)
        for j = diag + 1, mp_len - 1 do
            lastz = lastz + dp[j + m - 1] - dp[j - 1]
            consider(j, j - diag, lastz)
        end
        if ri == stop then break end
    end
    for i = 0, mp_len - 1 do mp[i] = sqrt(abs(mp[i])) end
    return mp, mpi, mp_len
end

local RESULTS = { anomaly = "anomaly", anomaly_current = "anomaly_current", mp = "mp", mpi = "mpi" }

function TS.matrix_profile(...)
    local self, ns, n, m, percent, result = ...
    local given = select("#", ...)
    check_object(self, 1, given, "matrix_profile")
    ns = range_start(self, ns, given, "matrix_profile")
    n = checkint(n, 3, given, "matrix_profile")
    m = checkint(m, 4, given, "matrix_profile")
    if not (n <= self.rows and div(n, 4) >= m) then argerror(3, "matrix_profile", "invalid sequence length") end
    if not (m > 3) then argerror(4, "matrix_profile", "invalid sub-sequence length") end
    percent = checknumber(percent, 5, given, "matrix_profile")
    if not (percent > 0 and percent <= 100) then argerror(5, "matrix_profile", "invalid percent") end
    result = standin.checkoption(result, 6, given, "matrix_profile", RESULTS, "anomaly")
    local sidx = find_index(self, ns, false)
    if sidx == -1 then return end
    local mp, mpi, mp_len = matrix_profile(self, sidx, n, m, percent)
    if result == "mp" or result == "mpi" then
        local t, out = result == "mp" and mp or mpi, {}
        for i = 0, mp_len - 1 do out[i + 1] = t[i] end
        return out
    end
    local q95, q50 = p2.quantile(0.95), p2.quantile(0.50)
    local idx, discord, e95, e50 = 0, -huge, 0, 0
    for i = result == "anomaly" and 0 or mp_len - m, mp_len - 1 do
        e95, e50 = q95:add(mp[i]), q50:add(mp[i])
        if mp[i] > discord then discord, idx = mp[i], i end
    end
    if discord == huge or discord == -huge then return end
    -- the percentage of the range the top 5% of discords represent
    return ns + idx * self.npr, (discord - e95) / (discord - e50) * 100, discord - e50
end

local function tostring_ts(self)
    local out = { standin.le_uint(self.time, 8), standin.le_uint(self.npr, 8), standin.le_int32(self.rows) }
    for i = 0, self.rows - 1 do out[#out + 1] = standin.le_int32(self.v[i]) end
    return tconcat(out)
end

function TS.__tostring(...)
    local self = ...
    check(self, 1, select("#", ...), "__tostring")
    return tostring_ts(self)
end
mt.__tostring = standin.uncounted(host_api, function(self) return tostring_ts(self) end) -- as the C one, uncounted

function TS.fromstring(...)
    local self, s = ...
    local given = select("#", ...)
    check(self, 2, given, "fromstring")
    s = standin.checkstring(s, 2, given, "fromstring")
    if #s ~= 20 + 4 * self.rows or standin.read_le_uint(s, 9, 8) ~= self.npr
        or standin.read_le_int32(s, 17) ~= self.rows then
        init(self)
        error("invalid serialization", 0)
    end
    self.time = standin.read_le_uint(s, 1, 8)
    for i = 0, self.rows - 1 do self.v[i] = standin.read_le_int32(s, 21 + 4 * i) end
end

function preserve(self, key)
    return standin.restore_text(key, sformat("streaming_algorithms.time_series.new(%d, %.0f)", self.rows, self.npr),
        tostring_ts(self))
end

standin.finish(host_api, M, TS) -- in the sandbox: uncounted, as upstream's C (env.lua)
streaming_algorithms = streaming_algorithms or setmetatable({}, {}) -- a metatable: not preserved
streaming_algorithms.time_series = M

return M
