-- Elasticsearch/OpenSearch bulk API output, delivering through hindsight-py's bulk sender.
--
-- Messages are encoded by encoder_module (default encoders.elasticsearch.payload) and kept in
-- memory; the read checkpoint is held back (process_message returns -4) until the batch has been
-- delivered, so the queue is the durable buffer: a crash or a stop re-sends from the last
-- delivered batch and nothing is lost. A batch is sent when it reaches flush_count, at every
-- timer_event (every ticker_interval seconds), and at shutdown when flush_on_shutdown is set
-- (otherwise it is re-read from the queue on the next start).
--
-- sender:send() returns only once every document has been indexed or written to the dead-letter
-- file; it retries transient failures itself and raises when a stop interrupts it or
-- abort_on_error gives up, which leaves the batch uncommitted.
--
-- cfg: address, port, timeout, flush_count, flush_on_shutdown, max_retry, discard_on_error,
-- abort_on_error, encoder_module and the encoder's own table; any of the optional sender keys
-- below are passed on as well.

require "string"
require "table"

local es = require "hindsight.elasticsearch"

local concat = table.concat

local flush_count       = read_config("flush_count") or 50000
local flush_on_shutdown = read_config("flush_on_shutdown")
assert(type(flush_count) == "number" and flush_count > 0, "flush_count must be greater than zero")
assert(not (read_config("abort_on_error") and read_config("discard_on_error")),
    "abort_on_error and discard_on_error are mutually exclusive")

local encoder_module = read_config("encoder_module") or "encoders.elasticsearch.payload"
local encode = require(encoder_module).encode
if type(encode) ~= "function" then
    error(encoder_module .. " does not provide an encode function")
end

local SENDER_KEYS = {
    "address", "port", "timeout", "max_retry", "discard_on_error", "abort_on_error", "flush_count",
    "flush_on_shutdown",
    -- optional, hindsight-py only
    "url", "urls", "username", "password", "api_key", "ca_certs", "verify_certs", "client_cert",
    "client_key", "gzip",
}
local sender_cfg = {}
for _, key in ipairs(SENDER_KEYS) do sender_cfg[key] = read_config(key) end
sender_cfg.address = sender_cfg.address or "127.0.0.1"
sender_cfg.port = sender_cfg.port or 9200
sender_cfg.timeout = sender_cfg.timeout or 10
sender_cfg.max_retry = sender_cfg.max_retry or 0
sender_cfg.flush_count = flush_count
local sender = es.sender(sender_cfg)

local batch, batch_count = {}, 0

local function send_batch()
    sender:send(concat(batch, "", 1, batch_count), batch_count)
    batch, batch_count = {}, 0
end

function process_message()
    local ok, data = pcall(encode)
    if not ok then
        if dead_letter then
            dead_letter("encode failed: " .. tostring(data), read_message("Payload") or read_message("raw"))
        end
        return -1, tostring(data)
    end
    if not data then return -2 end -- no Payload: nothing to index

    batch_count = batch_count + 1
    batch[batch_count] = data
    if batch_count >= flush_count then
        send_batch()
        return 0 -- commits the checkpoint through this message
    end
    return -4
end

-- Timers run on data time (the newest message's timestamp) and the first one comes with the first
-- message: a batch leaves once ticker_interval has passed since the previous timer, as upstream.
local ticker_ns = (read_config("ticker_interval") or 0) * 1e9
local last_timer_ns = nil

function timer_event(ns, shutdown)
    local due = last_timer_ns ~= nil and ns - last_timer_ns >= ticker_ns
    if last_timer_ns == nil or due then last_timer_ns = ns end
    if batch_count == 0 then return end
    if shutdown then
        if not flush_on_shutdown then return end
    elseif not due then
        return
    end
    send_batch()
    update_checkpoint()
end
