-- encoders.elasticsearch.payload for hindsight-py: a message whose Payload is already a JSON
-- document becomes one bulk API entry, the action line then the Payload, each ending in "\n"
-- (API of lua_sandbox_extensions' module of the same name). Configuration: see
-- encoders.elasticsearch.common.

local string = require "string"
local es     = require "encoders.elasticsearch.common"

local byte = string.byte

local cfg = es.load_encoder_cfg()

local M = {}

-- Returns the bulk entry, or nil when the message has no Payload (the output skips it).
function M.encode()
    local payload = read_message("Payload")
    if not payload then return nil end

    local ns
    if cfg.es_index_from_timestamp then ns = read_message("Timestamp") end
    -- looked up per call: the sandbox may wrap the common module's function after loading it
    local action = es.bulkapi_index_json(cfg.index, cfg.type_name, cfg.id, ns)
    if byte(payload, -1) == 10 then
        return action .. "\n" .. payload
    end
    return action .. "\n" .. payload .. "\n"
end

return M
