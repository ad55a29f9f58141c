"""The `hindsight` daemon (hindsight_py/daemon.py) with real processes and a real Elasticsearch:
it runs until signalled, re-runs inputs with a ticker_interval, keeps going when a plugin fails."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CLOUDTRAIL_NDJSON
from daemon_helpers import DaemonDir, cfg_text, es_output
from delivery_helpers import project_workdir
from native_pipeline import count, documents

FAILING_INPUT = """
def process_message(checkpoint):
    raise RuntimeError("this input always fails")
"""

# injects one line per call, numbered from its checkpoint: proves the re-runs and their checkpoints
COUNTING_INPUT = """
from hindsight_py.plugin import inject_payloads

def process_message(checkpoint):
    n = int(checkpoint or 0) + 1
    inject_payloads([b'{"call": %d}' % n], checkpoint=n)
    return 0
"""


def test_the_daemon_runs_until_signalled_and_a_failed_plugin_stays_down(tmp_path: Path, es8_url: str,
                                                                       scratch_index) -> None:
    index = scratch_index(es8_url)
    d = DaemonDir(tmp_path)
    lines = [json.dumps({"n": i}) for i in range(500)]
    (tmp_path / "data.ndjson").write_text("".join(line + "\n" for line in lines))
    d.put("run", "input", "file.cfg", cfg_text({"filename": "flat_file.py",
                                               "input_filename": str(tmp_path / "data.ndjson")}))
    d.put("run", "input", "calls.py", COUNTING_INPUT)
    d.put("run", "input", "calls.cfg", cfg_text({"filename": "calls.py", "ticker_interval": 1}))
    d.put("run", "input", "broken.py", FAILING_INPUT)
    d.put("run", "input", "broken.cfg", cfg_text({"filename": "broken.py", "ticker_interval": 1}))
    d.put("run", "output", "es.cfg", cfg_text(es_output(es8_url, index)))
    d.start()
    try:
        # the one-pass input finished long ago, yet the daemon ships what the re-run input adds
        d.wait_for("every line and three calls indexed", lambda: count(es8_url, index) >= 503)
        err = d.wait_for("the .err of the failed input", lambda: (tmp_path / "run/input/broken.err").exists()
                         and (tmp_path / "run/input/broken.err").read_text())
        assert "this input always fails" in err
        assert "input.broken" in d.log() and "detaching received" in d.log()
        calls_before = count(es8_url, index) - 500
        d.wait_for("more calls after the failure", lambda: count(es8_url, index) - 500 > calls_before + 2)
    finally:
        status = d.stop()
    assert status == 0, d.log()[-4000:]  # a plugin failure is reported, not an exit status (upstream)
    docs = documents(es8_url, index)
    calls = sorted(doc["call"] for doc in docs if "call" in doc)
    assert calls == list(range(1, len(calls) + 1))  # each call once, resumed from its checkpoint
    assert sorted(doc["n"] for doc in docs if "n" in doc) == list(range(500))
    cps = d.checkpoints()
    assert cps["input.calls"] == str(len(calls))
    assert cps["input.file"] == str((tmp_path / "data.ndjson").stat().st_size)
    assert cps["input->output.es"] == cps["input"]  # drained on the signal
    assert "summary: read" in d.log()


def test_the_daemon_runs_the_cloudtracker_setup_and_follows_its_file(tmp_path: Path, es8_url: str,
                                                                    scratch_index) -> None:
    # the project's run/ (file.lua -> elasticsearch_bulk_api.lua, counter.lua), the file followed
    index = scratch_index(es8_url)
    records = CLOUDTRAIL_NDJSON.read_bytes().splitlines(keepends=True)
    data = tmp_path / "cloudtrail.json"
    data.write_bytes(b"".join(records[:200]))
    wd = project_workdir(tmp_path / "w", data, es8_url, index, id_from_json="eventID")
    wd.edit(wd.input_cfg, ticker_interval="1")
    wd.edit(wd.es_cfg, ticker_interval="1")
    d = DaemonDir.existing(wd.path)
    d.start()
    try:
        d.wait_for("the first 200 records", lambda: count(es8_url, index + "*") == 200)
        with open(data, "ab") as f:
            f.write(b"".join(records[200:]))
        d.wait_for(f"all {len(records)} records", lambda: count(es8_url, index + "*") == len(records))
    finally:
        status = d.stop()
    assert status == 0, d.log()[-4000:]
    held = {doc["_id"] for doc in documents(es8_url, index + "*")}
    assert held == {json.loads(line)["eventID"] for line in records}
    assert wd.checkpoints()["input.file"] == data.stat().st_size
