"""`hindsight_cli hindsight.cfg` end to end, as a user runs it, into real Elasticsearch 8 and OpenSearch 2.

Each scenario is one module-scoped run pair per server: the CLI is started as a subprocess in a
working directory laid out as the README says (hindsight.cfg beside run/), ships a generated
CloudTrail file, then runs again with the same command. The tests then check what the servers and
the log say: every line indexed exactly once with its JSON intact, nothing more on the second run,
the counter's report in the log instead of in the index.

Cost (2 cores, shared with the servers): generating the 200,000-line file once per session takes
about 17 s; each 200k run takes about 40-70 s against ES 8 or OpenSearch 2 (the servers' indexing
is the limit); fetching and comparing 200k documents about 10 s. The upstream scenario uses the
first UPSTREAM_LINE_COUNT lines to keep the file within its budget. The fake-server tests take about
a second each.
"""

from __future__ import annotations

import json
import mmap
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from bulk_sink import BulkSink
from conftest import CLOUDTRAIL_GENERATOR, CLOUDTRAIL_NDJSON, REPO_ROOT
from delivery_helpers import CliRun, hindsight_cli
from upstream_files import cloudtracker_run, extension_modules, lua_string, point_output_at, replace_once

PROJECT_RUN = REPO_ROOT / "run"
LINE_COUNT = 200_000
UPSTREAM_LINE_COUNT = 50_000
PAGE_SIZE = 10_000
# A generous bound: a hung run must fail the test, not the CI job.
RUN_TIMEOUT = 900


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class LineFile:
    """A file of JSON lines and where each line is, by its (unique) eventID."""

    path: Path
    offsets: dict[str, tuple[int, int]]  # eventID -> [start, end) of the line, newline excluded

    @property
    def count(self) -> int:
        return len(self.offsets)

    @classmethod
    def index(cls, path: Path) -> LineFile:
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        with path.open("rb") as fh:
            for line in fh:
                end = start + len(line.rstrip(b"\n"))
                event_id = json.loads(line)["eventID"]
                assert event_id not in offsets, f"eventID {event_id} is not unique in {path}"
                offsets[event_id] = (start, end)
                start += len(line)
        return cls(path, offsets)


@pytest.fixture(scope="session")
def cloudtrail_lines(tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    """LINE_COUNT generated CloudTrail lines (about 250 MB), made once per session."""
    path = tmp_path_factory.mktemp("cloudtrail") / "cloudtrail.json"
    subprocess.run(
        [sys.executable, str(CLOUDTRAIL_GENERATOR), "-n", str(LINE_COUNT), "-o", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    lines = LineFile.index(path)
    assert lines.count == LINE_COUNT
    return lines


@pytest.fixture(scope="session")
def cloudtrail_head(cloudtrail_lines: LineFile, tmp_path_factory: pytest.TempPathFactory) -> LineFile:
    """The first UPSTREAM_LINE_COUNT lines of `cloudtrail_lines`."""
    path = tmp_path_factory.mktemp("cloudtrail-head") / "cloudtrail.json"
    with cloudtrail_lines.path.open("rb") as src, path.open("wb") as dst:
        for _, line in zip(range(UPSTREAM_LINE_COUNT), src, strict=False):
            dst.write(line)
    lines = LineFile.index(path)
    assert lines.count == UPSTREAM_LINE_COUNT
    return lines


# --------------------------------------------------------------------------- the server, over plain HTTP


class Index:
    """One index on a real server, read the way a test needs it."""

    def __init__(self, base_url: str, name: str) -> None:
        self.base_url = base_url
        self.name = name
        self.http = requests.Session()

    def _ok(self, response: requests.Response) -> Any:
        assert response.status_code == 200, (
            f"{response.request.method} {response.url}: {response.text[:2000]}"
        )
        return response.json()

    def count(self, query: dict[str, Any] | None = None) -> int:
        self._ok(self.http.post(f"{self.base_url}/{self.name}/_refresh", timeout=120))
        body = {"query": query} if query else None
        return int(
            self._ok(self.http.post(f"{self.base_url}/{self.name}/_count", json=body, timeout=120))["count"]
        )

    def documents(self) -> Iterator[dict[str, Any]]:
        """Every hit, PAGE_SIZE at a time, through a scroll (ES and OpenSearch alike)."""
        page = self._ok(
            self.http.post(
                f"{self.base_url}/{self.name}/_search",
                params={"scroll": "5m"},
                json={"size": PAGE_SIZE, "sort": ["_doc"]},
                timeout=300,
            )
        )
        scroll_id = page["_scroll_id"]
        try:
            while page["hits"]["hits"]:
                yield from page["hits"]["hits"]
                page = self._ok(
                    self.http.post(
                        f"{self.base_url}/_search/scroll",
                        json={"scroll": "5m", "scroll_id": scroll_id},
                        timeout=300,
                    )
                )
                scroll_id = page["_scroll_id"]
        finally:
            self.http.delete(f"{self.base_url}/_search/scroll", json={"scroll_id": scroll_id}, timeout=60)

    def delete(self) -> None:
        response = self.http.delete(
            f"{self.base_url}/{self.name},{self.name}-*",
            params={"expand_wildcards": "all", "ignore_unavailable": "true"},
            timeout=120,
        )
        assert response.status_code == 200, f"cleanup of {self.name}: {response.text}"


def assert_documents_are_the_lines(index: Index, lines: LineFile) -> None:
    """Exactly one document per line, whose _source equals json.loads of the line."""
    count = index.count()
    assert count == lines.count, f"the index holds {count} documents for {lines.count} lines"
    seen: set[str] = set()
    strangers: list[str] = []
    duplicates: list[str] = []
    different: list[str] = []
    with lines.path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for hit in index.documents():
            source = hit["_source"]
            event_id = source.get("eventID") if isinstance(source, dict) else None
            if event_id not in lines.offsets:
                strangers.append(json.dumps(source)[:300])
                continue
            if event_id in seen:
                duplicates.append(event_id)
                continue
            seen.add(event_id)
            start, end = lines.offsets[event_id]
            if source != json.loads(data[start:end]):
                different.append(event_id)
    assert not strangers, f"{len(strangers)} documents are no input line, e.g. {strangers[:3]}"
    assert not duplicates, f"{len(duplicates)} lines were indexed twice, e.g. {duplicates[:5]}"
    assert not different, f"{len(different)} documents differ from their line, e.g. eventID {different[:5]}"
    assert len(seen) == lines.count, f"{lines.count - len(seen)} lines are missing from the index"


# --------------------------------------------------------------------------- running the CLI


def run_cli(workdir: Path, *args: str) -> CliRun:
    started = time.monotonic()
    result = subprocess.run(
        [hindsight_cli(), *args],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    return CliRun(result.returncode, result.stderr, time.monotonic() - started)


def report(label: str, run: CliRun) -> None:
    """Figures for the report (shown with -s or -rA)."""
    print(f"[e2e figures] {label}: {run.seconds:.1f}s wall, rc {run.returncode}")


def project_workdir(workdir: Path, input_file: Path, port: int, index: str) -> Path:
    """The project's run/ as a user deploys it: hindsight.cfg (from run/, lua paths as shipped) beside
    a copy of run/, with the input file, the port and the index set."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_RUN / "hindsight.cfg", workdir / "hindsight.cfg")
    run = workdir / "run"
    shutil.copytree(PROJECT_RUN, run)
    file_cfg = run / "input" / "file.cfg"
    file_cfg.write_text(
        replace_once(
            file_cfg.read_text(),
            r'^input_filename\s*=\s*"[^"]*"',
            f"input_filename = {lua_string(str(input_file))}",
            "input_filename",
        )
    )
    es_cfg = run / "output" / "elasticsearch_bulk_api.cfg"
    es_cfg.write_text(point_output_at(es_cfg.read_text(), port, index))
    return workdir


def upstream_workdir(workdir: Path, input_file: Path, port: int, index: str) -> Path:
    """CloudTracker's original run/ and lua_sandbox_extensions' original modules, with the project's
    hindsight.cfg pointing its lua paths at those modules (where a lua_sandbox install puts them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cloudtracker_run(workdir, input_filename=input_file, port=port, index=index)
    modules, io_modules = extension_modules(workdir / "luasandbox")
    text = (PROJECT_RUN / "hindsight.cfg").read_text()
    text = replace_once(
        text,
        r"^analysis_lua_path\s*=.*$",
        f"analysis_lua_path = {lua_string(str(modules / '?.lua'))}",
        "analysis_lua_path",
    )
    text = replace_once(
        text,
        r"^io_lua_path\s*=.*$",
        f"io_lua_path = {lua_string(f'{modules}/?.lua;{io_modules}/?.lua')}",
        "io_lua_path",
    )
    (workdir / "hindsight.cfg").write_text(text)
    return workdir


@dataclass(frozen=True)
class Shipped:
    """A run pair on one server: the first run, the count right after it, and the second run."""

    server: str
    index: Index
    workdir: Path
    first: CliRun
    count_after_first: int
    second: CliRun


def ship_twice(
    server: str,
    base_url: str,
    lines: LineFile,
    workdir: Path,
    layout: Callable[[Path, Path, int, str], Path],
    label: str,
) -> Iterator[Shipped]:
    index = Index(base_url, f"hsp-e2e-{uuid.uuid4().hex[:12]}")
    port = urlsplit(base_url).port
    assert port is not None
    layout(workdir, lines.path, port, index.name)
    try:
        first = run_cli(workdir, "hindsight.cfg")
        report(f"{label} {server} first run ({lines.count} lines)", first)
        count_after_first = index.count() if first.returncode == 0 else -1
        second = run_cli(workdir, "hindsight.cfg")
        report(f"{label} {server} second run", second)
        yield Shipped(server, index, workdir, first, count_after_first, second)
    finally:
        index.delete()


def assert_clean_exit(run: CliRun) -> None:
    assert run.returncode == 0, f"exit status {run.returncode}, stderr:\n{run.stderr[-4000:]}"


# --------------------------------------------------------------------------- the project's run/


@pytest.fixture(scope="module", params=["es8", "os2"])
def project_shipped(
    request: pytest.FixtureRequest,
    search_server: Callable[[str], str],
    cloudtrail_lines: LineFile,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shipped]:
    server = request.param
    workdir = tmp_path_factory.mktemp(f"project-{server}")
    yield from ship_twice(
        server, search_server(server), cloudtrail_lines, workdir, project_workdir, "project run/"
    )


def test_project_run_ships_every_line(project_shipped: Shipped, cloudtrail_lines: LineFile) -> None:
    first = project_shipped.first
    assert_clean_exit(first)
    summary = first.summary()
    assert summary["read"] == cloudtrail_lines.count
    assert summary["delivered"] == cloudtrail_lines.count
    assert summary["dead"] == 0 and summary["aside"] == 0 and summary["status"] == 0
    assert project_shipped.count_after_first == cloudtrail_lines.count
    assert not (project_shipped.workdir / "output" / "dead_letter").exists()


def test_project_run_documents_equal_the_lines(project_shipped: Shipped, cloudtrail_lines: LineFile) -> None:
    assert_clean_exit(project_shipped.first)
    assert_documents_are_the_lines(project_shipped.index, cloudtrail_lines)


def test_project_run_second_run_ships_nothing(project_shipped: Shipped, cloudtrail_lines: LineFile) -> None:
    second = project_shipped.second
    assert_clean_exit(second)
    summary = second.summary()
    assert summary["read"] == 0 and summary["delivered"] == 0
    assert "read 0 messages" in second.stderr
    assert project_shipped.index.count() == cloudtrail_lines.count


def test_project_run_counter_is_logged_not_indexed(
    project_shipped: Shipped, cloudtrail_lines: LineFile
) -> None:
    """The counter's report reaches the log through output.counter_log, and the index holds input
    lines only (every CloudTrail record has an eventID; a counter payload would not)."""
    first = project_shipped.first
    assert_clean_exit(first)
    reports = [line for line in first.stderr.splitlines() if " output.counter_log " in line]
    assert any(line.endswith(f"count: {cloudtrail_lines.count} message analysed") for line in reports), (
        f"no final count in the log; counter lines: {reports}"
    )
    index = project_shipped.index
    assert index.count({"bool": {"must_not": {"exists": {"field": "eventID"}}}}) == 0
    assert index.count() == cloudtrail_lines.count


# --------------------------------------------------------------------------- CloudTracker's original run/


@pytest.fixture(scope="module", params=["es8", "os2"])
def upstream_shipped(
    request: pytest.FixtureRequest,
    search_server: Callable[[str], str],
    cloudtrail_head: LineFile,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shipped]:
    server = request.param
    workdir = tmp_path_factory.mktemp(f"upstream-{server}")
    yield from ship_twice(
        server, search_server(server), cloudtrail_head, workdir, upstream_workdir, "upstream run/"
    )


def counter_dead_letters(shipped: Shipped) -> list[dict[str, Any]]:
    path = shipped.workdir / "output" / "dead_letter" / "output.elasticsearch_bulk_api.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.upstream
def test_upstream_run_ships_every_line(upstream_shipped: Shipped, cloudtrail_head: LineFile) -> None:
    """Upstream's output sends everything, the counter's text payloads too: those cannot be documents,
    so hindsight-py sets them aside in the dead-letter file (counted, exit 0) and indexes the rest."""
    first = upstream_shipped.first
    assert_clean_exit(first)
    summary = first.summary()
    assert summary["read"] == cloudtrail_head.count
    assert summary["delivered"] == cloudtrail_head.count
    assert summary["dead"] == 0 and summary["status"] == 0
    assert upstream_shipped.count_after_first == cloudtrail_head.count
    aside = counter_dead_letters(upstream_shipped)
    sources = [record["data"] for record in aside]
    assert all(re.fullmatch(r"\d+ message analysed", s) for s in sources), sources
    assert f"{cloudtrail_head.count} message analysed" in sources
    # every payload set aside in the first run is on disk, and counted in its summary
    assert len([r for r in aside if r["reason"].startswith("not a JSON object")]) >= summary["aside"] > 0


@pytest.mark.upstream
def test_upstream_run_documents_equal_the_lines(upstream_shipped: Shipped, cloudtrail_head: LineFile) -> None:
    assert_clean_exit(upstream_shipped.first)
    assert_documents_are_the_lines(upstream_shipped.index, cloudtrail_head)


@pytest.mark.upstream
def test_upstream_run_second_run_ships_nothing(upstream_shipped: Shipped, cloudtrail_head: LineFile) -> None:
    second = upstream_shipped.second
    assert_clean_exit(second)
    summary = second.summary()
    assert summary["read"] == 0 and summary["delivered"] == 0
    assert "read 0 messages" in second.stderr
    assert upstream_shipped.index.count() == cloudtrail_head.count
    # the second run's counter report ("0 message analysed") is set aside like the first's
    assert (
        len(counter_dead_letters(upstream_shipped))
        == upstream_shipped.first.summary()["aside"] + summary["aside"]
    )


# --------------------------------------------------------------------------- `_type` on the wire


SERVER_VERSIONS = {
    "es8": ("elasticsearch", "8.19.21"),
    "os2": ("opensearch", "2.19.6"),
    # the control: a server that still takes mapping types gets CloudTracker's type_name
    "es6": ("elasticsearch", "6.8.23"),
}


@pytest.fixture(params=sorted(SERVER_VERSIONS))
def fake_cluster(request: pytest.FixtureRequest) -> Iterator[tuple[str, BulkSink]]:
    distribution, version = SERVER_VERSIONS[request.param]
    sink = BulkSink(version=version, distribution=distribution, record=True).start()
    yield request.param, sink
    sink.close()


def assert_action_lines(server: str, cluster: BulkSink, index: str, run: CliRun) -> None:
    assert_clean_exit(run)
    lines = CLOUDTRAIL_NDJSON.read_bytes().rstrip(b"\n").split(b"\n")
    received = [pair for request in cluster.requests for pair in request.pairs()]
    documents = [source for action, source in received if source.startswith(b"{")]
    assert documents == lines, "the documents sent are not the input lines, in order"
    expected = {"_index": index} if server != "es6" else {"_index": index, "_type": "doc"}
    wrong = [action for action, _ in received if action != {"index": expected}]
    assert not wrong, f"{server}: action lines other than {{'index': {expected}}}: {wrong[:3]}"


def test_project_action_lines_carry_no_type(fake_cluster: tuple[str, BulkSink], tmp_path: Path) -> None:
    """CloudTracker's type_name = "doc" reaches ES 6 as `_type`; ES 8 and OpenSearch 2 never see it."""
    server, cluster = fake_cluster
    index = "cloudtrail-types"
    workdir = project_workdir(tmp_path, CLOUDTRAIL_NDJSON, cluster.port, index)
    assert_action_lines(server, cluster, index, run_cli(workdir, "hindsight.cfg"))


@pytest.mark.upstream
def test_upstream_action_lines_carry_no_type(fake_cluster: tuple[str, BulkSink], tmp_path: Path) -> None:
    server, cluster = fake_cluster
    index = "cloudtrail-types"
    workdir = upstream_workdir(tmp_path, CLOUDTRAIL_NDJSON, cluster.port, index)
    assert_action_lines(server, cluster, index, run_cli(workdir, "hindsight.cfg"))
