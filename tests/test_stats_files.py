"""plugins.tsv and utilization.tsv: upstream's headers and arithmetic, and the files a real run writes,
read by lua_sandbox_extensions' own plugins_tsv.lua and plugin_monitor.lua.

Cost: the plugin_monitor run takes about 15 s (its stats generator sleeps 3 s, its analysis plugin
fails on its sixth one-second tick, and the files change every six seconds).
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import hindsight_cli, wait_until
from upstream_files import HINDSIGHT, LUA_SANDBOX_EXTENSIONS, copy_tree, extension_modules, read_text

from hindsight_py.stats_files import PLUGINS_HEADER, UTILIZATION_HEADER, StatsFiles, round_percentage


def _upstream_headers() -> list[tuple[str, ...]]:
    """The header lines hs_checkpoint_writer.c prints (utilization.tsv's, then plugins.tsv's)."""
    source = read_text(HINDSIGHT, "src/hs_checkpoint_writer.c")
    headers = []
    for call in re.findall(r'fprintf\(cpi\.[up]tsv,\s*((?:"[^"]*"\s*)+)\)', source):
        text = "".join(re.findall(r'"([^"]*)"', call)).replace("%%", "%")
        assert text.endswith("\\n")
        headers.append(tuple(text[:-2].split("\\t")))
    return headers


def test_the_headers_are_upstreams() -> None:
    assert _upstream_headers() == [UTILIZATION_HEADER, PLUGINS_HEADER]


def test_percentages_round_half_to_even_as_upstream() -> None:
    assert [round_percentage(n, 1000) for n in (0, 124, 125, 135, 126, 1000)] == [0, 12, 12, 14, 13, 100]
    assert round_percentage(5, 0) == 0


@dataclass
class _Plugin:
    """What the stats files read of a PluginConfig."""

    name: str
    type: str
    ticker_interval: int = 0
    assigned_thread: int = 0
    read_queue: str = "input"


def test_the_files_change_every_sixth_second_and_list_running_plugins(tmp_path: Path) -> None:
    files = StatsFiles(tmp_path)
    plugins: list[Any] = [_Plugin("input.a", "input"), _Plugin("analysis.b", "analysis", 1),
                          _Plugin("output.c", "output")]
    stats = {"input.a": {"injected": 60, "inject_bytes": 600},
             "analysis.b": {"processed": 60, "read": 60, "pm_avg": 1000, "mm_avg": 100, "te_avg": 50},
             "output.c": {"processed": 30, "failures": 3, "read": 60, "pm_avg": 2000, "mm_avg": 100}}
    written = [files.tick(plugins, stats, 2) for _ in range(13)]
    assert [i for i, w in enumerate(written) if w] == [1, 7]
    rows = [line.split("\t") for line in (tmp_path / "plugins.tsv").read_text().splitlines()]
    assert rows[0] == list(PLUGINS_HEADER)
    assert [r[0] for r in rows[1:]] == ["input.a", "analysis.b", "output.c"]
    assert rows[1][1:3] == ["60", "600"] and rows[3][3:5] == ["30", "3"]
    util = [line.split("\t") for line in (tmp_path / "utilization.tsv").read_text().splitlines()]
    assert util[0] == list(UTILIZATION_HEADER)
    assert [r[0] for r in util[1:]] == ["input.a", "analysis0", "analysis.b", "analysis1", "output.c"]
    # the counters did not move since the first write: no messages in the window
    assert util[1] == ["input.a", "0", "-1", "-1", "-1", "-1"]
    assert util[2][1] == "0" and util[5][1] == "0"
    # a plugin that ended drops out at the next write
    for _ in range(6):
        files.tick(plugins[1:], stats, 1)
    names = [line.split("\t")[0] for line in (tmp_path / "plugins.tsv").read_text().splitlines()[1:]]
    assert names == ["analysis.b", "output.c"]


def test_first_window_counts_and_shares(tmp_path: Path) -> None:
    p: Any = _Plugin("output.c", "output", read_queue="analysis")
    files = StatsFiles(tmp_path)
    files.write([p], {"output.c": {"processed": 600, "read": 1200, "pm_avg": 3000, "mm_avg": 1000}}, 1)
    util = (tmp_path / "utilization.tsv").read_text().splitlines()[2].split("\t")
    # 1200 matched at 1000 ns, 600 processed at 3000 ns: matcher 40%, process 60%; 200 messages/s at
    # 2500 ns a message is 0.05% of the 400,001 a second it could take: rounds to 0
    assert util == ["output.c", "600", "0", "40", "60", "0"]


@pytest.mark.parametrize("reader", ["plugins_tsv.lua", "plugins_tsv.py"])
def test_plugin_monitor_alerts_on_failures_and_terminations(tmp_path: Path, reader: str) -> None:
    """lua_sandbox_extensions' hindsight/plugin_monitor case, its plugins unchanged, with plugins_tsv
    (lua_sandbox_extensions' or the one hindsight-py ships) started from run/ (the case drops its cfg into sandbox_load_path, and stops it with a .off file
    there: dynamic loading, which this test leaves out). Its test_alert output checks both alerts
    (10% failures of output.test_percent; analysis.terminate's error from its .err file) and then
    writes the .off file; the test stops the run when it appears."""
    case = tmp_path / "case"
    copy_tree(LUA_SANDBOX_EXTENSIONS, "hindsight/tests/integration/plugin_monitor", case)
    modules, io_modules = extension_modules(tmp_path / "lib", ("heka", "lpeg", "hindsight", "socket"))
    copy_tree(LUA_SANDBOX_EXTENSIONS, "hindsight/sandboxes", tmp_path / "sandboxes")
    for kind in ("input", "analysis", "output"):
        (case / "load" / kind).mkdir(parents=True)
    (case / "hindsight.cfg").write_text(
        'output_path = "output"\nsandbox_load_path = "load"\nsandbox_run_path = "run"\n'
        f'sandbox_install_path = "{tmp_path}/sandboxes/heka"\n'
        f'analysis_lua_path = "{modules}/?.lua"\nanalysis_lua_cpath = "{modules}/?.so"\n'
        f'io_lua_path = analysis_lua_path .. ";{io_modules}/?.lua"\n'
        f'io_lua_cpath = analysis_lua_cpath .. ";{io_modules}/?.so"\n'
        'hostname = "integration_test"\nanalysis_defaults = {}\ninput_defaults = {}\noutput_defaults = {}\n'
    )
    (case / "run/input/plugin_tsv.cfg").write_text(
        f'filename = "{reader}"\nticker_interval = 1\npreserve_data = false\n')
    log = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen([hindsight_cli(), "hindsight.cfg", "7"], cwd=case, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        off = case / "load/input/plugin_tsv.off"
        wait_until(lambda: off.exists() or proc.poll() is not None, 60, "test_alert's .off file")
        assert off.exists(), (tmp_path / "stderr.log").read_text()[-4000:]
        plugins = (case / "output/plugins.tsv").read_text().splitlines()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
    stderr = (tmp_path / "stderr.log").read_text()
    assert not (case / "run/output/test_alert.err").exists(), stderr[-4000:]
    assert "terminate.lua:12: boom" in (case / "run/analysis/terminate.err").read_text()
    # 4: the analysis plugin that was terminated; 16: the twenty messages the outputs failed (-1),
    # which hindsight-py keeps in the dead-letter file
    assert status == 4 | 16, stderr[-4000:]
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in plugins[1:]}
    assert "analysis.terminate" not in rows
    assert rows["output.test_percent"][2:4] == ["100", "10"]
    assert rows["output.test_success"][2:4] == ["101", "0"]
