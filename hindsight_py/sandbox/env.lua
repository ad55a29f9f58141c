-- The Lua half of a hindsight-py sandbox.
--
-- Run once per plugin runtime, in the REAL global environment, with:
--   host: a table of Python callables and settings (see sandbox/lua.py)
--   pb:   the heka protobuf codec (heka_pb.lua)
--   cjson_shim: function(cjson_c) -> the sandbox flavour of cjson
-- It builds the plugin's environment (lua_sandbox's rules: base library only,
-- require limited to the configured paths, per-type removals) and returns a
-- control table the Python side drives. Everything on the per-message path
-- lives here so that Python and Lua cross once per batch, not once per message.

local host, pb, cjson_shim = ...

local real_G = _G
local type, pairs, ipairs, next, error, pcall, tostring, tonumber, select, setmetatable, getmetatable, rawget,
    setfenv, loadfile, unpack =
    type, pairs, ipairs, next, error, pcall, tostring, tonumber, select, setmetatable, getmetatable, rawget,
    setfenv, loadfile, unpack
local sfind, sgsub, ssub, sformat, sbyte, schar, slower = string.find, string.gsub, string.sub, string.format,
    string.byte, string.char, string.lower
local tconcat = table.concat
local floor = math.floor
local os_time = os.time
local io_open = io.open
local sethook = debug.sethook
local loadlib = package.loadlib

local plugin_type = host.plugin_type -- "input" | "analysis" | "output"
local plugin_name = host.name
local log = host.log
local log_level = host.log_level

----------------------------------------------------------------------------------------------------
-- Limits
----------------------------------------------------------------------------------------------------
-- The count hook fires every HOOK_STEP VM instructions, so the limit is exact to within one step;
-- a per-instruction hook would cost several times the plugin's own work.
local HOOK_STEP = 1000
local hook_budget = 0 -- steps allowed per call; 0 = unlimited
local hook_used = 0
local limit_tripped = nil -- set once the limit fires; the call is then failed even if the plugin pcall'ed it

local function instruction_hook()
    hook_used = hook_used + 1
    if hook_used > hook_budget then
        limit_tripped = "instruction_limit exceeded"
        error("instruction_limit exceeded", 0)
    end
end

local function set_instruction_limit(n)
    if n and n > 0 then
        hook_budget = math.ceil(n / HOOK_STEP)
        sethook(instruction_hook, "", HOOK_STEP)
    else
        hook_budget = 0
        sethook()
    end
end

local function reset_instructions()
    hook_used = 0
end

local output_limit = host.output_limit or 65536

----------------------------------------------------------------------------------------------------
-- The environment
----------------------------------------------------------------------------------------------------
local env = {}
for _, k in ipairs { "assert", "error", "gcinfo", "getfenv", "getmetatable", "ipairs", "next", "pairs", "pcall",
    "rawequal", "rawget", "rawset", "select", "setfenv", "setmetatable", "tonumber", "tostring", "type", "unpack",
    "xpcall" } do
    env[k] = real_G[k]
end
env._G = env
env._VERSION = _VERSION
if plugin_type ~= "analysis" then env.collectgarbage = collectgarbage end

local loaded = {}
local package_t = setmetatable({}, {})
env.package = package_t

local function seeall(m)
    setmetatable(m, { __index = env })
end
package_t.seeall = seeall

local function copy_table(t)
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
end

-- Built-in libraries become globals only when required, as in lua_sandbox; each sandbox gets its own
-- copy so that per-type removals never leak into the interpreter's own tables.
local function make_string_lib()
    local s = copy_table(string)
    s.dump = nil
    s.gfind = function() error("renamed to string.gmatch", 2) end
    return s
end

local function make_os_lib()
    local o = copy_table(os)
    o.exit = nil
    o.setlocale = nil
    if plugin_type == "analysis" then
        o.getenv, o.execute, o.remove, o.rename, o.tmpname = nil, nil, nil, nil, nil
    end
    return o
end

local function make_math_lib()
    local m = copy_table(math)
    m.erf = host.erf
    m.erfc = host.erfc
    if not m.mod then m.mod = math.fmod end
    return m
end

local disabled = {}
if plugin_type == "analysis" then
    disabled.io = true
    disabled.coroutine = true
end
for _, name in ipairs(host.disable_modules or {}) do disabled[name] = true end

local builtin_libs = {
    string = make_string_lib,
    table = function() return copy_table(table) end,
    math = make_math_lib,
    os = make_os_lib,
    io = function() return copy_table(io) end,
    coroutine = function() return copy_table(coroutine) end,
}

local function split_paths(p)
    local t = {}
    if type(p) == "string" then
        for entry in p:gmatch("[^;]+") do t[#t + 1] = entry end
    end
    return t
end

local user_path = split_paths(host.path)
local user_cpath = split_paths(host.cpath)
local bundled_path = split_paths(host.bundled_path)
local system_path = split_paths(host.system_path)
local system_cpath = split_paths(host.system_cpath)
local no_path = (host.path == nil or host.path == "")

local function readable(file)
    local fh = io_open(file, "rb")
    if fh then fh:close() return true end
    return false
end

local function search(paths, name)
    local fname = sgsub(name, "%.", "/")
    for _, template in ipairs(paths) do
        local file = sgsub(template, "%?", fname)
        if readable(file) then return file end
    end
    return nil
end

local function load_lua_module(file, name)
    local chunk, err = loadfile(file)
    if not chunk then error(err, 0) end
    setfenv(chunk, env)
    return chunk(name)
end

local function load_c_module(file, name)
    local sym = "luaopen_" .. sgsub(name, "%.", "_")
    local f, err = loadlib(file, sym)
    if not f then return nil, err end
    return f(name)
end

-- Modules lua_sandbox ships as C code that hindsight-py provides through Debian's builds.
local system_c_modules = { lpeg = true, cjson = true, ["socket.core"] = true, ["mime.core"] = true }

-- Elasticsearch 8+ and OpenSearch 2+ reject `_type` in bulk action lines, and CloudTracker's config sends
-- type_name = "doc". Whatever encoders.elasticsearch.common a user has (ours or upstream's), its action
-- lines lose `_type` unless the configured server is one that still accepts mapping types.
local function es_common_hook(m)
    if type(m) ~= "table" or type(rawget(m, "bulkapi_index_json")) ~= "function" then return m end
    local orig = m.bulkapi_index_json
    local drop = nil
    m.bulkapi_index_json = function(index, type_name, id, ns)
        if drop == nil then drop = host.drop_es_types() end
        if drop then type_name = nil end
        return orig(index, type_name, id, ns)
    end
    return m
end
local sandbox_require -- forward declaration: the hooks below load what the upstream versions loaded

-- lua_sandbox ships LuaSocket 3.0-rc1; hindsight-py uses Debian's 3.1. Two differences break plugins
-- written for the former: its mime.lua required "io" (making `io` a global plugins came to rely on),
-- and http.open(host, port) defaulted its third argument to socket.tcp.
local function mime_hook(m)
    if not disabled.io then sandbox_require("io") end
    return m
end

-- Bulk requests made through http.open (as upstream's elasticsearch_bulk_api.lua does, by hand) are
-- delivered by hindsight-py's bulk sender instead of the raw socket: retries with backoff, per-document
-- results, dead letters and counts, so even an unmodified upstream plugin never loses a document
-- silently. The plugin then sees a clean 200 with no errors. Every other request goes out unchanged.
local BULK_OK = '{"took":0,"errors":false,"items":[]}'

local function wrap_http_client(client, host_name, port)
    local takeover = false
    local body = nil
    local w = setmetatable({}, { __index = client })
    w.c = client.c
    function w:sendrequestline(method, uri)
        takeover = method == "POST" and type(uri) == "string" and sfind(uri, "/_bulk", 1, true) ~= nil
        if takeover then
            body = nil
            return 1
        end
        return client:sendrequestline(method, uri)
    end
    function w:sendheaders(headers)
        if takeover then return 1 end
        return client:sendheaders(headers)
    end
    function w:sendbody(headers, source, step)
        if not takeover then return client:sendbody(headers, source, step) end
        local parts = {}
        while true do
            local chunk, err = source()
            if chunk == nil then
                if err then return nil, err end
                break
            end
            if chunk ~= "" then parts[#parts + 1] = chunk end
        end
        body = tconcat(parts)
        return 1
    end
    function w:receivestatusline()
        if not takeover then return client:receivestatusline() end
        local ok, err = host.bulk_takeover(host_name, port, body or "")
        body = nil
        if not ok then error(err, 0) end
        return 200
    end
    function w:receiveheaders()
        if not takeover then return client:receiveheaders() end
        return { ["content-type"] = "application/json", ["content-length"] = tostring(#BULK_OK) }
    end
    function w:receivebody(headers, sink, step)
        if not takeover then return client:receivebody(headers, sink, step) end
        takeover = false
        sink(BULK_OK)
        sink(nil)
        return 1
    end
    return w
end

local function socket_http_hook(m)
    if type(m) ~= "table" or type(rawget(m, "open")) ~= "function" then return m end
    local orig = m.open
    local tcp = sandbox_require("socket").tcp
    m.open = function(host_name, port, create)
        local client = orig(host_name, port, create or tcp)
        return wrap_http_client(client, host_name, port)
    end
    return m
end

local module_hooks = {
    ["encoders.elasticsearch.common"] = es_common_hook,
    mime = mime_hook,
    ["socket.http"] = socket_http_hook,
}

local function finish_module(name, result)
    if result == nil then result = rawget(loaded, name) or true end
    if type(result) == "table" and getmetatable(result) == nil then
        -- an empty metatable keeps module tables out of preserved state, as lua_sandbox does
        setmetatable(result, {})
    end
    local hook = module_hooks[name]
    if hook then result = hook(result) or result end
    loaded[name] = result
    if not sfind(name, ".", 1, true) and type(result) == "table" and rawget(env, name) == nil then
        env[name] = result -- C modules register themselves as globals; keep that for our replacements
    end
    return result
end

local require_stack = {}

function sandbox_require(name)
    if type(name) ~= "string" then error("bad argument #1 to 'require' (string expected)", 2) end
    if not sfind(name, "^[%w_.]+$") then error("invalid module name '" .. name .. "'", 2) end
    local v = loaded[name]
    if v ~= nil then return v end
    if disabled[name] then error(sformat("module '%s' disabled", name), 2) end

    local lib = builtin_libs[name]
    if lib then
        local t = setmetatable(lib(), {})
        loaded[name] = t
        env[name] = t
        return t
    end
    local provided = host.preload_provider(name)
    if provided ~= nil then return finish_module(name, provided) end
    if no_path then
        error("no 'path' configuration was specified for the sandbox; external modules have been disabled", 2)
    end
    if require_stack[name] then error("loop or previous error loading module '" .. name .. "'", 2) end
    require_stack[name] = true

    local ok, result = pcall(function()
        local file = search(user_path, name)
        if file then return finish_module(name, load_lua_module(file, name)) end
        file = search(user_cpath, name)
        if file then
            local r, err = load_c_module(file, name)
            if r ~= nil then return finish_module(name, r) end
            -- a .so built against lua_sandbox's private API cannot load in stock Lua: fall back to ours
            log(7, sformat("%s: %s not usable (%s); using hindsight-py's %s", plugin_name, file, tostring(err), name))
        end
        file = search(bundled_path, name)
        if file then return finish_module(name, load_lua_module(file, name)) end
        if system_c_modules[name] then
            file = search(system_cpath, name)
            if file then
                local r, err = load_c_module(file, name)
                if r == nil then error(err, 0) end
                if name == "cjson" then r = cjson_shim(r, { output_limit = output_limit }) end
                return finish_module(name, r)
            end
        end
        file = search(system_path, name)
        if file then return finish_module(name, load_lua_module(file, name)) end
        error(sformat("module '%s' not found", name), 0)
    end)
    require_stack[name] = nil
    if not ok then error(result, 2) end
    return result
end
env.require = sandbox_require

env.module = function(name, ...)
    local m = loaded[name]
    if type(m) ~= "table" then
        m = env
        for part in name:gmatch("[^.]+") do
            local child = rawget(m, part)
            if child == nil then
                child = {}
                m[part] = child
            end
            m = child
        end
        loaded[name] = m
    end
    m._NAME = name
    m._M = m
    m._PACKAGE = sgsub(name, "[^.]+$", "")
    for i = 1, select("#", ...) do
        local f = select(i, ...)
        f(m)
    end
    setfenv(2, m)
    return m
end

----------------------------------------------------------------------------------------------------
-- Config
----------------------------------------------------------------------------------------------------
local config = {}
do
    local chunk, err = loadstring(host.runtime_cfg, "=" .. plugin_name .. ".rtc")
    if not chunk then error(err, 0) end
    setfenv(chunk, config)
    chunk()
end

env.read_config = function(...)
    local n = select("#", ...)
    if n ~= 1 then error(n == 0 and "read_config() must have a single argument" or "too many arguments", 2) end
    local k = ...
    if type(k) ~= "string" then error("bad argument #1 to 'read_config' (string expected)", 2) end
    return config[k]
end

----------------------------------------------------------------------------------------------------
-- print and the payload buffer
----------------------------------------------------------------------------------------------------
local payload = {}
local payload_len = 0

local function clear_payload()
    if payload_len > 0 or #payload > 0 then
        payload = {}
        payload_len = 0
    end
end

env.print = function(...)
    clear_payload()
    if log_level < 7 then return end
    local parts = {}
    for i = 1, select("#", ...) do
        local s = tostring((select(i, ...)))
        local nul = sfind(s, "\0", 1, true)
        if nul then s = ssub(s, 1, nul - 1) end
        parts[i] = sgsub(s, "[%c\127-\255]", " ")
    end
    log(7, tconcat(parts, "\t"))
end

local function format_number(x)
    if x ~= x then return "nan" end
    if x == math.huge then return "inf" end
    if x == -math.huge then return "-inf" end
    if x == floor(x) and x >= -2147483648 and x <= 2147483647 then return sformat("%d", x) end
    if x > 2147483647 or x < -2147483648 then return sformat("%.17g", x) end
    local s = sformat("%.8f", x)
    s = sgsub(s, "0+$", "")
    s = sgsub(s, "%.$", "")
    return s
end

local function add_to_payload(...)
    local n = select("#", ...)
    if n == 0 then error("add_to_payload() must have at least one argument", 2) end
    for i = 1, n do
        local v = select(i, ...)
        local t = type(v)
        local s
        if t == "string" then s = v
        elseif t == "number" then s = format_number(v)
        elseif t == "boolean" then s = v and "true" or "false"
        elseif t == "nil" then s = "nil"
        else error("add_to_payload() unsupported type", 2) end
        payload_len = payload_len + #s
        if output_limit > 0 and payload_len > output_limit then
            error("output_limit exceeded", 2)
        end
        payload[#payload + 1] = s
    end
end

----------------------------------------------------------------------------------------------------
-- The message codec environment and injection
----------------------------------------------------------------------------------------------------
local random_pool = ""
local random_pos = 1
local penv = {
    restricted = host.restricted_headers,
    logger = host.logger,
    hostname = host.hostname,
    pid = host.pid,
    now_ns = host.now_ns(),
    output_limit = output_limit,
}
penv.random16 = function()
    if random_pos + 15 > #random_pool then
        random_pool = host.random_uuids(1024)
        random_pos = 1
    end
    local s = ssub(random_pool, random_pos, random_pos + 15)
    random_pos = random_pos + 16
    return s
end
penv.random_uuid = penv.random16 -- the pool already carries the v4 version and variant bits

-- Encoded, framed messages wait here until the next flush; one Python crossing carries them all.
local out = {}
local out_n = 0 -- pieces in `out` (a message may take several)
local out_msgs = 0 -- messages in `out`
local out_bytes = 0
local pending_cp = nil
local have_cp = false
local last_flush_sec = os_time()
local running = true
local FLUSH_COUNT = host.flush_count or 1000
local FLUSH_BYTES = host.flush_bytes or (256 * 1024)
local max_message_size = host.max_message_size or 65536

local function flush()
    if out_msgs == 0 and not have_cp then return end
    local data = out_n > 0 and tconcat(out, "", 1, out_n) or ""
    local n = out_msgs
    for i = 1, out_n do out[i] = nil end
    out_n = 0
    out_msgs = 0
    out_bytes = 0
    local cp, hc = pending_cp, have_cp
    have_cp = false
    local keep_running, now_ns = host.flush(data, n, cp, hc)
    running = keep_running
    penv.now_ns = now_ns
    last_flush_sec = os_time()
end

local function queue_framed(framed)
    out_n = out_n + 1
    out[out_n] = framed
    out_msgs = out_msgs + 1
    out_bytes = out_bytes + #framed
    if out_msgs >= FLUSH_COUNT or out_bytes >= FLUSH_BYTES then
        flush()
    elseif out_n % 64 == 0 and os_time() ~= last_flush_sec then
        flush() -- keeps checkpoints and the queue at most about a second behind
    end
end

local encode_into = pb.encode_into

-- Encode a table straight into the flush buffer: no intermediate message string, no extra copy.
local function queue_table(t, what)
    local ok, n2, size = pcall(encode_into, out, out_n, t, penv)
    if not ok then
        for i = out_n + 1, #out do out[i] = nil end
        local e = n2
        if e == nil or e == "" then e = "exceeded output_limit" end
        error(what .. "() failed: " .. tostring(e), 3)
    end
    if size > max_message_size then
        for i = out_n + 1, n2 do out[i] = nil end
        error(what .. "() failed: exceeded max_message_size", 3)
    end
    for i = out_n + 1, n2 do out_bytes = out_bytes + #out[i] end
    out_n = n2
    out_msgs = out_msgs + 1
    if out_msgs >= FLUSH_COUNT or out_bytes >= FLUSH_BYTES then
        flush()
    elseif out_msgs % 64 == 0 and os_time() ~= last_flush_sec then
        flush() -- keeps checkpoints and the queue at most about a second behind
    end
end

local function encode_checked(t, what)
    local ok, s = pcall(pb.encode, t, penv)
    if not ok then
        if s == nil or s == "" then s = "exceeded output_limit" end
        error(what .. "() failed: " .. tostring(s), 3)
    end
    if #s > max_message_size then
        error(what .. "() failed: exceeded max_message_size", 3)
    end
    return s
end

local stream_reader_mt = {} -- forward declared; set below

local inject_budget = -1 -- analysis only; -1 = unlimited

local function inject_input(msg, cp)
    local t = type(msg)
    if t == "table" then
        local mt = getmetatable(msg)
        if mt == stream_reader_mt then
            local raw = msg._raw
            if not raw then error("inject_message() failed: the stream reader has no message", 2) end
            queue_framed(pb.frame(raw))
        else
            queue_table(msg, "inject_message")
        end
    elseif t == "string" then
        if not pb.valid(msg) then error("inject_message() attempted to inject a invalid protobuf string", 2) end
        queue_framed(pb.frame(msg))
    elseif t == "nil" then
        if cp == nil then error("inject_message() message cannot be nil without a checkpoint update", 2) end
    else
        error("inject_message() unsupported message type", 2)
    end
    if cp ~= nil then
        local ct = type(cp)
        if ct ~= "number" and ct ~= "string" then error("inject_message() unsupported checkpoint type", 2) end
        if ct == "string" and #cp >= 8192 then error("inject_message() failed: checkpoint update", 2) end
        pending_cp = cp
        have_cp = true
        if msg == nil and not running then
            error("shutting down", 0)
        end
    end
    -- hindsight-py: the instruction budget restarts at every inject, so a run-once input that reads a
    -- whole file in one call is never cut off in the middle (upstream silently loses lines there).
    hook_used = 0
end

local function inject_table_only(msg)
    if type(msg) ~= "table" then error("inject_message() unsupported message type", 2) end
    if inject_budget == 0 then error("inject_message() failed: injection limit exceeded", 2) end
    if inject_budget > 0 then inject_budget = inject_budget - 1 end
    queue_table(msg, "inject_message")
end

----------------------------------------------------------------------------------------------------
-- The current message (analysis and output)
----------------------------------------------------------------------------------------------------
local current = nil

local function read_message(name, fi, ai, zc)
    if type(name) ~= "string" then error("bad argument #1 to 'read_message' (string expected)", 2) end
    if zc ~= nil and type(zc) ~= "boolean" then error("bad argument #4 to 'read_message' (boolean expected)", 2) end
    if current == nil then return nil end
    return pb.read(current, name, fi or 0, ai or 0)
end

env.decode_message = function(s)
    if type(s) ~= "string" then error("bad argument #1 to 'decode_message' (string expected)", 2) end
    local ok, t = pcall(pb.decode, s)
    if not ok then error(t, 2) end
    return t
end

-- hindsight-py extension: a message a plugin cannot pass on goes to the dead-letter file, with its
-- reason, and is counted; plugins test `if dead_letter then` to stay portable to upstream.
env.dead_letter = function(reason, data)
    if type(reason) ~= "string" then error("bad argument #1 to 'dead_letter' (string expected)", 2) end
    if data ~= nil and type(data) ~= "string" then error("bad argument #2 to 'dead_letter' (string expected)", 2) end
    host.dead_letter(reason, data or "")
end

----------------------------------------------------------------------------------------------------
-- Per-type globals
----------------------------------------------------------------------------------------------------
if plugin_type == "input" then
    env.inject_message = inject_input
    env.is_running = function()
        if out_msgs == 0 then
            running = host.is_running()
        end
        return running
    end

    -- Stream reader: hindsight-py keeps the framing logic in Lua; the Python side is not involved.
    stream_reader_mt.__index = {}
    local R = stream_reader_mt.__index
    env.create_stream_reader = function(name)
        if type(name) ~= "string" or #name >= 255 then error("create_stream_reader() invalid name", 2) end
        return setmetatable({ _name = name, _buf = "", _raw = nil, _cap = max_message_size + 258 }, stream_reader_mt)
    end
    R.find_message = function(self, buf, decode)
        local read_bytes = 0
        if type(buf) == "string" then
            self._buf = self._buf .. buf
        elseif type(buf) == "userdata" then
            local chunk = buf:read(8192)
            if chunk then
                read_bytes = #chunk
                self._buf = self._buf .. chunk
            end
        elseif buf ~= nil then
            error("find_message() buffer must be a string, nil or a file handle", 2)
        end
        local found, consumed, raw = pb.find_framed(self._buf, max_message_size)
        self._buf = ssub(self._buf, consumed + 1)
        if found then
            if decode ~= false then
                local ok = pcall(pb.decode, raw)
                if not ok then found = false end
            end
            if found then self._raw = raw end
        end
        if type(buf) == "userdata" then return found, consumed, read_bytes end
        return found, consumed, found and 0 or (#self._buf > 0 and 1 or 0)
    end
    R.decode_message = function(self, s)
        if type(s) ~= "string" or s == "" then error("decode_message() requires a non empty string", 2) end
        local ok, err = pcall(pb.decode, s)
        if not ok then error(err, 2) end
        self._raw = s
    end
    R.read_message = function(self, name, fi, ai)
        if self._raw == nil then return nil end
        return pb.read(self._raw, name, fi or 0, ai or 0)
    end
elseif plugin_type == "analysis" then
    env.inject_message = inject_table_only
    env.read_message = read_message
    env.add_to_payload = add_to_payload
    env.inject_payload = function(ptype, pname, ...)
        if ptype ~= nil and type(ptype) ~= "string" then error("inject_payload() payload_type argument must be a string", 2) end
        if pname ~= nil and type(pname) ~= "string" then error("inject_payload() payload_name argument must be a string", 2) end
        if select("#", ...) > 0 then add_to_payload(...) end
        if payload_len == 0 then return end
        local fields = { payload_type = ptype or "txt" }
        if pname then fields.payload_name = pname end
        local msg = { Type = "inject_payload", Payload = tconcat(payload), Fields = fields }
        clear_payload()
        inject_table_only(msg)
    end
else -- output
    env.inject_message = function(msg)
        if type(msg) ~= "table" then error("inject_message() unsupported message type", 2) end
        host.inject_input(pb.frame(encode_checked(msg, "inject_message")))
    end
    env.read_message = read_message
    env.encode_message = function(t, framed)
        if type(t) ~= "table" then error("bad argument #1 to 'encode_message' (table expected)", 2) end
        local s = encode_checked(t, "encode_message")
        if framed then s = pb.frame(s) end
        return s
    end
    env.create_message_matcher = function(expr)
        if type(expr) ~= "string" then error("bad argument #1 to 'create_message_matcher' (string expected)", 2) end
        local m = host.create_matcher(expr)
        if not m then error("invalid message matcher expression", 2) end
        return {
            eval = function()
                if current == nil then error("no active message", 2) end
                return m(current)
            end,
        }
    end
end

----------------------------------------------------------------------------------------------------
-- Output checkpointing (batching and async)
----------------------------------------------------------------------------------------------------
local batching = false
local commit_index = 0 -- index into the current batch of the last committable message
local cur_index = 0
local acks = {}
local acks_n = 0
local async_size = host.async_buffer_size or 0
local failures = 0
local seq_counter = 0

if plugin_type == "output" then
    env.update_checkpoint = function(...)
        local n = select("#", ...)
        if n == 0 then
            if batching then
                batching = false
                if cur_index > 0 then
                    commit_index = cur_index -- reported when the batch returns
                else
                    host.commit_now() -- from timer_event: everything processed so far
                end
            end
        elseif n <= 2 then
            local seq, fails = ...
            if type(seq) ~= "number" then error("update_checkpoint() sequence_id must be a number", 2) end
            acks_n = acks_n + 1
            acks[acks_n] = seq
            if fails ~= nil then
                if type(fails) ~= "number" then error("update_checkpoint() failures must be a number", 2) end
                failures = failures + fails
            end
        else
            error("update_checkpoint() invalid number of arguments", 2)
        end
    end
end

----------------------------------------------------------------------------------------------------
-- Control: what Python calls
----------------------------------------------------------------------------------------------------
local control = {}

local function check_rc(what, ok, rc, msg)
    if not ok then return false, what .. "() " .. tostring(rc) end
    if limit_tripped then return false, what .. "() " .. limit_tripped end
    if type(rc) ~= "number" then return false, what .. "() must return a numeric status code" end
    if msg ~= nil and type(msg) ~= "string" then
        return false, what .. "() must return a nil or string error message"
    end
    return true, rc, msg
end

function control.load_plugin(source_path)
    local chunk, err = loadfile(source_path)
    if not chunk then return false, err end
    setfenv(chunk, env)
    reset_instructions()
    local ok, e = pcall(chunk)
    if limit_tripped then return false, limit_tripped end
    if not ok then return false, tostring(e) end
    if type(rawget(env, "process_message")) ~= "function" then
        return false, "process_message() function was not found"
    end
    return true, nil
end

function control.set_instruction_limit(n)
    set_instruction_limit(n)
end

-- input: one call of process_message(checkpoint)
function control.run_input(cp)
    reset_instructions()
    local ok, rc, msg = pcall(env.process_message, cp)
    local good, a, b = check_rc("process_message", ok, rc, msg)
    if not good and a == "process_message() shutting down" then good, a, b = true, 0, nil end
    local flush_ok, flush_err = pcall(flush)
    if not flush_ok then return false, tostring(flush_err) end
    return good, a, b
end

-- analysis and output: process a batch of raw messages handed over in one crossing.
-- Returns: processed, status, err, commit_index, failures, batching
--   status "ok" | "retry" (the message at processed+1 asked for -3) | "terminate" (err set)
function control.run_batch(msgs, n, inject_limit)
    local pm = env.process_message
    commit_index = 0
    local fails_before = failures
    for i = 1, n do
        current = msgs[i]
        cur_index = i
        reset_instructions()
        inject_budget = inject_limit
        seq_counter = seq_counter + 1
        local ok, rc, msg = pcall(pm, seq_counter)
        local good, a, b = check_rc("process_message", ok, rc, msg)
        if not good then
            current = nil
            flush()
            return i - 1, "terminate", a, commit_index, failures - fails_before, batching
        end
        rc = a
        if rc == 0 then
            batching = false
            commit_index = i
        elseif rc == -1 or rc == -2 then
            if rc == -1 then
                failures = failures + 1
                if b then log(4, sformat("received: %d msg: %s", rc, b)) end
            end
            if not batching and async_size == 0 then commit_index = i end
        elseif rc == -3 then
            current = nil
            flush()
            return i - 1, "retry", b, commit_index, failures - fails_before, batching
        elseif rc == -4 then
            batching = true
        elseif rc == -5 then
            if async_size == 0 then
                current = nil
                return i - 1, "terminate", "cannot use async checkpointing without a configured buffer",
                    commit_index, failures - fails_before, batching
            end
        elseif rc > 0 then
            current = nil
            flush()
            return i - 1, "terminate", "process_message() received a termination status code", commit_index,
                failures - fails_before, batching
        else
            if b then log(4, sformat("received: %d msg: %s", rc, b)) end
        end
    end
    current = nil
    flush()
    return n, "ok", nil, commit_index, failures - fails_before, batching
end

function control.take_acks()
    if acks_n == 0 then return nil end
    local a = acks
    acks = {}
    acks_n = 0
    return a
end

function control.seq_counter()
    return seq_counter
end

function control.run_timer(ns, shutdown, inject_limit)
    local te = rawget(env, "timer_event")
    if type(te) ~= "function" then
        if shutdown and plugin_type ~= "input" then
            return false, "timer_event() function was not found"
        end
        return true, nil
    end
    reset_instructions()
    inject_budget = inject_limit
    cur_index = 0
    local ok, err = pcall(te, ns, shutdown)
    flush()
    if limit_tripped then return false, "timer_event() " .. limit_tripped end
    if not ok then return false, "timer_event() " .. tostring(err) end
    return true, nil
end

function control.has_timer()
    return type(rawget(env, "timer_event")) == "function"
end

function control.set_running(flag)
    running = flag
end

function control.env()
    return env
end

----------------------------------------------------------------------------------------------------
-- preserve_data: lua_sandbox's .data format (Lua source that rebuilds the globals)
----------------------------------------------------------------------------------------------------
local function serialize_value(v)
    local t = type(v)
    if t == "string" then return sformat("%q", v) end
    if t == "number" then
        if v ~= v then return "0/0" end
        if v == math.huge then return "1/0" end
        if v == -math.huge then return "-1/0" end
        return format_number(v)
    end
    if t == "boolean" then return v and "true" or "false" end
    return nil
end

local function key_literal(k)
    if type(k) == "string" then return sformat("[%q]", k) end
    if type(k) == "number" then
        local s = serialize_value(k)
        return s and ("[" .. s .. "]") or nil
    end
    if type(k) == "boolean" then return k and "[true]" or "[false]" end
    return nil
end

function control.serialize_state()
    local lines = { sformat("if _PRESERVATION_VERSION and _PRESERVATION_VERSION ~= %d then return end",
        floor(tonumber(rawget(env, "_PRESERVATION_VERSION")) or 0)) }
    local seen = { [env] = true }
    local skip = { _PRESERVATION_VERSION = true, _VERSION = true, _G = true }
    local function walk(path, tbl)
        for k, v in next, tbl do
            local kl = key_literal(k)
            if kl and not (tbl == env and skip[k]) then
                local p = path .. kl
                local vt = type(v)
                if vt == "table" then
                    if seen[v] then
                        if type(seen[v]) == "string" then lines[#lines + 1] = p .. " = " .. seen[v] end
                    elseif getmetatable(v) == nil then
                        seen[v] = p
                        if next(v) == nil and host.is_array_table and host.is_array_table(v) then
                            lines[#lines + 1] = p .. " = {nil}"
                        else
                            lines[#lines + 1] = p .. " = {}"
                        end
                        walk(p, v)
                    end
                else
                    local s = serialize_value(v)
                    if s then lines[#lines + 1] = p .. " = " .. s end
                end
            end
        end
    end
    walk("_G", env)
    return tconcat(lines, "\n") .. "\n"
end

function control.restore_state(path)
    local chunk, err = loadfile(path)
    if not chunk then return false, "restore_global_data " .. tostring(err) end
    setfenv(chunk, env)
    sethook() -- lua_sandbox restores with the limits off
    local ok, e = pcall(chunk)
    set_instruction_limit(host.instruction_limit)
    if not ok then return false, "restore_global_data " .. tostring(e) end
    return true, nil
end

return control
