-- Turns Debian's lua-cjson (2.1.0) into the cjson lua_sandbox plugins see.
--
-- Returns function(cjson_c[, limits]) -> module table, where limits = {output_limit = bytes}
-- (0 or absent: unlimited). Differences from stock lua-cjson, as in the sandbox's fork:
--   * decode drops JSON null values (object members vanish, array slots become holes, a bare
--     `null` decodes to nil) unless decode_null(true) was called;
--   * decode_null(on) is added; it returns the current setting;
--   * encode raises "output_limit exceeded" when the text is longer than output_limit;
--   * new and encode_keep_buffer are gone.
-- Left as stock lua-cjson already does it: `null` is a NULL lightuserdata, "/" is escaped,
-- number precision is 14, an empty table encodes as {}, NaN/Infinity/hex numbers decode.
-- Not reproducible on stock Lua: the fork encodes a decoded `[]` (or `{nil}`) back as []; here it
-- becomes {}.

local pairs, type, error = pairs, type, error
local find = string.find

return function(cjson_c, limits)
    local decode_c, encode_c, null = cjson_c.decode, cjson_c.encode, cjson_c.null
    local output_limit = limits and limits.output_limit or 0
    local keep_null = false

    local M = {}
    for name, value in pairs(cjson_c) do
        if name ~= "new" and name ~= "encode_keep_buffer" then M[name] = value end
    end

    local function drop_nulls(t)
        for k, v in pairs(t) do
            if v == null then
                t[k] = nil -- clearing a visited key is allowed during traversal
            elseif type(v) == "table" then
                drop_nulls(v)
            end
        end
    end

    function M.decode(text)
        local value = decode_c(text)
        if keep_null then return value end
        if value == null then return nil end
        -- only a document that spells "null" somewhere can hold one
        if type(value) == "table" and find(text, "null", 1, true) then drop_nulls(value) end
        return value
    end

    function M.encode(value)
        local text = encode_c(value)
        if output_limit > 0 and #text > output_limit then error("output_limit exceeded", 2) end
        return text
    end

    function M.decode_null(on)
        if on ~= nil then keep_null = on == true or on == "on" end
        return keep_null
    end

    return M
end
