"""The file inputs under the `hindsight` daemon follow a growing file (ticker_interval > 0): a
record written in pieces arrives whole, a rotation is followed (old file to its end, then the new
one from 0), a truncation is said and read again from 0. Real processes, real Elasticsearch."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from daemon_helpers import DaemonDir, cfg_text, es_output
from native_pipeline import count, documents

PLUGINS = {
    "flat_file.py": {"filename": "flat_file.py"},
    "file.lua": {"filename": "file.lua"},
}


def record(n: int) -> bytes:
    # uneven lengths, so that the cuts fall everywhere in the lines
    return json.dumps({"n": n, "pad": "x" * (n * 37 % 300)}).encode() + b"\n"


def settle(d: DaemonDir, key: str, offset: int) -> None:
    """Wait until the input has read up to `offset` of its current file, and one more look."""
    d.wait_for(f"{key} at byte {offset}", lambda: d.checkpoints().get(key, "0").split("@")[0] == str(offset))
    time.sleep(1.5)  # the next call sees the unfinished line (the test asserts nothing about time)


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_a_growing_rotating_file_arrives_whole_and_exactly_once(plugin: str, tmp_path: Path, es8_url: str,
                                                               scratch_index) -> None:
    index = scratch_index(es8_url)
    d = DaemonDir(tmp_path)
    data = tmp_path / "data.ndjson"
    data.write_bytes(b"")
    if plugin == "file.lua":
        d.put("run", "input", "file.lua", (Path(__file__).parent.parent / "run/input/file.lua").read_text())
    d.put("run", "input", "tail.cfg", cfg_text({**PLUGINS[plugin], "input_filename": str(data), "ticker_interval": 1}))
    d.put("run", "output", "es.cfg", cfg_text(es_output(es8_url, index)))
    key = "input.tail"
    d.start()
    n = 0
    try:
        # 1. uneven chunks, each ending mid-line; the daemon looks at every unfinished line
        with open(data, "ab") as f:
            pending = b"".join(record(i) for i in range(0, 300))
            n = 300
            pos = 0
            for cut in (1, 4000, 9000, 9001, 17000, 30000, len(pending) - 5, len(pending)):
                f.write(pending[pos:cut])
                f.flush()
                pos = cut
                settle(d, key, pending.rfind(b"\n", 0, cut) + 1)
        # 2. rotation: the writer still appends to the old file (half a line, then its end)
        rotated = tmp_path / "data.ndjson.1"
        os.rename(data, rotated)
        last = record(n)
        n += 1
        with open(rotated, "ab") as f:
            f.write(last[:10])
            f.flush()
            time.sleep(1.5)
            f.write(last[10:] + record(n)[:-1])  # the old file's last line: no newline, ever
            n += 1
        # 3. the new file, also written in pieces
        fresh = b"".join(record(i) for i in range(n, n + 200))
        n += 200
        with open(data, "ab") as f:
            f.write(fresh[:5555])
            f.flush()
            time.sleep(1.5)
            f.write(fresh[5555:])
        d.wait_for(f"{n} documents", lambda: count(es8_url, index) >= n)
        # flat_file.py names the file by its inode; Lua's io has no inodes: file.lua keeps the offset
        expected = f"{len(fresh)}@{data.stat().st_ino}" if plugin == "flat_file.py" else str(len(fresh))
        d.wait_for("the new file's checkpoint", lambda: d.checkpoints().get(key) == expected)
    finally:
        status = d.stop()
    assert status == 0, d.log()[-4000:]
    docs = documents(es8_url, index)
    assert sorted(doc["n"] for doc in docs) == list(range(n)), "every record once"
    assert all(doc["pad"] == "x" * (doc["n"] * 37 % 300) for doc in docs), "every record whole"
    assert "was rotated" in d.log()


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_a_truncated_file_is_read_again_from_the_start_and_said(plugin: str, tmp_path: Path, es8_url: str,
                                                               scratch_index) -> None:
    index = scratch_index(es8_url)
    d = DaemonDir(tmp_path)
    data = tmp_path / "data.ndjson"
    first = b"".join(record(i) for i in range(100))
    data.write_bytes(first)
    if plugin == "file.lua":
        d.put("run", "input", "file.lua", (Path(__file__).parent.parent / "run/input/file.lua").read_text())
    d.put("run", "input", "tail.cfg", cfg_text({**PLUGINS[plugin], "input_filename": str(data), "ticker_interval": 1}))
    d.put("run", "output", "es.cfg", cfg_text(es_output(es8_url, index)))
    d.start()
    try:
        settle(d, "input.tail", len(first))
        with open(data, "r+b") as f:  # copytruncate: same file, shorter
            f.truncate(0)
            f.write(b"".join(record(i) for i in range(100, 130)))
        d.wait_for("130 documents", lambda: count(es8_url, index) >= 130)
    finally:
        assert d.stop() == 0, d.log()[-4000:]
    assert sorted(doc["n"] for doc in documents(es8_url, index)) == list(range(130))
    assert "truncated" in d.log()
