"""hindsight_py.queue: framed queue files, multi-process writers, tailing readers."""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

import pytest

from hindsight_py import framing, peek
from hindsight_py import message as m
from hindsight_py.queue import (
    QueueReader,
    QueueWriter,
    format_position,
    list_ids,
    parse_position,
    queue_head,
)


def raw_record(tag: str, size: int = 100) -> bytes:
    payload = (tag + ":").ljust(size, "x")
    return m.encode(m.Message(bytes(16), 1_734_000_000_000_000_000, logger="test", payload=payload))


def framed(tag: str, size: int = 100) -> bytes:
    return framing.frame(raw_record(tag, size))


def tag_of(raw: bytes) -> str:
    payload = peek.payload_of(raw)
    assert payload is not None
    return payload.decode().split(":")[0]


def read_all(reader: QueueReader, **kw: int) -> list[bytes]:
    out: list[bytes] = []
    while (batch := reader.read_batch(**kw)) is not None:
        out.extend(batch.records)
    return out


def file_bytes(directory: Path, file_id: int) -> bytes:
    return (directory / f"{file_id}.log").read_bytes()


# --- positions ---------------------------------------------------------------

def test_position_text_round_trip() -> None:
    assert format_position((3, 1048576)) == "3:1048576"
    assert parse_position("3:1048576") == (3, 1048576)
    assert parse_position(format_position((0, 0))) == (0, 0)
    for bad in ("3", "3:", "a:1", "-1:5", "3:4:5", ""):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_position(bad)


# --- writer and reader -------------------------------------------------------

def test_round_trip_and_record_ends(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 1 << 20)
    assert w.append(framed("a")) == (0, len(framed("a")))
    end = w.append(framed("b") + framed("c"))  # one append, two records
    assert end == (0, len(framed("a")) * 3)
    r = QueueReader(tmp_path, None)
    batch = r.read_batch()
    assert batch is not None and batch.file_id == 0
    assert [tag_of(x) for x in batch.records] == ["a", "b", "c"]
    data = file_bytes(tmp_path, 0)
    for raw, end_offset in zip(batch.records, batch.ends, strict=True):
        assert data[end_offset - len(raw):end_offset] == raw
    assert r.position() == (0, len(data)) == w.position() == queue_head(tmp_path)
    assert r.read_batch() is None
    assert r.at_end()
    w.append(framed("d"))
    assert not r.at_end()
    assert [tag_of(x) for x in read_all(r)] == ["d"]
    assert r.at_end()
    assert r.discarded_bytes == 0


def test_roll_over_across_several_files(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 1000)
    rec = len(framed("0"))
    tags = [str(i) for i in range(60)]
    for i in range(0, 60, 3):  # appends of three records
        w.append(b"".join(framed(t) for t in tags[i:i + 3]))
    ids = list_ids(tmp_path)
    assert len(ids) > 3 and ids == list(range(len(ids)))
    for i in ids[:-1]:
        size = (tmp_path / f"{i}.log").stat().st_size
        assert 1000 <= size < 1000 + 3 * rec  # rolls once the size is reached, after the append
    r = QueueReader(tmp_path, None)
    got: list[str] = []
    while (batch := r.read_batch(max_records=4)) is not None:
        assert len(batch.records) <= 4
        size = (tmp_path / f"{batch.file_id}.log").stat().st_size
        assert all(0 < e <= size for e in batch.ends)  # a batch never spans files
        got.extend(tag_of(x) for x in batch.records)
    assert got == tags
    assert r.at_end() and r.position() == w.position()


def test_writer_opens_the_newest_file(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.log").write_bytes(framed(f"old{i}"))
    (tmp_path / "notes.txt").write_text("ignored")
    w = QueueWriter(tmp_path, 1 << 20)
    assert w.position() == (2, len(framed("old2")))
    w.append(framed("new"))
    assert file_bytes(tmp_path, 2) == framed("old2") + framed("new")
    assert w.torn_bytes == 0


def test_reader_starts_at_the_oldest_file_and_resumes_from_positions(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 500)
    for i in range(20):
        w.append(framed(str(i)))
    os.remove(tmp_path / "0.log")  # pruned
    r = QueueReader(tmp_path, None)
    first = r.read_batch(max_records=2)
    assert first is not None and first.file_id == 1
    start = int(tag_of(first.records[0]))
    # resume from the middle of a batch, through the checkpoint text form
    resumed = QueueReader(tmp_path, parse_position(format_position((first.file_id, first.ends[0]))))
    assert [int(tag_of(x)) for x in read_all(resumed)] == list(range(start + 1, 20))
    rest = read_all(QueueReader(tmp_path, r.position()))
    assert [int(tag_of(x)) for x in rest] == list(range(start + 2, 20))


def test_missing_files_are_jumped(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 300)
    for i in range(12):
        w.append(framed(str(i), 300))  # one record per file
    assert list_ids(tmp_path) == list(range(13))
    for gone in (2, 3, 7):
        os.remove(tmp_path / f"{gone}.log")
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["0", "1", "4", "5", "6", "8", "9", "10", "11"]
    # a checkpoint pointing into a missing file moves to the next one that exists
    r2 = QueueReader(tmp_path, (2, 50))
    assert [tag_of(x) for x in read_all(r2)][:1] == ["4"]


def test_reader_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    r = QueueReader(tmp_path / "input", None)
    assert r.read_batch() is None and r.at_end()
    w = QueueWriter(tmp_path / "input", 1 << 20)
    w.append(framed("late"))
    assert [tag_of(x) for x in read_all(r)] == ["late"]


def test_reader_follows_the_writer_across_a_roll(tmp_path: Path) -> None:
    rec = len(framed("a"))
    w = QueueWriter(tmp_path, 2 * rec)
    w.append(framed("a"))
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["a"]
    w.append(framed("b"))  # file 0 reaches output_size: rolls
    w.append(framed("c"))
    w.append(framed("d"))  # and so does file 1
    assert list_ids(tmp_path) == [0, 1, 2]
    batch = r.read_batch()
    assert batch is not None and batch.file_id == 0 and [tag_of(x) for x in batch.records] == ["b"]
    batch = r.read_batch()
    assert batch is not None and batch.file_id == 1 and [tag_of(x) for x in batch.records] == ["c", "d"]
    assert r.read_batch() is None
    assert r.position() == w.position() == (2, 0)
    assert r.at_end()


def test_a_record_larger_than_the_read_chunk(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 64 << 20)
    big = framed("big", 3 << 20)
    w.append(framed("small") + big + framed("after"))
    r = QueueReader(tmp_path, None, max_message_size=4 << 20)
    assert [tag_of(x) for x in read_all(r)] == ["small", "big", "after"]
    # with the default max_message_size (64 KiB) the big record is skipped and counted
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["small", "after"]
    assert r.discarded_bytes == len(big)


def test_max_bytes_bounds_a_batch(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 1 << 20)
    w.append(b"".join(framed(str(i), 1000) for i in range(10)))
    r = QueueReader(tmp_path, None)
    batch = r.read_batch(max_bytes=2500)
    assert batch is not None and len(batch.records) == 3  # stops once 2500 bytes are reached
    assert len(read_all(r)) == 7


# --- damage ------------------------------------------------------------------

def test_corrupt_bytes_in_the_middle_are_skipped_and_counted(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 1 << 20)
    junk = (b"\x00garbage\x1e\x02\x08\x05\x1f12345"  # a frame around a non-message
            + b"\x1e\x03\x08\xff\x7f\x1f" + b"z" * 50  # a frame longer than max_message_size
            + framed("torn")[:40])  # the start of a record with no end
    w.append(framed("before"))
    w.append(junk)
    w.append(framed("after"))
    r = QueueReader(tmp_path, None, max_message_size=8192)
    assert [tag_of(x) for x in read_all(r)] == ["before", "after"]
    assert r.discarded_bytes == len(junk)
    assert r.at_end()


def test_corrupt_tail_of_a_finished_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "0.log").write_bytes(framed("a") + b"\x1e\x03\x08\xff\x7f\x1f" + framed("b"))
    (tmp_path / "1.log").write_bytes(framed("c"))
    r = QueueReader(tmp_path, None)  # upstream-style queue: no .lock
    # the bogus frame claims 16383 bytes; file 0 is finished, so it cannot be
    # completed and the record inside it is found
    assert [tag_of(x) for x in read_all(r)] == ["a", "b", "c"]
    assert r.discarded_bytes == 6


def test_torn_tail_is_truncated_when_a_writer_opens(tmp_path: Path) -> None:
    w = QueueWriter(tmp_path, 1 << 20)
    w.append(framed("a"))
    w.close()
    whole = file_bytes(tmp_path, 0)
    partial = framed("b")[:57]  # a writer killed mid-append
    with open(tmp_path / "0.log", "ab") as f:
        f.write(partial)
    w2 = QueueWriter(tmp_path, 1 << 20)
    assert w2.torn_bytes == len(partial)
    assert file_bytes(tmp_path, 0) == whole
    w2.append(framed("c"))
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["a", "c"]
    assert r.discarded_bytes == 0


def test_a_live_writer_truncates_what_a_dead_one_left(tmp_path: Path) -> None:
    w1 = QueueWriter(tmp_path, 1 << 20)
    w1.append(framed("a"))
    # another writer died after writing one whole record and part of a second;
    # it never recorded the head, so the whole record is kept, the rest cut
    partial = framed("b") + framed("c")[:30]
    with open(tmp_path / "0.log", "ab") as f:
        f.write(partial)
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["a"]  # readers stop at the head
    w1.append(framed("d"))
    assert w1.torn_bytes == 30
    assert [tag_of(x) for x in read_all(r)] == ["b", "d"]
    assert r.discarded_bytes == 0


def test_upstream_queue_without_lock_is_scanned_once(tmp_path: Path) -> None:
    (tmp_path / "0.log").write_bytes(framed("a") + b"\x1e\x02\x08" + framed("b") + framed("c")[:20])
    w = QueueWriter(tmp_path, 1 << 20)
    assert w.torn_bytes == 20
    assert file_bytes(tmp_path, 0) == framed("a") + b"\x1e\x02\x08" + framed("b")
    assert queue_head(tmp_path) == (0, len(file_bytes(tmp_path, 0)))


def test_partial_record_at_eof_waits_to_be_completed(tmp_path: Path) -> None:
    # no .lock (a queue being written by upstream): the reader must treat a
    # partial record as a write in progress, not as garbage
    rec = framed("b")
    path = tmp_path / "0.log"
    path.write_bytes(framed("a") + rec[:3])
    r = QueueReader(tmp_path, None)
    assert [tag_of(x) for x in read_all(r)] == ["a"]
    assert not r.at_end()
    with open(path, "ab") as f:
        f.write(rec[3:60])
    assert r.read_batch() is None and not r.at_end()
    with open(path, "ab") as f:
        f.write(rec[60:])
    assert [tag_of(x) for x in read_all(r)] == ["b"]
    assert r.discarded_bytes == 0 and r.at_end()


def test_tail_written_before_a_roll_is_read_before_moving_on(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(framed("a"))
    r = QueueReader(tmp_path, None)  # no .lock
    assert [tag_of(x) for x in read_all(r)] == ["a"]
    # the writer appends to 0 and rolls to 1 between two polls
    with open(path, "ab") as f:
        f.write(framed("b"))
    (tmp_path / "1.log").write_bytes(framed("c"))
    assert [tag_of(x) for x in read_all(r)] == ["b", "c"]


# --- several writer processes ------------------------------------------------

def _writer_process(directory: str, name: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    w = QueueWriter(Path(directory), 20_000)
    i = 0
    while i < count:
        n = min(rng.randint(1, 8), count - i)
        w.append(b"".join(framed(f"{name}-{j}", rng.randint(50, 600)) for j in range(i, i + n)))
        i += n
    w.close()


def test_two_writer_processes_share_a_queue(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    count = 1500
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), name, count, seed))
             for seed, name in enumerate(("p", "q"))]
    QueueWriter(tmp_path, 20_000).close()  # the directory and .lock exist before the reader starts
    r = QueueReader(tmp_path, None)
    for p in procs:
        p.start()
    got: list[bytes] = []
    # tail while they write: a reader must never see a record in progress
    while any(p.is_alive() for p in procs):
        got.extend(read_all(r))
    for p in procs:
        p.join()
        assert p.exitcode == 0
    got.extend(read_all(r))
    assert r.at_end()
    assert r.discarded_bytes == 0
    tags = [tag_of(x) for x in got]
    assert sorted(tags) == sorted(f"{n}-{j}" for n in ("p", "q") for j in range(count))
    for name in ("p", "q"):  # each writer's records stay in its order
        assert [t for t in tags if t.startswith(name + "-")] == [f"{name}-{j}" for j in range(count)]
    for raw in got:
        msg = m.decode(raw)
        assert msg.payload is not None and msg.payload.startswith(tag_of(raw) + ":x")
    assert len(list_ids(tmp_path)) > 5
