"""A second output type through the same settle/commit interface as Elasticsearch: a file sink.

The sink is the test's own Python plugin (written below into the run directory): it hands each
batch of payloads to a background thread that appends and fsyncs them, and registers its ticket
counter with `plugin.track_delivery`. Nothing outside the plugin knows it exists: the read loop
commits a position only once the write before it is settled, as it does for bulk bodies.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import REPO_ROOT
from delivery_helpers import hindsight_cli, wait_until

from hindsight_py.checkpoint import load_checkpoints
from hindsight_py.queue import QueueReader, format_position

SINK_PLUGIN = '''
"""File sink: payloads appended to `sink_path` by a background thread, fsynced, then settled."""
import os
import threading

from hindsight_py.plugin import bind, is_running, read_config, read_message, track_delivery, update_checkpoint

BATCH = 50
HANG_ON = os.environ.get("SINK_HANG_ON", "").encode()  # test hook: the body with this line never settles


class FileSink:
    """A settle/commit ticket counter: `ticket` bodies handed over, `done` bodies on disk."""

    def __init__(self, path):
        self.path = path
        self.ticket = 0
        self.done = 0
        self.interrupted = False
        self._is_running = bind(is_running)  # wait() is also called by the host, outside the plugin's calls

    @property
    def busy(self):
        return self.done != self.ticket

    def submit(self, data):
        assert not self.busy
        self.ticket += 1
        threading.Thread(target=self._write, args=(data, self.ticket), daemon=True).start()

    def _write(self, data, ticket):
        if HANG_ON and HANG_ON in data:
            return  # a write that never ends
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.done = ticket

    def wait(self):
        while self.busy:
            if not self._is_running():
                self.interrupted = True
                return "stopped before the file was written; its messages stay queued"
            threading.Event().wait(0.02)
        return None


sink = FileSink(read_config("sink_path"))
track_delivery(sink)
buffer = []


def flush():
    """Hand the buffer over unless a write is in flight (one at a time, never waiting for it)."""
    if buffer and not sink.busy:
        sink.submit(b"".join(buffer))
        buffer.clear()
    return not buffer


def process_message(sequence_id):
    buffer.append(read_message("Payload").encode() + b"\\n")
    if len(buffer) >= BATCH and flush():
        return 0  # everything so far is handed over: its commit waits for the write
    return -4  # held: not settled before it is handed over


def timer_event(ns, shutdown):
    if shutdown:
        sink.wait()
    if flush():
        update_checkpoint()
'''


def workdir(tmp_path: Path, lines: list[str]) -> Path:
    wd = tmp_path / "wd"
    (wd / "run" / "input").mkdir(parents=True)
    (wd / "run" / "output").mkdir()
    (wd / "run" / "analysis").mkdir()
    (wd / "in.txt").write_text("".join(line + "\n" for line in lines))
    shutil.copy(REPO_ROOT / "run" / "hindsight.cfg", wd / "hindsight.cfg")  # output_path "output", run/
    shutil.copy(REPO_ROOT / "run" / "input" / "file.lua", wd / "run" / "input" / "file.lua")
    (wd / "run" / "input" / "file.cfg").write_text('filename = "file.lua"\ninput_filename = "in.txt"\n'
                                                    "instruction_limit = 0\n")
    (wd / "run" / "output" / "file_sink.py").write_text(SINK_PLUGIN)
    (wd / "run" / "output" / "file_sink.cfg").write_text(
        'filename = "file_sink.py"\nmessage_matcher = "TRUE"\nread_queue = "input"\nticker_interval = 1\n'
        f'sink_path = "{wd / "sink.txt"}"\n')
    return wd


def queue_end(wd: Path) -> str:
    reader = QueueReader(wd / "output" / "input", None, 1 << 20)
    while reader.read_batch(10_000) is not None:
        pass
    return format_position(reader.position())


def checkpoints(wd: Path) -> dict[str, object]:
    return dict(load_checkpoints(wd / "output" / "hindsight.cp"))


def test_a_file_sink_output_settles_through_the_same_interface(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(1234)]
    wd = workdir(tmp_path, lines)
    run = subprocess.run([hindsight_cli(), "hindsight.cfg"], cwd=wd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (wd / "sink.txt").read_bytes() == "".join(line + "\n" for line in lines).encode()
    assert checkpoints(wd)["input->output.file_sink"] == queue_end(wd)


def test_a_kill_with_a_write_in_flight_loses_nothing(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(5000)]  # several batches: commits between them
    wd = workdir(tmp_path, lines)
    # the body with line 4500 never settles: the daemon is killed (-9) while it is in flight
    proc = subprocess.Popen([hindsight_cli(), "hindsight.cfg"], cwd=wd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SINK_HANG_ON": "line 4500\n"})
    sink = wd / "sink.txt"
    # the first body is the first 50 lines at most (the sink hands over 50, or a timer fewer)
    wait_until(lambda: sink.exists() and sink.read_text().count("\n") > 0, 60, "a first body on disk")
    # The loop learns what a call settled when the call returns, and a position then waits for
    # every ticket open at that moment: under load the first checkpoint may wait behind the hung
    # write too. Whatever was committed, none may pass the write in flight.
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)  # its plugin processes die with it (PR_SET_PDEATHSIG)
    proc.wait(60)
    written = sink.read_text().splitlines()
    assert written == lines[:len(written)] and len(written) < 4500
    cp = checkpoints(wd).get("input->output.file_sink")
    reader = QueueReader(wd / "output" / "input", None, 1 << 20)
    ends = []
    while (batch := reader.read_batch(1000)) is not None:
        ends += [format_position((batch.file_id, end)) for end in batch.ends]
    settled = ends[:len(written)]
    assert cp is None or cp in settled, f"the checkpoint {cp} is past the last line on disk ({settled[-1]})"

    run = subprocess.run([hindsight_cli(), "hindsight.cfg"], cwd=wd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    again = sink.read_text().splitlines()
    assert sorted(set(again), key=lambda s: int(s.split()[1])) == lines, "every line, none lost"
    assert checkpoints(wd)["input->output.file_sink"] == queue_end(wd)
