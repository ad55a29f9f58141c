"""Input plugin: output_path/plugins.tsv as the messages monitoring plugins consume.

The counterpart of lua_sandbox_extensions' plugins_tsv.lua, shipped with hindsight-py so that
plugin_monitor.lua (or any analysis plugin matching `Type =~ "^hindsight%.plugin%."`) works
without that extension installed. On each tick it reads plugins.tsv and injects:

- `hindsight.plugin.stats`, one per running plugin: Fields `name` and `deltas`, the change of each
  plugins.tsv column since the previous read (the whole value the first time it sees the plugin),
  in the file's column order (0: Inject Message Count ... 2: Process Message Count,
  3: Process Message Failures ...);
- `hindsight.plugin.terminated`, for a plugin that left the file and has an .err file in
  sandbox_run_path: Field `name`, the .err file's text as the Payload.

Sample cfg (run/input/plugins_tsv.cfg)::

    filename        = "plugins_tsv.py"
    ticker_interval = 60
    preserve_data   = false
"""

import os

from hindsight_py.plugin import inject_message, read_config

output_path = read_config("output_path")
run_path = read_config("sandbox_run_path")
previous = {}


def _parse(text):
    """{plugin: [column values]}, or None for a file that is not a plugins.tsv."""
    lines = text.split("\n")
    if len(lines) < 2 or lines[-1] != "":
        return None
    table = {}
    for line in lines[1:-1]:
        cells = line.split("\t")
        if len(cells) < 2 or not all(c.isdigit() for c in cells[1:]):
            return None
        table[cells[0]] = [int(c) for c in cells[1:]]
    return table


def _terminated(name):
    plugin_type, _, short = name.partition(".")
    try:
        with open(os.path.join(run_path, plugin_type, short + ".err")) as fh:
            return fh.read()
    except OSError:  # it ended normally or was removed: nothing to report
        return None


def process_message(checkpoint):
    global previous
    try:
        with open(os.path.join(output_path, "plugins.tsv")) as fh:
            text = fh.read()
    except OSError:
        return 0  # not written yet
    current = _parse(text)
    if current is None:
        return -1, "plugins.tsv does not parse"
    for name, values in current.items():
        old = previous.pop(name, None)
        deltas = values if old is None else [v - (old[i] if i < len(old) else 0) for i, v in enumerate(values)]
        inject_message({"Type": "hindsight.plugin.stats", "Fields": {"name": name, "deltas": deltas}})
    for name in previous:  # gone since the last read
        reason = _terminated(name)
        if reason is not None:
            inject_message({"Type": "hindsight.plugin.terminated", "Payload": reason, "Fields": {"name": name}})
    previous = current
    return 0
