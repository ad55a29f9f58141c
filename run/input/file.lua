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
-- Bytes are read as they are (binary mode).
--
-- With ticker_interval = 0 (the default) the file is read once: a last line without a trailing
-- newline is a line. With ticker_interval = N the file is followed (under the `hindsight` daemon):
-- every N seconds what was appended is read, and a last line without its newline waits for it.
-- When the name points to another file (rotation: a different size or first 4 KB than the open
-- file), the old file is read to its end once it has not changed for rotate_wait seconds
-- (default 10; its last line without newline is then a line), then the new one from byte 0. A
-- file shorter than what was read (truncation) is read again from byte 0. Both are reported as
-- process_message's -1 message, which Hindsight logs as a warning. Unlike flat_file.py, the
-- checkpoint is only the offset (Lua's io has no inode): a rotation while the daemon is stopped
-- is noticed only when the new file is shorter than the offset.

require "io"
require "os"
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
local follow = (read_config("ticker_interval") or 0) > 0
local rotate_wait = read_config("rotate_wait") or 10
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

local function size_of(fh)
    local pos = fh:seek("cur")
    local size = fh:seek("end")
    fh:seek("set", pos)
    return size
end

-- Injects the lines from offset on; the last line without newline only when final. Returns the
-- offset after the last line handled and how many lines.
local function read_lines(fh, offset, final, checkpointing)
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
    if carry and final then -- the last line has no newline; the checkpoint covers exactly its bytes
        local line = concat(carry)
        handle(line, offset, offset + #line, checkpointing)
        offset, count = offset + #line, count + 1
    end
    return offset, count
end

local function read_once(checkpoint)
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
    local _, count = read_lines(fh, offset, true, checkpointing)
    if checkpointing then fh:close() end
    return 0, format("processed %d lines", count)
end

-- following: the open file {fh, offset, rotated_size, rotated_at}, kept across calls
local current = nil

-- Whether the name points to another file than cur.fh (or to none).
local function rotated(cur)
    local fh = io.open(input_filename, "rb")
    if not fh then return true end
    local same = size_of(cur.fh) == fh:seek("end")
    if same then
        cur.fh:seek("set", 0)
        fh:seek("set", 0)
        same = cur.fh:read(4096) == fh:read(4096)
    end
    fh:close()
    return not same
end

local function read_following(checkpoint)
    local notes = {}
    if not current then
        local fh = io.open(input_filename, "rb")
        if not fh then return 0 end -- not there yet
        local offset = tonumber(checkpoint) or 0
        if offset > fh:seek("end") then
            notes[#notes + 1] = format("%s is shorter than the checkpoint (byte %d): it was truncated or "
                .. "replaced; reading it from byte 0", input_filename, offset)
            offset = 0
        end
        current = {fh = fh, offset = offset}
    end
    local cur = current
    local size = size_of(cur.fh)
    if size < cur.offset then
        notes[#notes + 1] = format("%s was truncated to %d bytes after %d had been read: reading it again "
            .. "from byte 0", input_filename, size, cur.offset)
        cur.offset = 0
        inject_message(nil, 0)
    end
    cur.fh:seek("set", cur.offset)
    local count
    cur.offset, count = read_lines(cur.fh, cur.offset, false, true)
    if rotated(cur) then
        local now = os.time()
        if cur.rotated_size ~= size then -- the writer may still be finishing it: look again later
            cur.rotated_size, cur.rotated_at = size, now
        elseif now - cur.rotated_at >= rotate_wait then
            cur.fh:seek("set", cur.offset)
            local n
            cur.offset, n = read_lines(cur.fh, cur.offset, true, true) -- the old file is finished
            count = count + n
            notes[#notes + 1] = format("%s was rotated: read the old file to its end (byte %d)", input_filename,
                cur.offset)
            cur.fh:close()
            inject_message(nil, 0)
            current = nil
            local fh = io.open(input_filename, "rb")
            if fh then
                current = {fh = fh, offset = 0}
                current.offset, n = read_lines(fh, 0, false, true)
                count = count + n
            end
        end
    else
        cur.rotated_size = nil
    end
    if #notes > 0 then return -1, concat(notes, "; ") end
    return 0
end

function process_message(checkpoint)
    if follow and input_filename then return read_following(checkpoint) end
    return read_once(checkpoint)
end
