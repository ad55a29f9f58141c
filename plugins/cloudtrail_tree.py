"""Input: a CloudTrail tree as `aws s3 sync` leaves it, one message per record.

The tree under `root` holds `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/*.json.gz` (and plain
`.json`) files, each `{"Records": [...]}`; a file holding a bare JSON array of records is read too.
`CloudTrail-Digest` files are skipped, so are names starting with "." and the temporary files
`aws s3 sync` writes before renaming (their names do not end in .json/.json.gz).

Each record becomes one message: Payload = the record as compact JSON (so the document indexed
is the record), Type = "cloudtrail", Timestamp = eventTime, Fields eventID, eventTime,
eventSource, eventName, awsRegion, recipientAccountId (those that are strings). With
`timestamp_field` (default "@timestamp") the record gets that key too, a copy of eventTime, for
Kibana-style date fields; set it to false to leave records exactly as they are.

A record written as that compact JSON already (CloudTrail's are) is framed straight from the
file's bytes in C, batch by batch (inject_json_records); any other is parsed and built one by one,
in its place, and a file the byte scan cannot follow is parsed whole. The messages are the same.

Where it stands is kept in two places (docs/cloudtrail.md):
- a ledger under output_path (`cloudtrail_tree/<plugin>.files`): one line per finished file,
  appended and fsynced (in the background) before any checkpoint handed over counts it;
- the checkpoint, one compact JSON string `{"v":1,"ledger":<bytes of the ledger>,"file":<path>,
  "records":<n>}`: how much of the ledger is true, and how far into the file in progress it got.
At start the ledger is cut back to the checkpoint's length, so after a kill -9 the files and
records after the last saved checkpoint are read again (at most what was in flight, never fewer:
nothing is skipped), and the `_id` an output derives from eventID makes the repeats harmless.

A file that cannot be read whole (corrupt or truncated gzip, broken JSON, no Records) is reported
in the dead-letter file with the reason and its path, after the records before the damage have
been sent; it is counted and logged, and reading goes on with the next file. A finished file
whose size changes later (re-synced) is read again.

cfg:
    filename        = "cloudtrail_tree.py"
    root            = "/data/cloudtrail"   -- required: the directory `aws s3 sync` writes to
    ticker_interval = 0                    -- 0: read what is there and stop; N > 0: look again every N s
    timestamp_field = "@timestamp"         -- false: no extra key in the documents
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from hindsight_py import _accel
from hindsight_py.plugin import (
    dead_letter,
    inject_json_records,
    inject_message,
    inject_records,
    is_running,
    log,
    read_config,
)

try:  # ISA-L's inflate: the same bytes as zlib's, in about a third of the CPU time
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is optional
    import zlib as _zlib

try:  # several times faster; what it cannot read (an integer past 64 bits) goes to json
    from orjson import dumps as _fast_dumps
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is optional
    _fast_loads = json.loads
    _fast_dumps = None

LOG_WARNING, LOG_INFO = 4, 6
CHECKPOINT_VERSION = 1
_FIELDS = ("eventID", "eventTime", "eventSource", "eventName", "awsRegion", "recipientAccountId")
_DIGEST_DIR = "CloudTrail-Digest"
_DIGEST_NAME = "_CloudTrail-Digest_"
_CHUNK = 256 * 1024  # gzip input per step: a corrupt spot loses at most this much of what precedes it
_STOP_CHECK_EVERY = 500  # records between two looks at is_running(), and per batch of messages
# orjson writes 1e-07 as 1e-7: a payload that may hold such a number is written by json instead
_SHORT_EXPONENT = re.compile(rb"[0-9]e-[0-9][,}\]]").search
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cfg_root() -> str:
    root = read_config("root")
    if not isinstance(root, str) or not root:
        raise ValueError("root must name the directory that holds the CloudTrail tree")
    return os.path.abspath(root)


ROOT = _cfg_root()
_stamp = read_config("timestamp_field")
TIMESTAMP_FIELD: str | None = "@timestamp" if _stamp is None else (_stamp or None)
if TIMESTAMP_FIELD is not None and not isinstance(TIMESTAMP_FIELD, str):
    raise ValueError("timestamp_field must be a string or false")
MAX_MESSAGE_SIZE = int(read_config("max_message_size") or 64 * 1024)
LEDGER_PATH = os.path.join(str(read_config("output_path")), "cloudtrail_tree", f"{read_config('Logger')}.files")


# -- the ledger of finished files ----------------------------------------------------------------
class Ledger:
    """Finished files, one JSON line each: [relative path, size, "ok" | "damaged"].

    A line is appended at once and fsync()ed in the background (one fsync covers every line
    appended before it starts, so they group up); `durable` is how many bytes are on disk. A
    checkpoint may count only those (_give): reading goes on meanwhile, instead of waiting about
    5 ms per file for the disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        self.durable = 0
        self.files: dict[str, int] = {}
        self._fd = -1
        self._syncing: threading.Thread | None = None

    def load(self, trusted: int) -> None:
        """Read the first `trusted` bytes (what the checkpoint vouches for); cut the rest away."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(trusted)
        except FileNotFoundError:
            data = b""
        if len(data) < trusted:
            log(LOG_WARNING, f"{self.path} holds {len(data)} bytes where the checkpoint counts {trusted}: "
                             "files it no longer lists are read again")
        end = data.rfind(b"\n") + 1  # a torn last line is not trusted either
        self.files = {}
        for line in data[:end].splitlines():
            try:
                rel, size, _status = json.loads(line)
            except (ValueError, TypeError):
                continue
            self.files[rel] = size
        self.wait()
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.size = self.durable = end

    def add(self, rel: str, size: int, status: str) -> int:
        """Append a finished file (on disk soon: sync_in_background); returns the ledger's new length."""
        line = (json.dumps([rel, size, status], ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(line)
        self.files[rel] = size
        self.sync_in_background()
        return self.size

    def sync_in_background(self) -> None:
        """Start an fsync() of what is appended so far, unless one runs or all is on disk."""
        if self.durable < self.size and (self._syncing is None or not self._syncing.is_alive()):
            self._syncing = threading.Thread(target=self._sync, args=(self.size,), daemon=True,
                                             name="cloudtrail-ledger-fsync")
            self._syncing.start()

    def _sync(self, upto: int) -> None:
        os.fsync(self._fd)
        self.durable = max(self.durable, upto)

    def wait(self) -> None:
        """Until everything appended is on disk."""
        if self._syncing is not None:
            self._syncing.join()
        if self.durable < self.size:
            os.fsync(self._fd)
            self.durable = self.size


def checkpoint_text(ledger_size: int, rel: str | None = None, records: int = 0) -> str:
    state: dict[str, Any] = {"v": CHECKPOINT_VERSION, "ledger": ledger_size}
    if rel is not None:
        state["file"] = rel
        state["records"] = records
    return json.dumps(state, separators=(",", ":"), ensure_ascii=False)


def parse_checkpoint(value: Any) -> tuple[int, str | None, int]:
    """(ledger bytes, file in progress, records of it done); (0, None, 0) for none or a foreign one."""
    if value is None:
        return 0, None, 0
    try:
        state = json.loads(value) if isinstance(value, str) else None
        if not isinstance(state, dict) or state.get("v") != CHECKPOINT_VERSION:
            raise ValueError
        ledger = int(state["ledger"])
        rel = state.get("file")
        records = int(state.get("records", 0))
    except (ValueError, KeyError, TypeError):
        log(LOG_WARNING, f"checkpoint {str(value)[:100]!r} is not this plugin's: reading the tree from the start")
        return 0, None, 0
    return ledger, rel if isinstance(rel, str) else None, records


# -- finding files -------------------------------------------------------------------------------
def _is_log_file(name: str) -> bool:
    return (not name.startswith(".") and _DIGEST_NAME not in name
            and (name.endswith(".json.gz") or name.endswith(".json")))


def scan(root: str) -> Iterator[tuple[str, int]]:
    """(relative path, size) of every CloudTrail log file under root, digests left out."""
    stack = [root]
    seen: set[tuple[int, int]] = set()  # directories by identity: a symlink loop is walked once
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue  # removed while we looked
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if entry.name != _DIGEST_DIR and not entry.name.startswith("."):
                    stack.append(entry.path)
            elif _is_log_file(entry.name):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                yield os.path.relpath(entry.path, root).replace(os.sep, "/"), size


# -- reading one file ----------------------------------------------------------------------------
def _gunzip(data: bytes) -> tuple[bytes, str | None]:
    """What can be decompressed, and what went wrong (None: the whole file). Handles multi-member files."""
    whole = _inflate_whole(data)
    return (whole, None) if whole is not None else _inflate_in_steps(data)


def _inflate_whole(data: bytes) -> bytes | None:
    """The text of a sound gzip file in one call per member, None if anything is wrong with it.
    A member's size (its last 4 bytes, mod 2**32) as max_length lets the inflater allocate its
    output once instead of growing it; it is only a hint: a wrong one costs time, not bytes."""
    out: list[bytes] = []
    rest = data
    while rest:
        d = _zlib.decompressobj(47)  # gzip or zlib header
        try:
            out.append(d.decompress(rest, int.from_bytes(rest[-4:], "little") + 1))
            if not d.eof:
                out.append(d.decompress(d.unconsumed_tail))
                out.append(d.flush())
        except _zlib.error:
            return None
        if not d.eof:
            return None
        rest = d.unused_data
        if not rest.strip(b"\0"):  # zero padding after the last member is harmless
            break
    return b"".join(out)  # one member: its bytes object itself, not a copy


def _inflate_in_steps(data: bytes) -> tuple[bytes, str | None]:
    """_gunzip of a damaged file: what precedes the damage, _CHUNK by _CHUNK, and what went wrong."""
    out: list[bytes] = []
    rest = data
    while rest:
        d = _zlib.decompressobj(47)
        pos = 0
        while pos < len(rest):
            chunk = rest[pos:pos + _CHUNK]
            pos += len(chunk)
            try:
                out.append(d.decompress(chunk))
            except _zlib.error as e:
                return b"".join(out), f"corrupt gzip data: {e}"
            if d.eof:
                break
        if not d.eof:
            return b"".join(out) + d.flush(), "truncated gzip data: the file ends before its compressed stream does"
        rest = d.unused_data + rest[pos:]
        if not rest.strip(b"\0"):  # zero padding after the last member is harmless
            break
    return b"".join(out), None


def _salvage(text: str) -> tuple[list[Any], str]:
    """The records of a broken `{"Records": [...]}` text that parse whole, in order."""
    decoder = json.JSONDecoder()
    start = text.find('"Records"')
    at = text.find("[", start) if start >= 0 else (0 if text.lstrip().startswith("[") else -1)
    if at < 0:
        return [], "no Records array"
    records: list[Any] = []
    pos = at + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break
        records.append(value)
    return records, f"{len(records)} records recovered before the damage"


def read_records(path: str) -> tuple[list[Any], str | None]:
    """The records of one file, and what was wrong with it (None when it was read whole)."""
    records, problem, _ = _parse(*_file_data(path))
    return records, problem


def _file_data(path: str) -> tuple[bytes, str | None]:
    """The file's JSON text (decompressed), and what was wrong with the compression."""
    with open(path, "rb") as fh:
        data = fh.read()
    problem = None
    if path.endswith(".gz") and data[:2] == b"\x1f\x8b":
        data, problem = _gunzip(data)
    elif path.endswith(".gz") and data.lstrip()[:1] not in (b"{", b"["):
        data, problem = b"", "not gzip data (and not plain JSON either)"
    return data, problem


def _parse(data: bytes, problem: str | None) -> tuple[list[Any], str | None, bool]:
    """The records of a file's text, what was wrong, and whether orjson read it (then every
    record is one it can write)."""
    if problem is None:
        try:
            doc = _fast_loads(data)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("Records"), list):
            return doc["Records"], None, _fast_dumps is not None
    text = data.decode("utf-8", "surrogateescape")
    if problem is None:
        try:
            doc = json.loads(text)
        except ValueError as e:
            problem = f"not valid JSON: {e}"
        else:
            if isinstance(doc, dict) and isinstance(doc.get("Records"), list):
                return doc["Records"], None, False
            if isinstance(doc, list):
                return doc, None, False
            return [], "not a CloudTrail log file: no Records array", False
    records, note = _salvage(text)
    return records, f"{problem}; {note}", False


# -- messages ------------------------------------------------------------------------------------
def _event_ns(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # CloudTrail writes UTC with a Z; a local time would be a guess
    since = when - _EPOCH  # exact, where a float timestamp would round
    return (since.days * 86400 + since.seconds) * 1_000_000_000 + since.microseconds * 1000


def make_message(record: dict[str, Any]) -> dict[str, Any]:
    event_ns = _event_ns(record.get("eventTime"))
    if TIMESTAMP_FIELD is not None and event_ns is not None and TIMESTAMP_FIELD not in record:
        record[TIMESTAMP_FIELD] = record["eventTime"]
    msg: dict[str, Any] = {
        "Type": "cloudtrail",
        "Payload": json.dumps(record, separators=(",", ":"), ensure_ascii=False),
        "Fields": {k: record[k] for k in _FIELDS if isinstance(record.get(k), str)},
    }
    if event_ns is not None:
        msg["Timestamp"] = event_ns
    return msg


def _send_one(rel: str, number: int, record: Any, checkpoint: str) -> None:
    """One record as its own message (or dead-lettered with the reason): the way for odd ones."""
    if isinstance(record, dict):
        message = make_message(record)
        try:
            inject_message(message, checkpoint)
        except ValueError as e:  # larger than max_message_size, say: set aside, not lost
            dead_letter(f"{rel}: record {number}: {e}", message["Payload"])
            inject_message(None, checkpoint)
    else:
        dead_letter(f"{rel}: record {number} is not a JSON object", json.dumps(record, ensure_ascii=False))
        inject_message(None, checkpoint)


def _fast_payload(record: dict[str, Any], limit: int) -> bytes | None:
    """make_message's Payload, written by orjson; None where it could differ or be too large."""
    assert _fast_dumps is not None
    try:
        payload = _fast_dumps(record)
    except TypeError:  # a lone surrogate, say
        return None
    if b"e-" in payload and _SHORT_EXPONENT(payload):
        return None
    # the Fields repeat at most the payload's bytes: such a message surely fits
    return payload if 2 * len(payload) + 1024 <= limit else None


def _send_batch(rel: str, records: list[Any], first: int, position: _Position) -> None:
    """make_message() of each record, sent as one batch of messages (inject_records): the records of
    one file as orjson read them. Odd ones (not an object, too large) go one by one, in order."""
    payloads: list[bytes] = []
    stamps: list[int] = []
    plain: list[dict[str, Any]] = []
    now = time.time_ns()

    def flush(last: int) -> None:
        if plain:
            fields = {k: [v if type(v := r.get(k)) is str else None for r in plain] for k in _FIELDS}
            inject_records(payloads, stamps, fields, position.at(last), type="cloudtrail")
            payloads.clear()
            stamps.clear()
            plain.clear()

    for number, record in enumerate(records, start=first):
        payload = None
        if type(record) is dict:
            when = record.get("eventTime")
            ns = _event_ns(when)
            added = ns is not None and TIMESTAMP_FIELD is not None and TIMESTAMP_FIELD not in record
            if added:
                record[TIMESTAMP_FIELD] = when
            payload = _fast_payload(record, MAX_MESSAGE_SIZE)
            if added and payload is None:
                del record[TIMESTAMP_FIELD]  # make_message adds it again
        if payload is None:
            flush(number - 1)
            _send_one(rel, number, record, position.at(number))
            continue
        payloads.append(payload)
        stamps.append(now if ns is None else ns)
        plain.append(record)
    flush(first + len(records) - 1)


_ARRAY_START = re.compile(rb'\s*\{\s*"Records"\s*:\s*\[').match
_ARRAY_END = re.compile(rb"\]\s*\}\s*\Z").match
_NEXT = re.compile(rb"\s*(?:,\s*|(?=\]))").match


def _loads_one(text: bytes) -> Any:
    """One record's text as the whole file's parse would have it; ValueError if it is not JSON."""
    try:
        return _fast_loads(text)
    except ValueError:
        return json.loads(text.decode("utf-8", "surrogateescape"))


def _send_array(rel: str, data: bytes, position: _Position) -> int | None:
    """The records of a `{"Records": [...]}` text, framed straight from its bytes (inject_json_records):
    -1 when they were all sent, None when a stop was requested, else how many were sent before
    something the scan does not vouch for (the caller parses the file and goes on from there)."""
    start = _ARRAY_START(data)
    if start is None or _ARRAY_END(data, data.rfind(b"]")) is None:
        return 0
    pos, number = start.end(), 0
    while True:
        done = inject_json_records(data, pos, _STOP_CHECK_EVERY, fields=_FIELDS, stamp_key=TIMESTAMP_FIELD,
                                   type="cloudtrail")
        if done is None:
            return number
        count, pos, status, odd_end = done
        number += count
        if count:
            inject_message(None, position.at(number))
        if status == 1:  # the array's "]": the last one, as checked above?
            return -1 if _ARRAY_END(data, pos) is not None else number
        if status == 2 and odd_end > pos:  # a record to build the slow way, in its place
            try:
                record = _loads_one(data[pos:odd_end])
            except ValueError:
                return number
            after = _NEXT(data, odd_end)
            if after is None:
                return number
            number += 1
            _send_one(rel, number, record, position.at(number))
            pos = after.end()
        elif status != 0:
            return number
        if not is_running():
            return None


# -- the plugin ----------------------------------------------------------------------------------
class _State:
    ledger: Ledger | None = None
    resume_file: str | None = None
    resume_records = 0
    damaged_files = 0
    given: str | None = None  # the last checkpoint handed over
    wanted: tuple[str, int] | None = None  # the latest one, and the ledger bytes it counts


S = _State()


def _give(text: str, counts: int) -> str:
    """The checkpoint to hand over now: `text`, which counts `counts` bytes of the ledger, once
    they are on disk; until then the last one handed over, which counts less (a restart then reads
    a little more again, never less: nothing is skipped)."""
    S.wanted = (text, counts)
    assert S.ledger is not None
    if S.ledger.durable >= counts or S.given is None:
        if S.ledger.durable < counts:
            S.ledger.wait()  # (nothing handed over yet to fall back on)
        S.given = text
    else:
        S.ledger.sync_in_background()
    return S.given


def _settle() -> None:
    """Hand over the latest checkpoint, its ledger on disk: before returning to the host."""
    if S.ledger is not None and S.wanted is not None and S.given != S.wanted[0]:
        S.ledger.wait()
        S.given = S.wanted[0]
        inject_message(None, S.given)


class _Position:
    """The checkpoints of the records of the file in progress, `at(n)` after its record n: a
    prefix, n, "}" (what checkpoint_text gives, built once), handed over as _give allows."""

    def __init__(self, ledger: Ledger, rel: str) -> None:
        self.counts = ledger.size
        self.prefix = checkpoint_text(ledger.size, rel, 0)[:-2]

    def at(self, number: int) -> str:
        return _give(f"{self.prefix}{number}}}", self.counts)


def _start(checkpoint: Any) -> Ledger:
    trusted, rel, records = parse_checkpoint(checkpoint)
    ledger = Ledger(LEDGER_PATH)
    ledger.load(trusted)
    S.resume_file, S.resume_records = rel, records
    return ledger


def _read_file(ledger: Ledger, rel: str, size: int) -> bool:
    """Send one file's records; False when a stop was requested before it was finished."""
    skip = S.resume_records if rel == S.resume_file else 0
    S.resume_file, S.resume_records = None, 0
    path = os.path.join(ROOT, rel)
    try:
        data, problem = _file_data(path)
    except FileNotFoundError:
        log(LOG_WARNING, f"{rel} went away before it could be read")
        return True
    position = _Position(ledger, rel)
    # framed from the bytes with the C loop; without it (HINDSIGHT_PY_PURE) parsing is the faster way
    if problem is None and skip == 0 and _fast_dumps is not None and _accel.speedups is not None:
        sent = _send_array(rel, data, position)
        if sent is None:
            return False  # a stop was requested
        if sent < 0:
            ledger.add(rel, size, "ok")
            inject_message(None, _give(checkpoint_text(ledger.size), ledger.size))
            return True
        skip = sent  # the rest as parsed: what stopped the scan is odd, or damage
    records, problem, fast = _parse(data, problem)
    del data
    for start in range(skip, len(records), _STOP_CHECK_EVERY):
        batch = records[start:start + _STOP_CHECK_EVERY]
        if fast:
            _send_batch(rel, batch, start + 1, position)
        else:
            for number, record in enumerate(batch, start=start + 1):
                _send_one(rel, number, record, position.at(number))
        if not is_running():
            return False
    status = "ok"
    if problem is not None:
        status = "damaged"
        S.damaged_files += 1
        reason = f"{rel}: {problem}"
        dead_letter(reason, json.dumps({"file": path, "size": size, "records_sent": len(records)},
                                       ensure_ascii=False))
        log(LOG_WARNING, f"damaged file: {reason} (in the dead-letter file; {S.damaged_files} so far)")
    ledger.add(rel, size, status)
    inject_message(None, _give(checkpoint_text(ledger.size), ledger.size))
    return True


def process_message(checkpoint: Any = None) -> tuple[int, str]:
    if S.ledger is None:
        S.ledger = _start(checkpoint)
    ledger = S.ledger
    if not os.path.isdir(ROOT):
        log(LOG_WARNING, f"root {ROOT} is not a directory (yet): nothing to read")
    pending = sorted((rel, size) for rel, size in scan(ROOT) if ledger.files.get(rel) != size)
    if S.resume_file is not None:
        # the file in progress first, as it was when the run stopped
        pending.sort(key=lambda item: item[0] != S.resume_file)
    done = 0
    for rel, size in pending:
        if rel in ledger.files:
            log(LOG_INFO, f"{rel} changed size since it was read ({ledger.files[rel]} -> {size}): reading it again")
        if not _read_file(ledger, rel, size):
            _settle()
            return 0, f"stopped after {done} files"
        done += 1
        if not is_running():
            break
    _settle()
    return 0, f"read {done} files ({S.damaged_files} damaged so far)"
