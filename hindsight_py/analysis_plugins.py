"""An analysis process (Hindsight's hs_analysis_plugins): its plugins share one read loop over
the input queue and inject into the analysis queue."""

from __future__ import annotations

from hindsight_py.plugin_host import stats_dict
from hindsight_py.plugin_process import PluginProcess, load_slots, open_cursor, read_queues, save_state
from hindsight_py.queue import QueueWriter


def run_analysis(r: PluginProcess) -> None:
    r.writer = QueueWriter(r.output_path / "analysis", r.hs.output_size)
    slots = load_slots(r)
    if not slots:
        r.channel.send("exit", r.spec.label, 0, None, {})
        return
    reader = open_cursor(r, "input", f"input->analysis{r.spec.thread}")
    read_queues(r, [reader], slots, is_output=False)
    for slot in slots:
        if slot.alive:
            save_state(slot)
            r.channel.send("exit", slot.plugin.name, 0, None, stats_dict(slot.host))
    r.channel.send("exit", r.spec.label, 0, None, {})


__all__ = ["run_analysis"]
