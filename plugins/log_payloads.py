"""Output plugin: writes the payload of each message it matches to the log, at info level.

Used by the project's run/ to report the counter analysis ("<n> message analysed") without
sending those payloads to Elasticsearch. Sample cfg::

    filename        = "log_payloads.py"
    message_matcher = "Type == 'inject_payload'"
"""

from hindsight_py.plugin import log, read_message


def process_message(sequence_id):
    payload = read_message("Payload")
    if payload is not None:
        name = read_message("Fields[payload_name]") or read_message("Logger")
        log(6, f"{name}: {payload.rstrip()}")
    return 0


def timer_event(ns, shutdown):
    pass
