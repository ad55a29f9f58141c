"""Shared by the delivery tests (crash safety, server faults, bad input, shutdown): a working
directory laid out as a user deploys the project's run/, input files whose lines can be counted
back, the CLI as a subprocess, and an index read back over plain HTTP.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from conftest import REPO_ROOT
from sandbox_fakes import lua_sandbox

from hindsight_py import message as hmsg

PROJECT_RUN = REPO_ROOT / "run"
# a hung run must fail its test, not the CI job
RUN_TIMEOUT = 600

SUMMARY = re.compile(
    r"hindsight summary: read (?P<read>\d+) messages, delivered (?P<delivered>\d+) documents, "
    r"dead-lettered (?P<dead>\d+), retried (?P<retried>\d+) requests, "
    r"(?:set aside (?P<aside>\d+) non-JSON payloads, )?"
    r"(?:moved mistyped fields aside in (?P<moved>\d+) documents, )?"
    r"(?:dropped (?P<dropped>\d+) refused messages \(refused_messages = \"drop\"\), )?"
    r"[\d.]+s, exit status (?P<status>\d+)"
)

EVENT_NAMES = ("ListRoles", "GetObject", "AssumeRole", "DescribeInstances", "PutObject")


# --------------------------------------------------------------------------- input files


def event_id(seq: int) -> str:
    return str(uuid.UUID(int=(seq * 0x9E3779B97F4A7C15 + 0x1234) % (1 << 128)))


def record_line(seq: int) -> bytes:
    """A compact CloudTrail-shaped record (about 230 bytes) with a unique eventID and its seq.

    Smaller than real CloudTrail records (about 1.2 KB) so that 200,000 of them index in seconds:
    the delivery guarantees do not depend on the size, the server's time does.
    """
    time_of_day = f"{(seq // 3600) % 24:02d}:{(seq // 60) % 60:02d}:{seq % 60:02d}"
    return (
        f'{{"eventVersion":"1.08","eventTime":"2024-01-01T{time_of_day}Z","eventSource":"s3.amazonaws.com",'
        f'"eventName":"{EVENT_NAMES[seq % 5]}","awsRegion":"us-east-1",'
        f'"sourceIPAddress":"10.0.{(seq >> 8) & 255}.{seq & 255}","eventID":"{event_id(seq)}","seq":{seq}}}'
    ).encode()


@dataclass
class LineFile:
    """A file of record lines 0..count-1; `ends[i]` is the offset just after line i's newline."""

    path: Path
    count: int
    ends: list[int] = field(repr=False)

    @classmethod
    def write(cls, path: Path, count: int) -> LineFile:
        ends = []
        offset = 0
        with path.open("wb") as fh:
            for seq in range(count):
                line = record_line(seq) + b"\n"
                fh.write(line)
                offset += len(line)
                ends.append(offset)
        return cls(path, count, ends)

    def lines_before(self, offset: int) -> int:
        """How many whole lines end at or before byte `offset` (a file input checkpoint)."""
        return bisect.bisect_right(self.ends, offset)


# --------------------------------------------------------------------------- the working directory


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable text is a valid Lua string literal


def set_key(text: str, key: str, value: str) -> str:
    """Replace the (first) top-level `key = ...` line of a cfg, or append one."""
    pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
    if pattern.search(text):
        return pattern.sub(lambda _: f"{key} = {value}", text, count=1)
    return text + f"\n{key} = {value}\n"


@dataclass
class Workdir:
    path: Path

    @property
    def output(self) -> Path:
        return self.path / "output"

    @property
    def es_cfg(self) -> Path:
        return self.path / "run" / "output" / "elasticsearch_bulk_api.cfg"

    @property
    def input_cfg(self) -> Path:
        return self.path / "run" / "input" / "file.cfg"

    def edit(self, cfg: Path, **keys: str) -> None:
        text = cfg.read_text()
        for key, value in keys.items():
            text = set_key(text, key, value)
        cfg.write_text(text)

    def checkpoints(self) -> dict[str, Any]:
        from hindsight_py.checkpoint import load_checkpoints

        path = self.output / "hindsight.cp"
        return dict(load_checkpoints(path)) if path.exists() else {}

    def input_offset(self) -> int:
        value = self.checkpoints().get("input.file")
        return int(value) if value is not None else 0

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-letter record of every plugin, each with its file's name under "file"."""
        out = []
        directory = self.output / "dead_letter"
        for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                record["file"] = path.name
                out.append(record)
        return out


def project_workdir(path: Path, input_file: Path, base_url: str, index: str, *, id_from_json: str | None = None,
                    **output_keys: str) -> Workdir:
    """The project's run/ beside its hindsight.cfg, reading `input_file` into `index` at `base_url`."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_RUN / "hindsight.cfg", path / "hindsight.cfg")
    shutil.copytree(PROJECT_RUN, path / "run")
    wd = Workdir(path)
    wd.edit(wd.input_cfg, input_filename=lua_string(str(input_file)))
    port = base_url.rsplit(":", 1)[1].rstrip("/")
    wd.edit(wd.es_cfg, port=port, **output_keys)
    id_line = f"    id_from_json = {lua_string(id_from_json)},\n" if id_from_json else ""
    common = (f"encoders_elasticsearch_common = {{\n    es_index_from_timestamp = true,\n"
              f"    index = {lua_string(index)},\n    type_name = \"doc\",\n{id_line}}}")
    text, n = re.subn(r"^encoders_elasticsearch_common\s*=\s*\{.*?^\}", lambda _: common, wd.es_cfg.read_text(),
                      flags=re.M | re.S)
    assert n == 1, "run/output/elasticsearch_bulk_api.cfg has no encoders_elasticsearch_common table"
    wd.es_cfg.write_text(text)
    return wd


# --------------------------------------------------------------------------- the encoder, unit level

# An output that reports what encoders.elasticsearch.payload makes of each message through the
# dead-letter callback (the fake host records those): ("ok", bulk entry) or ("error: ...", Payload).
ENCODER_PROBE = """
local encode = require("encoders.elasticsearch.payload").encode
function process_message()
    local ok, out = pcall(encode)
    if ok then dead_letter("ok", out or "nil") else dead_letter("error: " .. tostring(out), "") end
    return 0
end
function timer_event() end
"""


def encode_payloads(tmp_path: Path, payloads: list[str], common: str) -> list[tuple[str, bytes]]:
    plugin = tmp_path / "probe.lua"
    plugin.write_text(ENCODER_PROBE)
    sandbox, host = lua_sandbox(plugin, "output", cfg=f"encoders_elasticsearch_common = {common}\n",
                                path=str(tmp_path / "?.lua"))
    raws = [hmsg.encode(hmsg.Message(payload=p, logger="input.file")) for p in payloads]
    result = sandbox.run_batch(raws)
    assert result.status == "ok", result.error
    return host.dead_letters


# --------------------------------------------------------------------------- running the CLI


def hindsight_cli() -> str:
    beside = Path(sys.executable).parent / "hindsight_cli"
    found = str(beside) if beside.exists() else shutil.which("hindsight_cli")
    assert found, "hindsight_cli is not installed (pip install -e .)"
    return found


@dataclass
class CliRun:
    returncode: int
    stderr: str
    seconds: float = 0.0

    def summary(self) -> dict[str, int]:
        found = SUMMARY.findall(self.stderr)
        assert len(found) == 1, f"expected one summary line, stderr:\n{self.stderr[-4000:]}"
        match = SUMMARY.search(self.stderr)
        assert match is not None
        return {k: int(v) for k, v in match.groupdict(default="0").items()}

    def tail(self) -> str:
        return self.stderr[-4000:]


def run_cli(wd: Workdir, *, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT) -> CliRun:
    result = subprocess.run(
        [hindsight_cli(), "hindsight.cfg"], cwd=wd.path, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    return CliRun(result.returncode, result.stderr)


class Background:
    """hindsight_cli running in the background, its stderr in a file."""

    def __init__(self, wd: Workdir, *, env: dict[str, str] | None = None, log_name: str = "stderr.log") -> None:
        self.log_path = wd.path / log_name
        self._log = self.log_path.open("ab")
        self._start = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [hindsight_cli(), "hindsight.cfg"], cwd=wd.path, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """The plugin processes (direct children) of the supervisor."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = RUN_TIMEOUT) -> CliRun:
        try:
            rc = self.process.wait(timeout)
        finally:
            self._log.close()
        with self.log_path.open("rb") as fh:
            fh.seek(self._start)
            text = fh.read().decode("utf-8", "replace")
        return CliRun(rc, text)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(60)
        self._log.close()


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def stop_signal_names() -> dict[str, int]:
    return {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


# --------------------------------------------------------------------------- the index


class Index:
    def __init__(self, base_url: str, name: str) -> None:
        self.base_url = base_url
        self.name = name
        self.http = requests.Session()
        self.http.trust_env = False  # loopback: no proxy from the environment

    def _ok(self, response: requests.Response) -> Any:
        assert response.status_code == 200, f"{response.request.method} {response.url}: {response.text[:2000]}"
        return response.json()

    def refresh(self) -> None:
        self._ok(self.http.post(f"{self.base_url}/{self.name}/_refresh", timeout=120))

    def count(self) -> int:
        response = self.http.post(f"{self.base_url}/{self.name}/_count", timeout=120)
        deadline = time.monotonic() + 60
        while response.status_code == 503 and time.monotonic() < deadline:
            # An index created a moment ago answers 503 until its primary shard is started (a
            # loaded machine makes that window long): ask again until it is.
            time.sleep(0.5)
            response = self.http.post(f"{self.base_url}/{self.name}/_count", timeout=120)
        if response.status_code == 404:
            return 0
        return int(self._ok(response)["count"])

    def refreshed_count(self) -> int:
        response = self.http.post(f"{self.base_url}/{self.name}/_refresh", timeout=120)
        if response.status_code == 404:
            return 0
        self._ok(response)
        return self.count()

    def has_event(self, eid: str) -> bool:
        body = {"query": {"term": {"eventID.keyword": eid}}}
        response = self.http.post(f"{self.base_url}/{self.name}/_count", json=body, timeout=60)
        return int(self._ok(response)["count"]) > 0

    def event_counts(self) -> Counter[str]:
        """Documents per eventID, exactly (a composite aggregation, paged)."""
        self.refresh()
        counts: Counter[str] = Counter()
        after = None
        while True:
            composite: dict[str, Any] = {"size": 10_000, "sources": [{"e": {"terms": {"field": "eventID.keyword"}}}]}
            if after is not None:
                composite["after"] = after
            body = {"size": 0, "aggs": {"ids": {"composite": composite}}}
            result = self._ok(self.http.post(f"{self.base_url}/{self.name}/_search", json=body, timeout=300))
            agg = result["aggregations"]["ids"]
            for bucket in agg["buckets"]:
                counts[bucket["key"]["e"]] = bucket["doc_count"]
            after = agg.get("after_key")
            if not agg["buckets"] or after is None:
                return counts

    def index_operations(self) -> int:
        """Index operations the server performed (overwrites of an `_id` included)."""
        stats = self._ok(self.http.get(f"{self.base_url}/{self.name}/_stats/indexing", timeout=60))
        return int(stats["_all"]["primaries"]["indexing"]["index_total"])

    def sources(self) -> list[dict[str, Any]]:
        self.refresh()
        body = {"size": 10_000, "query": {"match_all": {}}}
        result = self._ok(self.http.post(f"{self.base_url}/{self.name}/_search", json=body, timeout=120))
        return [hit["_source"] for hit in result["hits"]["hits"]]

    def create(self, body: dict[str, Any]) -> None:
        self._ok(self.http.put(f"{self.base_url}/{self.name}", json=body, timeout=120))


@dataclass
class Tally:
    """How the documents of an index compare with the lines 0..count-1 of a LineFile."""

    missing: list[int]
    duplicates: int  # documents beyond the first per line
    strangers: int  # documents that are no line of the file

    def describe(self) -> str:
        return f"missing {len(self.missing)} (e.g. {self.missing[:5]}), duplicates {self.duplicates}, " \
               f"strangers {self.strangers}"


def tally(index: Index, lines: LineFile) -> Tally:
    counts = index.event_counts()
    wanted = {event_id(seq): seq for seq in range(lines.count)}
    missing = sorted(seq for eid, seq in wanted.items() if counts.get(eid, 0) == 0)
    duplicates = sum(n - 1 for eid, n in counts.items() if eid in wanted and n > 1)
    strangers = sum(n for eid, n in counts.items() if eid not in wanted)
    return Tally(missing, duplicates, strangers)


def figures(label: str, **values: Any) -> None:
    """Figures for the report (shown with -s or -rA)."""
    print(f"[delivery figures] {label}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
