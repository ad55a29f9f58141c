"""Bad input lines: each one is delivered as it is, or dead-lettered with the reason; none is merged
with another, cut, or dropped without a trace.

The project's run/ reads a file mixing good CloudTrail lines with every kind of bad line (invalid
UTF-8, NUL bytes, an empty line, a blank one, text that is no JSON, a line over max_message_size,
a cut-off JSON document, CRLF, a last line without a newline) into Elasticsearch 8; the test then
accounts for every line, by its bytes, in the index or in a dead-letter file. An empty input file
ships nothing and succeeds. The encoder refuses a Payload that would span several NDJSON lines.

Cost: a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from delivery_helpers import Index, encode_payloads, project_workdir, record_line, run_cli

# max_message_size and output_limit of the project's hindsight.cfg are 1 MiB
OVERSIZED = b'{"eventID":"oversized","blob":"' + b"x" * (1024 * 1024 + 100) + b'"}'
LARGE_BUT_FITS = b'{"eventID":"large","blob":"' + b"y" * (900 * 1024) + b'"}'


def _good(seq: int) -> bytes:
    return record_line(seq)


# (line bytes without its newline, where it must end up): "index" (the document is the line's JSON),
# "dead letter: <reason fragment>" (the dead-letter record carries the line's exact bytes)
MIXED: list[tuple[bytes, str]] = [
    (_good(0), "index"),
    (b'{"eventID":"bad-utf8","s":"\xff\xfe abc"}', "dead letter: Invalid UTF-8"),
    (_good(1), "index"),
    (b'{"eventID":"nul-inside","s":"a\x00b"}', "dead letter: CTRL-CHAR"),
    (b"\x00\x00\x00", "dead letter: not a JSON object"),
    (b"", "dead letter: not a JSON object"),
    (_good(2), "index"),
    (b"   \t ", "dead letter: not a JSON object"),
    (b"this is not json at all", "dead letter: not a JSON object"),
    (OVERSIZED, "dead letter: exceeded"),
    (_good(3), "index"),
    (LARGE_BUT_FITS, "index"),
    (_good(4) + b"\r", "index"),
    (b'{"eventID":"cut-off", "s": ', "dead letter: Unexpected end"),
    (_good(5), "index"),
]
# the file ends with a good line that has no newline
LAST_WITHOUT_NEWLINE = _good(6)


def _dead_letter_bytes(record: dict) -> bytes:
    return record["data"].encode("utf-8", "surrogateescape")  # one schema: exact bytes for every writer


def test_every_line_of_a_mixed_file_is_indexed_or_dead_lettered(es8_url: str, scratch_index,
                                                                tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "mixed.json"
    source.write_bytes(b"".join(line + b"\n" for line, _ in MIXED) + LAST_WITHOUT_NEWLINE)
    wd = project_workdir(tmp_path / "w", source, es8_url, index.name)

    result = run_cli(wd)

    expected = MIXED + [(LAST_WITHOUT_NEWLINE, "index")]
    assert f"processed {len(expected)} lines" in result.stderr
    # dead letters make the exit status 16; nothing else went wrong
    assert result.returncode == 16, result.tail()

    documents = index.sources()
    letters = wd.dead_letters()
    unmatched_documents = list(documents)
    unmatched_letters = list(letters)
    for line, destination in expected:
        if destination == "index":
            want = json.loads(line)
            assert want in unmatched_documents, f"line {line[:80]!r} is not in the index"
            unmatched_documents.remove(want)
        else:
            fragment = destination.removeprefix("dead letter: ")
            found = [r for r in unmatched_letters if _dead_letter_bytes(r) == line]
            assert found, f"line {line[:80]!r} is neither in the index nor in a dead-letter file"
            assert fragment in found[0]["reason"], found[0]["reason"]
            unmatched_letters.remove(found[0])
    # nothing else: no line merged with another, no document that is no line
    assert unmatched_documents == [], unmatched_documents[:3]
    assert unmatched_letters == [], unmatched_letters[:3]
    summary = result.summary()
    dead = sum(1 for _, d in expected if d != "index")
    assert summary["delivered"] == len(expected) - dead
    assert summary["dead"] + summary["aside"] == dead


def test_an_empty_file_ships_nothing_and_succeeds(es8_url: str, scratch_index, tmp_path: Path) -> None:
    index = Index(es8_url, scratch_index(es8_url))
    source = tmp_path / "empty.json"
    source.write_bytes(b"")
    wd = project_workdir(tmp_path / "w", source, es8_url, index.name)

    result = run_cli(wd)

    assert result.returncode == 0, result.tail()
    assert "processed 0 lines" in result.stderr
    assert result.summary()["delivered"] == 0
    assert wd.dead_letters() == []
    assert index.refreshed_count() == 0


# --------------------------------------------------------------------------- the encoder, unit level

def test_the_encoder_refuses_a_payload_that_would_span_bulk_lines(tmp_path: Path) -> None:
    out = encode_payloads(tmp_path, ['{"a":\n1}', '{"a":1}\n', '{"a":1}\r\n', '{"a":1}\n\n', "{\"a\":1}\r"],
                          '{ index = "i", type_name = "doc" }')
    assert out[0][0].startswith("error: the Payload has a line break at byte 6")
    assert out[1] == ("ok", b'{"index":{"_index":"i"}}\n{"a":1}\n')
    assert out[2] == ("ok", b'{"index":{"_index":"i"}}\n{"a":1}\r\n')
    assert out[3] == ("ok", b'{"index":{"_index":"i"}}\n{"a":1}\n\n')  # a blank line between entries is skipped
    assert out[4] == ("ok", b'{"index":{"_index":"i"}}\n{"a":1}\r\n')
