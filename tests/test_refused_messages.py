"""A message the host refuses is never lost, whatever the plugin does with the error (issue 18).

End to end with `hindsight_cli`: CloudTracker's unmodified run/ under Hindsight's own settings
(max_message_size = 64 KiB, the sandbox defaults) ships 10,000 records with a 100 KB and a 1 MB one
among them into the real Elasticsearch 8. CloudTracker's file.lua pcalls the decoder, which swallows
the inject_message error: upstream loses both big records without a word. Here each is in the
dead-letter file whole (its bytes equal the line), with the reason and the offsets, counted in the
summary line and in the exit status; a rerun adds nothing and dead-letters nothing twice. The same
for an analysis plugin whose inject_payload exceeds output_limit, and for a Python input plugin.

Cost: the CloudTracker run about 15 s (ES 8 indexing 10,000 records); the others a second or two.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import PROJECT_RUN, CliRun, Index, Workdir, event_id, record_line, run_cli
from upstream_files import cloudtracker_run, extension_modules, lua_string, replace_once

from hindsight_py.dead_letters import data_bytes, read_records

NORMAL = 10_000
BIG = {3_000: 100 * 1024, 7_000: 1024 * 1024}  # line number -> size of the record
SCHEMA = {"time", "plugin", "kind", "reason", "data", "offset", "next_offset", "message", "status", "error",
          "action"}


def big_line(seq: int, size: int) -> bytes:
    """A CloudTrail-shaped record of about `size` bytes (a large requestParameters, as some are)."""
    head = record_line(seq)[:-1] + b',"requestParameters":{"policy":"'
    return head + b"p" * (size - len(head) - 3) + b'"}}'


def write_records(path: Path, big: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """NORMAL normal records with the big ones inserted before the given line numbers; returns the
    big ones by seq: (the byte offset of the line, the line)."""
    placed = {}
    offset = 0
    with path.open("wb") as fh:
        seq = 0
        for n in range(NORMAL + len(big)):
            if n in big:
                line = big_line(100_000 + n, big[n])
                placed[100_000 + n] = (offset, line)
            else:
                line = record_line(seq)
                seq += 1
            fh.write(line + b"\n")
            offset += len(line) + 1
    return placed


def hindsight_settings_workdir(path: Path, input_file: Path, port: int, index: str,
                               input_defaults: str = "") -> Workdir:
    """CloudTracker's run/ and lua_sandbox_extensions' modules as a user installs them, with a
    hindsight.cfg of Hindsight's own settings: max_message_size = 64 * 1024 and the sandbox defaults
    (output_limit 64 KiB, memory_limit 8 MiB). The project's cfg keeps only its paths."""
    path.mkdir(parents=True)
    cloudtracker_run(path, input_filename=input_file, port=port, index=index)
    modules, io_modules = extension_modules(path / "luasandbox")
    text = (PROJECT_RUN / "hindsight.cfg").read_text()
    text = replace_once(text, r"^analysis_lua_path\s*=.*$", f"analysis_lua_path = {lua_string(f'{modules}/?.lua')}",
                        "analysis_lua_path")
    text = replace_once(text, r"^io_lua_path\s*=.*$",
                        f"io_lua_path = {lua_string(f'{modules}/?.lua;{io_modules}/?.lua')}", "io_lua_path")
    text = replace_once(text, r"^max_message_size\s*=.*$", "max_message_size = 64 * 1024", "max_message_size")
    text = replace_once(text, r"^input_defaults = \{[^}]*\}", f"input_defaults = {{{input_defaults}}}",
                        "input_defaults")
    (path / "hindsight.cfg").write_text(text)
    return Workdir(path)


def dead_letters(wd: Workdir, plugin: str) -> list[dict[str, Any]]:
    records = read_records(wd.output / "dead_letter" / f"{plugin}.jsonl")
    for r in records:
        assert set(r) == SCHEMA and r["plugin"] == plugin, r.keys()
    return records


def assert_summary(run: CliRun, **expected: int) -> None:
    summary = run.summary()
    assert {k: summary[k] for k in expected} == expected, run.tail()
    assert summary["status"] == run.returncode


@pytest.mark.upstream
def test_cloudtracker_big_records_are_dead_lettered_whole(es8_url: str, scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "cloudtrail.json"
    big = write_records(source, BIG)
    wd = hindsight_settings_workdir(tmp_path / "w", source, int(es8_url.rsplit(":", 1)[1]), index.name)

    first = run_cli(wd)

    # the counter's text reports are set aside, not failures: 16 says "not everything was delivered"
    assert first.returncode == 16, first.tail()
    assert_summary(first, read=NORMAL, delivered=NORMAL, dead=2)
    counts = index.event_counts()
    assert sum(counts.values()) == NORMAL and set(counts) == {event_id(seq) for seq in range(NORMAL)}
    letters = dead_letters(wd, "input.file")
    assert [r["kind"] for r in letters] == ["message", "message"]
    for record, (seq, (offset, line)) in zip(letters, sorted(big.items()), strict=True):
        assert data_bytes(record) == line  # whole: the bytes of the line
        # output_limit (64 KiB, the default) is the first limit a message meets
        assert record["reason"] == "inject_message() failed: exceeded output_limit (output_limit = 65536)"
        # the checkpoint before the line (where it starts) and the one file.lua passed after it
        assert (record["offset"], record["next_offset"]) == (offset, offset + len(line) + 1)
        assert record["message"]["Logger"] == "input.file"
        assert event_id(seq) not in counts
    assert "dead-lettered 2," in first.stderr

    second = run_cli(wd)
    assert second.returncode == 0, second.tail()
    assert_summary(second, read=0, delivered=0, dead=0)
    assert dead_letters(wd, "input.file") == letters
    assert sum(index.event_counts().values()) == NORMAL


@pytest.mark.upstream
def test_cloudtracker_refused_messages_drop_restores_upstream(es8_url: str, scratch_index, tmp_path: Path) -> None:
    """`refused_messages = "drop"` in input_defaults: upstream's loss, on purpose, still counted."""
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "cloudtrail.json"
    write_records(source, {2: 100 * 1024})
    wd = hindsight_settings_workdir(tmp_path / "w", source, int(es8_url.rsplit(":", 1)[1]), index.name,
                                    input_defaults='refused_messages = "drop"')

    run = run_cli(wd)

    assert run.returncode == 0, run.tail()
    assert_summary(run, read=NORMAL, delivered=NORMAL, dead=0, dropped=1)
    assert not (wd.output / "dead_letter" / "input.file.jsonl").exists()


@pytest.mark.upstream
def test_cloudtracker_record_beyond_memory_limit_names_limit_record_and_cfg(es8_url: str, scratch_index,
                                                                           tmp_path: Path) -> None:
    """A 5 MB record ends CloudTracker's file.lua (memory_limit 8 MiB, upstream's default), as
    upstream; the error says which limit, which record and where to change it."""
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "cloudtrail.json"
    lines = [record_line(0), record_line(1), big_line(2, 5 << 20), record_line(3)]
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    wd = hindsight_settings_workdir(tmp_path / "w", source, int(es8_url.rsplit(":", 1)[1]), index.name)

    run = run_cli(wd)

    assert run.returncode == 2, run.tail()
    offset = len(lines[0]) + len(lines[1]) + 2
    assert (f"input.file detaching received: 1 msg: process_message() not enough memory: memory_limit = 8388608 (run/input/file.cfg) was "
            f"reached on the record at checkpoint {offset} (a file input: the record's byte offset); raise "
            f"memory_limit in run/input/file.cfg") in run.stderr, run.tail()
    assert set(index.event_counts()) == {event_id(0), event_id(1)}
    assert wd.checkpoints()["input.file"] == offset  # the record waits for a rerun with a larger limit


# --------------------------------------------------------------------------- analysis and Python plugins

# The project's run/ with the output writing payloads to the log (no server), plus a plugin.
def plugin_workdir(path: Path, input_file: Path, plugin_dir: str, cfg: str, source_name: str, source: str,
                   keep_input: bool = True) -> Workdir:
    path.mkdir(parents=True)
    shutil.copy(PROJECT_RUN / "hindsight.cfg", path / "hindsight.cfg")
    run = path / "run"
    for sub in ("input", "analysis", "output"):
        (run / sub).mkdir(parents=True)
    if keep_input:
        shutil.copy(PROJECT_RUN / "input" / "file.lua", run / "input" / "file.lua")
        (run / "input" / "file.cfg").write_text(
            f'filename = "file.lua"\ninput_filename = {lua_string(str(input_file))}\ninstruction_limit = 0\n')
    (run / "output" / "log.cfg").write_text('filename = "log_payloads.py"\nmessage_matcher = "Type == \'inject_payload\'"\n')
    (run / plugin_dir / f"{source_name}.cfg").write_text(cfg)
    (run / plugin_dir / source).write_text(PLUGINS[source])
    return Workdir(path)


PLUGINS = {
    # an analysis plugin that copies big payloads in its timer and swallows the error, as many do
    "copy_big.lua": """
require "string"
local big = {}
function process_message()
    local payload = read_message("Payload")
    if #payload > 60000 then big[#big + 1] = payload end
    return 0
end
function timer_event(ns, shutdown)
    for i = 1, #big do pcall(inject_payload, "json", "copy", big[i]) end
    big = {}
    inject_payload("txt", "note", "timer ran")
end
""",
    # a Python input in the style of CloudTracker's file.lua: errors swallowed, checkpoint after every line
    "lines.py": """
from hindsight_py.plugin import inject_message, read_config

def process_message(checkpoint):
    offset = int(checkpoint or 0)
    with open(read_config("input_filename"), "rb") as fh:
        fh.seek(offset)
        for line in fh:
            try:
                inject_message({"Payload": line.rstrip(b"\\n")})
            except ValueError:
                pass
            offset += len(line)
            inject_message(None, offset)
    return 0
""",
}


def test_analysis_inject_payload_over_output_limit_is_dead_lettered_whole(tmp_path: Path) -> None:
    source = tmp_path / "records.json"
    lines = [record_line(0), big_line(1, 100 * 1024), record_line(2)]
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    wd = plugin_workdir(tmp_path / "w", source, "analysis", 'filename = "copy_big.lua"\nmessage_matcher = '
                        '"Logger == \'input.file\'"\nticker_interval = 1\n', "copy_big", "copy_big.lua")

    first = run_cli(wd)

    assert first.returncode == 16, first.tail()  # 16: a message is in a dead-letter file
    assert_summary(first, read=3, dead=1)
    [letter] = dead_letters(wd, "analysis.copy_big")
    assert data_bytes(letter) == lines[1]
    assert letter["reason"] == "inject_payload() output_limit exceeded (output_limit = 65536)"
    assert letter["kind"] == "message" and letter["offset"] is None
    assert letter["message"]["Type"] == "inject_payload"
    assert letter["message"]["Fields"] == {"payload_type": "json", "payload_name": "copy"}
    assert "timer ran" in first.stderr  # the plugin went on; its other payloads were delivered

    second = run_cli(wd)
    assert second.returncode == 0, second.tail()
    assert dead_letters(wd, "analysis.copy_big") == [letter]


@pytest.mark.parametrize("refused_messages", ["dead_letter", "drop"])
def test_python_input_refused_message_is_dead_lettered_whole(tmp_path: Path, refused_messages: str) -> None:
    source = tmp_path / "records.json"
    # the project's hindsight.cfg: max_message_size = 1 MiB
    lines = [big_line(0, 1100 * 1024), record_line(1), big_line(2, 2048 * 1024), record_line(3)]
    source.write_bytes(b"".join(line + b"\n" for line in lines))
    cfg = (f'filename = "lines.py"\ninput_filename = {lua_string(str(source))}\n'
           f'refused_messages = "{refused_messages}"\n')
    wd = plugin_workdir(tmp_path / "w", source, "input", cfg, "lines", "lines.py", keep_input=False)

    first = run_cli(wd)

    if refused_messages == "drop":
        assert first.returncode == 0, first.tail()
        assert_summary(first, read=2, dead=0, dropped=2)
        assert not (wd.output / "dead_letter").exists()
        return
    assert first.returncode == 16, first.tail()
    assert_summary(first, read=2, dead=2)
    letters = dead_letters(wd, "input.lines")
    assert [data_bytes(r) for r in letters] == [lines[0], lines[2]]
    starts = [0, len(lines[0]) + len(lines[1]) + 2]
    # the first line: no checkpoint yet, the next one says where it ends
    assert [(r["offset"], r["next_offset"]) for r in letters] == [
        (None, starts[0] + len(lines[0]) + 1), (starts[1], starts[1] + len(lines[2]) + 1)]
    assert all(r["reason"].startswith("inject_message() failed: exceeded max_message_size (the message is ")
               and r["reason"].endswith("max_message_size = 1048576)") for r in letters)

    second = run_cli(wd)
    assert second.returncode == 0, second.tail()
    assert_summary(second, read=0, dead=0)
    assert dead_letters(wd, "input.lines") == letters


def test_dead_letter_records_read_back_with_jq_shape(tmp_path: Path) -> None:
    """Every line of a dead-letter file is one ASCII JSON object (what `jq -c .data` reads)."""
    from hindsight_py.dead_letters import dead_letter_file, message_record, record

    path = tmp_path / "dead_letter" / "input.x.jsonl"
    raw = b'{"a":"\xff\xfe"}'
    dead_letter_file(path).append([record("data", "r", raw), message_record("m", {"Payload": raw, "Type": "t"})])
    text = path.read_bytes()
    assert text.isascii() and text.count(b"\n") == 2
    if shutil.which("jq"):
        out = subprocess.run(["jq", "-c", ".kind"], input=text, capture_output=True, check=True).stdout
        assert out.split() == [b'"data"', b'"message"']
    assert [data_bytes(json.loads(line)) for line in text.splitlines()] == [raw, raw]
