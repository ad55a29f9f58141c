-- streaming_algorithms.running_stats for hindsight-py: trink/streaming_algorithms' running
-- statistics (Welford's mean and sum of squares) with its Lua API, in Lua.
--
-- running_stats.new() -> rs;  rs:add(x) -> the mean (non-finite x are ignored)
-- rs:count(), rs:avg(), rs:sd(), rs:usd() (uncorrected), rs:variance(), rs:clear()
-- rs:fromstring(bytes) / tostring(rs) -> count, mean, sum: three doubles (the C bytes)

local _, host_api = ...
local string = require "string"
local math = require "math"
local standin = require "hindsight_py.standin"
local welford = require "hindsight_py.welford"
local huge = math.huge
local sformat = string.format
local select, setmetatable = select, setmetatable

local MT_NAME = "trink.streaming_algorithms.running_stats"
local M = {}
local RS = {}
local mt = { __index = RS, __metatable = MT_NAME }
local preserve -- serialize_rs, below

local function check(self, nargs, given, fname) standin.check(self, MT_NAME, nargs, given, fname) end

local init = welford.init

function M.new(...)
    if select("#", ...) ~= 0 then standin.argerror(0, "new", "this function takes no arguments") end
    local rs = setmetatable({}, mt)
    init(rs)
    return standin.track(host_api, rs, preserve)
end

-- sa_add_running_stats: a value that is not finite is left out
function M.add(self, d)
    if d ~= d or d == huge or d == -huge then return end
    welford.add(self, d)
end

M.sd, M.usd = welford.sd, welford.usd

function RS.add(...)
    local self, d = ...
    local n = select("#", ...)
    check(self, 2, n, "add")
    M.add(self, standin.checknumber(d, 2, n, "add"))
    return self.mean
end

local function getter(fname, f)
    return function(...)
        local self = ...
        check(self, 1, select("#", ...), fname)
        return f(self)
    end
end
RS.avg = getter("avg", function(self) return self.mean end)
RS.count = getter("count", function(self) return self.n end)
RS.clear = getter("clear", init)
RS.sd = getter("sd", M.sd)
RS.usd = getter("usd", M.usd)
RS.variance = getter("variance", function(self) return self.n < 2 and 0 or self.sum / (self.n - 1) end)

local function tostring_rs(self)
    return standin.le_double(self.n) .. standin.le_double(self.mean) .. standin.le_double(self.sum)
end
RS.__tostring = getter("__tostring", tostring_rs)
mt.__tostring = standin.uncounted(host_api, function(self) return tostring_rs(self) end) -- as the C one, uncounted

function RS.fromstring(...)
    local self, s = ...
    local n = select("#", ...)
    check(self, 2, n, "fromstring")
    s = standin.checkstring(s, 2, n, "fromstring")
    local count = #s == 24 and standin.read_double(s, 1)
    if not count or count < 0 then
        init(self)
        error("invalid serialization", 0)
    end
    self.n, self.mean, self.sum = count, standin.read_double(s, 9), standin.read_double(s, 17)
end

function preserve(self, key)
    return standin.restore_text(key, "streaming_algorithms.running_stats.new()", tostring_rs(self))
end

local api = { new = M.new }
standin.finish(host_api, api, RS) -- in the sandbox: uncounted, as upstream's C (env.lua)
streaming_algorithms = streaming_algorithms or setmetatable({}, {}) -- a metatable: not preserved
streaming_algorithms.running_stats = api

return api
