-- hindsight_py.ecma_regex: the ECMAScript regular expressions RapidJSON's schema validator supports
-- (literals, ., classes, escapes \d \w \s, groups, |, * + ? {m,n}, ^ $), compiled to a
-- backtracking matcher. compile(re) -> function(s) -> true when re matches somewhere in s
-- (an unanchored search, as RapidJSON's Search), for hindsight_py.json_schema's pattern and
-- patternProperties.

local string = require "string"
local table = require "table"
local math = require "math"
local error = error
local huge = math.huge
local ipairs = ipairs
local sbyte = string.byte
local sfind = string.find
local smatch = string.match
local ssub = string.sub
local tonumber = tonumber

local function class_escape(c)
    if c == "d" then return function(b) return b >= 48 and b <= 57 end end
    if c == "D" then return function(b) return not (b >= 48 and b <= 57) end end
    if c == "w" then
        return function(b) return (b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122) or b == 95 end
    end
    if c == "W" then
        return function(b) return not ((b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122) or b == 95) end
    end
    if c == "s" then return function(b) return b == 32 or (b >= 9 and b <= 13) end end
    if c == "S" then return function(b) return not (b == 32 or (b >= 9 and b <= 13)) end end
    local lit = ({ n = 10, t = 9, r = 13, f = 12, v = 11 })[c] or sbyte(c)
    return function(b) return b == lit end
end

local function compile_regex(re)
    local pos = 1
    local parse_alt
    local function peek() return ssub(re, pos, pos) end
    local function parse_atom()
        local c = peek()
        if c == "(" then
            pos = pos + 1
            if ssub(re, pos, pos + 1) == "?:" then pos = pos + 2 end
            local node = parse_alt()
            if peek() ~= ")" then error("bad regex", 0) end
            pos = pos + 1
            return node
        elseif c == "[" then
            pos = pos + 1
            local negate = false
            if peek() == "^" then
                negate = true
                pos = pos + 1
            end
            local tests = {}
            local first = true
            while pos <= #re and (peek() ~= "]" or first) do
                first = false
                local ch = peek()
                local test
                local lo
                if ch == "\\" then
                    local e = ssub(re, pos + 1, pos + 1)
                    pos = pos + 2
                    if sfind("dDwWsS", e, 1, true) then
                        test = class_escape(e)
                    else
                        lo = ({ n = 10, t = 9, r = 13, f = 12, v = 11 })[e] or sbyte(e)
                    end
                else
                    lo = sbyte(ch)
                    pos = pos + 1
                end
                if lo then
                    if peek() == "-" and ssub(re, pos + 1, pos + 1) ~= "]" and pos + 1 <= #re then
                        pos = pos + 1
                        local hc = peek()
                        local hi
                        if hc == "\\" then
                            local e = ssub(re, pos + 1, pos + 1)
                            hi = ({ n = 10, t = 9, r = 13, f = 12, v = 11 })[e] or sbyte(e)
                            pos = pos + 2
                        else
                            hi = sbyte(hc)
                            pos = pos + 1
                        end
                        local l2, h2 = lo, hi
                        test = function(b) return b >= l2 and b <= h2 end
                    else
                        local l2 = lo
                        test = function(b) return b == l2 end
                    end
                end
                tests[#tests + 1] = test
            end
            if peek() ~= "]" then error("bad regex", 0) end
            pos = pos + 1
            return { k = "set", f = function(b)
                for i = 1, #tests do
                    if tests[i](b) then return not negate end
                end
                return negate
            end }
        elseif c == "." then
            pos = pos + 1
            return { k = "set", f = function(b) return b ~= 10 and b ~= 13 end }
        elseif c == "^" then
            pos = pos + 1
            return { k = "bol" }
        elseif c == "$" then
            pos = pos + 1
            return { k = "eol" }
        elseif c == "\\" then
            local e = ssub(re, pos + 1, pos + 1)
            pos = pos + 2
            return { k = "set", f = class_escape(e) }
        end
        pos = pos + 1
        local b = sbyte(c)
        return { k = "set", f = function(x) return x == b end }
    end
    local function parse_repeat()
        local atom = parse_atom()
        while true do
            local c = peek()
            local min, max
            if c == "*" then min, max = 0, huge
            elseif c == "+" then min, max = 1, huge
            elseif c == "?" then min, max = 0, 1
            elseif c == "{" then
                local a, b, e = smatch(re, "^{(%d*),?(%d*)}()", pos)
                if not e then break end
                local exact = not sfind(ssub(re, pos, e - 1), ",", 1, true)
                min = tonumber(a) or 0
                max = exact and min or (tonumber(b) or huge)
                pos = e - 1
            else
                break
            end
            pos = pos + 1
            atom = { k = "rep", node = atom, min = min, max = max }
        end
        return atom
    end
    local function parse_seq()
        local seq = {}
        while pos <= #re and peek() ~= "|" and peek() ~= ")" do seq[#seq + 1] = parse_repeat() end
        return { k = "seq", seq }
    end
    function parse_alt()
        local alts = { parse_seq() }
        while peek() == "|" do
            pos = pos + 1
            alts[#alts + 1] = parse_seq()
        end
        if #alts == 1 then return alts[1] end
        return { k = "alt", alts }
    end
    local root = parse_alt()
    if pos <= #re then error("bad regex", 0) end

    -- m(node, s, i, k): match node at i, then continuation k(j)
    local m
    local function seq_at(list, idx, s, i, k)
        if idx > #list then return k(i) end
        return m(list[idx], s, i, function(j) return seq_at(list, idx + 1, s, j, k) end)
    end
    function m(node, s, i, k)
        local kind = node.k
        if kind == "set" then
            local b = sbyte(s, i)
            if b and node.f(b) then return k(i + 1) end
            return false
        elseif kind == "seq" then
            return seq_at(node[1], 1, s, i, k)
        elseif kind == "alt" then
            for _, a in ipairs(node[1]) do
                if m(a, s, i, k) then return true end
            end
            return false
        elseif kind == "bol" then
            if i == 1 then return k(i) end
            return false
        elseif kind == "eol" then
            if i == #s + 1 then return k(i) end
            return false
        else -- rep, greedy
            local function try(count, j)
                if count < node.max and m(node.node, s, j, function(j2)
                    if j2 == j then return false end -- no progress
                    return try(count + 1, j2)
                end) then
                    return true
                end
                if count >= node.min then return k(j) end
                return false
            end
            return try(0, i)
        end
    end
    return function(s)
        for i = 1, #s + 1 do
            if m(root, s, i, function() return true end) then return true end
        end
        return false
    end
end

return { compile = compile_regex }
