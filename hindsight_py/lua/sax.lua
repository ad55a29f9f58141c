-- sax for hindsight-py: the API of lua_sandbox_extensions' sax package (trink/symtseries' Lua
-- module, 0.5.0) in Lua, with the C library's arithmetic: SAX (Symbolic Aggregate approXimation)
-- words of a series, z-normalised and averaged per frame, each frame's mean turned into one of c
-- symbols by the standard normal's quantiles.
--
-- sax.window.new(n, w, c) -> window over the last n values (1 < n <= 4096), w frames (1 < w <= 2048,
--                             dividing n), c symbols (2..16); it starts with n NaNs
-- sax.word.new(values, w, c) -> the word of an array of numbers (its length is n)
-- sax.word.new("SYMBOLS", c) -> a word from its text ('A' the lowest symbol, '#' a frame of NaNs)
-- sax.mindist(a, b) -> distance, above, below: the lower bound of the Euclidean distance between
--                      the series of two words or windows (nil if their n, w or c differ)
-- sax.version()     -> "0.5.0"
-- window:add(number | array) (only the last n values of an array count), window:clear(),
-- window:get_word() (a copy of its word); tostring(x), and == between words and windows (their
-- symbols, w and c).
-- A window keeps its mean and sum of squared deviations up to date at each value as the C module
-- does (infinities and NaNs are not counted in them, NaNs not in the frame means either), so that
-- the same symbols come out.

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local sqrt, floor, huge = math.sqrt, math.floor, math.huge
local schar, sbyte, sformat = string.char, string.byte, string.format
local tconcat = table.concat
local type, select, setmetatable, getmetatable, tonumber, rawget = type, select, setmetatable, getmetatable,
    tonumber, rawget
local argerror, float32, outputd = standin.argerror, standin.float32, standin.outputd

local WINDOW, WORD = "mozsvc.sax.window", "mozsvc.sax.word"
local MAX_CARDINALITY = 16
local STAT_EPS = 1e-2
local BYTE_A = sbyte("A")

local M = {}
local windows, words = {}, {} -- sax.window, sax.word
local Window = {}
local window_mt = { __index = Window, __metatable = WINDOW }
local word_mt = { __metatable = WORD }

-- The symbol tables of cardinality c, from the standard normal's quantiles q(i/c): the breakpoints
-- cut at 3 decimals toward zero, and the distances between symbols (q(j/c) - q((i+1)/c), 0 for
-- neighbours) rounded to 3 decimals; both held as C floats, which is what the C module's tables are.
local function normal_cdf(x)
    local z = x / sqrt(2) -- Phi(x) = (1 + erf(x / sqrt(2))) / 2; erf's series, |z| < 1.2 here
    local term, sum, n = z, z, 0
    repeat
        n = n + 1
        term = -term * z * z / n
        local add = term / (2 * n + 1)
        sum = sum + add
    until add < 1e-18 and add > -1e-18
    return 0.5 + sum / sqrt(math.pi)
end

local function normal_quantile(p)
    if p == 0.5 then return 0 end
    if p > 0.5 then return -normal_quantile(1 - p) end
    local lo, hi = -4, 0
    for _ = 1, 64 do
        local mid = (lo + hi) / 2
        if normal_cdf(mid) < p then lo = mid else hi = mid end
    end
    return (lo + hi) / 2
end

local tables = {} -- c -> { breaks = {[0..c-2]}, dist = {[sa * c + sb]} }
local function symbol_tables(c)
    local t = tables[c]
    if t then return t end
    local q, breaks, dist = {}, {}, {}
    for i = 1, c - 1 do
        q[i] = normal_quantile(i / c)
        local cut = q[i] * 1000
        cut = cut >= 0 and floor(cut) or -floor(-cut)
        breaks[i - 1] = float32(cut / 1000)
    end
    for a = 0, c - 1 do
        for b = 0, c - 1 do
            local d = 0
            if a - b > 1 or b - a > 1 then
                local hi, lo = a > b and a or b, a > b and b or a
                d = float32(floor((q[hi] - q[lo + 1]) * 1000 + 0.5) / 1000)
            end
            dist[a * c + b] = d
        end
    end
    t = { breaks = breaks, dist = dist }
    tables[c] = t
    return t
end

-- Symbols are held as the C library holds them: 0 the highest ('A' + c - 1), c - 1 the lowest
-- ('A'), c a frame of NaNs ('#').
local function get_symbol(value, c, breaks)
    if value ~= value then return c end
    for i = 0, c - 2 do
        if value < breaks[i] then return c - i - 1 end
    end
    return 0
end

local function finite(x) return x == x and x ~= huge and x ~= -huge end

-- symbols of the n values read from `at(k)` (k = 0 .. n-1), for the series' mean and deviation
local function transform(n, w, c, mu, std, at)
    local breaks = symbol_tables(c).breaks
    local frame = n / w
    local symbols, k = {}, 0
    for i = 1, w do
        local sum, count = 0, frame
        for _ = 1, frame do
            local v = at(k)
            k = k + 1
            if v ~= v then count = count - 1 else sum = sum + v end
        end
        local average
        if count == 0 or sum ~= sum then
            average = 0 / 0 -- all NaNs, or inf - inf
        elseif finite(sum) then
            average = std < STAT_EPS and 0 or (sum - count * mu) / (count * std)
        else
            average = sum
        end
        symbols[i] = get_symbol(average, c, breaks)
    end
    return symbols
end

local function new_word(n, w, c, symbols)
    return setmetatable({ n = n, w = w, c = c, symbols = symbols }, word_mt)
end

-- a word's text: '#' for NaN frames, 'A' for the lowest symbol
local function word_text(word)
    local out, c = {}, word.c
    for i = 1, word.w do
        local s = word.symbols[i]
        out[i] = s == c and "#" or schar(c - s - 1 + BYTE_A)
    end
    return tconcat(out)
end

-- luaL_argcheck's texts for lua_gettop
local function check_nargs(given, want, fname, text)
    if given ~= want then argerror(0, fname, text or "incorrect number of args") end
end

local function check_nwc(n, w, c, narg)
    if not (n > 1 and n <= 4096) then argerror(narg, "new", "n is out of range") end
    if not (w > 1 and w <= 2048) then argerror(narg, "new", "w is out of range") end
    if n % w ~= 0 then argerror(narg, "new", "n must be evenly divisible by w") end
    if not (c > 1 and c <= MAX_CARDINALITY) then argerror(narg, "new", "cardinality is out of range") end
end

-- lua_isnumber / lua_tonumber: numbers and the strings that convert
local function as_number(v)
    if type(v) == "number" then return v end
    if type(v) == "string" then return tonumber(v) end
    return nil
end

-- check_array: elements 1..size, every one a number (the C module names argument 1 whatever the table's)
local function check_array(t, size, fname)
    local values = {}
    for i = 1, size do
        local v = as_number(rawget(t, i))
        if v == nil then argerror(1, fname, "expected array of numbers as input") end
        values[i] = v
    end
    return values
end

local function new_window(n, w, c)
    local values = {}
    for i = 0, n - 1 do values[i] = 0 / 0 end
    return setmetatable({ n = n, w = w, c = c, values = values, head = 0, tail = n - 1, mu = 0, s2 = 0,
        finite_cnt = 0, symbols = nil }, window_mt)
end

-- the window's word, computed when first needed after a change (from the values as they are then:
-- what the C module computes at every add)
local function current_symbols(win)
    local symbols = win.symbols
    if symbols then return symbols end
    local std = win.finite_cnt == 0 and 0 or sqrt(win.s2 / win.finite_cnt)
    local values, head, n = win.values, win.head, win.n
    symbols = transform(n, win.w, win.c, win.mu, std, function(k) return values[(head + k) % n] end)
    win.symbols = symbols
    return symbols
end

-- a word or a window, as the word it stands for (nil if neither)
local function as_word(x)
    local mt = getmetatable(x)
    if mt == WORD then return x end
    if mt == WINDOW then return { n = x.n, w = x.w, c = x.c, symbols = current_symbols(x) } end
    return nil
end

local function check_word_or_window(x, narg, fname)
    local word = as_word(x)
    if not word then
        argerror(narg, fname, sformat("sax.window or sax.word expected expected, got %s", type(x)))
    end
    return word
end

local function check_window(x, fname)
    if getmetatable(x) ~= WINDOW then
        argerror(1, fname, sformat("%s expected, got %s", WINDOW, type(x)))
    end
    return x
end

-- the ring buffer's push, with the running mean and squared deviations of its finite values updated
-- as the C module updates them (the same operations in the same order)
local function append_value(win, value)
    local values, n = win.values, win.n
    local prev_finite = win.finite_cnt
    local tail = (win.tail + 1) % n
    local head_value = values[win.head] -- the buffer is always full: the head goes
    win.head = (win.head + 1) % n
    win.tail = tail
    values[tail] = value
    local new_finite = prev_finite + (finite(value) and 1 or 0) - (finite(head_value) and 1 or 0)
    win.finite_cnt = new_finite
    local mu, s2 = win.mu, win.s2
    if prev_finite == new_finite then
        if finite(value) then -- a finite value in place of a finite one
            local diff = value - head_value
            mu = mu + diff / prev_finite
            local a, b = value - mu, head_value - mu
            s2 = s2 + (diff * diff / new_finite + a * a - b * b)
        end
    elseif new_finite < prev_finite then -- a non-finite value in place of a finite one
        if new_finite == 0 then
            mu, s2 = 0, 0
        else
            local prev_mu = mu
            mu = (prev_mu * prev_finite - head_value) / new_finite
            local old_diff, new_diff = prev_mu - head_value, mu - head_value
            s2 = s2 + ((old_diff * old_diff * prev_finite) / (new_finite * new_finite) - new_diff * new_diff)
        end
    else -- a finite value in place of a non-finite one
        s2 = s2 + ((value - mu) * (value - mu) * prev_finite) / new_finite
        mu = mu + (value - mu) / new_finite
    end
    if s2 < 0 and s2 > -STAT_EPS then s2 = 0 end
    win.mu, win.s2 = mu, s2
    win.symbols = nil
end

-- the mean and deviation of a whole series (its finite values), updated value by value
local function mu_and_std(series, size)
    local mean, s2, n = 0, 0, 0
    for i = 1, size do
        local v = series[i]
        if finite(v) then
            n = n + 1
            s2 = s2 + ((v - mean) * (v - mean) * (n - 1)) / n
            mean = mean + (v - mean) / n
        end
    end
    if n == 0 then return 0, 0 end
    return mean, sqrt(s2 / n)
end

local function word_from_array(...)
    local t, w, c = ...
    w = standin.checkint(w, 2, 3, "new")
    c = standin.checkint(c, 3, 3, "new")
    if type(t) ~= "table" then argerror(1, "new", "array-like table expected") end
    local size = #t
    check_nwc(size, w, c, 2)
    local series = check_array(t, size, "new")
    local mu, std = mu_and_std(series, size)
    return new_word(size, w, c, transform(size, w, c, mu, std, function(k) return series[k + 1] end))
end

local function word_from_string(...)
    local s, c = ...
    s = standin.checkstring(s, 1, 2, "new")
    if #s <= 1 then argerror(1, "new", "length of SAX string should be > 1") end
    c = standin.checkint(c, 2, 2, "new") % 256 -- the C function takes an unsigned char
    local symbols = {}
    local ok = c >= 2 and c <= MAX_CARDINALITY
    for i = 1, #s do
        if not ok then break end
        local b = sbyte(s, i)
        if b == 35 then -- '#'
            symbols[i] = c
        elseif b < BYTE_A or b >= BYTE_A + c then
            ok = false
        else
            symbols[i] = c - (b - BYTE_A) - 1
        end
    end
    if not ok then argerror(1, "new", "illegal symbols for given cardinality or bad cardinality itself") end
    return new_word(0, #s, c, symbols)
end

local function serialize_double(x)
    if x ~= x then return "0/0" end
    if x == huge then return "1/0" end
    if x == -huge then return "-1/0" end
    return outputd(x)
end

-- preserve_data: what the C module's serialize function writes
local function preserve_window(win, key)
    local text = sformat("if %s == nil then %s = sax.window.new(%d, %d, %d) end", key, key, win.n, win.w, win.c)
    local values, out, any = win.values, {}, false
    for k = 0, win.n - 1 do
        local v = values[(win.head + k) % win.n]
        if v == v then any = true end
        out[k + 1] = serialize_double(v)
    end
    if not any then return text end
    return text .. sformat("\n%s:clear()\n%s:add({", key, key) .. tconcat(out, ",") .. "})"
end

local function preserve_word(word, key)
    return sformat('if %s == nil then %s = sax.word.new("%s", %d) end', key, key, word_text(word), word.c)
end

local function track(object, preserve) return standin.track(host_api, object, preserve) end

function words.new(...)
    local given = select("#", ...)
    local word
    if given == 2 then
        word = word_from_string(...)
    elseif given == 3 then
        word = word_from_array(...)
    else
        argerror(0, "new", "incorrect number of arguments")
    end
    return track(word, preserve_word)
end

function windows.new(...)
    local given = select("#", ...)
    check_nargs(given, 3, "new")
    local n, w, c = ...
    n = standin.checkint(n, 1, given, "new")
    w = standin.checkint(w, 2, given, "new")
    c = standin.checkint(c, 3, given, "new")
    check_nwc(n, w, c, 1)
    return track(new_window(n, w, c), preserve_window)
end

function M.mindist(...)
    check_nargs(select("#", ...), 2, "mindist")
    local a, b = ...
    a = check_word_or_window(a, 1, "mindist")
    b = check_word_or_window(b, 2, "mindist")
    if a.c ~= b.c or a.w ~= b.w or (a.n ~= b.n and a.n ~= 0 and b.n ~= 0) then return nil end
    local w, c = a.w, a.c
    local n = a.n > 0 and a.n or b.n
    if n == 0 then n = w end
    local dist = symbol_tables(c).dist
    local above, below = 0, 0
    for i = 1, w do
        local sa, sb = a.symbols[i], b.symbols[i]
        if sa ~= sb then
            if sa == c then -- a frame of NaNs: as far from the other as a symbol can be
                sa = sb > c - 1 - sb and 0 or c - 1
            elseif sb == c then
                sb = sa > c - 1 - sa and 0 or c - 1
            end
            local d = dist[sa * c + sb]
            d = d * d
            if sa < sb then above = above + d else below = below + d end
        end
    end
    local compression = sqrt(n / w)
    return compression * sqrt(above + below), compression * sqrt(above), compression * sqrt(below)
end

function M.version() return "0.5.0" end

function Window:add(...)
    local given = select("#", ...) + 1
    check_nargs(given, 2, "add")
    check_window(self, "add")
    local v = ...
    local number = as_number(v)
    if number then
        append_value(self, number)
        return
    end
    if type(v) ~= "table" then argerror(2, "add", "number or array-like table expected") end
    local size = #v
    if size == 0 then return end
    local values = check_array(v, size, "add")
    for i = size > self.n and size - self.n + 1 or 1, size do append_value(self, values[i]) end
end

function Window:clear(...)
    check_nargs(select("#", ...) + 1, 1, "clear", "incorrect number of arguments")
    check_window(self, "clear")
    local values = self.values
    for i = 0, self.n - 1 do values[i] = 0 / 0 end
    self.head, self.tail, self.mu, self.s2, self.finite_cnt, self.symbols = 0, self.n - 1, 0, 0, 0, nil
end

function Window:get_word(...)
    check_nargs(select("#", ...) + 1, 1, "get_word")
    check_window(self, "get_word")
    local symbols, copy = current_symbols(self), {}
    for i = 1, self.w do copy[i] = symbols[i] end
    return track(new_word(self.n, self.w, self.c, copy), preserve_word)
end

-- Shared by both metatables: Lua calls __eq only when both operands have the same one.
local function equal(a, b)
    a, b = as_word(a), as_word(b)
    if not a or not b or a.w ~= b.w or a.c ~= b.c then return false end
    for i = 1, a.w do
        if a.symbols[i] ~= b.symbols[i] then return false end
    end
    return true
end

local function text(...)
    check_nargs(select("#", ...), 1, "__tostring")
    return word_text(check_word_or_window((...), 1, "__tostring"))
end

equal, text = standin.uncounted(host_api, equal), standin.uncounted(host_api, text)
window_mt.__eq, word_mt.__eq = equal, equal
window_mt.__tostring, word_mt.__tostring = text, text
-- add_to_payload / a Fields value: the word's text, as the C module's output function writes it
window_mt.__lsb_output, word_mt.__lsb_output = text, text

standin.finish(host_api, M, windows, words, Window) -- in the sandbox: uncounted, as upstream's C (env.lua)
M.window, M.word = windows, words

return M
