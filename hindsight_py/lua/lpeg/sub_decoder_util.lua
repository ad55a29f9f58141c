-- lpeg.sub_decoder_util for hindsight-py: helpers decoders use to build messages and to set up
-- sub-decoders (API of lua_sandbox_extensions' module of the same name).
--
-- copy_message(src, mutable)      -> a message table to fill: a copy of `src` (headers, and a
--                                    shallow copy of the Fields hash), `src` itself when
--                                    `mutable`, or {} when src is nil
-- add_fields(msg, fields)         -> merges a Fields hash into msg.Fields (overwrites)
-- load_decoder(cfg, printf_msgs)  -> a decode(data, default_headers, mutable) function
-- load_sub_decoder                -> the same function (old name)
-- load_sub_decoders(sds, printf)  -> {name = decode function}; a "*" entry answers unknown names
--
-- A decoder configuration is
--   "decoders.x"           the decode function of that module
--   "module" / "module#g"  an LPeg grammar (module.grammar or module.syslog_grammar, or module.g)
--                          whose match result is a Fields hash
--   { entry, ... }         each entry a sample message, a {printf spec}, {"module#fn", args...}
--                          (fn builds the grammar) or {"module#g", args...} (match arguments),
--                          optionally paired with transformations {field = "module#function"};
--                          the first grammar that matches adds its fields to a copy of the
--                          defaults with Payload = data. A last entry "<<DROP>>" drops
--                          unmatched data, "<<FAIL>>" reports "parse failed"; otherwise the
--                          data is injected with no fields added.
--   { {"decoders.x", transformations} } the decoder with the transformations applied to every
--                          message it injects.
-- Sample messages and printf specs need lpeg.printf, which is only loaded when used.

local string = require "string"

local find, match, format = string.find, string.match, string.format
local error, ipairs, next, pairs, pcall, require, setmetatable, tostring, type, unpack =
    error, ipairs, next, pairs, pcall, require, setmetatable, tostring, type, unpack

-- the environment this module was loaded in: the plugin's globals
local plugin_env = getfenv(1)
local real_inject_message = inject_message

local DROP = "<<DROP>>"
local FAIL = "<<FAIL>>"

local M = {}

function M.copy_message(src, mutable)
    if src == nil then return {} end
    if mutable then return src end
    local msg = {
        Uuid       = src.Uuid,
        Timestamp  = src.Timestamp,
        Type       = src.Type,
        Logger     = src.Logger,
        Severity   = src.Severity,
        Payload    = src.Payload,
        EnvVersion = src.EnvVersion,
        Pid        = src.Pid,
        Hostname   = src.Hostname,
    }
    local fields = src.Fields
    if type(fields) == "table" then
        local copy = {}
        for k, v in pairs(fields) do copy[k] = v end
        msg.Fields = copy
    end
    return msg
end
local copy_message = M.copy_message

function M.add_fields(msg, fields)
    local existing = msg.Fields
    if existing then
        for k, v in pairs(fields) do existing[k] = v end
    else
        msg.Fields = fields
    end
end
local add_fields = M.add_fields

local printf_module
local function printf()
    if not printf_module then
        local ok, mod = pcall(require, "lpeg.printf")
        if not ok then
            error("sample messages and printf specifications need the lpeg.printf module: " .. mod, 0)
        end
        printf_module = mod
    end
    return printf_module
end

-- "module#name" -> module.name; "module" -> its grammar or syslog_grammar
local function module_reference(ref)
    local mod_name, member = match(ref, "^([^#]+)#(.+)$")
    if mod_name then return require(mod_name)[member] end
    local mod = require(ref)
    return mod.grammar or mod.syslog_grammar
end

local function decode_function_of(module_name)
    local decode = require(module_name).decode
    if type(decode) ~= "function" then
        error(format("no decode function defined: %s", module_name), 0)
    end
    return decode
end

-- {field = "module#function"} -> a new {field = function}; the cfg table is left as it is
local function resolve_transformations(t)
    local resolved = {}
    for field, ref in pairs(t) do
        local fn
        if type(ref) == "string" then
            local mod_name, fn_name = match(ref, "^([^#]+)#(.+)$")
            if mod_name then fn = require(mod_name)[fn_name] end
        end
        if type(fn) ~= "function" then
            error(format("invalid transformation function %s=%s", tostring(field), tostring(ref)), 0)
        end
        resolved[field] = fn
    end
    return resolved
end

-- Loads a decoder module while inject_message is replaced by one that applies the
-- transformations first: decoders keep the inject_message they find when they load.
local function decode_function_with(module_name, transformations)
    transformations = resolve_transformations(transformations)
    local function transforming_inject(msg, checkpoint)
        if type(msg) ~= "table" then error("transformations expect msg to be a table", 2) end
        for field, fn in pairs(transformations) do fn(msg, field) end
        return real_inject_message(msg, checkpoint)
    end
    plugin_env.inject_message = transforming_inject
    local ok, mod = pcall(require, module_name)
    plugin_env.inject_message = real_inject_message
    if not ok then error(mod, 0) end
    if type(mod) ~= "table" or type(mod.decode) ~= "function" then
        error(format("no decode function defined: %s", module_name), 0)
    end
    return mod.decode
end

local function grammar_decoder(grammar)
    return function(data, default_headers, mutable)
        local fields = grammar:match(data)
        if not fields then return "parse failed" end
        local msg = copy_message(default_headers, mutable)
        add_fields(msg, fields)
        real_inject_message(msg)
    end
end

local function matcher_of(grammar, args)
    if args and #args > 1 then
        return function(data) return grammar:match(data, 1, unpack(args, 2)) end
    end
    return function(data) return grammar:match(data) end
end

-- Picks the first grammar of `entries` ({matcher, transformations}) that matches.
local function picking_decoder(entries, no_match)
    return function(data, default_headers, mutable)
        local msg = copy_message(default_headers, mutable)
        msg.Payload = data
        local matched = false
        for _, entry in ipairs(entries) do
            local fields = entry[1](data)
            if fields then
                add_fields(msg, fields)
                local transformations = entry[2]
                if transformations then
                    for field, fn in pairs(transformations) do fn(msg, field) end
                end
                matched = true
                break
            end
        end
        if not matched then
            if no_match == DROP then return end
            if no_match == FAIL then return "parse failed" end
        end
        real_inject_message(msg)
    end
end

local function grammar_entry(spec, grammars, label, i)
    local head = spec[1]
    if type(head) == "string" then
        local g = printf().match_sample(grammars(), head)
        if not g then error(format("no grammar found for: %s", head), 0) end
        return matcher_of(g)
    elseif type(head) == "table" then
        local first = head[1]
        if type(first) == "string" and find(first, "%", 1, true) then
            return matcher_of(printf().build_grammar(head))
        end
        local ref = type(first) == "string" and module_reference(first) or nil
        local kind = type(ref)
        if kind == "function" then return matcher_of(ref(unpack(head, 2))) end
        if kind == "userdata" then return matcher_of(ref, head) end
        error(format("invalid module reference %s", tostring(first)), 0)
    end
    error(format("sub_decoder: %s invalid entry: %d", label, i), 0)
end

local function build(cfg, printf_messages, grammars, label)
    local kind = type(cfg)
    if kind == "string" then
        if find(cfg, "^decoders%.") then return decode_function_of(cfg) end
        local g = module_reference(cfg)
        if type(g) ~= "userdata" then
            error(format("sub_decoder, no grammar defined: %s", label), 0)
        end
        return grammar_decoder(g)
    end
    if kind ~= "table" then
        error(format("sub_decoder: %s invalid type: %s", label, kind), 0)
    end

    local no_printf = printf_messages == nil or next(printf_messages) == nil
    local entries, no_match = {}, nil
    local n = #cfg
    for i, entry in ipairs(cfg) do
        if type(entry) ~= "table" then entry = {entry} end
        local head = entry[1]
        if type(head) == "string" and find(head, "^decoders%.") and n == 1 and no_printf then
            if entry[2] then return decode_function_with(head, entry[2]) end
            return decode_function_of(head)
        end
        if (head == DROP or head == FAIL) and i == n then
            no_match = head
            break
        end
        local transformations = entry[2]
        if transformations then transformations = resolve_transformations(transformations) end
        entries[#entries + 1] = {grammar_entry(entry, grammars, label, i), transformations}
    end
    return picking_decoder(entries, no_match)
end

local function grammar_cache(printf_messages)
    local grammars
    return function()
        if not grammars then grammars = printf().load_messages(printf_messages or {}) end
        return grammars
    end
end

function M.load_decoder(cfg, printf_messages)
    return build(cfg, printf_messages, grammar_cache(printf_messages), "")
end
M.load_sub_decoder = M.load_decoder

function M.load_sub_decoders(sub_decoders, printf_messages)
    local decoders = {}
    local grammars = grammar_cache(printf_messages)
    for name, cfg in pairs(sub_decoders or {}) do
        local decode = build(cfg, printf_messages, grammars, name)
        if name == "*" then
            setmetatable(decoders, {__index = function() return decode end})
        else
            decoders[name] = decode
        end
    end
    return decoders
end

return M
