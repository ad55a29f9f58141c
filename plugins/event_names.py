"""Analysis plugin (an example of a Python plugin): the most frequent CloudTrail eventNames.

Sample cfg::

    filename        = "event_names.py"
    message_matcher = "Logger == 'input.file'"
    ticker_interval = 60
    top             = 10

Every ticker_interval (and once at shutdown) it injects a tab-separated report,
`<count>\\t<eventName>` per line, as an `inject_payload` message named "event_names".
"""

import json
from collections import Counter

from hindsight_py.plugin import dead_letter, inject_payload, read_config, read_message

top = int(read_config("top") or 10)
names: Counter[str] = Counter()


def process_message():
    payload = read_message("Payload")
    try:
        record = json.loads(payload)
    except (TypeError, ValueError) as e:
        dead_letter(f"not a JSON record: {e}", payload or "")
        return -1, "not a JSON record"
    names[str(record.get("eventName"))] += 1
    return 0


def timer_event(ns, shutdown):
    if names:
        report = "\n".join(f"{n}\t{name}" for name, n in names.most_common(top))
        inject_payload("tsv", "event_names", report)
