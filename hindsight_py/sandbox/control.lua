-- The control table: what Python calls. Loading the plugin, a batch of messages for analysis and
-- outputs (run_batch, with the data-time timer), a call of an input's process_message, timer_event,
-- output checkpointing (update_checkpoint, acks), and preserve_data's save and restore.
--
-- A part of the sandbox's host code (env.lua loads it, as host code, with the shared table `S`;
-- everything is captured into locals here, at load time). Installs update_checkpoint for outputs;
-- returns the control table. Everything a batch does per message is in locals here.

local S = ...
local host, env, std, plugin_type, log, HOST_SOURCE = S.host, S.env, S.std, S.plugin_type, S.log, S.HOST_SOURCE
local ucp_cb, preservers = S.ucp_cb, S.preservers
local typeerror = S.typeerror
local set_instruction_limit, reset_instructions, tripped, check_rc, error_text = S.set_instruction_limit,
    S.reset_instructions, S.tripped, S.check_rc, S.error_text
local read_source, loadfile51 = S.read_source, S.loadfile51
local set_current, zero_copy_value = S.set_current, S.zero_copy_value
local flush_written_files = S.flush_written_files
local flush, refuse, start_message, set_inject_budget = S.flush, S.refuse, S.start_message, S.set_inject_budget
local set_input_checkpoint, dead_lettered, format_number = S.set_input_checkpoint, S.dead_lettered,
    S.format_number
local pb_timestamp = S.pb.timestamp

local type, next, error, assert, pcall, tostring, select, setmetatable, getmetatable, rawget, setfenv,
    loadstring = type, next, error, assert, pcall, tostring, select, setmetatable, getmetatable, rawget, setfenv,
    loadstring
local sformat = string.format
local tconcat = table.concat
local floor, huge = math.floor, math.huge
local sethook = debug.sethook

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
        local seq, fails = ...
        if n > 2 then error(sformat("update_checkpoint() invalid number of args: %d", n), 2) end
        if n == 2 and type(fails) ~= "number" then typeerror(2, "number", 0, ...) end
        if n >= 1 and type(seq) ~= "number" then typeerror(1, "sequence_id", 0, ...) end
        if ucp_cb then
            if ucp_cb(seq) ~= 0 then error("update_checkpoint() failed: rejected by the callback", 2) end
        end
        if n == 0 then
            if batching then
                batching = false
                if cur_index > 0 then
                    commit_index = cur_index -- reported when the batch returns
                else
                    host.commit_now() -- from timer_event: everything processed so far
                end
            end
            return
        end
        acks_n = acks_n + 1
        acks[acks_n] = seq
        if n == 2 then failures = failures + fails end
    end
end

----------------------------------------------------------------------------------------------------
-- Control: what Python calls
----------------------------------------------------------------------------------------------------
local control = {}
function control.flush_files() flush_written_files() end

local PM_NOT_FOUND = "process_message() function was not found"

function control.load_plugin(source_path)
    local chunk, err = loadfile51(source_path)
    if not chunk then return false, err end
    setfenv(chunk, env)
    reset_instructions()
    local ok, e = pcall(chunk)
    flush() -- what the top-level chunk injected is written, as upstream writes it at once
    local tripped_by = tripped()
    if tripped_by then return false, tripped_by end
    if not ok then return false, error_text(e) end
    return true, nil -- as upstream, a missing process_message is found out when it is called
end

function control.set_instruction_limit(n)
    set_instruction_limit(n)
end

-- input: one call of process_message(checkpoint)
function control.run_input(cp)
    local pm = rawget(env, "process_message")
    if type(pm) ~= "function" then return false, PM_NOT_FOUND end
    reset_instructions()
    set_input_checkpoint(cp)
    local ok, rc, msg = pcall(pm, cp)
    local good, a, b = check_rc("process_message", ok, rc, msg)
    if not good and a == "process_message() shutting down" then good, a, b = true, 0, nil end
    local flush_ok, flush_err = pcall(flush)
    if not flush_ok then return false, tostring(flush_err) end
    return good, a, b
end

-- analysis and output: process a batch of raw messages handed over in one crossing.
-- Returns: processed, status, err, commit_index, failures, batching
--   status "ok" | "retry" (the message at processed+1 asked for -3) | "terminate" (err set)
-- index: the message of the current batch the timer runs after (0: between batches), so that an
-- update_checkpoint() inside timer_event commits exactly what was processed before it.
local function fire_timer(ns, shutdown, inject_limit, index)
    local te = rawget(env, "timer_event")
    if type(te) ~= "function" then return false, "timer_event() function was not found" end
    reset_instructions()
    set_inject_budget(inject_limit, "timer_event_inject_limit")
    cur_index = index
    local ok, err = pcall(te, ns, shutdown)
    flush()
    local tripped_by = tripped()
    if tripped_by then return false, "timer_event() " .. tripped_by end
    if not ok then return false, "timer_event() " .. tostring(err) end
    return true, nil
end

function control.run_timer(ns, shutdown, inject_limit)
    return fire_timer(ns, shutdown, inject_limit, 0)
end

-- hindsight_cli's timers run on data time: "now" is the newest message Timestamp seen (whole
-- seconds), the first timer is due at the first message, and the check follows every message.
local ticker = 0
local timer_inject_limit = -1
local next_due = nil
local data_now = 0

function control.set_ticker(seconds, inject_limit)
    ticker = seconds or 0
    timer_inject_limit = inject_limit or -1
end

function control.data_now()
    return data_now
end

-- The timer is due (data_now has reached next_due): fire it after message i.
local function data_timer(i)
    next_due = data_now + ticker
    return fire_timer(data_now * 1e9, false, timer_inject_limit, i)
end

-- How a batch ends: run_batch's values, the current message cleared (and the injected flushed).
local function batch_end(processed, status, err, fails_before, flushing)
    set_current(nil)
    if flushing then flush() end
    return processed, status, err, commit_index, failures - fails_before, batching
end

-- A message whose process_message did not end the usual way (status 0, no error text): what its
-- status asks for. Returns nil to go on with the batch, or how the batch ends there (run_batch's
-- status and error, and whether the injected are flushed).
local function unusual_end(msgs, i, ok, rc, msg)
    local good, a, b = check_rc("process_message", ok, rc, msg)
    if not good then return "terminate", a, true end
    rc = a
    if rc == 0 then
        batching = false
        commit_index = i
    elseif rc == -1 or rc == -2 then
        if rc == -1 then
            failures = failures + 1
            if b then log(4, sformat("received: %d msg: %s", rc, b)) end
            -- an output that failed a message has not delivered it: the host keeps it, unless the
            -- plugin dead-lettered it itself (hindsight-py's elasticsearch_bulk_api.lua does)
            if plugin_type == "output" and not dead_lettered() then
                refuse(msgs[i], b and "process_message() returned -1: " .. tostring(b)
                    or "process_message() returned -1")
            end
        end
        if not batching and async_size == 0 then commit_index = i end
    elseif rc == -3 then
        return "retry", b, true
    elseif rc == -4 then
        batching = true
    elseif rc == -5 then
        if async_size == 0 then
            return "terminate", "cannot use async checkpointing without a configured buffer", false
        end
    elseif rc > 0 then
        return "terminate", "process_message() received a termination status code", true
    else
        if b then log(4, sformat("received: %d msg: %s", rc, b)) end
    end
    return nil
end

-- The loop runs in LuaJIT's interpreter whenever an instruction limit is set (it calls the plugin,
-- whose code is never compiled then), where every bytecode passes the count hook's dispatcher: the
-- usual message (status 0, no error text, the limit not hit) takes the shortest way through.
function control.run_batch(msgs, n, inject_limit)
    local pm = rawget(env, "process_message")
    if type(pm) ~= "function" then return 0, "terminate", PM_NOT_FOUND, 0, 0, batching end
    commit_index = 0
    local fails_before = failures
    for i = 1, n do
        local raw = msgs[i]
        set_current(raw)
        cur_index = i
        reset_instructions()
        start_message(inject_limit)
        seq_counter = seq_counter + 1
        local ok, rc, msg = pcall(pm, seq_counter)
        if ok and rc == 0 and msg == nil and not tripped() then
            batching = false
            commit_index = i
        else
            local status, err, flushing = unusual_end(msgs, i, ok, rc, msg)
            if status then return batch_end(i - 1, status, err, fails_before, flushing) end
        end
        if ticker > 0 then
            -- hindsight_cli's data time: the newest Timestamp seen, in whole seconds
            local secs = floor(pb_timestamp(raw) / 1e9)
            if secs > data_now then data_now = secs end
            if next_due == nil or data_now >= next_due then
                local tok, terr = data_timer(i)
                if not tok then return batch_end(i, "terminate", terr, fails_before, false) end
            end
        end
    end
    return batch_end(n, "ok", nil, fails_before, true)
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

----------------------------------------------------------------------------------------------------
-- preserve_data: lua_sandbox's .data format (Lua source that rebuilds the globals)
----------------------------------------------------------------------------------------------------
-- lsb_serialize_double / %q / true|false; nil for anything else
local function serialize_value(v)
    local t = type(v)
    if t == "string" then return sformat("%q", v) end
    if t == "number" then
        if v ~= v then return "0/0" end
        if v == huge then return "1/0" end
        if v == -huge then return "-1/0" end
        return format_number(v)
    end
    if t == "boolean" then return v and "true" or "false" end
    return nil
end

--- serialize_state() -> text | nil, err: the plugin's globals as lua_sandbox's preserve_global_data
-- writes them. Skipped values: functions, threads, userdata (none of ours has a serializer), tables
-- with a metatable (module tables, API objects) other than the C module stand-ins' objects (which
-- write themselves, as upstream's serialize functions do) and the globals table itself. A key that cannot be
-- written (a table, a function) fails the whole save, as upstream.
function control.serialize_state()
    sethook() -- lua_sandbox saves with the limits off
    local version = rawget(env, "_PRESERVATION_VERSION")
    version = type(version) == "number" and (version >= 0 and floor(version) or -floor(-version)) or 0
    local lines = { sformat("if _PRESERVATION_VERSION and _PRESERVATION_VERSION ~= %d then return end", version) }
    local seen = {}
    local failure = nil
    local function walk(path, tbl)
        for k, v in next, tbl do
            if failure then return end
            local vt = type(v)
            local preserver = vt == "table" and preservers[v]
            local skip = vt == "function" or vt == "thread" or vt == "userdata" or vt == "nil"
                or (vt == "table" and (v == env or getmetatable(v) ~= nil))
                or (tbl == env and k == "_PRESERVATION_VERSION")
            if preserver or not skip then
                local kl = serialize_value(k)
                if not kl then
                    failure = sformat("serialize_data cannot preserve type '%s'", type(k))
                    return
                end
                local p = path .. "[" .. kl .. "]"
                if vt == "table" then
                    if seen[v] then
                        lines[#lines + 1] = p .. " = " .. seen[v]
                    elseif preserver then -- a stand-in's object writes itself
                        seen[v] = p
                        lines[#lines + 1] = preserver(v, p)
                    else
                        seen[v] = p
                        lines[#lines + 1] = p .. " = {}"
                        walk(p, v)
                    end
                else
                    lines[#lines + 1] = p .. " = " .. serialize_value(v)
                end
            end
        end
    end
    walk("_G", env)
    set_instruction_limit(host.instruction_limit)
    if failure then return nil, failure end
    return tconcat(lines, "\n") .. "\n", nil
end

function control.restore_state(path)
    local src, err = read_source(path)
    local chunk = nil
    if src then chunk, err = loadstring(src, "@" .. path) end
    if not chunk then return false, "restore_global_data " .. tostring(err) end
    setfenv(chunk, env)
    sethook() -- lua_sandbox restores with the limits off
    local ok, e = pcall(chunk)
    set_instruction_limit(host.instruction_limit)
    if not ok then return false, "restore_global_data " .. tostring(e) end
    return true, nil
end


----------------------------------------------------------------------------------------------------
-- Control for test harnesses: upstream's C test API, as tests/lua_harness.py drives it. The runner
-- calls none of these; plugins reach none of them (only Python holds `control`).
----------------------------------------------------------------------------------------------------
-- lsb_heka_pm_*: one process_message call with the given message and arguments (outputs get no
-- sequence id when none is passed). Returns check_rc's values.
function control.pm_direct(raw, ...)
    if type(rawget(env, "process_message")) ~= "function" then return false, PM_NOT_FOUND end
    set_current(raw)
    reset_instructions()
    local ok, rc, msg = pcall(env.process_message, ...)
    set_current(nil)
    flush()
    return check_rc("process_message", ok, rc, msg)
end

-- what lua_sandbox's test function read_message_zc does with a zero-copy reference
function control.zero_copy_value(ud)
    return zero_copy_value(ud)
end

function control.has_timer()
    return type(rawget(env, "timer_event")) == "function"
end

-- the plugin's globals, as lsb_get_lua gives them: to read values, and to add functions as lsb_add_function does
function control.env()
    return env
end

-- Lua run with the unrestricted standard library, e.g. to give a plugin the loadfile
-- lua_sandbox's generic test sandbox has. What it hands the plugin is its own choice.
function control.execute_privileged(source, ...)
    local chunk = assert(loadstring(source, HOST_SOURCE .. "privileged"))
    setfenv(chunk, setmetatable({}, { __index = std }))
    return chunk(...)
end

return control
