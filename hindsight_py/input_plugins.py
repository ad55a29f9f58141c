"""The input plugin process (Hindsight's hs_input_plugins): process_message until it detaches,
again every ticker_interval seconds, until a stop."""

from __future__ import annotations

import time

from hindsight_py.plugin_host import stats_dict
from hindsight_py.plugin_process import PluginProcess
from hindsight_py.queue import QueueWriter
from hindsight_py.sandbox import PluginError


def run_input(r: PluginProcess) -> None:
    plugin = r.spec.plugins[0]
    r.writer = QueueWriter(r.output_path / "input", r.hs.output_size)
    if r.writer.torn_bytes:
        r.logger.bind(plugin.name)(4, f"cut a torn record of {r.writer.torn_bytes} bytes at the end of the input queue")
    try:
        sandbox, host = r.make_sandbox(plugin)
    except PluginError as e:
        r.terminated(plugin, str(e), None)
        return
    log = host.log_fn
    timings = host.stats.timings
    while True:
        started = time.perf_counter_ns()
        try:
            rc, msg = sandbox.run_input(host.checkpoint_value)
        except PluginError as e:
            r.terminated(plugin, str(e), host)
            return
        timings.call(timings.process, time.perf_counter_ns() - started, 1)
        if rc > 0:
            r.terminated(plugin, f"process_message() received a termination status code {rc} {msg or ''}".strip(), host)
            return
        if rc < 0 and msg:
            log(4, f"received: {rc} msg: {msg}")
        if plugin.ticker_interval == 0 or r.channel.stop:
            log(6, f"detaching received: {rc} msg: {msg or ''}")
            break
        deadline = time.monotonic() + plugin.ticker_interval
        r.channel.poll()
        while not r.channel.stop and time.monotonic() < deadline:
            # woken at once by a stop; every 0.1 s at least, for the coalesced checkpoints and stats
            r.channel.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        if r.channel.stop:
            break
    host.settle_refused(None)
    if plugin.preserve_data:  # inputs keep state across clean restarts too (lsb_heka_destroy_sandbox)
        try:
            sandbox.save_state()
        except Exception as e:
            log(3, f"preserve_data failed: {e}")
    r.channel.send_checkpoints()
    r.channel.send("exit", plugin.name, 0, None, stats_dict(host))


__all__ = ["run_input"]
