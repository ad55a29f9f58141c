"""The entry point of a plugin process: it runs the host of its plugin type (input_plugins,
analysis_plugins, output_plugins); the pipe protocol is in plugin_process.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

from hindsight_py.analysis_plugins import run_analysis
from hindsight_py.input_plugins import run_input
from hindsight_py.output_plugins import run_output
from hindsight_py.plugin_host import stats_dict
from hindsight_py.plugin_process import STATUS_BITS, Channel, PluginProcess, ProcessSpec


def _die_with_parent(parent_pid: int, label: str) -> None:
    # A kill -9 of the supervisor must take its children along: a surviving child would race the
    # restarted daemon on the same queues and checkpoints.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # name the process after its plugin (ps -o comm, top): 15 bytes at most
        libc.prctl(15, ctypes.c_char_p(label.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def run_process(spec: ProcessSpec, conn: Connection) -> None:
    """Entry point of a plugin process (forked by the supervisor)."""
    _die_with_parent(spec.supervisor_pid, spec.label)
    # The terminal's ^C reaches the whole process group; only the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(conn)
    r = PluginProcess(spec, channel)
    channel.stats_source = lambda: [(h.plugin.name, stats_dict(h)) for h in r.hosts]
    # HINDSIGHT_PY_PROFILE=/tmp/p writes /tmp/p-<process>.prof (cProfile) for each plugin process
    profile_prefix = os.environ.get("HINDSIGHT_PY_PROFILE")
    profiler = None
    if profile_prefix:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        if spec.kind == "input":
            run_input(r)
        elif spec.kind == "analysis":
            run_analysis(r)
        else:
            run_output(r)
        channel.send_checkpoints()
        channel.send("done", spec.label)
    except Exception as e:  # the supervisor must hear about it; the traceback goes to stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        try:
            channel.send_checkpoints()
            for p in spec.plugins:
                channel.send("exit", p.name, STATUS_BITS[p.type], f"internal error: {e}", {})
            channel.send("done", spec.label)
        except OSError:
            pass
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_prefix}-{spec.label}.prof")
        sys.stderr.flush()
        os._exit(0)


__all__ = ["ProcessSpec", "run_process", "STATUS_BITS"]
