"""`hindsight-py check hindsight.cfg`: each kind of bad setup is reported with its file and key, all
of them in one pass, with exit status 1; a good setup passes; no plugin code runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HINDSIGHT_CFG = """output_path = "output"
sandbox_run_path = "run"
sandbox_load_path = "load"
analysis_lua_path = "?.lua"
analysis_lua_cpath = "?.so"
io_lua_path = "?.lua"
io_lua_cpath = "?.so"
input_defaults = {}
analysis_defaults = {}
output_defaults = {}
"""
# its top-level code would leave a file behind if it ran
GOOD_LUA = 'local f = io.open("RAN", "w"); f:write("x"); f:close()\nfunction process_message() return 0 end\n'


def check(cwd: Path) -> tuple[int, list[str]]:
    result = subprocess.run([sys.executable, "-m", "hindsight_py", "check", "hindsight.cfg"], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout.splitlines()


def setup(tmp_path: Path, cfg: str = HINDSIGHT_CFG) -> Path:
    for kind in ("input", "analysis", "output"):
        (tmp_path / "run" / kind).mkdir(parents=True)
        (tmp_path / "load" / kind).mkdir(parents=True)
    (tmp_path / "hindsight.cfg").write_text(cfg)
    (tmp_path / "run/input/good.cfg").write_text('filename = "good.lua"\n')
    (tmp_path / "run/input/good.lua").write_text(GOOD_LUA)
    return tmp_path


def test_a_good_setup_passes_and_runs_nothing(tmp_path: Path) -> None:
    setup(tmp_path)
    (tmp_path / "run/output/py.cfg").write_text('filename = "py.py"\nmessage_matcher = "TRUE"\n')
    (tmp_path / "run/output/py.py").write_text("open('RAN', 'w')\ndef process_message():\n    return 0\n")
    status, lines = check(tmp_path)
    assert (status, lines) == (0, ["hindsight.cfg: ok, 2 plugins"])
    assert not (tmp_path / "RAN").exists()


def test_every_bad_plugin_is_reported_at_once(tmp_path: Path) -> None:
    setup(tmp_path)
    files = {
        "run/analysis/matcher.cfg": 'filename = "good.lua"\nmessage_matcher = "Type =="\n',
        "run/analysis/good.lua": GOOD_LUA,
        "run/output/nosource.cfg": 'filename = "missing.lua"\nmessage_matcher = "TRUE"\n',
        "run/output/lua_syntax.cfg": 'filename = "lua_syntax.lua"\nmessage_matcher = "TRUE"\n',
        "run/output/lua_syntax.lua": "function process_message(\n return 0 end\n",
        "run/output/py_syntax.cfg": 'filename = "py_syntax.py"\nmessage_matcher = "TRUE"\n',
        "run/output/py_syntax.py": "def process_message(:\n    pass\n",
        "run/output/no_matcher.cfg": 'filename = "good.lua"\n',
        "run/output/bad_value.cfg": 'filename = "good.lua"\nmessage_matcher = "TRUE"\nticker_interval = "x"\n',
        "run/output/good.lua": GOOD_LUA,
        "load/input/cfg_syntax.cfg": 'filename = "x.lua"\nticker_interval = \n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    status, lines = check(tmp_path)
    assert status == 1
    assert lines[-1] == "7 problems in 7 files"
    found = {line.split(": ")[0]: line for line in lines[:-1]}
    assert found.keys() == {"run/analysis/matcher.cfg", "run/output/nosource.cfg", "run/output/lua_syntax.lua",
                            "run/output/py_syntax.py", "run/output/no_matcher.cfg", "run/output/bad_value.cfg",
                            "load/input/cfg_syntax.cfg"}
    assert found["run/analysis/matcher.cfg"].startswith("run/analysis/matcher.cfg: message_matcher: ")
    assert found["run/output/nosource.cfg"].startswith("run/output/nosource.cfg: filename: ")
    assert "missing.lua" in found["run/output/nosource.cfg"]
    assert "lua_syntax.lua:2:" in found["run/output/lua_syntax.lua"]
    assert "line 1" in found["run/output/py_syntax.py"]
    assert found["run/output/no_matcher.cfg"].startswith("run/output/no_matcher.cfg: message_matcher: ")
    assert found["run/output/bad_value.cfg"].startswith("run/output/bad_value.cfg: ticker_interval: ")
    assert "cfg_syntax.cfg:3:" in found["load/input/cfg_syntax.cfg"]
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize(("change", "key"), [
    (lambda cfg: cfg.replace('output_path = "output"\n', ""), "output_path"),
    (lambda cfg: cfg.replace('"run"', '"nowhere"'), "sandbox_run_path"),
    (lambda cfg: cfg + "analysis_threads = 0\n", "analysis_threads"),
    (lambda cfg: cfg + "unknown_key = 1\n", "unknown_key"),
    (lambda cfg: cfg + "output_defaults = {ticker_interval = 'x'}\n", "ticker_interval"),
])
def test_a_bad_hindsight_cfg_names_its_key(tmp_path: Path, change: object, key: str) -> None:
    setup(tmp_path, change(HINDSIGHT_CFG))  # type: ignore[operator]
    status, lines = check(tmp_path)
    assert status == 1
    assert lines[0].startswith("hindsight.cfg: ") and key in lines[0], lines
    assert lines[-1] == "1 problem in 1 file"


def test_a_hindsight_cfg_that_does_not_parse(tmp_path: Path) -> None:
    setup(tmp_path, HINDSIGHT_CFG + "output_size = = 3\n")
    status, lines = check(tmp_path)
    assert status == 1
    assert lines[0].startswith("hindsight.cfg: ") and ":11:" in lines[0], lines
