-- encoders.elasticsearch.payload for hindsight-py: a message whose Payload is already a JSON
-- document becomes one bulk API entry, the action line then the Payload, each ending in "\n"
-- (API of lua_sandbox_extensions' module of the same name). Configuration: see
-- encoders.elasticsearch.common.
--
-- hindsight-py additions:
--   * `id_from_json` (in the common cfg table): the `_id` is taken from the document itself, so a
--     document delivered twice (at-least-once delivery after a crash) is stored once. A document
--     that is not JSON, or lacks the member, or has a non-scalar value there, gets no `_id`.
--   * A Payload with a line break inside it (not only at its end) raises an error instead of being
--     sent: in the NDJSON bulk body it would split into several lines and shift every following
--     document of the batch onto the wrong action line. The output dead-letters what encode rejects.

local string = require "string"
local math   = require "math"
local cjson  = require "cjson"
local es     = require "encoders.elasticsearch.common"

local byte, find, sub, format, gmatch = string.byte, string.find, string.sub, string.format, string.gmatch
local floor = math.floor
local decode_json, encode_json = cjson.decode, cjson.encode
local error, pcall, type = error, pcall, type

local cfg = es.load_encoder_cfg()

-- id_from_json as a path: "a.b" is tried as the member "a.b" first, then as a.b.
local id_name = cfg.id_from_json
local id_path = nil
if id_name and find(id_name, ".", 1, true) then
    id_path = {}
    for part in gmatch(id_name, "[^.]+") do id_path[#id_path + 1] = part end
end

local MAX_EXACT = 2 ^ 53

local function scalar_id(v)
    local t = type(v)
    if t == "string" then
        if v == "" then return nil end
        return v
    elseif t == "number" then
        if v == floor(v) and v >= -MAX_EXACT and v <= MAX_EXACT then return format("%d", v) end
        return format("%.17g", v)
    end
    return nil
end

local function id_of(payload)
    local ok, doc = pcall(decode_json, payload)
    if not ok or type(doc) ~= "table" then return nil end
    local v = doc[id_name]
    if v == nil and id_path then
        v = doc
        for i = 1, #id_path do
            if type(v) ~= "table" then return nil end
            v = v[id_path[i]]
        end
    end
    return scalar_id(v)
end

-- The action line with `"_id":<id>` as its last key (where common's own `id` would put it).
local function with_id(action, id)
    local head = sub(action, 1, -3) -- without the closing "}}"
    if byte(head, -1) == 123 then -- "{": no other key
        return head .. '"_id":' .. encode_json(id) .. "}}"
    end
    return head .. ',"_id":' .. encode_json(id) .. "}}"
end

-- The length of `payload` without its trailing line breaks.
local function body_length(payload)
    local n = #payload
    while n > 0 do
        local c = byte(payload, n)
        if c ~= 10 and c ~= 13 then break end
        n = n - 1
    end
    return n
end

local M = {}

-- Returns the bulk entry, or nil when the message has no Payload (the output skips it).
function M.encode()
    local payload = read_message("Payload")
    if not payload then return nil end

    local nl = find(payload, "\n", 1, true)
    if nl and nl <= body_length(payload) then
        error(format("the Payload has a line break at byte %d: a bulk document must be a single line", nl), 0)
    end

    local ns
    if cfg.es_index_from_timestamp then ns = read_message("Timestamp") end
    -- looked up per call: the sandbox may wrap the common module's function after loading it
    local action = es.bulkapi_index_json(cfg.index, cfg.type_name, cfg.id, ns)
    if id_name then
        local id = id_of(payload)
        if id then action = with_id(action, id) end
    end
    if byte(payload, -1) == 10 then
        return action .. "\n" .. payload
    end
    return action .. "\n" .. payload .. "\n"
end

return M
