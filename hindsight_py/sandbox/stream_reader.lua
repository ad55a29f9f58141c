-- Stream readers (inputs): create_stream_reader's userdata, as lua_sandbox's, with their state kept
-- here.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Returns create_stream_reader (installed
-- for inputs by message_inject.lua), check_reader and reader_message (inject_message takes a reader).

local S = ...
local pb, max_message_size = S.pb, S.max_message_size
local argerror, typeerror, check_index = S.argerror, S.typeerror, S.check_index

local type, error, tostring, select, setmetatable, getmetatable = type, error, tostring, select, setmetatable,
    getmetatable
local ssub, sbyte = string.sub, string.byte
local newproxy, io_type = newproxy, io.type

local readers = setmetatable({}, { __mode = "k" }) -- userdata -> { name, buf, raw }
local reader_proto = newproxy(true)
local READER_TYPE = "lsb.heka_stream_reader"
local R = {}
getmetatable(reader_proto).__index = R

local function check_reader(ud, ...)
    local st = readers[ud]
    if not st then typeerror(1, READER_TYPE, 1, ud, ...) end
    return st
end

local function reader_need(st)
    -- how many more bytes the message at the head of the buffer needs (lsb_input_buffer's arithmetic)
    local b = st.buf
    if sbyte(b, 1) == 30 and #b >= 2 then
        local hlen = sbyte(b, 2)
        if #b >= hlen + 3 and sbyte(b, 3) == 8 then
            local len, shift = 0, 1
            for i = 4, hlen + 2 do
                local c = sbyte(b, i)
                len = len + (c % 128) * shift
                shift = shift * 128
                if c < 128 then break end
            end
            if len > 0 then return len + hlen + 3 - #b end
        end
    end
    return st.cap - #b
end

function R.find_message(...)
    local n = select("#", ...)
    if n < 2 or n > 3 then argerror(0, "incorrect number of arguments") end
    local self, buf, decode = ...
    local st = check_reader(self, ...)
    local fh = nil
    local tb = type(buf)
    if tb == "string" then
        if buf ~= "" then st.buf = st.buf .. buf end
    elseif tb == "userdata" then
        if io_type(buf) == nil then typeerror(2, "FILE*", 0, ...) end
        if io_type(buf) == "closed file" then error("attempt to use a closed file", 2) end
        fh = buf
    elseif tb ~= "nil" then
        error("buffer must be a nil, string, userdata (FILE*)", 2)
    end
    if n == 3 and type(decode) ~= "boolean" then typeerror(3, "boolean", 0, ...) end
    local found, consumed, raw = pb.find_framed(st.buf, max_message_size, decode ~= false)
    st.buf = ssub(st.buf, consumed + 1)
    local need
    if found then
        st.raw = raw
        need = #st.buf > 0 and 0 or st.cap
    else
        need = reader_need(st)
    end
    if fh then
        if found then return true, consumed, 0 end
        local want = need
        if want < 8192 then want = 8192 end
        if want > st.cap - #st.buf then want = st.cap - #st.buf end
        local chunk = want > 0 and fh:read(want) or nil
        if chunk then st.buf = st.buf .. chunk end
        return false, consumed, chunk and #chunk or 0
    end
    return found, consumed, need
end

function R.decode_message(...)
    if select("#", ...) ~= 2 then
        check_reader(...)
        argerror(0, "incorrect number of arguments")
    end
    local self, s = ...
    local st = check_reader(self, s)
    st.raw = nil
    if type(s) ~= "string" then error("buffer must be string", 2) end
    if s == "" then error("empty protobuf string", 2) end
    if not pb.valid(s) then error("invalid protobuf string", 2) end
    st.raw = s
end

function R.read_message(...)
    local n = select("#", ...)
    if n < 1 or n > 4 then error("read_message() incorrect number of arguments", 2) end
    local self, name, fi, ai = ...
    local st = check_reader(self, name, fi, ai)
    if n == 1 then error("heka_read_message() incorrect number of arguments", 2) end
    if type(name) ~= "string" then typeerror(2, "string", 0, ...) end
    fi = check_index(fi, 3, "field index", 0)
    ai = check_index(ai, 4, "array index", 0)
    if st.raw == nil then return nil end
    return pb.read(st.raw, name, fi, ai)
end

local function create_stream_reader(...)
    if select("#", ...) ~= 1 then argerror(0, "incorrect number of arguments") end
    local name = ...
    if type(name) ~= "string" and type(name) ~= "number" then typeerror(1, "string", 0, ...) end
    name = tostring(name)
    if #name >= 255 then argerror(1, "name is too long") end
    local ud = newproxy(reader_proto)
    readers[ud] = { name = name, buf = "", raw = nil, cap = max_message_size + 258 }
    return ud
end

-- the message a stream reader holds (what inject_message would take of it); nil for anything else
local function reader_message(ud)
    local st = readers[ud]
    return st and st.raw
end

return { create_stream_reader = create_stream_reader, check_reader = check_reader, reader_message = reader_message }
