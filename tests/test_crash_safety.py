"""Crash safety: `kill -9` of hindsight_cli at any moment loses nothing.

The project's run/ ships a file into Elasticsearch 8 through two outputs (one index without `_id`,
one with `id_from_json = "eventID"`) while the supervisor is killed (SIGKILL) 20 times at random
moments and restarted on the same output_path. After each kill the test checks the on-disk
invariants a restart depends on: the plugin processes died with the supervisor, the input's
checkpoint in hindsight.cp does not run ahead of the input queue, and each output's checkpoint does
not run ahead of its index. At the end every line must be in both indexes. Documents without `_id`
may be duplicated (at-least-once: what the checkpoints lagged at each kill, about half a second);
documents with an `_id` from the record never are.

Also: a torn record at the end of a queue file is cut, never shipped; an output that holds messages
(-4) keeps its checkpoint behind them even across batches its matcher skips; `id_from_json`.

Lines are compact CloudTrail-shaped records (about 230 bytes, not 1.2 KB) so that 200,000 of them,
twice, index in seconds: the guarantees do not depend on the size, the server's time does.

Cost: the kill test about 45-75 s on 2 cores; the others a few seconds each.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from delivery_helpers import (
    Background,
    Index,
    LineFile,
    Workdir,
    encode_payloads,
    event_id,
    figures,
    gone,
    lua_string,
    project_workdir,
    record_line,
    run_cli,
    tally,
    wait_until,
)

from hindsight_py import framing, peek
from hindsight_py import message as hmsg
from hindsight_py.queue import list_ids, parse_position, queue_head
from hindsight_py.sandbox import PluginError

LINE_COUNT = 200_000
KILLS = 20
# When the kills come, whatever the speed of the machine: a quarter of the runs are killed at a
# random moment of their first second (start-up, the input reading), the others at random points of
# the shipping (once the index holds a random number of documents between 0 and 85% of the lines,
# plus a random delay), so that every kill lands in the middle of the work.
EARLY_KILLS = 0.25
EARLY_S = (0.2, 1.0)
SHIPPING_SPAN = 0.85
AFTER_TARGET_S = (0.0, 0.5)
# At-least-once bounds. The input's checkpoint lags its queue by about half a second (children
# report every 0.25 s, hindsight.cp is written every 0.25 s), so a kill makes the input read again
# what it read in that time; the outputs' checkpoints lag the server the same way, so a kill re-sends
# about what the server indexed in that time. Both are bounded per kill with room for a machine a
# few times faster than CI's; checkpoints that only moved at exit would exceed them many times over.
MAX_LINES_READ_AGAIN_PER_KILL = 25_000
MAX_DOCUMENTS_SENT_AGAIN_PER_KILL = 25_000


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    return LineFile.write(tmp_path_factory.mktemp("crash") / "cloudtrail.json", LINE_COUNT)


def _seq_of(raw: bytes) -> int:
    import json

    payload = peek.payload_of(raw)
    assert payload is not None
    return int(json.loads(payload)["seq"])


def _record_ending_at(directory: Path, position: tuple[int, int]) -> bytes | None:
    """The queue record that ends exactly at `position` (None at the start of the queue).

    The start of a file other than the first is the end of the file before it: a writer rolls to a
    new file right after an append, so a kill can leave the head at (n, 0)."""
    file_id, offset = position
    if offset == 0:
        previous = directory / f"{file_id - 1}.log"
        if not previous.exists():
            return None
        file_id, offset = file_id - 1, previous.stat().st_size
    start = max(0, offset - (1 << 20))
    with (directory / f"{file_id}.log").open("rb") as fh:
        fh.seek(start)
        buf = fh.read(offset - start)
    records: list[bytes] = []
    ends: list[int] = []
    # the window may start inside a record: validation skips to the first real frame
    framing.scan_records(buf, 0, len(buf), 1 << 20, records, ends, base=start, validate=True, final=True)
    for raw, end in zip(records, ends, strict=True):
        if end == offset:
            return raw
    raise AssertionError(f"no record of {directory} ends at {position}")


OUTPUTS = {"without _id": "output.elasticsearch_bulk_api", "with _id": "output.elasticsearch_bulk_api_id"}


def _two_outputs(wd: Workdir, base_url: str, with_id_index: str) -> None:
    """A second copy of the project's Elasticsearch output, into its own index, with `_id` = eventID."""
    text = wd.es_cfg.read_text()
    text = re.sub(r'index = "[^"]*",', lambda _: f"index = {lua_string(with_id_index)},", text, count=1)
    text = text.replace('type_name = "doc",', 'type_name = "doc",\n    id_from_json = "eventID",', 1)
    assert "id_from_json" in text
    (wd.es_cfg.parent / "elasticsearch_bulk_api_id.cfg").write_text(text)


def _check_invariants(wd: Workdir, lines: LineFile, indexes: dict[str, Index]) -> dict[str, int]:
    """What a restart will rely on, right after a kill."""
    cp = wd.checkpoints()
    queue = wd.output / "input"
    # The input's checkpoint covers only lines already in the input queue (records are appended in
    # line order from the checkpoint on, so the queue's last record is the furthest line written).
    covered = lines.lines_before(int(cp.get("input.file", 0)))
    head = queue_head(queue)
    last = _record_ending_at(queue, head) if head is not None else None
    last_seq = _seq_of(last) if last is not None else -1
    assert covered == 0 or last_seq >= covered - 1, (
        f"hindsight.cp says the input handled {covered} lines but the queue ends at line {last_seq} "
        f"(head {head}, files {sorted((f.name, f.stat().st_size) for f in queue.iterdir())}, hindsight.cp {cp})")
    seen = {"input_lines": covered, "reread": last_seq + 1 - covered}
    # an output's checkpoint covers only documents the server accepted
    for label, index in indexes.items():
        position = cp.get(f"input->{OUTPUTS[label]}")
        raw = _record_ending_at(queue, parse_position(position)) if isinstance(position, str) else None
        if raw is not None:
            seq = _seq_of(raw)
            index.refresh()
            assert index.has_event(event_id(seq)), (
                f"hindsight.cp puts {OUTPUTS[label]} past line {seq}, which is not in its index")
            seen[f"delivered {label}"] = seq
    return seen


def test_kill_9_at_random_moments_loses_nothing(lines: LineFile, es8_url: str, scratch_index,
                                                tmp_path: Path) -> None:
    indexes = {label: Index(es8_url, scratch_index(es8_url)) for label in OUTPUTS}
    wd = project_workdir(tmp_path / "w", lines.path, es8_url, indexes["without _id"].name)
    _two_outputs(wd, es8_url, indexes["with _id"].name)
    rng = random.Random(20240101)
    targets = sorted(rng.uniform(0, SHIPPING_SPAN * lines.count) for _ in range(KILLS))
    watched = indexes["without _id"]
    history = []
    logs = []
    lived = 0.0
    killed_plugins = 0
    for target in targets:
        run = Background(wd)
        started = time.monotonic()
        if rng.random() < EARLY_KILLS:
            time.sleep(rng.uniform(*EARLY_S))
        else:
            wait_until(lambda target=target, run=run: watched.count() >= target or run.process.poll() is not None,
                       120, f"{target:.0f} documents in the index", interval=0.05)
            time.sleep(rng.uniform(*AFTER_TARGET_S))
        children = run.children()
        assert run.process.poll() is None, run.wait(60).tail()  # the run must not be over yet
        run.signal(signal.SIGKILL)
        lived += time.monotonic() - started
        result = run.wait(60)
        logs.append(result.stderr)
        assert result.returncode == -signal.SIGKILL, result.tail()
        # PR_SET_PDEATHSIG: no plugin process outlives its supervisor to race the next run
        # (a kill in the supervisor's first moments may come before it started any)
        killed_plugins += bool(children)
        wait_until(lambda children=children: all(gone(pid) for pid in children), 10,
                   f"the plugin processes {children} to die with the supervisor")
        history.append(_check_invariants(wd, lines, indexes))
    assert killed_plugins >= KILLS // 2
    final = run_cli(wd)
    logs.append(final.stderr)
    assert final.returncode == 0, final.tail()

    log = "".join(logs)
    read_again = sum(h["reread"] for h in history)
    for label, index in indexes.items():
        result = tally(index, lines)
        operations = index.index_operations()
        figures(
            f"kill -9 x{KILLS} over {lived:.0f}s, {lines.count} lines, {label}",
            lost=len(result.missing), duplicates=result.duplicates, index_operations=operations,
            sent_again=operations - lines.count,
            kills_while_reading=sum(1 for h in history if h["input_lines"] < lines.count),
            lines_read_again=read_again, torn_records_cut=log.count("cut a torn record"),
        )
        assert result.missing == [], f"{label}: {result.describe()}"
        assert result.strangers == 0, f"{label}: {result.describe()}"
        assert operations >= lines.count
        if label == "with _id":
            assert result.duplicates == 0, f"{label}: {result.describe()}"
            assert index.refreshed_count() == lines.count
        else:
            # every line read again is in the queue twice and is delivered twice; the rest of the
            # duplicates are batches the server took whose checkpoint the kill prevented
            assert result.duplicates >= read_again
            assert result.duplicates - read_again <= KILLS * MAX_DOCUMENTS_SENT_AGAIN_PER_KILL, result.describe()
        # the checkpoints moved while the runs were being killed, not only at the final run's end
        assert any(f"delivered {label}" in h for h in history), history
    assert read_again <= KILLS * MAX_LINES_READ_AGAIN_PER_KILL, history


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
    framed = framing.frame(hmsg.encode(hmsg.Message(payload='{"eventID":"torn","seq":-1}', logger="input.file")))
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
        wait_until(lambda: "input->output.elasticsearch_bulk_api" in wd.checkpoints(), 60,
                   "an output checkpoint in hindsight.cp")
        first = os.stat(wd.output / "hindsight.cp").st_mtime_ns
        wait_until(lambda: os.stat(wd.output / "hindsight.cp").st_mtime_ns != first, 30,
                   "hindsight.cp to be rewritten")
    finally:
        run.kill()


# --------------------------------------------------------------------------- `_id` from the record


def test_id_from_json_takes_the_id_from_the_document(tmp_path: Path) -> None:
    payloads = [
        '{"eventID":"e-1","x":1}',
        '{"userIdentity":{"accessKeyId":"AKIA1"},"eventID":"e-2"}',
        '{"eventID":12345678901234}',  # numbers: integral ones without an exponent
        '{"eventID":"has \\"quotes\\" and %{Type}"}',  # escaped as JSON, never interpolated
        '{"no":"id here"}',  # no member: no _id
        '{"eventID":{"nested":1}}',  # not a scalar: no _id
        'not json',  # not JSON: no _id (the sender sets it aside)
        '{"eventID":""}',  # empty: no _id
    ]
    out = encode_payloads(tmp_path, payloads, '{ index = "i", type_name = "doc", id_from_json = "eventID" }')
    actions = [json.loads(entry.split(b"\n", 1)[0]) for _, entry in out]
    assert [a["index"].get("_id") for a in actions] == [
        "e-1", "e-2", "12345678901234", 'has "quotes" and %{Type}', None, None, None, None]
    assert all(a["index"]["_index"] == "i" for a in actions)
    # the document itself is untouched
    assert out[0][1].split(b"\n", 1)[1] == b'{"eventID":"e-1","x":1}\n'

    dotted = encode_payloads(tmp_path, [payloads[1]],
                             '{ index = "i", id_from_json = "userIdentity.accessKeyId" }')
    assert json.loads(dotted[0][1].split(b"\n", 1)[0]) == {"index": {"_index": "i", "_id": "AKIA1"}}


def test_id_and_id_from_json_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="id and id_from_json are mutually exclusive"):
        encode_payloads(tmp_path, [], '{ index = "i", id = "%{Uuid}", id_from_json = "eventID" }')
