-- Counts the messages it sees and reports the total every ticker_interval:
-- an inject_payload("txt", "count", "<n> message analysed") message.

require "string"

message_count = 0 -- a global, so that preserve_data keeps it across restarts

function process_message()
    message_count = message_count + 1
    return 0
end

function timer_event(ns, shutdown)
    inject_payload("txt", "count", string.format("%d message analysed", message_count))
end
