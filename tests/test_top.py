"""`hindsight-py top`, driven in tmux as a person would: its screen read while the project's run/
ships into Elasticsearch 8 (kept running by an input with a ticker), then `q` typed.

Cost: about 10 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from delivery_helpers import Background, LineFile, project_workdir, wait_until

LINES = 3_000
TOP = [str(Path(sys.executable).parent / "hindsight-py"), "top", "hindsight.cfg", "--interval", "0.5"]


class Tmux:
    """A detached tmux session (scripts/test.sh installs tmux) running `command`."""

    def __init__(self, cwd: Path, command: list[str]) -> None:
        self.name = f"hsp-top-{uuid.uuid4().hex[:8]}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "140", "-y", "30", "-c", str(cwd),
                        *command], check=True)

    def screen(self) -> str:
        result = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
        return result.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def row(screen: str, plugin: str) -> list[str]:
    found = [line.split() for line in screen.splitlines() if line.startswith(plugin + " ")]
    assert found, screen
    return found[0]


def test_top_shows_the_running_daemon_and_quits_on_q(tmp_path: Path, es8_url: str, scratch_index) -> None:
    lines = LineFile.write(tmp_path / "lines.json", LINES)
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, scratch_index(es8_url))
    (wd.path / "run/input/keepalive.cfg").write_text('filename = "keepalive.lua"\nticker_interval = 1\n')
    (wd.path / "run/input/keepalive.lua").write_text("function process_message() return 0 end\n")
    output = "output.elasticsearch_bulk_api"
    top = Tmux(wd.path, TOP)
    run = None
    try:
        wait_until(lambda: "waiting for output/stats.json" in top.screen(), 30, "top's waiting screen")
        run = Background(wd)

        def delivered() -> bool:
            try:
                stats = json.loads((wd.output / "stats.json").read_text())
            except (OSError, ValueError):
                return False
            return stats["plugins"].get(output, {}).get("indexed") == LINES

        wait_until(delivered, 120, "every line delivered")
        wait_until(lambda: row(top.screen(), output)[4] == "3.0K", 30, "top showing the deliveries")
        screen = top.screen()
        assert screen.splitlines()[2].split() == ["PLUGIN", "STATE", "RATE/s", "PROCESSED", "DELIVERED", "DEAD",
                                                  "MOVED", "LAG", "BYTES", "LAG", "MSGS", "UTIL%"]
        assert row(screen, "input.file")[1:4] == ["ended", "0", "3.0K"]
        assert row(screen, "input.keepalive")[1] == "running"
        assert row(screen, output)[1] == "running"
        assert row(screen, output)[5:9] == ["0", "0", "0", "0"]  # no dead letters, nothing moved, no lag
        top.keys("q")
        wait_until(lambda: not top.alive(), 10, "top to quit on q")
    finally:
        top.kill()
        if run is not None:
            run.process.send_signal(signal.SIGINT)
            assert run.process.wait(timeout=120) == 0


def test_top_with_a_bad_cfg_says_why(tmp_path: Path) -> None:
    result = subprocess.run([*TOP[:2], str(tmp_path / "missing.cfg")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "missing.cfg" in result.stderr
