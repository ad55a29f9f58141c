"""A broken configuration stops `hindsight_cli` before anything runs: one error line naming the file
and the key, exit status 1. The real CLI runs as a subprocess on a copy of the project's run/.

Cost: about 0.3 s per case (interpreter start and config load; no plugin starts, no server).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from upstream_files import replace_once

PROJECT_RUN = REPO_ROOT / "run"
USAGE = "usage: hindsight_cli <cfg> [loglevel]\n"
ERROR_LINE = re.compile(r"^\d+ \[error\] hindsight loading (?P<file>\S+) failed: (?P<reason>.+)$")


def hindsight_cli() -> str:
    beside = Path(sys.executable).parent / "hindsight_cli"
    found = str(beside) if beside.exists() else shutil.which("hindsight_cli")
    assert found, "hindsight_cli is not installed (pip install -e .)"
    return found


def run_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hindsight_cli(), *args],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """hindsight.cfg beside a copy of the project's run/, as a user deploys it."""
    shutil.copy(PROJECT_RUN / "hindsight.cfg", tmp_path / "hindsight.cfg")
    shutil.copytree(PROJECT_RUN, tmp_path / "run")
    return tmp_path


def test_the_unbroken_copy_loads(workdir: Path) -> None:
    """The control for every case below: the same copy, unedited, gets past configuration loading
    (it then fails to reach a server at port 9200 or not; either way it is not a config error)."""
    from hindsight_py.supervisor import load_all

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        hs, plugins = load_all("hindsight.cfg", 6)
    assert sorted(p.name for p in plugins) == [
        "analysis.counter",
        "input.file",
        "output.counter_log",
        "output.elasticsearch_bulk_api",
    ]


@dataclass(frozen=True)
class Broken:
    """One mistake: in `file`, the regex `pattern` (one match) becomes `replacement`."""

    file: str
    pattern: str
    replacement: str
    key: str  # what the error must name, besides the file
    reason: str  # a regex the reason must match


CASES = {
    "hindsight.cfg syntax error": Broken(
        "hindsight.cfg",
        r"^output_size\s*=.*$",
        "output_size = 64 * * 1024",
        "",
        r"hindsight\.cfg:\d+: unexpected symbol",
    ),
    "plugin cfg syntax error": Broken(
        "run/output/elasticsearch_bulk_api.cfg",
        r"^flush_count\s*=.*$",
        "flush_count = 500 500",
        "",
        r"run/output/elasticsearch_bulk_api\.cfg:\d+: ",
    ),
    "hindsight.cfg unknown key": Broken(
        # a misspelt optional key (a misspelt required one fails as missing first)
        "hindsight.cfg",
        r"^backpressure_disk_free(?=\s*=)",
        "backpresure_disk_free",
        "backpresure_disk_free",
        r"invalid option: 'backpresure_disk_free'",
    ),
    "defaults table unknown key": Broken(
        "hindsight.cfg",
        r"^output_defaults = \{$",
        'output_defaults = { message_matcher = "TRUE",',
        "output_defaults.message_matcher",
        r"invalid option: 'output_defaults\.message_matcher'",
    ),
    "plugin cfg wrong type": Broken(
        "run/input/file.cfg",
        r"^instruction_limit\s*=.*$",
        'instruction_limit = "x"',
        "instruction_limit",
        r"instruction_limit must be set to a number",
    ),
    "hindsight.cfg wrong type": Broken(
        "hindsight.cfg",
        r"^output_size\s*=.*$",
        'output_size = "big"',
        "output_size",
        r"output_size must be set to a number",
    ),
    "plugin cfg missing filename": Broken(
        "run/analysis/counter.cfg", r"^filename\s*=.*$", "", "filename", r"filename must be set to a string"
    ),
    "plugin cfg bad message_matcher": Broken(
        "run/output/elasticsearch_bulk_api.cfg",
        r"^message_matcher\s*=.*$",
        "message_matcher = \"Logger == 'input.file' &&\"",
        "message_matcher",
        r"invalid message_matcher: Logger == 'input\.file' &&",
    ),
    "plugin cfg value with a newline": Broken(
        # quoted back in the error, escaped: still one line
        "run/output/elasticsearch_bulk_api.cfg",
        r"^message_matcher\s*=.*$",
        'message_matcher = "TRUE &&\\n"',
        "message_matcher",
        r"invalid message_matcher: TRUE &&\\n ",
    ),
}


def line_of(text: str, pattern: str) -> int:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match is not None
    return text.count("\n", 0, match.start()) + 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_error_line_and_exit_1(case: str, workdir: Path) -> None:
    broken = CASES[case]
    target = workdir / broken.file
    original = target.read_text()
    line_number = line_of(original, broken.pattern)
    target.write_text(replace_once(original, broken.pattern, broken.replacement, case))

    result = run_cli(workdir, "hindsight.cfg")

    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    match = ERROR_LINE.match(lines[0])
    assert match, f"not an error line naming the file: {lines[0]!r}"
    assert match["file"] == broken.file
    assert re.search(broken.reason, match["reason"]), match["reason"]
    if broken.key:
        assert re.search(rf"\b{re.escape(broken.key)}\b", match["reason"]), (
            f"the key is not named: {lines[0]}"
        )
    else:
        # a syntax error has no key to name: Lua names the line, which is the one we broke
        assert f"{broken.file}:{line_number}:" in match["reason"], lines[0]
    assert result.stdout == ""
    # refused before anything started: no queues, no checkpoints, no .rtc files
    assert not (workdir / "output").exists()
    if broken.file.startswith("run/"):
        # as upstream, the reason is also left beside the plugin cfg
        err = target.with_suffix(".err")
        assert err.read_text().rstrip("\n").endswith(match["reason"])


def test_missing_cfg_file(workdir: Path) -> None:
    result = run_cli(workdir, "no-such.cfg")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    match = ERROR_LINE.match(lines[0])
    assert match and match["file"] == "no-such.cfg", lines[0]
    assert "No such file or directory" in match["reason"]
    assert not (workdir / "output").exists()


@pytest.mark.parametrize("args", [(), ("hindsight.cfg", "7", "extra")], ids=["no args", "three args"])
def test_usage(args: tuple[str, ...], workdir: Path) -> None:
    result = run_cli(workdir, *args)
    assert result.returncode == 1
    assert result.stderr == USAGE
    assert result.stdout == ""
    assert not (workdir / "output").exists()
