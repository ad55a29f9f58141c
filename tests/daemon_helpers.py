"""The `hindsight` daemon in a tmp dir, for tests/test_daemon*.py: the native pipeline's layout
(tests/native_pipeline.py) with a load/ directory, run in the background until signalled."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from native_pipeline import HINDSIGHT_CFG, lua

#: how long a test waits for something the daemon should do; generous: the machine is shared
WAIT = 120.0


def hindsight() -> str:
    beside = Path(sys.executable).parent / "hindsight"
    found = str(beside) if beside.exists() else shutil.which("hindsight")
    assert found, "the hindsight daemon is not installed (pip install -e .)"
    return found


def es_output(url: str, index: str, **keys: Any) -> dict[str, Any]:
    return {"filename": "elasticsearch_bulk.py", "message_matcher": "TRUE", "read_queue": "input",
            "ticker_interval": 1, "url": url, "encoders_elasticsearch_common": {"index": index}, **keys}


def cfg_text(keys: dict[str, Any]) -> str:
    return "".join(f"{k} = {lua(v)}\n" for k, v in keys.items())


class DaemonDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        for top in ("run", "load"):
            for kind in ("input", "analysis", "output"):
                (root / top / kind).mkdir(parents=True, exist_ok=True)
        (root / "hindsight.cfg").write_text(
            HINDSIGHT_CFG.replace('sandbox_load_path      = ""', 'sandbox_load_path      = "load"'))
        self.proc: subprocess.Popen[str] | None = None

    @classmethod
    def existing(cls, root: Path) -> DaemonDir:
        """A directory laid out already (its hindsight.cfg and run/ as they are)."""
        d = cls.__new__(cls)
        d.root, d.proc = root, None
        return d

    def put(self, where: str, kind: str, name: str, text: str) -> Path:
        """Write `<where>/<kind>/<name>` through a rename, as an operator's deploy would."""
        path = self.root / where / kind / name
        tmp = path.with_name("." + name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def start(self) -> subprocess.Popen[str]:
        self._log = open(self.root / "hindsight.log", "w")
        self.proc = subprocess.Popen([hindsight(), "hindsight.cfg", "7"], cwd=self.root, stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        return self.proc

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM and the exit status; a daemon that does not stop in time is killed (and fails)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"the daemon did not stop within {timeout:g}s:\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()

    def log(self) -> str:
        return (self.root / "hindsight.log").read_text(errors="replace")

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Poll `condition` until it is truthy (its value is returned); the daemon must stay up."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert self.proc is None or self.proc.poll() is None, f"the daemon exited:\n{self.log()[-4000:]}"
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g}s\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def checkpoints(self) -> dict[str, str]:
        import re

        path = self.root / "output" / "hindsight.cp"
        found = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            match = re.match(r"_G\['(.*)'\] = '?(.*?)'?$", line)
            if match:
                found[match.group(1)] = match.group(2)
        return found
