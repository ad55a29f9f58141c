"""The example Python plugins, run the way a user runs them: hindsight_cli on a run/ directory."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

from conftest import REPO_ROOT

SAMPLE = REPO_ROOT / "examples" / "cloudtrail-sample.ndjson"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_event_names_report_reaches_the_log(tmp_path: Path) -> None:
    _write(tmp_path / "hindsight.cfg", (REPO_ROOT / "run" / "hindsight.cfg").read_text())
    _write(tmp_path / "run/input/flat_file.cfg", f'filename = "flat_file.py"\ninput_filename = "{SAMPLE}"\n')
    _write(tmp_path / "run/analysis/event_names.cfg",
           'filename = "event_names.py"\nmessage_matcher = "Logger == \'input.flat_file\'"\n'
           "ticker_interval = 3600\ntop = 3\nprocess_message_inject_limit = 0\n")
    _write(tmp_path / "run/output/report.cfg",
           'filename = "log_payloads.py"\nmessage_matcher = "Fields[payload_name] == \'event_names\'"\n')
    proc = subprocess.run(["hindsight_cli", "hindsight.cfg"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = Counter(json.loads(line)["eventName"] for line in SAMPLE.read_text().splitlines())
    top3 = expected.most_common(3)
    report = [line for line in proc.stderr.splitlines() if "output.report" in line]
    assert report, proc.stderr
    # the first report line carries the most frequent name; the rest follow in the payload
    assert f"{top3[0][1]}\t{top3[0][0]}" in proc.stderr
    for n, name in ((n, name) for name, n in top3[1:]):
        assert f"{n}\t{name}" in proc.stderr
    assert "read 1000 messages" in proc.stderr
