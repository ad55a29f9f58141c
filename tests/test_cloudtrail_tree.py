"""plugins/cloudtrail_tree.py: an `aws s3 sync` tree of CloudTrail files, through hindsight_cli.

The 310 real records (tests/data/cloudtrail/stratus-red-team-arrays, one source file per S3
object) are packed at test time as AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/*.json.gz,
beside a CloudTrail-Digest file and a corrupt archive. Input-only runs check the messages in the
queue and the checkpoint (re-runs, new files, watching, kill -9); the example configuration
(examples/cloudtrail-tree) then loads the tree into Elasticsearch 8 and OpenSearch 2.
Cost: input-only tests about 15 s together (the kill -9 one makes 16,000 records); the server
tests about 20 s per server (the servers create eight daily indices).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import CLOUDTRAIL_ARRAYS, CLOUDTRAIL_GENERATOR, REPO_ROOT

from hindsight_py import message as hmsg
from hindsight_py import peek
from hindsight_py.outputs.type_conflicts import undo_renames
from hindsight_py.queue import QueueReader

EXAMPLE_DIR = REPO_ROOT / "examples" / "cloudtrail-tree"
RUN_TIMEOUT = 300  # a hung run fails its test, not the CI job


# -- trees ---------------------------------------------------------------------------------------
def _object_path(root: Path, records: list[dict[str, Any]], rng: random.Random) -> Path:
    first = records[0]
    account, region, when = first["recipientAccountId"], first["awsRegion"], first["eventTime"]
    stamp = when[:16].replace("-", "").replace(":", "") + "Z"
    unique = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", k=16))
    day = root / "AWSLogs" / account / "CloudTrail" / region / when[:4] / when[5:7] / when[8:10]
    return day / f"{account}_CloudTrail_{region}_{stamp}_{unique}.json.gz"


def pack_tree(root: Path, files: Iterable[list[dict[str, Any]]], seed: int = 7) -> list[Path]:
    """Each list of records as one S3 object, `{"Records": [...]}` gzipped, where CloudTrail puts it."""
    rng = random.Random(seed)
    paths = []
    for records in files:
        path = _object_path(root, records, rng)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(json.dumps({"Records": records}).encode()))
        paths.append(path)
    return paths


def sample_files() -> list[list[dict[str, Any]]]:
    return [json.loads(p.read_text()) for p in sorted(CLOUDTRAIL_ARRAYS.glob("*.json"))]


def pack_sample_tree(root: Path) -> tuple[list[dict[str, Any]], Path]:
    """The 310 real records, a digest file and a corrupt archive; returns (records, corrupt path)."""
    files = sample_files()
    paths = pack_tree(root, files)
    account = paths[0].parts[-8]
    digest_dir = root / "AWSLogs" / account / "CloudTrail-Digest" / "us-east-1" / "2024" / "08" / "01"
    digest_dir.mkdir(parents=True)
    digest = {"awsAccountId": account, "digestStartTime": "2024-08-01T12:00:00Z", "logFiles": []}
    (digest_dir / f"{account}_CloudTrail-Digest_us-east-1_trail_us-east-1_20240801T130000Z.json.gz").write_bytes(
        gzip.compress(json.dumps(digest).encode()))
    # a gzip header, then bytes that are no deflate stream: nothing in it can be read
    corrupt = paths[0].with_name(paths[0].name.replace(".json.gz", "X.json.gz"))
    corrupt.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(7, 250)))
    return [r for records in files for r in records], corrupt


# -- configurations and runs ---------------------------------------------------------------------
def _replace_once(text: str, pattern: str, replacement: str) -> str:
    out, n = re.subn(pattern, lambda _m: replacement, text, flags=re.MULTILINE)
    assert n == 1, f"{pattern!r} should match once"
    return out


def example_config(tmp_path: Path, *, root: Path, url: str | None = None, index: str | None = None,
                   ticker_interval: int = 0, name: str = "hs") -> Path:
    """examples/cloudtrail-tree copied and pointed at `root`, the server `url`, indices `index-*`
    (template `index`, alias `index-all`).

    Without `url` the output is left out: the messages stay in the input queue.
    """
    work = tmp_path / name
    def leave_out(directory: str, names: list[str]) -> set[str]:
        # a run of the example in place leaves output/ and .err/.rtc files beside the cfgs
        top = Path(directory) == EXAMPLE_DIR
        return {n for n in names if (top and n == "output") or n.endswith((".err", ".rtc"))}

    shutil.copytree(EXAMPLE_DIR, work, ignore=leave_out)
    cfg_in = work / "run" / "input" / "cloudtrail.cfg"
    text = _replace_once(cfg_in.read_text(), r"^root\s*=.*$", f"root = {json.dumps(str(root))}")
    cfg_in.write_text(_replace_once(text, r"^ticker_interval\s*=.*$", f"ticker_interval = {ticker_interval}"))
    cfg_out = work / "run" / "output" / "elasticsearch.cfg"
    if url is None:
        cfg_out.unlink()
        return work
    text = _replace_once(cfg_out.read_text(), r'^url\s*=\s*"[^"]*"', f'url = "{url}"')
    text = _replace_once(text, r'"cloudtrail-%\{%Y\.%m\.%d\}"', f'"{index}-%{{%Y.%m.%d}}"')
    text = _replace_once(text, r'\{"cloudtrail-\*"\}', f'{{"{index}-*"}}')
    text = _replace_once(text, r'name\s*=\s*"hindsight-cloudtrail"', f'name = "{index}"')
    text = _replace_once(text, r'aliases\s*=\s*\{"cloudtrail"\}', f'aliases = {{"{index}-all"}}')
    cfg_out.write_text(text)
    return work


def run_hindsight(work: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hindsight_py", "hindsight.cfg", "7"], cwd=work,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_hindsight(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hindsight_py", "hindsight.cfg", "7"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def queue_messages(output: Path) -> list[hmsg.Message]:
    reader = QueueReader(output / "input", None)
    out: list[hmsg.Message] = []
    while (batch := reader.read_batch(1000)) is not None:
        out += [hmsg.decode(raw) for raw in batch.records]
    return out


_EVENT_ID = re.compile(rb'"eventID":"([^"]+)"')


def queued_event_ids(output: Path) -> list[str]:
    """The eventID of each message in the input queue, in order (without decoding whole messages)."""
    reader = QueueReader(output / "input", None)
    ids: list[str] = []
    while (batch := reader.read_batch(1000)) is not None:
        for raw in batch.records:
            found = _EVENT_ID.search(peek.payload_of(raw) or b"")
            assert found, raw[:200]
            ids.append(found.group(1).decode())
    return ids


def dead_letter_records(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted((output / "dead_letter").glob("*.jsonl"))
            for line in path.read_text().splitlines()]


def input_checkpoint(output: Path) -> dict[str, Any]:
    text = (output / "hindsight.cp").read_text()
    m = re.search(r"_G\['input\.cloudtrail'\] = '(.*)'\n", text)
    assert m, text
    return json.loads(m.group(1).replace('\\"', '"'))


def search_sources(base_url: str, index: str) -> list[dict[str, Any]]:
    requests.post(f"{base_url}/{index}/_refresh", timeout=60).raise_for_status()
    answer = requests.post(f"{base_url}/{index}/_search", timeout=60,
                           json={"size": 10000, "query": {"match_all": {}}})
    answer.raise_for_status()
    return [hit["_source"] for hit in answer.json()["hits"]["hits"]]


def delete_template(base_url: str, name: str) -> None:
    response = requests.delete(f"{base_url}/_index_template/{name}", timeout=60)
    assert response.status_code in (200, 404), response.text


def compact(record: dict[str, Any], **extra: Any) -> str:
    return json.dumps({**record, **extra}, separators=(",", ":"), ensure_ascii=False)


# -- the input alone -------------------------------------------------------------------------------
def test_every_record_becomes_one_message_and_damage_is_reported(tmp_path):
    records, corrupt = pack_sample_tree(tmp_path / "tree")
    work = example_config(tmp_path, root=tmp_path / "tree")

    first = run_hindsight(work)

    assert first.returncode == 16, first.stderr  # 16: something is in the dead-letter file
    messages = queue_messages(work / "output")
    assert len(messages) == len(records) == 310
    by_id = {m.field_value("eventID"): m for m in messages}
    assert len(by_id) == 310
    for record in records:
        msg = by_id[record["eventID"]]
        assert msg.payload == compact(record, **{"@timestamp": record["eventTime"]})
        assert msg.type == "cloudtrail"
        assert msg.logger == "input.cloudtrail"
        assert msg.field_value("eventTime") == record["eventTime"]
        assert msg.field_value("eventName") == record["eventName"]
        assert msg.timestamp == int(time.mktime(time.strptime(record["eventTime"], "%Y-%m-%dT%H:%M:%SZ"))
                                    - time.timezone) * 10**9
    letters = dead_letter_records(work / "output")
    assert len(letters) == 1  # the corrupt archive; the digest is not read at all
    assert letters[0]["plugin"] == "input.cloudtrail"
    assert str(corrupt.relative_to(tmp_path / "tree")) in letters[0]["reason"]
    assert "corrupt gzip data" in letters[0]["reason"]
    assert json.loads(letters[0]["data"])["file"] == str(corrupt)
    assert "damaged file" in first.stderr
    assert input_checkpoint(work / "output") == {"v": 1, "ledger": (work / "output" / "cloudtrail_tree"
                                                                  / "input.cloudtrail.files").stat().st_size}

    again = run_hindsight(work)

    assert again.returncode == 0, again.stderr
    assert len(queue_messages(work / "output")) == 310  # nothing read twice
    assert len(dead_letter_records(work / "output")) == 1


def test_new_files_are_picked_up_by_the_next_run_and_changed_ones_read_again(tmp_path):
    files = sample_files()
    tree = tmp_path / "tree"
    pack_tree(tree, files[:10], seed=1)
    work = example_config(tmp_path, root=tree)
    assert run_hindsight(work).returncode == 0
    first_count = sum(len(f) for f in files[:10])
    assert len(queue_messages(work / "output")) == first_count

    later = pack_tree(tree, files[10:12], seed=2)
    result = run_hindsight(work)

    assert result.returncode == 0, result.stderr
    messages = queue_messages(work / "output")
    assert [m.field_value("eventID") for m in messages[first_count:]] == [
        r["eventID"] for path in sorted(later) for r in json.loads(gzip.decompress(path.read_bytes()))["Records"]]

    # a re-synced object with more records in it is read again, whole
    grown = later[0]
    records = json.loads(gzip.decompress(grown.read_bytes()))["Records"]
    grown.write_bytes(gzip.compress(json.dumps({"Records": records + records[:1]}).encode()))
    before = len(messages)
    result = run_hindsight(work)
    assert result.returncode == 0
    assert "changed size" in result.stderr
    assert len(queue_messages(work / "output")) == before + len(records) + 1


def test_a_truncated_archive_gives_what_precedes_the_damage_and_is_reported(tmp_path):
    records = json.loads((CLOUDTRAIL_ARRAYS / "aws.credential-access.ec2-steal-instance-credentials.json").read_text())
    tree = tmp_path / "tree"
    [path] = pack_tree(tree, [records])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])
    plain = tree / "AWSLogs" / "plain" / "broken.json"
    text = json.dumps({"Records": records[:5]})
    plain.parent.mkdir(parents=True)
    plain.write_text(text[: text.index(records[3]["eventID"])])  # cut inside the 4th record
    work = example_config(tmp_path, root=tree)

    result = run_hindsight(work)

    assert result.returncode == 16
    messages = queue_messages(work / "output")
    from_gz = [m for m in messages if m.field_value("eventID") in {r["eventID"] for r in records}]
    letters = {Path(json.loads(d["data"])["file"]).name: d for d in dead_letter_records(work / "output")}
    assert set(letters) == {path.name, "broken.json"}
    assert "truncated gzip data" in letters[path.name]["reason"]
    recovered = int(re.search(r"(\d+) records recovered", letters[path.name]["reason"]).group(1))
    assert 0 < recovered < len(records)
    # the records recovered are the first ones, in order, each whole
    assert [m.payload for m in from_gz[:recovered]] == [
        compact(r, **{"@timestamp": r["eventTime"]}) for r in records[:recovered]]
    assert "not valid JSON" in letters["broken.json"]["reason"]
    assert "3 records recovered" in letters["broken.json"]["reason"]


def test_watching_picks_up_files_as_they_arrive(tmp_path):
    files = sample_files()
    tree = tmp_path / "tree"
    pack_tree(tree, files[:3], seed=3)
    work = example_config(tmp_path, root=tree, ticker_interval=1)
    expected = sum(len(f) for f in files[:3])
    process = start_hindsight(work)
    try:
        _wait_for(lambda: len(_queued(work)) == expected, process)
        pack_tree(tree, files[3:5], seed=4)
        expected += sum(len(f) for f in files[3:5])
        _wait_for(lambda: len(_queued(work)) == expected, process)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    ids = [m.field_value("eventID") for m in queue_messages(work / "output")]
    assert sorted(ids) == sorted(r["eventID"] for f in files[:5] for r in f)


def _queued(work: Path) -> list[hmsg.Message]:
    return queue_messages(work / "output") if (work / "output" / "input").exists() else []


def _wait_for(condition: Any, process: subprocess.Popen[str], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the condition did not come true within the limit"
        time.sleep(0.05)


def test_kill_9_neither_skips_nor_repeats_more_than_the_last_checkpoint(tmp_path):
    generated = tmp_path / "generated.ndjson"
    subprocess.run([sys.executable, str(CLOUDTRAIL_GENERATOR), "-n", "16000", "-o", str(generated)], check=True)
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    tree = tmp_path / "tree"
    pack_tree(tree, [records[i:i + 2000] for i in range(0, len(records), 2000)], seed=5)
    work = example_config(tmp_path, root=tree)

    process = start_hindsight(work)
    queue_file = work / "output" / "input" / "0.log"
    _wait_for(lambda: queue_file.exists() and queue_file.stat().st_size > 3_000_000, process)
    process.send_signal(signal.SIGKILL)  # the plugin processes die with it (PR_SET_PDEATHSIG)
    process.communicate(timeout=60)
    cut = len(queued_event_ids(work / "output"))
    assert 0 < cut < len(records), "the kill came too late to test anything"
    resume_at = _records_before_checkpoint(work / "output", tree)

    result = run_hindsight(work)

    assert result.returncode == 0, result.stderr
    ids = queued_event_ids(work / "output")
    counts = Counter(ids)
    assert set(counts) == {r["eventID"] for r in records}  # nothing skipped
    assert len(ids) == len(records) + cut - resume_at
    # what was read twice is exactly what came after the checkpoint saved before the kill
    in_order = sorted(records, key=_tree_order(tree))
    assert sorted(i for i, n in counts.items() if n > 1) == sorted(r["eventID"] for r in in_order[resume_at:cut])
    assert max(counts.values()) <= 2


def _tree_order(tree: Path) -> Any:
    """Records in the order the input reads them: files by relative path, records in file order."""
    rank: dict[str, tuple[str, int]] = {}
    for path in tree.rglob("*.json.gz"):
        rel = path.relative_to(tree).as_posix()
        for n, record in enumerate(json.loads(gzip.decompress(path.read_bytes()))["Records"]):
            rank[record["eventID"]] = (rel, n)
    return lambda record: rank[record["eventID"]]


def _records_before_checkpoint(output: Path, tree: Path) -> int:
    """How many records (in reading order) the saved checkpoint counts as read."""
    if not (output / "hindsight.cp").exists() or "input.cloudtrail" not in (output / "hindsight.cp").read_text():
        return 0
    state = input_checkpoint(output)
    ledger = (output / "cloudtrail_tree" / "input.cloudtrail.files").read_bytes()[: state["ledger"]]
    finished = [json.loads(line)[0] for line in ledger.splitlines()]
    count = sum(len(json.loads(gzip.decompress((tree / rel).read_bytes()))["Records"]) for rel in finished)
    return count + state.get("records", 0)


def test_root_is_required(tmp_path):
    work = example_config(tmp_path, root=tmp_path / "tree")
    cfg = work / "run" / "input" / "cloudtrail.cfg"
    cfg.write_text(_replace_once(cfg.read_text(), r"^root\s*=.*$", ""))
    result = run_hindsight(work)
    assert result.returncode == 2, result.stderr  # the input failed
    assert "root must name the directory" in result.stderr


# -- into the servers ------------------------------------------------------------------------------
@pytest.fixture(params=["es8_url", "os2_url"])
def server(request) -> str:
    return request.getfixturevalue(request.param)


@pytest.mark.servers
def test_the_example_loads_the_real_records_once(server, scratch_index, tmp_path):
    records, corrupt = pack_sample_tree(tmp_path / "tree")
    index = scratch_index(server)
    work = example_config(tmp_path, root=tmp_path / "tree", url=server, index=index)
    try:
        first = run_hindsight(work)
        assert first.returncode == 16, first.stderr  # the corrupt archive, and nothing else
        letters = dead_letter_records(work / "output")
        assert [d["plugin"] for d in letters] == ["input.cloudtrail"]
        assert corrupt.name in letters[0]["reason"]
        assert not (work / "output" / "dead_letter" / "output.elasticsearch.jsonl").exists()

        stored = search_sources(server, f"{index}-*")
        assert len(stored) == 310
        by_id = {}
        for doc in stored:
            assert doc.pop("@timestamp") == doc["eventTime"]
            by_id[doc["eventID"]] = doc
        renamed = [doc for doc in by_id.values() if "_hindsight_renamed" in doc]
        assert {m["from"] for doc in renamed for m in doc["_hindsight_renamed"]} == {"responseElements.role"}
        assert {r["eventID"]: r for r in records} == {i: undo_renames(doc) for i, doc in by_id.items()}
        days = {r["eventTime"][:10].replace("-", ".") for r in records}
        indices = requests.get(f"{server}/_cat/indices/{index}-*?h=index&format=json", timeout=30).json()
        assert {i["index"] for i in indices} == {f"{index}-{day}" for day in days}
        # the template's alias spans them all
        assert requests.get(f"{server}/{index}-all/_count", timeout=30).json()["count"] == 310

        # the same run again: nothing new is read
        again = run_hindsight(work)
        assert again.returncode == 0, again.stderr
        assert len(search_sources(server, f"{index}-*")) == 310

        # from scratch (output/ removed): everything is read and sent again, _id = eventID keeps one copy
        shutil.rmtree(work / "output")
        fresh = run_hindsight(work)
        assert fresh.returncode == 16, fresh.stderr
        assert len(search_sources(server, f"{index}-*")) == 310
    finally:
        delete_template(server, index)
