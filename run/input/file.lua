-- Reads a file line by line and injects each line through a decoder (default: decoders.payload,
-- the line becomes the Payload). The checkpoint is the byte offset just after the last line
-- handled, so a restart resumes where it stopped.
--
-- cfg: input_filename (nil reads stdin, without checkpoints), default_headers, decoder_module.
--
-- No line is ever dropped without a trace: a line the decoder rejects, or that cannot be injected
-- (e.g. larger than output_limit), goes to hindsight-py's dead-letter file through the global
-- dead_letter(reason, data) when the sandbox provides it; otherwise an error message (Type "error")
-- carrying the line (or, if even that cannot be injected, its offset and length) is injected; if
-- that fails too, the plugin stops before the line so that nothing is lost.
-- A last line without a trailing newline is a line; bytes are read as they are (binary mode).

require "io"
require "string"
require "table"

local find, sub, format = string.find, string.sub, string.format
local concat = table.concat

local input_filename  = read_config("input_filename")
local default_headers = read_config("default_headers")
assert(default_headers == nil or type(default_headers) == "table", "invalid default_headers cfg")

local decoder_module = read_config("decoder_module") or "decoders.payload"
local decode = require(decoder_module).decode
if type(decode) ~= "function" then
    error(decoder_module .. " does not provide a decode function")
end

local BLOCK_SIZE = 64 * 1024
local source_name = input_filename or "stdin"

local function report_failure(err, line, offset)
    local reason = format("%s (line at byte offset %d of %s)", tostring(err or "decode failed"), offset,
        source_name)
    if dead_letter then
        dead_letter(reason, line)
        return
    end
    local msg = {
        Type    = "error",
        Payload = reason,
        Fields  = {
            input_filename = source_name,
            offset         = {value = offset, value_type = 2},
            data           = {value = line, value_type = 1},
        },
    }
    if pcall(inject_message, msg) then return end
    -- the line itself is what did not fit: say where it is instead
    msg.Fields.data = nil
    msg.Fields.length = {value = #line, value_type = 2}
    inject_message(msg)
end

local function handle(line, offset, next_offset, checkpointing)
    local ok, err = pcall(decode, line, default_headers)
    if not ok or err then report_failure(err, line, offset) end
    if checkpointing then inject_message(nil, next_offset) end
end

function process_message(checkpoint)
    local fh, offset = io.stdin, 0
    local checkpointing = input_filename ~= nil
    if checkpointing then
        fh = assert(io.open(input_filename, "rb"))
        offset = tonumber(checkpoint) or 0
        local size = fh:seek("end")
        if offset > size then
            fh:close()
            error(format("the checkpoint (byte %d) is past the end of %s (%d bytes): the file was replaced "
                .. "or truncated; remove this plugin's checkpoint to read it again", offset, input_filename, size))
        end
        fh:seek("set", offset)
    end

    local count = 0
    local carry = nil -- the start of a line that continues in the next block
    while true do
        local block = fh:read(BLOCK_SIZE)
        if not block then break end
        local pos = 1
        local nl = find(block, "\n", 1, true)
        if carry and nl then
            carry[#carry + 1] = sub(block, 1, nl - 1)
            local line = concat(carry)
            carry = nil
            local next_offset = offset + #line + 1
            handle(line, offset, next_offset, checkpointing)
            offset, count, pos = next_offset, count + 1, nl + 1
            nl = find(block, "\n", pos, true)
        end
        while nl do
            local next_offset = offset + (nl - pos) + 1
            handle(sub(block, pos, nl - 1), offset, next_offset, checkpointing)
            offset, count, pos = next_offset, count + 1, nl + 1
            nl = find(block, "\n", pos, true)
        end
        if pos <= #block then
            carry = carry or {}
            carry[#carry + 1] = sub(block, pos)
        end
    end
    if carry then -- the last line has no newline; the checkpoint covers exactly its bytes
        local line = concat(carry)
        handle(line, offset, offset + #line, checkpointing)
        count = count + 1
    end
    if checkpointing then fh:close() end
    return 0, format("processed %d lines", count)
end
