"""Shutdown and status: a stop signal drains what is queued and saves the checkpoints; a second one
stops at once without losing what is on disk; the drain is bounded by a timeout; a terminal shows a
live status line, a pipe never gets its escape codes.

Each test runs the project's run/ into Elasticsearch 8 (the timeout test into a port where nothing
listens, then into es8).

Cost: about 10-20 s per signal test, a few seconds for the others.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from daemon_helpers import DaemonDir, cfg_text
from delivery_helpers import (
    Background,
    Index,
    LineFile,
    figures,
    hindsight_cli,
    project_workdir,
    run_cli,
    tally,
    wait_until,
)

LINE_COUNT = 60_000
STATUS = re.compile(
    r"read (?P<read>[\d,]+) lines \| shipped (?P<shipped>[\d,]+) documents \((?P<rate>[\d,]+)/s\) \| "
    r"dead-lettered (?P<dead>[\d,]+) \| retried (?P<retried>[\d,]+)"
)


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    return LineFile.write(tmp_path_factory.mktemp("shutdown") / "cloudtrail.json", LINE_COUNT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_drains_the_queues_and_saves_the_checkpoints(signum: int, lines: LineFile, es8_url: str,
                                                                  scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    run = Background(wd)
    wait_until(lambda: index.refreshed_count() >= 2_000, 120, "the first documents in the index")
    run.signal(signum)
    stopped = run.wait()

    # a clean stop: everything the input read was delivered, and the checkpoints say so exactly
    assert stopped.returncode == 0, stopped.tail()
    assert "\x1b[" not in stopped.stderr  # stderr is a file here: no status line
    read = wd.input_offset()
    covered = lines.lines_before(read)
    assert lines.ends[covered - 1] == read  # the input stopped on a line boundary
    assert index.refreshed_count() == covered == stopped.summary()["delivered"]

    again = run_cli(wd)

    assert again.returncode == 0, again.tail()
    outcome = tally(index, lines)
    figures(f"{signal.Signals(signum).name} after 2,000 documents, {lines.count} lines",
            delivered_before_stop=covered, lost=len(outcome.missing), duplicates=outcome.duplicates)
    # nothing lost and, the stop being clean, nothing sent twice either (documents have no _id)
    assert outcome.missing == [] and outcome.duplicates == 0 and outcome.strangers == 0, outcome.describe()


def test_a_second_signal_stops_at_once_without_losing_what_is_on_disk(lines: LineFile, es8_url: str,
                                                                      scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    run = Background(wd)
    wait_until(lambda: index.refreshed_count() >= 2_000, 120, "the first documents in the index")
    children = run.children()
    run.signal(signal.SIGTERM)
    # signals of one kind sent back to back may reach the process as one: wait for the first
    wait_until(lambda: b"stop signal received" in run.log_path.read_bytes(), 30, "the first signal to be handled")
    run.signal(signal.SIGTERM)
    stopped = run.wait(60)

    assert stopped.returncode & 1, stopped.tail()  # a forced stop is not a clean exit
    assert "second stop signal" in stopped.stderr
    assert all(not Path(f"/proc/{pid}/cmdline").exists() or _zombie(pid) for pid in children)
    assert stopped.summary()["status"] == stopped.returncode
    shipped_before = index.refreshed_count()

    again = run_cli(wd)

    assert again.returncode == 0, again.tail()
    outcome = tally(index, lines)
    figures(f"two SIGTERMs after 2,000 documents, {lines.count} lines", indexed_at_stop=shipped_before,
            lost=len(outcome.missing), duplicates=outcome.duplicates)
    assert outcome.missing == [] and outcome.strangers == 0, outcome.describe()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_drain_is_bounded_by_the_shutdown_timeout(es8_url: str, scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    lines = LineFile.write(tmp_path / "lines.json", 5_000)
    nowhere = f"http://127.0.0.1:{_free_port()}"  # connection refused: the output retries forever
    wd = project_workdir(tmp_path / "w", lines.path, nowhere, index.name)
    run = Background(wd, env={"HINDSIGHT_PY_SHUTDOWN_TIMEOUT": "2"})
    wait_until(lambda: wd.input_offset() == lines.ends[-1], 60, "the input to read the whole file")
    run.signal(signal.SIGTERM)
    stopped = run.wait(120)

    # the outputs were told to stop after 2 s: what they could not deliver stays queued
    assert stopped.returncode != 0, stopped.tail()
    assert "shutdown did not finish within 2s" in stopped.stderr
    assert stopped.summary()["delivered"] == 0
    assert wd.input_offset() == lines.ends[-1]  # the input's checkpoint was saved

    wd.edit(wd.es_cfg, port=es8_url.rsplit(":", 1)[1])
    again = run_cli(wd)

    assert again.returncode == 0, again.tail()
    outcome = tally(index, lines)
    assert outcome.missing == [] and outcome.duplicates == 0 and outcome.strangers == 0, outcome.describe()


def test_a_terminal_shows_a_live_status_line(lines: LineFile, es8_url: str, scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    master, slave = pty.openpty()
    process = subprocess.Popen([hindsight_cli(), "hindsight.cfg"], cwd=wd.path, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            assert ready, "no output for 300 s"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        rc = process.wait(60)
    text = output.decode("utf-8", "replace")

    assert rc == 0, text[-3000:]
    segments = text.split("\r\x1b[K")
    statuses = [m for m in (STATUS.fullmatch(s.strip("\r\n")) for s in segments) if m]
    assert statuses, f"no status line in:\n{text[-3000:]}"
    shipped = [int(m["shipped"].replace(",", "")) for m in statuses]
    assert shipped == sorted(shipped) and max(shipped) > 0 and max(shipped) <= lines.count
    assert all(m["dead"] == "0" for m in statuses)
    # log lines and the summary start on a line of their own: they erase the status line first
    assert re.search(r"\r\x1b\[K\d+ \[notice\] hindsight summary: read 60000 messages, delivered 60000 documents",
                     text), text[-3000:]
    assert index.refreshed_count() == lines.count


WRITER = """
require "io"
require "os"
function process_message()
    local n = tonumber(read_message("Payload"))
    if n == 200 then -- the last one takes a while: the other output has long drained its queues
        local t = os.clock()
        while os.clock() - t < 0.5 do end
    end
    local fh = assert(io.open("written.txt", "w")) -- rewritten at each message, as dashboard files are
    fh:write(n, "\\n")
    fh:close()
    return 0
end
function timer_event() end
"""

READER = """
require "io"
function process_message() return 0 end
function timer_event(ns, shutdown)
    if not shutdown then return end
    local fh = assert(io.open("written.txt"))
    local last = fh:read("*a")
    fh:close()
    assert(last == "200\\n", "read " .. last)
end
"""

SOURCE = """
function process_message()
    for i = 1, 200 do inject_message({Payload = tostring(i)}) end
    return 0
end
"""


def _run_writer_and_reader(tmp_path: Path, writer: str, reader: str) -> None:
    """200 messages to two outputs: `writer` takes them all; `reader` matches none, so it drains at
    once and waits at the barrier for its shutdown timer_event. The run must exit 0."""
    d = DaemonDir(tmp_path)
    d.put("run", "input", "source.lua", SOURCE)
    d.put("run", "input", "source.cfg", cfg_text({"filename": "source.lua"}))
    d.put("run", "output", "writer.lua", writer)
    d.put("run", "output", "writer.cfg", cfg_text({"filename": "writer.lua", "message_matcher": "TRUE",
                                                  "instruction_limit": 0}))
    d.put("run", "output", "reader.lua", reader)
    d.put("run", "output", "reader.cfg", cfg_text({"filename": "reader.lua", "message_matcher": "FALSE",
                                                  "ticker_interval": 60}))
    result = subprocess.run([hindsight_cli(), "hindsight.cfg", "7"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]


def test_outputs_run_their_shutdown_timer_event_once_every_output_has_drained(tmp_path: Path) -> None:
    # the reader matches nothing and drains at once; its shutdown timer_event reads the file the
    # writer is still writing: it runs only after the writer has processed its last message
    _run_writer_and_reader(tmp_path, WRITER, READER)
    assert (tmp_path / "written.txt").read_text() == "200\n"


STUCK_WRITER = """
require "io"
require "os"
function process_message()
    if tonumber(read_message("Payload")) == 200 then -- stuck on its last message, as on a dead server
        local t = os.time()
        while os.time() - t < 9 do end
        local fh = assert(io.open("writer_done.txt", "w"))
        fh:write(os.time(), "\\n")
        fh:close()
    end
    return 0
end
function timer_event() end
"""

STAMPING_READER = """
require "io"
require "os"
function process_message() return 0 end
function timer_event(ns, shutdown)
    if not shutdown then return end
    local fh = assert(io.open("reader_shutdown.txt", "w"))
    fh:write(os.time(), "\\n")
    fh:close()
end
"""


def test_an_output_stuck_on_its_last_message_holds_up_the_others_shutdown_for_a_bounded_time(tmp_path: Path) -> None:
    # the barrier waits OUTPUT_BARRIER_WAIT (5 s) for the stuck writer, not the 9 s it takes: the
    # reader's shutdown timer_event (its last batch, for a bulk output) runs while the writer is stuck
    _run_writer_and_reader(tmp_path, STUCK_WRITER, STAMPING_READER)
    reader_shutdown = int((tmp_path / "reader_shutdown.txt").read_text())
    writer_done = int((tmp_path / "writer_done.txt").read_text())
    assert reader_shutdown <= writer_done - 2, (reader_shutdown, writer_done)
