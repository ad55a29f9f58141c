-- What plugins write: the payload buffer (print, add_to_payload, inject_payload), inject_message,
-- the buffer of encoded messages that reaches Python once per flush, refused messages and
-- dead_letter; and the plugin type's globals, installed here once every API function exists.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Returns what control.lua needs: flush,
-- refuse, start_message, set_inject_budget, set_input_checkpoint, dead_lettered, format_number.

local S = ...
local host, env, pb, builtin_libs = S.host, S.env, S.pb, S.builtin_libs
local plugin_type, log, log_level, output_limit, max_message_size = S.plugin_type, S.log, S.log_level,
    S.output_limit, S.max_message_size
local inject_cb = S.inject_cb
local argerror, typeerror = S.argerror, S.typeerror
local machinery, set_internal, restart_count, trip = S.machinery, S.set_internal, S.restart_count, S.trip
local create_stream_reader, check_reader, reader_message = S.create_stream_reader, S.check_reader,
    S.reader_message
local read_message, userdata_output, decode_message = S.read_message, S.userdata_output, S.decode_message
local create_message_matcher = S.create_message_matcher

local type, error, pcall, tostring, select, rawget = type, error, pcall, tostring, select, rawget
local sfind, sgsub, ssub, sformat = string.find, string.gsub, string.sub, string.format
local tconcat = table.concat
local floor, huge = math.floor, math.huge
local os_time = os.time

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
    local n = select("#", ...)
    if log_level ~= 7 or n == 0 then return end
    local to_s = rawget(env, "tostring") or tostring -- upstream calls the sandbox's global tostring
    local parts = {}
    for i = 1, n do
        local s = to_s((select(i, ...)))
        if type(s) ~= "string" and type(s) ~= "number" then
            error("'tostring' must return a string to 'print'", 2)
        end
        s = tostring(s)
        local nul = sfind(s, "\0", 1, true)
        if nul then s = ssub(s, 1, nul - 1) end
        parts[i] = sgsub(s, "[^\32-\126]", " ") -- isprint() in the C locale
    end
    log(7, tconcat(parts, "\t"))
end

local function format_number(x)
    if x ~= x then return "nan" end
    if x == huge then return "inf" end
    if x == -huge then return "-inf" end
    if x == floor(x) and x >= -2147483648 and x <= 2147483647 then return sformat("%d", x) end
    if x > 2147483647 or x < -2147483648 then return sformat("%.17g", x) end
    local s = sformat("%.8f", x)
    s = sgsub(s, "0+$", "")
    s = sgsub(s, "%.$", "")
    return s
end

-- overflow: inject_payload's function(i, s, ...), called before the output_limit error with the
-- part that did not fit (s, the i-th argument) and all the arguments
local function add_to_payload_from(first, depth, overflow, ...)
    for i = first, select("#", ...) do
        local v = select(i, ...)
        local t = type(v)
        local s
        if t == "string" then s = v
        elseif t == "number" then s = format_number(v)
        elseif t == "boolean" then s = v and "true" or "false"
        elseif t == "nil" then s = "nil"
        elseif t == "userdata" then
            s = userdata_output(v)
            if s == nil then argerror(i, "unknown userdata type", depth + 1) end
        else
            -- a table: only a C module stand-in's object (circular_buffer...) writes itself
            s = t == "table" and userdata_output(v)
            if not s then argerror(i, "unsupported type", depth + 1) end
        end
        payload_len = payload_len + #s
        if output_limit > 0 and payload_len > output_limit then
            if overflow then overflow(i, s, ...) end
            error("output_limit exceeded", depth + 3)
        end
        payload[#payload + 1] = s
    end
end

local function add_to_payload(...)
    if select("#", ...) == 0 then argerror(0, "must have at least one argument") end
    add_to_payload_from(1, 0, nil, ...)
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
penv.output_userdata = userdata_output

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

-- hindsight-py: a message the host refuses (a limit, an invalid message table) is not lost, whatever
-- the plugin does with the error (docs/delivery.md). It crosses to the host, which dead-letters it
-- (refused_messages = "dead_letter", the default) or counts it (= "drop"), and then the error is
-- raised as upstream raises it. An input's refusal is written when the plugin moves on: at its next
-- inject (whose checkpoint the record gets) or the next flush, always before a checkpoint passes it.
-- Only the refused path crosses: the normal path pays one nil check per inject.
local host_refused, host_settle = host.refused, host.settle_refused
local take_refused = host_refused ~= nil and host.refused_messages ~= "drop" -- the host keeps what it refuses
local refusal_pending = false
local last_cp = nil -- an input's checkpoint: the one it was started with, then the latest it passed

local function host_call(fn, ...)
    set_internal(true)
    local ok, r = pcall(fn, ...)
    set_internal(false)
    if not ok then
        -- the refused message could not be set aside: the call fails even if the plugin pcalls it
        trip("failed to write a refused message to the dead-letter file: " .. tostring(r))
    end
    return r
end

local function settle_refusal(next_cp)
    refusal_pending = false
    host_call(host_settle, next_cp)
end

-- msg: a message table, protobuf string, or nil (nothing that can be kept)
local function refuse(msg, reason)
    if host_refused == nil or msg == nil then return end
    if host_call(host_refused, reason, msg, last_cp) then refusal_pending = true end
end

local function flush()
    if refusal_pending then settle_refusal(nil) end
    if out_msgs == 0 and not have_cp then return end
    set_internal(true)
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
    set_internal(false)
end

-- After a message is queued: flush when the buffer is full, or when the second has changed (the
-- clock read every 64th `tick`), which keeps checkpoints and the queue at most about a second behind.
local function flush_if_due(tick)
    if out_msgs >= FLUSH_COUNT or out_bytes >= FLUSH_BYTES then
        flush()
    elseif tick % 64 == 0 and os_time() ~= last_flush_sec then
        flush()
    end
end

local function queue_framed(framed)
    out_n = out_n + 1
    out[out_n] = framed
    out_msgs = out_msgs + 1
    out_bytes = out_bytes + #framed
    flush_if_due(out_n)
end

local encode, encode_into = pb.encode, pb.encode_into

-- Encode a table straight into the flush buffer: no intermediate message string, no extra copy.
-- Run as the machinery (an error in the middle would corrupt the buffer): true, or false and the
-- encoder's error, or false, nil and the size of a message over max_message_size (the buffer as it was).
local function encode_queued(t)
    local ok, n2, size = pcall(encode_into, out, out_n, t, penv)
    if not ok then
        for i = out_n + 1, #out do out[i] = nil end
        return false, n2
    end
    if size > max_message_size then
        for i = out_n + 1, n2 do out[i] = nil end
        return false, nil, size
    end
    for i = out_n + 1, n2 do out_bytes = out_bytes + #out[i] end
    out_n = n2
    out_msgs = out_msgs + 1
    return true
end

-- Errors are raised at the caller of the API function (depth: frames between it and queue_table).
local function queue_table(t, what, depth)
    local ok, e, size = machinery(encode_queued, t)
    if ok == nil then error(what .. "() failed: called while a message is being encoded", 3 + (depth or 0)) end
    if not ok then
        if size then
            refuse(t, sformat("%s() failed: exceeded max_message_size (the message is %d bytes, "
                .. "max_message_size = %d)", what, size, max_message_size))
            error(what .. "() failed: exceeded max_message_size", 3 + (depth or 0))
        end
        local detail = ""
        if e == nil or e == "" then e, detail = "exceeded output_limit", sformat(" (output_limit = %d)", output_limit) end
        e = what .. "() failed: " .. tostring(e)
        refuse(t, e .. detail)
        error(e, 3 + (depth or 0))
    end
    flush_if_due(out_msgs)
end

-- The protobuf of message table t, or an error worded for `what` at the caller of the API function
-- (depth: the frames between encode_checked and that function).
local function encode_checked(t, what, empty_reason, depth, injecting)
    local ok, s = machinery(pcall, encode, t, penv)
    if ok == nil then error(what .. "() failed: called while a message is being encoded", depth + 3) end
    if not ok then
        local detail = ""
        if s == nil or s == "" then s, detail = empty_reason, sformat(" (output_limit = %d)", output_limit) end
        s = what .. "() failed: " .. tostring(s)
        if injecting then refuse(t, s .. detail) end
        error(s, depth + 3)
    end
    if #s > max_message_size then
        if injecting then
            refuse(t, sformat("%s() failed: exceeded max_message_size (the message is %d bytes, "
                .. "max_message_size = %d)", what, #s, max_message_size))
        end
        error(what .. "() failed: exceeded max_message_size", depth + 3)
    end
    return s
end

-- upstream's inject callbacks answer with lsb_heka_im_result: 2 checkpoint, 3 limit
local function callback_rejected(rv, depth)
    if rv == 3 and plugin_type ~= "input" then
        error("inject_message() failed: injection limit exceeded", depth + 3)
    elseif rv == 2 and plugin_type == "input" then
        error("inject_message() failed: checkpoint update", depth + 3)
    end
    error(sformat("inject_message() failed: rejected by the callback rv: %d", rv), depth + 3)
end

local PM_LIMIT = "process_message_inject_limit"
local inject_budget = -1 -- analysis only; -1 = unlimited
local inject_budget_limit, inject_budget_name = -1, PM_LIMIT -- for the dead letter

local function set_inject_budget(limit, name)
    inject_budget, inject_budget_limit, inject_budget_name = limit, limit, name
end

----------------------------------------------------------------------------------------------------
-- inject_message
----------------------------------------------------------------------------------------------------
-- what of an inject_message argument the host can keep: a table, a string, a stream reader's message
local function keepable(msg)
    local t = type(msg)
    if t == "table" or t == "string" then return msg end
    if t == "userdata" then return reader_message(msg) end
    return nil
end

local function inject_input(msg, cp)
    local ct = type(cp)
    if ct ~= "nil" and ct ~= "number" and ct ~= "string" then
        local e = "inject_message() unsupported checkpoint type: " .. ct
        refuse(keepable(msg), e)
        error(e, 2)
    end
    if refusal_pending then settle_refusal(cp) end -- the plugin moved on: cp is the one that skips it
    local t = type(msg)
    if inject_cb then -- upstream's per-message callback (test harness): encode, ask, then queue
        local raw
        if t == "table" then
            raw = encode_checked(msg, "inject_message", "exceeded output_limit", 0)
        elseif t == "userdata" then
            raw = check_reader(msg, cp).raw
            if not raw then error("inject_message() attempted to inject a nil message", 2) end
        elseif t == "string" then
            if not pb.valid(msg) then error("inject_message() attempted to inject a invalid protobuf string", 2) end
            raw = msg
        elseif t == "nil" then
            if cp == nil then error("inject_message() message cannot be nil without a checkpoint update", 2) end
        else
            error("inject_message() unsupported message type: " .. t, 2)
        end
        local rv = inject_cb(raw, cp)
        if rv ~= 0 then callback_rejected(rv, 0) end
        if raw then queue_framed(pb.frame(raw)) end
    elseif t == "table" then
        queue_table(msg, "inject_message")
    elseif t == "userdata" then
        local raw = check_reader(msg, cp).raw
        if not raw then error("inject_message() attempted to inject a nil message", 2) end
        queue_framed(pb.frame(raw))
    elseif t == "string" then
        if not pb.valid(msg) then
            refuse(msg, "inject_message() attempted to inject a invalid protobuf string")
            error("inject_message() attempted to inject a invalid protobuf string", 2)
        end
        queue_framed(pb.frame(msg))
    elseif t == "nil" then
        if cp == nil then error("inject_message() message cannot be nil without a checkpoint update", 2) end
    else
        error("inject_message() unsupported message type: " .. t, 2)
    end
    if cp ~= nil then
        if ct == "string" and #cp >= 8192 then error("inject_message() failed: checkpoint update", 2) end
        pending_cp = cp
        have_cp = true
        last_cp = cp
        if msg == nil then -- a shutdown sync point (upstream asks its host at every one)
            if out_msgs == 0 then running = host.is_running() end
            if not running then error("shutting down", 0) end -- a clean stop requested here
        end
    end
    -- hindsight-py: the instruction budget restarts at every inject, so a run-once input that reads a
    -- whole file in one call is never cut off in the middle (upstream silently loses lines there).
    restart_count()
end

-- analysis (and output with an inject callback): a table only. depth: as queue_table's.
local function inject_table_only(msg, depth)
    depth = depth or 0
    if type(msg) ~= "table" then typeerror(1, "table", depth, msg) end
    if inject_cb then
        local raw = encode_checked(msg, "inject_message", "exceeded output_limit", depth)
        local rv = inject_cb(raw, nil)
        if rv ~= 0 then callback_rejected(rv, depth) end
        queue_framed(pb.frame(raw))
        return
    end
    if inject_budget == 0 then
        refuse(msg, sformat("inject_message() failed: injection limit exceeded (%s = %d)", inject_budget_name,
            inject_budget_limit))
        error("inject_message() failed: injection limit exceeded", 2 + depth)
    end
    if inject_budget > 0 then inject_budget = inject_budget - 1 end
    queue_table(msg, "inject_message", depth)
end

env.decode_message = decode_message

-- hindsight-py extension: a message a plugin cannot pass on goes to the dead-letter file, with its
-- reason, and is counted; plugins test `if dead_letter then` to stay portable to upstream.
local dead_lettered = false -- the plugin called dead_letter() for the current message (run_batch)
env.dead_letter = function(reason, data)
    if type(reason) ~= "string" then typeerror(1, "string", 0, reason, data) end
    if data ~= nil and type(data) ~= "string" then typeerror(2, "string", 0, reason, data) end
    dead_lettered = true
    host.dead_letter(reason, data or "")
end

----------------------------------------------------------------------------------------------------
-- Per-type globals
----------------------------------------------------------------------------------------------------
if plugin_type == "input" then
    env.inject_message = inject_input
    env.is_running = function()
        if inject_cb then
            if inject_cb(nil, nil) ~= 0 then error("is_running() failed: rejected by the callback", 2) end
        end
        if out_msgs == 0 then
            running = host.is_running()
        end
        return running
    end
    env.create_stream_reader = create_stream_reader
elseif plugin_type == "analysis" then
    env.inject_message = function(msg) inject_table_only(msg, 1) end
    env.read_message = read_message
    env.add_to_payload = add_to_payload
    env.inject_payload = function(...)
        local n = select("#", ...)
        local ptype, pname = ...
        if n > 0 and type(ptype) ~= "string" then error("inject_payload() payload_type argument must be a string", 2) end
        if n > 1 and type(pname) ~= "string" then error("inject_payload() payload_name argument must be a string", 2) end
        if n > 2 then
            add_to_payload_from(3, 0, function(i, s, ...)
                -- the payload the host was handed goes to the dead-letter file whole: the buffer,
                -- this part and the parts after it (as text, however they would have failed)
                local whole = { tconcat(payload), s }
                for j = i + 1, select("#", ...) do
                    local v = select(j, ...)
                    local tv = type(v)
                    whole[#whole + 1] = tv == "string" and v or tv == "number" and format_number(v)
                        or tv == "userdata" and userdata_output(v) or tostring(v)
                end
                refuse({ Type = "inject_payload", Payload = tconcat(whole),
                    Fields = { payload_type = ptype or "txt", payload_name = pname } },
                    sformat("inject_payload() output_limit exceeded (output_limit = %d)", output_limit))
                if take_refused then clear_payload() end -- the host has it: it is not sent later
            end, ...)
        end
        if payload_len == 0 then return end
        -- built as upstream builds it (two hash slots up front), so `next` gives the same field order
        local fields = { payload_type = ptype or "txt", payload_name = pname }
        local msg = { Type = "inject_payload", Payload = tconcat(payload), Fields = fields }
        clear_payload()
        inject_table_only(msg, 1)
    end
else -- output
    if inject_cb then
        env.inject_message = function(msg) inject_table_only(msg, 1) end -- lsb_heka_create_output_im
    elseif host.inject_input then -- hindsight creates outputs with an inject callback (into the input queue)
        -- hindsight-py: an output may inject into the input queue (a table only)
        env.inject_message = function(msg)
            if type(msg) ~= "table" then typeerror(1, "table", 0, msg) end
            host.inject_input(pb.frame(encode_checked(msg, "inject_message", "exceeded output_limit", 0, true)))
        end
    end
    env.read_message = read_message
    env.encode_message = function(...)
        local n = select("#", ...)
        local t, framed = ...
        if n == 2 then
            if type(framed) ~= "boolean" then typeerror(2, "boolean", 0, ...) end
        elseif n ~= 1 then
            argerror(n, "incorrect number of arguments")
        end
        if type(t) ~= "table" then typeerror(1, "table", 0, ...) end
        local s = encode_checked(t, "encode_message", "buffer full", 0)
        if framed then s = pb.frame(s) end
        return s
    end
    env.create_message_matcher = create_message_matcher
end

-- inputs: a plugin that waits on a command (upstream's moz_telemetry_s3 test polls `ls` for the files
-- its injected messages produce) needs them in the queue first, as upstream writes each one at once;
-- hindsight-py batches them until process_message returns
if plugin_type == "input" then
    local base_io = builtin_libs.io
    builtin_libs.io = function()
        local t = base_io()
        local popen = t.popen
        t.popen = function(...)
            flush()
            return popen(...)
        end
        return t
    end
end

-- The start of a process_message call in a batch (control.lua): its inject_message budget.
local function start_message(inject_limit)
    inject_budget, inject_budget_limit, inject_budget_name = inject_limit, inject_limit, PM_LIMIT
    dead_lettered = false
end

-- an input's checkpoint as process_message starts (control.lua): what a refusal before its first
-- inject is recorded with
local function set_input_checkpoint(cp)
    last_cp = cp
end

-- whether the plugin dead-lettered the current message itself (control.lua)
local function plugin_dead_lettered()
    return dead_lettered
end

return {
    flush = flush, refuse = refuse, start_message = start_message, set_inject_budget = set_inject_budget,
    set_input_checkpoint = set_input_checkpoint, dead_lettered = plugin_dead_lettered,
    format_number = format_number,
}

