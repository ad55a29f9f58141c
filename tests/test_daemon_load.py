"""Dynamic loading through sandbox_load_path (hindsight_py/daemon.py, load_path.py) while the
daemon ships into a real Elasticsearch: plugins start, are replaced and stop, bad files are
refused with an .err, and nothing is lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon_helpers import WAIT, DaemonDir, cfg_text, es_output
from native_pipeline import count, documents

TOTAL = 6000

# numbered records from its checkpoint, 200 a call, up to TOTAL: a restart resumes where it was
GENERATOR = """
from hindsight_py.plugin import inject_payloads

VERSION = %d

def process_message(checkpoint):
    n = int(checkpoint or 0)
    if n < %d:
        end = min(n + 200, %d)
        inject_payloads([b'{"n": %%d, "v": %%d}' %% (i, VERSION) for i in range(n, end)], checkpoint=end)
    return 0
"""

COUNTER_CFG = cfg_text({"filename": "counter.lua", "message_matcher": "TRUE", "ticker_interval": 1})
COUNTER_LUA = """
local n = 0
function process_message() n = n + 1 return 0 end
function timer_event(ns) end
"""


def generator(version: int) -> str:
    return GENERATOR % (version, TOTAL, TOTAL)


def test_plugins_come_and_go_through_load_with_nothing_lost(tmp_path: Path, es8_url: str, scratch_index) -> None:
    index = scratch_index(es8_url)
    d = DaemonDir(tmp_path)
    run, load = tmp_path / "run", tmp_path / "load"
    d.put("run", "input", "gen.py", generator(1))
    d.put("run", "input", "gen.cfg", cfg_text({"filename": "gen.py", "ticker_interval": 1}))
    es = es_output(es8_url, index, flush_count=300)
    d.put("run", "output", "es.cfg", cfg_text(es))
    d.start()
    try:
        d.wait_for("the first documents", lambda: count(es8_url, index) > 0)

        # a new analysis plugin with its code; then its .off stops it
        d.put("load", "analysis", "counter.lua", COUNTER_LUA)
        d.put("load", "analysis", "counter.cfg", COUNTER_CFG)
        d.wait_for("analysis.counter loaded", lambda: "analysis.counter loaded" in d.log())
        assert (run / "analysis/counter.cfg").exists() and (run / "analysis/counter.lua").exists()
        assert not (load / "analysis/counter.cfg").exists()
        d.put("load", "analysis", "counter.off", "")
        d.wait_for("run/analysis/counter.off", lambda: (run / "analysis/counter.off").exists())
        assert not (run / "analysis/counter.cfg").exists() and not (load / "analysis/counter.off").exists()

        # the output replaced while it ships: its checkpoint carries over
        d.put("load", "output", "es.cfg", cfg_text({**es, "flush_count": 500}))
        d.wait_for("output.es replaced", lambda: "output.es replaced" in d.log())
        assert "flush_count = 500" in (run / "output/es.cfg").read_text()

        # new code for the running input: it restarts from its checkpoint
        d.put("load", "input", "gen.py", generator(2))
        d.wait_for("input.gen replaced", lambda: "input.gen replaced" in d.log())

        # a malformed new plugin and a malformed replacement: refused, the daemon and output.es go on
        d.put("load", "output", "bad.cfg", "filename = \n")
        d.put("load", "output", "es.cfg", cfg_text({**es, "message_matcher": "Type =="}))
        bad_err = d.wait_for("run/output/bad.err", lambda: (run / "output/bad.err").exists()
                             and (run / "output/bad.err").read_text())
        es_err = d.wait_for("run/output/es.err", lambda: (run / "output/es.err").exists()
                            and (run / "output/es.err").read_text())
        assert "load/output/bad.cfg" in bad_err and "invalid message_matcher" in es_err
        assert (load / "output/bad.cfg").exists() and not (run / "output/bad.cfg").exists()
        assert "flush_count = 500" in (run / "output/es.cfg").read_text()  # the running cfg is untouched
        assert "loading load/output/bad.cfg failed" in d.log()
        shipped = count(es8_url, index)
        d.wait_for("output.es still shipping", lambda: count(es8_url, index) > shipped)

        # turned off while the input goes on, then on again: it resumes from its checkpoint
        (load / "output/es.cfg").unlink()
        d.put("load", "output", "es.off", "")
        d.wait_for("run/output/es.off", lambda: (run / "output/es.off").exists())
        d.wait_for("output.es stopped", lambda: "output.es stopping" in d.log())
        d.put("load", "output", "es.cfg", cfg_text(es))
        d.wait_for("output.es loaded again", lambda: "output.es loaded" in d.log())
        assert not (run / "output/es.off").exists() and not (run / "output/es.err").exists()

        d.wait_for(f"{TOTAL} documents", lambda: count(es8_url, index) >= TOTAL)
        d.wait_for("the input's last checkpoint", lambda: d.checkpoints().get("input.gen") == str(TOTAL))
    finally:
        status = d.stop()
    assert status == 0, d.log()[-4000:]
    docs = documents(es8_url, index)
    numbers = sorted(doc["n"] for doc in docs)
    assert numbers == list(range(TOTAL)), "each record exactly once across every replacement"
    assert {doc["v"] for doc in docs} == {1, 2}  # both versions of the input's code ran
    cps = d.checkpoints()
    assert cps["input->output.es"] == cps["input"]
    assert "Traceback" not in d.log()


# hindsight_cli: `first` writes a cfg for `second` into load/ and ends at once (so no input runs
# then); `second`, which would run forever (ticker_interval), injects two messages and turns itself
# off, rewriting its .off at every call
FIRST = """
from hindsight_py.plugin import inject_payloads

def process_message(checkpoint):
    inject_payloads([b'{"from": "first"}'])
    with open("load/input/second.cfg", "w") as fh:
        fh.write('filename = "second.py"\\nticker_interval = 1\\n')
    return 0
"""
SECOND = """
from hindsight_py.plugin import inject_payloads

def process_message(checkpoint):
    if checkpoint is None:
        inject_payloads([b'{"from": "second"}', b'{"from": "second"}'], checkpoint=1)
    open("load/input/second.off", "w").close()
    return 0
"""


def test_hindsight_cli_starts_what_load_gets_while_it_runs_and_ends_once_no_input_runs(tmp_path: Path) -> None:
    d = DaemonDir(tmp_path)
    run, load = tmp_path / "run", tmp_path / "load"
    d.put("run", "input", "first.py", FIRST)
    d.put("run", "input", "first.cfg", cfg_text({"filename": "first.py"}))
    d.put("run", "input", "second.py", SECOND)  # its code only: started by the cfg `first` writes
    cli = Path(sys.executable).parent / "hindsight_cli"
    result = subprocess.run([str(cli), "hindsight.cfg", "7"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=WAIT, stdin=subprocess.DEVNULL)
    log = result.stderr
    assert result.returncode == 0, log[-4000:]  # a plugin stopped by its .off is no failure
    # `first` ended right after writing the cfg: the look at load/ before the drain started `second`
    assert "input.second loaded" in log and "input.second stopping (load/input/second.off)" in log
    assert "input plugins have exited; cascading shutdown initiated" in log
    assert "summary: read 3 messages" in log
    assert (run / "input/second.off").exists() and not (run / "input/second.cfg").exists()
    assert not (load / "input/second.cfg").exists()
