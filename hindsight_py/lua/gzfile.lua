-- gzfile for hindsight-py: the API of lua_sandbox_extensions' C module (zlib's gzopen/gzgets), in
-- Lua on Debian's lua-zlib: gzip files are inflated as they are read, other files read as they are.
--
-- gzfile.open(filename[, mode[, buffer_size]]) -> gzf, or nil, "open failed"  (mode "rb")
-- gzfile.string(filename[, mode[, buffer_size[, max_bytes]]]) -> the whole (inflated) content;
--                                               raises "open failed", "max_bytes exceeded"
-- gzfile.version()                           -> "0.0.3"
-- gzf:lines([max_bytes])   -> iterator of lines, "\n" kept, each cut to max_bytes (default 1 MiB)
-- gzf:lines_tail([striplf]) -> iterator of complete lines only: a partial last line is kept back
--                             until a later call finds its end (the file grew), as tail does
-- gzf:seek([whence[, offset]]) -> the new offset in the inflated data ("set" or "cur"), or nil, err
-- gzf:close()

local _, host_api = ...
local string = require "string"
local math = require "math"
local table = require "table"
local standin = require "hindsight_py.standin"
local zlib = require "zlib"
local open = host_api and host_api.io_open or require("io").open
local sfind, ssub, sbyte = string.find, string.sub, string.byte
local tconcat = table.concat
local floor = math.floor
local type, select, setmetatable, getmetatable, tostring, pcall = type, select, setmetatable, getmetatable,
    tostring, pcall

local MT_NAME = "mozsvc.gzfile"
local CHUNK = 8192
local M = {}
local G = {}
local mt = { __index = G, __metatable = MT_NAME }

local argerror = standin.argerror

-- gzf: { fh, inflate (a lua-zlib stream, or false while the file is read as it is, nil until its
-- first bytes decide), buf (inflated bytes not consumed), pos (inflated offset of buf's start) }
local function fill(gzf)
    local fh = gzf.fh
    if not fh then return false end
    local data = fh:read(CHUNK)
    if not data or data == "" then return false end
    if gzf.inflate == nil then
        if sbyte(data, 1) == 0x1f and (#data < 2 or sbyte(data, 2) == 0x8b) then
            gzf.inflate = zlib.inflate(31)
        else
            gzf.inflate = false
        end
    end
    if gzf.inflate then
        local ok, out, eof = pcall(gzf.inflate, data)
        if not ok then error("gzfile error: " .. tostring(out), 0) end
        if eof then gzf.inflate = zlib.inflate(31) end -- a following gzip member
        data = out or ""
    end
    gzf.buf = gzf.buf .. data
    return true
end

local function optint(v, narg, fname, default)
    if v == nil then return default end
    if type(v) == "string" then v = tonumber(v) end
    if type(v) ~= "number" then argerror(narg, fname, "number expected, got " .. type(v)) end
    return v >= 0 and floor(v) or -floor(-v)
end

local function optstring(v, narg, fname, default)
    if v == nil then return default end
    if type(v) == "number" then return tostring(v) end
    if type(v) ~= "string" then argerror(narg, fname, "string expected, got " .. type(v)) end
    return v
end

local function check(self, max, given, fname)
    if getmetatable(self) ~= MT_NAME then
        argerror(1, fname, "mozsvc.gzfile expected, got " .. (given == 0 and "no value" or type(self)))
    end
    if given > max then argerror(0, fname, "incorrect number of arguments") end
end

local function open_file(fname, ...)
    local n = select("#", ...)
    local fn, mode, bsize = ...
    if n > 3 then argerror(0, fname, "incorrect number of arguments") end
    if type(fn) ~= "string" and type(fn) ~= "number" then
        argerror(1, fname, "string expected, got " .. (n == 0 and "no value" or type(fn)))
    end
    optstring(mode, 2, fname, "rb")
    bsize = optint(bsize, 3, fname, CHUNK)
    if not (bsize > 0) then argerror(3, fname, "buffer_size must be > 0") end
    local fh = open(tostring(fn), "rb")
    if not fh then return nil end
    return setmetatable({ fh = fh, buf = "", pos = 0 }, mt)
end

function M.open(...)
    local gzf = open_file("open", ...)
    if not gzf then return nil, "open failed" end
    return gzf
end

function M.string(...)
    local n = select("#", ...)
    if n > 4 then argerror(0, "string", "incorrect number of arguments") end
    local max_bytes = optint(select(4, ...), 4, "string", 1024 * 1024)
    if not (max_bytes > 0) then argerror(4, "string", "max_bytes must be > 0") end
    local gzf = open_file("string", (select(1, ...)), (select(2, ...)), (select(3, ...)))
    if not gzf then error("open failed", 0) end
    while fill(gzf) do
        if #gzf.buf > max_bytes then
            gzf.fh:close()
            error("max_bytes exceeded", 0)
        end
    end
    gzf.fh:close()
    return gzf.buf
end

function M.version() return "0.0.3" end

-- the next line (with its "\n") or what is left at the end; nil, partial when no "\n" came
local function next_line(gzf)
    local from = 1
    while true do
        local e = sfind(gzf.buf, "\n", from, true)
        if e then
            local line = ssub(gzf.buf, 1, e)
            gzf.buf = ssub(gzf.buf, e + 1)
            gzf.pos = gzf.pos + e
            return line
        end
        from = #gzf.buf + 1
        if not fill(gzf) then return nil end
    end
end

function G.lines(...)
    local self, max_bytes = ...
    check(self, 2, select("#", ...), "lines")
    max_bytes = optint(max_bytes, 2, "lines", 1024 * 1024)
    if not (max_bytes > 0) then argerror(2, "lines", "max_bytes must be > 0") end
    return function()
        if not self.fh then return nil end
        local line = next_line(self)
        if not line then -- the end: what is left, if anything
            line = self.buf
            self.pos = self.pos + #line
            self.buf = ""
            if line == "" then return nil end
        end
        return ssub(line, 1, max_bytes)
    end
end

function G.lines_tail(...)
    local self, striplf = ...
    check(self, 2, select("#", ...), "lines_tail")
    return function()
        if not self.fh then return nil end
        local line = next_line(self)
        if not line then return nil end -- a partial line stays in buf for a later call
        if striplf then line = ssub(line, 1, -2) end
        return line
    end
end

function G.seek(...)
    local self, whence, offset = ...
    check(self, 3, select("#", ...), "seek")
    whence = optstring(whence, 2, "seek", "set")
    if whence ~= "set" and whence ~= "cur" then argerror(2, "seek", "invalid option '" .. whence .. "'") end
    offset = optint(offset, 3, "seek", 0)
    if not self.fh then return nil, "file is closed" end
    local target = whence == "cur" and self.pos + offset or offset
    if target < 0 then return nil, "negative offset" end
    if target < self.pos then -- rewind: read again from the start
        self.fh:seek("set", 0)
        self.inflate, self.buf, self.pos = nil, "", 0
    end
    while self.pos + #self.buf < target do
        if not fill(self) then break end
    end
    local skip = target - self.pos
    if skip > #self.buf then skip = #self.buf end
    self.buf = ssub(self.buf, skip + 1)
    self.pos = self.pos + skip
    return self.pos
end

function G.close(...)
    local self = ...
    check(self, 1, select("#", ...), "close")
    if self.fh then
        self.fh:close()
        self.fh = nil
    end
    self.buf = ""
end

standin.finish(host_api, M, G) -- in the sandbox: uncounted, as upstream's C (env.lua)

return M
