-- encoders.elasticsearch.common for hindsight-py: the Elasticsearch bulk API action line and the
-- shared encoder configuration (API of lua_sandbox_extensions' module of the same name).
--
-- Configuration: a table in the plugin cfg named after this module with dots turned into
-- underscores (`encoders_elasticsearch_common`):
--   es_index_from_timestamp  boolean, default false: strftime placeholders use the message
--                            Timestamp instead of the current time
--   index                    string, default "heka-%{%Y.%m.%d}"
--   type_name                string, default "message"
--   id                       string, default nil (no `_id`)
-- All three accept `%{...}` placeholders (see heka.msg_interpolate).
--   id_from_json             string, default nil (hindsight-py): the `_id` is the value of this
--                            member of the JSON document itself (e.g. "eventID", or a dotted path
--                            such as "userIdentity.accessKeyId"), so that a document sent again
--                            after a crash overwrites its first copy instead of duplicating it.
--                            Used by encoders.elasticsearch.payload; exclusive with `id`.

local module_name = ... or "encoders.elasticsearch.common"
local string = require "string"
local cjson  = require "cjson"
local mi     = require "heka.msg_interpolate"

local find, lower, gsub = string.find, string.lower, string.gsub
local interpolate = mi.interpolate
local encode_json = cjson.encode
local error, type = error, type

local cfg_name = (gsub(module_name, "%.", "_"))

local M = {}

local function dynamic(v)
    return type(v) == "string" and find(v, "%{", 1, true) ~= nil
end

-- The action line depends on the message only through placeholders; without any it is the
-- same bytes for every message, so the last one is kept.
local cached_index, cached_type, cached_id, cached_line

-- Returns `{"index":{"_index":...,"_type":...,"_id":...}}`, leaving out the keys whose argument
-- is nil. The key order is the one upstream's cjson table produces. `_index` is lowercased after
-- interpolation, as Elasticsearch requires. `ns` (nanoseconds) is the time for strftime
-- placeholders; nil means now.
function M.bulkapi_index_json(index, type_name, id, ns)
    if cached_line and index == cached_index and type_name == cached_type and id == cached_id then
        return cached_line
    end
    local secs
    if ns then secs = ns / 1e9 end

    local line = '{"index":{'
    local sep = ""
    if index then
        line = line .. '"_index":' .. encode_json(lower((interpolate(index, secs))))
        sep = ","
    end
    if type_name then
        line = line .. sep .. '"_type":' .. encode_json((interpolate(type_name, secs)))
        sep = ","
    end
    if id then
        line = line .. sep .. '"_id":' .. encode_json((interpolate(id, secs)))
    end
    line = line .. "}}"

    if not (dynamic(index) or dynamic(type_name) or dynamic(id)) then
        cached_index, cached_type, cached_id, cached_line = index, type_name, id, line
    end
    return line
end

-- Reads and validates this module's cfg table, filling in the defaults. read_config returns the
-- sandbox's own copy, so the defaults stay in place for later calls.
function M.load_encoder_cfg()
    local cfg = read_config(cfg_name)
    if type(cfg) ~= "table" then error(cfg_name .. " must be a table", 0) end

    if cfg.es_index_from_timestamp == nil then
        cfg.es_index_from_timestamp = false
    elseif type(cfg.es_index_from_timestamp) ~= "boolean" then
        error("es_index_from_timestamp must be nil or boolean", 0)
    end

    if cfg.index == nil then
        cfg.index = "heka-%{%Y.%m.%d}"
    elseif type(cfg.index) ~= "string" then
        error("index must be nil or a string", 0)
    end

    if cfg.type_name == nil then
        cfg.type_name = "message"
    elseif type(cfg.type_name) ~= "string" then
        error("type_name must be nil or a string", 0)
    end

    if cfg.id_from_json ~= nil then
        if type(cfg.id_from_json) ~= "string" or cfg.id_from_json == "" then
            error("id_from_json must be nil or a non-empty string", 0)
        end
        if cfg.id ~= nil then error("id and id_from_json are mutually exclusive", 0) end
    end
    return cfg
end

return M
