"""An output process (Hindsight's hs_output_plugins): one plugin reading the input queue, the
analysis queue or both, its checkpoints held back until what it was given is settled."""

from __future__ import annotations

from hindsight_py.plugin_host import stats_dict
from hindsight_py.plugin_process import PluginProcess, load_slots, open_cursor, read_queues, save_state


def run_output(r: PluginProcess) -> None:
    plugin = r.spec.plugins[0]
    slots = load_slots(r)
    if not slots:
        return
    slots[0].host.before_reading()  # an output's leftovers of the last run (a stop ends the loop at once)
    rq = plugin.read_queue
    readers = []
    if rq in ("both", "input"):
        readers.append(open_cursor(r, "input", f"input->{plugin.name}"))
    if rq in ("both", "analysis"):
        readers.append(open_cursor(r, "analysis", f"analysis->{plugin.name}"))
    read_queues(r, readers, slots, is_output=True)
    slot = slots[0]
    if slot.alive:
        save_state(slot)
        r.channel.send_checkpoints()
        r.channel.send("exit", plugin.name, 0, None, stats_dict(slot.host))


__all__ = ["run_output"]
