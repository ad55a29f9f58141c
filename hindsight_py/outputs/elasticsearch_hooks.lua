-- The Elasticsearch output's Lua side (outputs/elasticsearch_lua.py): the modules it gives Lua
-- plugins, and the modules it intercepts. Loaded by sandbox/env.lua as host code (never the
-- plugin's), once per plugin runtime, through the output extension point:
--   fns: Python callables (each already behind env.lua's guard; what they return stays here)
--   api: guard (for callables the Python side hands back), require (the sandbox's require),
--        read_file (the whole content of an io file handle, then closed), file_of (the file handle
--        an ltn12.source.file closure reads, or nil)
-- It returns { provides = { name = function() -> module }, wraps = { name = function(m) -> m } }.

local fns, api = ...
local type, rawget, setmetatable, tostring, error = type, rawget, setmetatable, tostring, error
local sfind, tconcat = string.find, table.concat

local provides, wraps = {}, {}

-- `require "hindsight.elasticsearch"` (inputs and outputs): the bulk sender (outputs/elasticsearch.py)
-- as a Lua module, so that the Lua output plugin and the native one share a single delivery path.
if fns.new_sender then
    provides["hindsight.elasticsearch"] = function()
        local M = {}
        function M.sender(cfg)
            local send, accepts = fns.new_sender(cfg)
            send, accepts = api.guard(send), api.guard(accepts)
            local s = {}
            function s:send(body, n)
                local ok, a, b = send(body, n)
                if not ok then error(a, 2) end
                return a, b
            end
            function s:accepts_types() return accepts() end
            return s
        end
        return M
    end
end

-- Elasticsearch 8+ and OpenSearch 2+ reject `_type` in bulk action lines, and CloudTracker's config sends
-- type_name = "doc". Whatever encoders.elasticsearch.common a user has (ours or upstream's), its action
-- lines lose `_type` unless the configured server is one that still accepts mapping types. The server
-- is asked until it answers: one that cannot be reached yet does not decide for the whole run.
wraps["encoders.elasticsearch.common"] = function(m)
    if type(m) ~= "table" or type(rawget(m, "bulkapi_index_json")) ~= "function" then return m end
    local orig = m.bulkapi_index_json
    local drop = nil -- nil: not known yet
    m.bulkapi_index_json = function(index, type_name, id, ns)
        local d = drop
        if d == nil then
            local known
            d, known = fns.types_dropped()
            if known then drop = d end
        end
        if d then type_name = nil end
        return orig(index, type_name, id, ns)
    end
    return m
end

-- Bulk requests made through http.open (as upstream's elasticsearch_bulk_api.lua does, by hand) are
-- delivered by hindsight-py's bulk sender instead of the raw socket: retries with backoff, per-document
-- results, dead letters and counts, so even an unmodified upstream plugin never loses a document
-- silently. The plugin then sees a clean 200 with no errors. Every other request goes out unchanged.
if fns.takeover then
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
            -- ltn12.source.file(fh): read the rest of the file at once instead of 2 KB per call
            local fh = api.file_of(source)
            if fh then
                body = api.read_file(fh)
                return 1
            end
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
            local ok, err = fns.takeover(host_name, port, body or "")
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

    wraps["socket.http"] = function(m)
        if type(m) ~= "table" or type(rawget(m, "open")) ~= "function" then return m end
        local orig = m.open
        m.open = function(host_name, port, create)
            return wrap_http_client(orig(host_name, port, create), host_name, port)
        end
        return m
    end
end

return { provides = provides, wraps = wraps }
