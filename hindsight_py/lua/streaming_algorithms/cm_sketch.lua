-- streaming_algorithms.cm_sketch for hindsight-py: the API of trink/streaming_algorithms' count-min
-- sketch (as lua_sandbox_extensions packages it), in Lua, with its sizing, XXH32 double hashing and
-- conservative update, so that the same counts come out and the serialized form is the C bytes.
--
-- cm_sketch.new(epsilon, delta)  -> a sketch of ceil(e / epsilon) x ceil(ln(1 / delta)) counters
-- cms:update(key[, n])           -> the key's estimated count after adding n (default 1; n < 0 removes)
-- cms:point_query(key)           -> its estimated count
-- cms:item_count(), cms:unique_count(), cms:clear()
-- cms:fromstring(bytes) / tostring(cms) -> item count and unique count (8 bytes each), then the
--                                   counters (4 bytes each), little-endian
-- Keys are strings or numbers (a number hashes as the 8 bytes of its double).

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local xxh32 = require("hindsight_py.xxh64").xxh32
local ceil, log = math.ceil, math.log
local sformat = string.format
local tconcat = table.concat
local type, select, setmetatable, getmetatable = type, select, setmetatable, getmetatable
local le_uint, read_le_uint = standin.le_uint, standin.read_le_uint

local MT_NAME = "trink.streaming_algorithms.cm_sketch"
local E = 2.718281828459045
local TWO32 = 4294967296
local UINT32_MAX = TWO32 - 1

local M = {}
local CMS = {}
local mt = { __index = CMS, __metatable = MT_NAME }
local argerror = standin.argerror
local preserve -- serialize_cms, below

-- check_cms: self, then exactly `nargs` arguments (self included)
local function check(self, nargs, given, fname)
    if getmetatable(self) ~= MT_NAME then
        argerror(1, fname, sformat("%s expected, got %s", MT_NAME, given < 1 and "no value" or type(self)))
    end
    if given ~= nargs then argerror(0, fname, "incorrect number of arguments") end
end

function M.new(...)
    local n = select("#", ...)
    if n ~= 2 then argerror(0, "new", "incorrect number of arguments") end
    local epsilon, delta = ...
    epsilon = standin.checknumber(epsilon, 1, n, "new")
    if not (0 < epsilon and epsilon < 1) then argerror(1, "new", "0 < epsilon < 1") end
    delta = standin.checknumber(delta, 2, n, "new")
    if not (0 < delta and delta < 1) then argerror(2, "new", "0 < delta < 1") end
    local cms = setmetatable({ width = ceil(E / epsilon), depth = ceil(log(1 / delta)) }, mt)
    CMS.clear(cms)
    return standin.track(host_api, cms, preserve)
end

function CMS.clear(...)
    local self = ...
    check(self, 1, select("#", ...), "clear")
    self.items, self.uniques = 0, 0
    self.counts = {} -- index (0-based) -> count; absent: 0
end

function CMS.item_count(...)
    local self = ...
    check(self, 1, select("#", ...), "item_count")
    return self.items
end

function CMS.unique_count(...)
    local self = ...
    check(self, 1, select("#", ...), "unique_count")
    return self.uniques
end

-- sa_update_cms: the counters of `key` (enhanced double hashing, Kirsch and Mitzenmacher), the
-- estimate, and for n ~= 0 the conservative update
local function update(self, key, fname, n)
    local bytes = standin.key_bytes(key, fname)
    local h1, h2 = xxh32(bytes, 1), xxh32(bytes, 2)
    local width, depth, counts = self.width, self.depth, self.counts
    local cells = {}
    local est = UINT32_MAX
    for i = 0, depth - 1 do
        local cell = i * width + (h1 + i * h2 + i * i) % TWO32 % width
        cells[i + 1] = cell
        local cnt = counts[cell] or 0
        if cnt < est then est = cnt end
    end
    if n > 0 then
        if est == 0 then self.uniques = self.uniques + 1 end
        local added = 0
        for i = 1, depth do
            local cell = cells[i]
            local cnt = counts[cell] or 0
            local room = UINT32_MAX - cnt
            local add = room < n and room or n
            local target = est + add
            if target > UINT32_MAX then target = UINT32_MAX end
            if target > cnt then counts[cell] = target end
            if add > added then added = add end
        end
        self.items = self.items + added
        return est + added
    elseif n < 0 and est ~= 0 then
        n = -n
        if n >= est then
            n = est
            self.uniques = self.uniques - 1
        end
        for i = 1, depth do
            local cell = cells[i]
            local cnt = counts[cell] - n
            counts[cell] = cnt ~= 0 and cnt or nil
        end
        self.items = self.items - n
        return est - n
    end
    return est
end

function CMS.update(...)
    local self, key, n = ...
    local given = select("#", ...)
    if getmetatable(self) ~= MT_NAME then check(self, given, given, "update") end
    if given < 2 or given > 3 then argerror(0, "update", "incorrect number of arguments") end
    if type(key) ~= "string" and type(key) ~= "number" then argerror(2, "update", "must be a string or number") end
    n = n == nil and 1 or standin.checkint(n, 3, given, "update")
    return update(self, key, "update", n)
end

function CMS.point_query(...)
    local self, key = ...
    check(self, 2, select("#", ...), "point_query")
    return update(self, key, "point_query", 0)
end

local function tostring_cms(self)
    local out = { le_uint(self.items, 8), le_uint(self.uniques, 8) }
    local counts = self.counts
    for i = 0, self.width * self.depth - 1 do out[#out + 1] = le_uint(counts[i] or 0, 4) end
    return tconcat(out)
end

function CMS.fromstring(...)
    local self, s = ...
    local n = select("#", ...)
    check(self, 2, n, "fromstring")
    s = standin.checkstring(s, 2, n, "fromstring")
    local cells = self.width * self.depth
    if #s ~= 16 + 4 * cells then
        self.items, self.uniques, self.counts = 0, 0, {}
        error("invalid serialization", 0)
    end
    self.items, self.uniques = read_le_uint(s, 1, 8), read_le_uint(s, 9, 8)
    local counts = {}
    for i = 0, cells - 1 do
        local c = read_le_uint(s, 17 + 4 * i, 4)
        if c ~= 0 then counts[i] = c end
    end
    self.counts = counts
end

mt.__tostring = standin.uncounted(host_api, function(self) return tostring_cms(self) end) -- as the C one, uncounted

-- serialize_cms: upstream writes the constructor call as `streaming_algorithms.cm_sketch(e, d)`
-- (without `.new`), kept so that state files read the same in both
function preserve(self, key)
    return standin.restore_text(key, sformat("streaming_algorithms.cm_sketch(%s, %s)",
        sformat("%g", E / (self.width - 0.5)), sformat("%g", 1 / E ^ (self.depth - 0.5))), tostring_cms(self))
end

standin.finish(host_api, M, CMS) -- in the sandbox: uncounted, as upstream's C (env.lua)

-- luaL_register(lua, "streaming_algorithms.cm_sketch"): the global too
streaming_algorithms = streaming_algorithms or setmetatable({}, {}) -- a metatable: not preserved
streaming_algorithms.cm_sketch = M

return M
