"""Crash safety: `kill -9` of hindsight_cli at any moment loses nothing.

The project's run/ ships a file into Elasticsearch 8 while the supervisor is killed (SIGKILL) at
random moments and restarted on the same output_path. After each kill the test checks the on-disk
invariants a restart depends on: the plugin processes died with the supervisor, the input's
checkpoint in hindsight.cp does not run ahead of the input queue, and the output's checkpoint does
not run ahead of the index. At the end every line must be in the index; documents without `_id`
may be duplicated (at-least-once: about a checkpoint interval of input per kill), documents with
an `_id` from the record (`id_from_json = "eventID"`) never are.

Also: a torn record at the end of a queue file is cut, never shipped; an output that holds messages
(-4) keeps its checkpoint behind them even across batches its matcher skips.

Cost: the two kill runs take about 40-60 s each on 2 cores (200,000 compact lines, 20 kills); the
other tests a few seconds each.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from delivery_helpers import (
    Background,
    Index,
    LineFile,
    Workdir,
    event_id,
    figures,
    gone,
    project_workdir,
    record_line,
    run_cli,
    tally,
    wait_until,
)

from hindsight_py import message as hmsg
from hindsight_py.queue import QueueReader, list_ids, parse_position

LINE_COUNT = 200_000
KILLS = 20
# Each run lives this long before its kill: from before the plugins are loaded to well into shipping.
LIFETIME_S = (0.3, 1.6)
# At-least-once bound without `_id`: hindsight.cp is written every 0.5 s and the children report
# every 0.25 s, so a kill re-sends under a second of input. Expressed in lines (the input reads about
# 100,000-200,000 compact lines per second here), per kill, with room for a slow CI machine.
MAX_DUPLICATES_PER_KILL = 200_000


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    return LineFile.write(tmp_path_factory.mktemp("crash") / "cloudtrail.json", LINE_COUNT)


def _seq_of(raw: bytes) -> int:
    import json

    payload = hmsg.payload_of(raw)
    assert payload is not None
    return int(json.loads(payload)["seq"])


def _queue_records(wd: Workdir, until: tuple[int, int] | None = None) -> list[tuple[tuple[int, int], bytes]]:
    """The input queue's records in order (with their end positions), up to `until` if given."""
    out = []
    directory = wd.output / "input"
    ids = list_ids(directory)
    if not ids:
        return out
    with QueueReader(directory, (ids[0], 0), 64 << 20, validate=False) as reader:
        while True:
            batch = reader.read_batch(10_000, 64 << 20)
            if batch is None:
                return out
            for raw, end in zip(batch.records, batch.ends, strict=True):
                if until is not None and (batch.file_id, end) > until:
                    return out
                out.append(((batch.file_id, end), raw))


def _check_invariants(wd: Workdir, lines: LineFile, index: Index) -> dict[str, int]:
    """What a restart will rely on, right after a kill."""
    cp = wd.checkpoints()
    # the input's checkpoint covers only lines already in the input queue
    covered = lines.lines_before(int(cp.get("input.file", 0)))
    records = _queue_records(wd)
    last_seq = _seq_of(records[-1][1]) if records else -1
    assert covered == 0 or last_seq >= covered - 1, (
        f"hindsight.cp says the input handled {covered} lines but the queue ends at line {last_seq}")
    # the output's checkpoint covers only documents the server accepted
    position = cp.get("input->elasticsearch_bulk_api")
    delivered_seq = -1
    if isinstance(position, str):
        upto = _queue_records(wd, parse_position(position))
        if upto:
            delivered_seq = _seq_of(upto[-1][1])
            index.refresh()
            assert index.has_event(event_id(delivered_seq)), (
                f"hindsight.cp puts the output past line {delivered_seq}, which is not in the index")
    return {"input_lines": covered, "queue_last": last_seq, "output_last": delivered_seq}


def _kill_and_restart(wd: Workdir, lines: LineFile, index: Index, seed: int) -> tuple[list[dict[str, int]], str]:
    rng = random.Random(seed)
    history = []
    logs = []
    for _ in range(KILLS):
        run = Background(wd)
        time.sleep(rng.uniform(*LIFETIME_S))
        children = run.children()
        run.signal(signal.SIGKILL)
        result = run.wait(60)
        logs.append(result.stderr)
        assert result.returncode == -signal.SIGKILL or result.returncode == 0, result.tail()
        # PR_SET_PDEATHSIG: no plugin process outlives its supervisor to race the next run
        wait_until(lambda children=children: all(gone(pid) for pid in children), 10,
                   f"the plugin processes {children} to die with the supervisor")
        history.append(_check_invariants(wd, lines, index))
    final = run_cli(wd)
    logs.append(final.stderr)
    assert final.returncode == 0, final.tail()
    return history, "".join(logs)


@pytest.mark.parametrize("with_id", [False, True], ids=["without-_id", "with-_id"])
def test_kill_9_at_random_moments_loses_nothing(with_id: bool, lines: LineFile, es8_url: str, scratch_index,
                                                tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name,
                         id_from_json="eventID" if with_id else None)

    history, log = _kill_and_restart(wd, lines, index, seed=20240101 + with_id)

    result = tally(index, lines)
    operations = index.index_operations()
    killed_while_reading = sum(1 for h in history if h["input_lines"] < lines.count)
    torn = log.count("cut a torn record")
    figures(
        f"kill -9 x{KILLS}, {lines.count} lines, {'with' if with_id else 'without'} _id",
        lost=len(result.missing), duplicates=result.duplicates, index_operations=operations,
        resent=operations - lines.count, kills_while_input_read=killed_while_reading, torn_records_cut=torn,
    )
    assert result.missing == [], result.describe()
    assert result.strangers == 0, result.describe()
    if with_id:
        assert result.duplicates == 0, result.describe()
        assert index.count() == lines.count
    else:
        assert result.duplicates <= KILLS * MAX_DUPLICATES_PER_KILL, result.describe()
    # at-least-once: whatever was sent twice is what the server did twice, nothing else
    assert operations >= lines.count


def test_a_torn_record_at_the_end_of_the_queue_is_cut_not_shipped(es8_url: str, scratch_index,
                                                                  tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "lines.json"
    source.write_bytes(b"".join(record_line(i) + b"\n" for i in range(100)))
    wd = project_workdir(tmp_path / "w", source, es8_url, index.name)
    first = run_cli(wd)
    assert first.returncode == 0, first.tail()

    # A writer killed in the middle of an append leaves part of a record past the queue head.
    queue_file = wd.output / "input" / f"{list_ids(wd.output / 'input')[-1]}.log"
    framed = hmsg.frame(hmsg.encode(hmsg.Message(payload='{"eventID":"torn","seq":-1}', logger="input.file")))
    with queue_file.open("ab") as fh:
        fh.write(framed[: len(framed) // 2])
    # ... and the input file grows, so that the next run appends after the torn bytes
    with source.open("ab") as fh:
        fh.write(b"".join(record_line(i) + b"\n" for i in range(100, 150)))

    second = run_cli(wd)

    assert second.returncode == 0, second.tail()
    assert "cut a torn record" in second.stderr
    lf = LineFile(source, 150, [])
    result = tally(index, lf)
    assert result.missing == [] and result.duplicates == 0 and result.strangers == 0, result.describe()
    assert index.refreshed_count() == 150


def test_an_output_holding_messages_does_not_commit_past_them_over_skipped_batches(
        es8_url: str, scratch_index, tmp_path: Path) -> None:
    """flush_on_shutdown = false leaves a held batch in the queue; the next run must send it, even when
    whole read batches after it matched nothing (their end must not become the checkpoint)."""
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "lines.json"
    source.write_bytes(b"".join(record_line(i) + b"\n" for i in range(10)) + b"noise\n" * 5000)
    wd = project_workdir(tmp_path / "w", source, es8_url, index.name, flush_count="1000",
                         ticker_interval="3600", flush_on_shutdown="false",
                         message_matcher='"Payload != \'noise\'"')
    first = run_cli(wd)
    assert first.returncode == 0, first.tail()
    assert index.refreshed_count() == 0  # held, never sent: flush_count not reached, no timer, no flush

    wd.edit(wd.es_cfg, flush_on_shutdown="true")
    second = run_cli(wd)

    assert second.returncode == 0, second.tail()
    assert index.refreshed_count() == 10


def test_the_supervisor_writes_its_checkpoints_while_running(es8_url: str, scratch_index, tmp_path: Path,
                                                            lines: LineFile) -> None:
    """hindsight.cp follows the run (not only its end): a kill -9 resumes near where it stopped."""
    index = Index(es8_url, scratch_index(es8_url))
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, index.name)
    run = Background(wd)
    try:
        wait_until(lambda: wd.input_offset() > 0, 60, "an input checkpoint in hindsight.cp")
        wait_until(lambda: "input->elasticsearch_bulk_api" in wd.checkpoints(), 60,
                   "an output checkpoint in hindsight.cp")
        first = os.stat(wd.output / "hindsight.cp").st_mtime_ns
        wait_until(lambda: os.stat(wd.output / "hindsight.cp").st_mtime_ns != first, 30,
                   "hindsight.cp to be rewritten")
    finally:
        run.kill()
