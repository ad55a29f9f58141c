-- decoders.payload for hindsight-py: injects the raw data as the message Payload (API of
-- lua_sandbox_extensions' decoders.payload).
--
-- decode(data, default_headers, mutable)
--   data             string, becomes Payload
--   default_headers  optional Heka message table (hash-based Fields) used as the starting point;
--                    it is copied unless `mutable` is true
-- Raises the inject_message error when the message cannot be injected.

local sdu = require "lpeg.sub_decoder_util"

local copy_message = sdu.copy_message
-- Taken at load time on purpose: lpeg.sub_decoder_util substitutes inject_message while it loads a
-- decoder that has transformations configured.
local inject_message = inject_message

local M = {}

function M.decode(data, default_headers, mutable)
    local msg = copy_message(default_headers, mutable)
    msg.Payload = data
    inject_message(msg)
end

return M
