"""The Prometheus endpoint and stats.json, scraped while the project's run/ ships into Elasticsearch 8.

An extra input with a ticker keeps the run going after the file is read (as a daemon's inputs do),
so the test scrapes until every line is delivered and the queue lag is zero, then stops it.

Cost: about 10 s.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
import requests
from delivery_helpers import SUMMARY, Background, Index, LineFile, project_workdir, wait_until

from hindsight_py.config import ConfigError, load_hindsight_config
from hindsight_py.live_stats import lag_bytes
from hindsight_py.metrics import parse_address, render

LINES = 5_000
SAMPLE = re.compile(r'^(?P<name>\w+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group("labels") or ""))
        samples[(m.group("name"), labels)] = float(m.group("value"))
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    for (n, ls), v in samples.items():
        if n == name and set(labels.items()) <= set(ls):
            return v
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_endpoint_is_scraped_during_a_run(tmp_path: Path, es8_url: str, scratch_index) -> None:
    lines = LineFile.write(tmp_path / "lines.json", LINES)
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    port = free_port()
    cfg = wd.path / "hindsight.cfg"
    cfg.write_text(cfg.read_text() + f'\nmetrics_address = "127.0.0.1:{port}"\n')
    (wd.path / "run/input/keepalive.cfg").write_text('filename = "keepalive.lua"\nticker_interval = 1\n')
    (wd.path / "run/input/keepalive.lua").write_text("function process_message() return 0 end\n")
    run = Background(wd)
    url = f"http://127.0.0.1:{port}/metrics"
    output = "output.elasticsearch_bulk_api"
    scrapes: list[dict] = []

    def shipped() -> bool:
        try:
            response = requests.get(url, timeout=5)
        except requests.ConnectionError:
            return False
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(response.text)
        scrapes.append(samples)
        return (value(samples, "hindsight_plugin_delivered_documents_total", plugin=output) == LINES
                and value(samples, "hindsight_queue_lag_bytes", reader=output, queue="input") == 0)

    try:
        wait_until(shipped, 120, "every line delivered in the metrics")
        last = scrapes[-1]
        assert value(last, "hindsight_plugin_injected_messages_total", plugin="input.file") == LINES
        assert value(last, "hindsight_plugin_running", plugin="input.file") == 0  # it read its file
        assert value(last, "hindsight_plugin_running", plugin="input.keepalive") == 1
        assert value(last, "hindsight_plugin_dead_lettered_total", plugin=output) == 0
        assert value(last, "hindsight_queue_lag_messages", reader=output, queue="input") == 0
        # the same figures in stats.json, for hindsight-py top
        stats = json.loads((wd.output / "stats.json").read_text())
        assert stats["plugins"][output]["indexed"] == LINES
        assert stats["readers"][f"input->{output}"]["lag_bytes"] == 0
    finally:
        run.process.send_signal(signal.SIGINT)
        status = run.process.wait(timeout=120)
    log = run.log_path.read_text()
    assert status == 0, log[-4000:]
    summary = SUMMARY.search(log)
    assert summary and int(summary["delivered"]) == LINES
    assert index.count() == LINES
    # the endpoint goes away with the daemon
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


def test_render_without_figures_and_label_escaping() -> None:
    assert render(None) == "# no figures yet\n"
    text = render({"time": 10.0, "started": 4.0, "readers": {},
                   "plugins": {'output."q"': {"type": "output", "running": True, "indexed": 3}}})
    samples = parse(text.replace('\\"', "'"))
    assert value(samples, "hindsight_plugin_delivered_documents_total", plugin="output.'q'") == 3
    assert value(samples, "hindsight_uptime_seconds") == 6


def test_metrics_address_is_checked_when_the_cfg_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for kind in ("input", "analysis", "output"):
        (tmp_path / "run" / kind).mkdir(parents=True)
    base = ('output_path = "o"\nsandbox_run_path = "run"\nanalysis_lua_path = ""\nanalysis_lua_cpath = ""\n'
            'io_lua_path = ""\nio_lua_cpath = ""\ninput_defaults = {}\nanalysis_defaults = {}\noutput_defaults = {}\n')
    (tmp_path / "h.cfg").write_text(base + 'metrics_address = "localhost"\n')
    with pytest.raises(ConfigError, match="metrics_address must be 'host:port'"):
        load_hindsight_config(tmp_path / "h.cfg")
    (tmp_path / "h.cfg").write_text(base + 'metrics_address = "[::1]:9108"\n')
    assert load_hindsight_config(tmp_path / "h.cfg").metrics_address == "[::1]:9108"
    assert parse_address("[::1]:9108") == ("::1", 9108)


def test_lag_spans_queue_files(tmp_path: Path) -> None:
    (tmp_path / "3.log").write_bytes(b"x" * 100)
    (tmp_path / "4.log").write_bytes(b"x" * 50)
    (tmp_path / "5.log").write_bytes(b"x" * 10)
    assert lag_bytes(tmp_path, "3:40", (5, 10)) == 60 + 50 + 10
    assert lag_bytes(tmp_path, "5:4", (5, 10)) == 6
    assert lag_bytes(tmp_path, None, (5, 10)) == 160
    assert lag_bytes(tmp_path, "3:40", None) is None
