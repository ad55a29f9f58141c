#!/usr/bin/env python3
"""hindsight-py against its baselines, in one invocation, on the same data.

    python benchmarks/run.py                      # 200k lines to the fast fake _bulk endpoint
    python benchmarks/run.py --lines 200000 1000000 2000000 --only native   # scaling
    python benchmarks/run.py --es http://127.0.0.1:39200      # a real Elasticsearch instead
    python benchmarks/run.py --hindsight ~/.cache/hindsight-py/hindsight-0.16   # + the real Hindsight
    python benchmarks/run.py --targets --hindsight ~/.cache/hindsight-py/hindsight-0.16 --es URL
                                                  # issue 17's targets, each with its figure

Pipelines (hindsight_cli, one process per plugin):
  lua       the project's run/ (file.lua -> counter.lua -> elasticsearch_bulk_api.lua)
  upstream  CloudTracker's original run/ with lua_sandbox_extensions' modules (from the cache of
            scripts/fetch_upstream.py, fetched first if need be)
  native    Python plugins: plugins/flat_file.py -> plugins/elasticsearch_bulk.py
  native_pure   the same without the C loops of hindsight_py/_speedups.c (HINDSIGHT_PY_PURE=1)
  s3tree    examples/cloudtrail-tree as it ships (plugins/cloudtrail_tree.py -> elasticsearch_bulk.py), the
            same records as .json.gz files of 1,000 in the AWSLogs/ layout (tree_dir); s3tree_pure: no C loops
Baselines:
  streaming_bulk / parallel_bulk   elasticsearch-py's helpers reading the same file
  server_limit                     pre-built bulk bodies posted as fast as the server takes them, the best
                                   of 1, 2 and 4 connections

Data: tests/cloudtrail_gen.py (made once per line count under benchmarks/_work/); endpoint:
tests/bulk_sink.py in a process of its own.
Printed: docs/s, CPU seconds (user+sys of the whole process tree) and per 100,000 documents, peak
memory (PSS summed over the tree), and each pipeline's ratio to each baseline (docs/s over docs/s).
Timings vary run to run (about +-20% here): compare ratios from the same invocation, not absolute
numbers across machines.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import urllib3
from build_hindsight import BuildError, cache_base, upstream_dir

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
GENERATOR = REPO / "tests" / "cloudtrail_gen.py"
SINK = REPO / "tests" / "bulk_sink.py"
FETCH_UPSTREAM = REPO / "scripts" / "fetch_upstream.py"
BATCH = 500  # documents per bulk request, as CloudTracker's elasticsearch_bulk_api.cfg


# -- data and endpoints ------------------------------------------------------------------------
def data_file(lines: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"cloudtrail-{lines}.ndjson"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, str(GENERATOR), "-n", str(lines), "-o", str(tmp)], check=True)
        tmp.rename(path)
    return path


def tree_dir(lines: int, per_file: int = 1000) -> Path:
    """data_file(lines) as `aws s3 sync` leaves a trail: .json.gz files of `per_file` records each,
    {"Records": [...]}, under AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/, named after their
    first record."""
    root = WORK / f"cloudtrail-tree-{lines}"
    if not root.exists():
        import gzip

        tmp = root.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with open(data_file(lines), "rb") as fh:
            for n, chunk in enumerate(iter(lambda: [fh.readline() for _ in range(per_file)], [b""] * per_file)):
                chunk = [line.strip() for line in chunk if line.strip()]
                if not chunk:
                    break
                first = json.loads(chunk[0])
                day = first["eventTime"][:10].replace("-", "/")
                account, region = first["recipientAccountId"], first["awsRegion"]
                name = f"{account}_CloudTrail_{region}_{first['eventTime'][:10].replace('-', '')}_{n:05d}.json.gz"
                path = tmp / "AWSLogs" / account / "CloudTrail" / region / day / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(gzip.compress(b'{"Records":[' + b",".join(chunk) + b"]}", 6))
        tmp.rename(root)
    return root


class Endpoint:
    """The fast fake _bulk endpoint (tests/bulk_sink.py), or a real server (--es)."""

    def __init__(self, es_url: str | None) -> None:
        self.real = es_url is not None
        self.http = urllib3.PoolManager(maxsize=4)
        self.proc = None
        if es_url:
            self.url = es_url.rstrip("/")
        else:
            # it prints its URL once it listens
            self.proc = subprocess.Popen([sys.executable, str(SINK)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            assert self.proc.stdout is not None
            self.url = self.proc.stdout.readline().strip()
            if not self.url:
                raise RuntimeError(f"{SINK} did not start (exit status {self.proc.wait()})")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def reset(self, index: str) -> None:
        if self.real:
            self.http.request("DELETE", f"{self.url}/{index}")
            body = json.dumps({"settings": {"index.mapping.total_fields.limit": 10000,
                                            "number_of_replicas": 0, "refresh_interval": "30s"},
                               "mappings": {"date_detection": False}})
            self.http.request("PUT", f"{self.url}/{index}", body=body, headers={"Content-Type": "application/json"})

    def docs(self, index: str) -> int:
        if self.real:
            self.http.request("POST", f"{self.url}/{index}/_refresh")
            return json.loads(self.http.request("GET", f"{self.url}/{index}/_count").data)["count"]
        return json.loads(self.http.request("GET", self.url + "/_sink_stats").data)["docs"]

    def close(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()


# -- measuring a process tree ------------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Peak memory of a process and its descendants, sampled every 20 ms.

    Summed as PSS (proportional set size): forked plugin processes share the supervisor's pages
    copy-on-write, and summing their RSS would count those pages once per process."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.cpu: dict[str, float] = {}  # CPU seconds by process name, as last seen
        self.stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        name, rest = f.read().rsplit(")", 1)
                        fields = rest.split()
                        label = name.split("(", 1)[1]
                        if p == self.pid:
                            label = "supervisor"
                        self.cpu[f"{label}:{p}"] = (int(fields[11]) + int(fields[12])) / self._tick
                    with open(f"/proc/{p}/smaps_rollup") as f:
                        for line in f:
                            if line.startswith("Pss:"):
                                total += int(line.split()[1])
                                break
                except OSError:
                    pass
            self.peak_kb = max(self.peak_kb, total)
            self.stop.wait(0.02)


def measure(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, float, int]:
    """(wall s, cpu s, peak PSS MB, exit status) of a command and all its descendants."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace")[-3000:])
    if os.environ.get("BENCH_CPU_BREAKDOWN"):
        by_name: dict[str, float] = {}
        for key, secs in sampler.cpu.items():
            name = key.rsplit(":", 1)[0]
            by_name[name] = by_name.get(name, 0.0) + secs
        print("   cpu by process:", ", ".join(f"{k} {v:.2f}s" for k, v in sorted(by_name.items())))
    return wall, cpu, sampler.peak_kb / 1024, proc.returncode


# -- pipelines ----------------------------------------------------------------------------------
HINDSIGHT_CFG = """
output_path = "output"
sandbox_run_path = "run"
analysis_lua_path = "{modules}/?.lua"
analysis_lua_cpath = "{modules}/?.so"
io_lua_path = analysis_lua_path .. ";{io_modules}/?.lua"
io_lua_cpath = analysis_lua_cpath .. ";{io_modules}/?.so"
max_message_size = 1024 * 1024
input_defaults = {{ output_limit = 1024 * 1024 }}
analysis_defaults = {{}}
output_defaults = {{}}
"""


def _sub(path: Path, pairs: dict[str, str]) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        for key, value in pairs.items():
            if line.split("=")[0].strip() == key:
                lines[i] = f"{key} = {value}"
    path.write_text("\n".join(lines) + "\n")


def _es_cfg(path: Path, ep: Endpoint, index: str) -> None:
    text = path.read_text()
    text = text.replace('"cloudtrail"', f'"{index}"')
    path.write_text(text)
    _sub(path, {"port": str(ep.port), "address": '"127.0.0.1"'})


def setup_lua(work: Path, data: Path, ep: Endpoint, index: str) -> None:
    shutil.copytree(REPO / "run", work / "run")
    (work / "hindsight.cfg").write_text(HINDSIGHT_CFG.format(modules="/nonexistent", io_modules="/nonexistent"))
    _sub(work / "run/input/file.cfg", {"input_filename": json.dumps(str(data))})
    _es_cfg(work / "run/output/elasticsearch_bulk_api.cfg", ep, index)


def upstream_sources() -> tuple[Path, Path] | str:
    """CloudTracker's and lua_sandbox_extensions' directories in scripts/fetch_upstream.py's cache
    (fetched now if they are not there yet), or why they are not available."""
    names = ("cloudtracker", "lua_sandbox_extensions")
    fetch = subprocess.run([sys.executable, str(FETCH_UPSTREAM), *names], capture_output=True, text=True)
    if fetch.returncode != 0:
        return fetch.stderr.strip()
    cloudtracker, extensions = (upstream_dir(cache_base() / "upstream", name) for name in names)
    return cloudtracker, extensions


def setup_upstream(work: Path, data: Path, ep: Endpoint, index: str) -> None:
    sources = upstream_sources()
    assert not isinstance(sources, str), sources
    cloudtracker, extensions = sources
    for extension in ("heka", "lpeg", "elasticsearch"):
        for kind in ("modules", "io_modules"):
            if (extensions / extension / kind).is_dir():
                shutil.copytree(extensions / extension / kind, work / "lib" / kind, dirs_exist_ok=True)
    for name in ("input/file.cfg", "input/file.lua", "analysis/counter.cfg", "analysis/counter.lua",
                 "output/elasticsearch_bulk_api.cfg", "output/elasticsearch_bulk_api.lua"):
        dest = work / "run" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cloudtracker / "hindsight" / "run" / name, dest)
    (work / "hindsight.cfg").write_text(HINDSIGHT_CFG.format(modules=work / "lib/modules",
                                                             io_modules=work / "lib/io_modules"))
    _sub(work / "run/input/file.cfg", {"input_filename": json.dumps(str(data))})
    _es_cfg(work / "run/output/elasticsearch_bulk_api.cfg", ep, index)


NATIVE_INPUT = """filename = "flat_file.py"
input_filename = {data}
"""
NATIVE_OUTPUT = """filename = "elasticsearch_bulk.py"
message_matcher = "TRUE"
address = "127.0.0.1"
port = {port}
flush_count = 5000
ticker_interval = 10
encoders_elasticsearch_common = {{ index = "{index}", type_name = "doc" }}
"""


def setup_native(work: Path, data: Path, ep: Endpoint, index: str) -> None:
    for t in ("input", "analysis", "output"):
        (work / "run" / t).mkdir(parents=True)
    (work / "hindsight.cfg").write_text(HINDSIGHT_CFG.format(modules="/nonexistent", io_modules="/nonexistent"))
    (work / "run/input/flat_file.cfg").write_text(NATIVE_INPUT.format(data=json.dumps(str(data))))
    (work / "run/output/elasticsearch_bulk.cfg").write_text(NATIVE_OUTPUT.format(port=ep.port, index=index))


def setup_s3tree(work: Path, data: Path, ep: Endpoint, index: str) -> None:
    """examples/cloudtrail-tree as it ships (template, _id, daily index, type conflicts), pointed at
    tree_dir() of the same records and at the endpoint; its indices are named after `index`."""
    shutil.copytree(REPO / "examples/cloudtrail-tree", work, dirs_exist_ok=True)
    _sub(work / "hindsight.cfg", {"sandbox_install_path": '""'})
    lines = sum(1 for _ in open(data, "rb"))
    _sub(work / "run/input/cloudtrail.cfg", {"root": json.dumps(str(tree_dir(lines)))})
    out = work / "run/output/elasticsearch.cfg"
    out.write_text(out.read_text().replace('"cloudtrail-', f'"{index}-'))
    _sub(out, {"url": json.dumps(ep.url)})


PIPELINES = {"lua": setup_lua, "upstream": setup_upstream, "native": setup_native, "native_pure": setup_native,
             "s3tree": setup_s3tree, "s3tree_pure": setup_s3tree}
# extra environment of a pipeline's hindsight_cli
PIPELINE_ENV = {"native_pure": {"HINDSIGHT_PY_PURE": "1"}, "s3tree_pure": {"HINDSIGHT_PY_PURE": "1"}}


def run_pipeline(name: str, data: Path, lines: int, ep: Endpoint, max_in_flight: int | None = None) -> dict:
    work = WORK / f"run-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    index = f"bench-{name}"
    PIPELINES[name](work, data, ep, index)
    if max_in_flight is not None:  # bulk requests on their way at once (docs/outputs.md)
        for cfg in (work / "run" / "output").glob("*.cfg"):
            cfg.write_text(cfg.read_text() + f"\nmax_in_flight = {max_in_flight}\n")
    ep.reset(index)
    docs_before = ep.docs(index)
    # This checkout's hindsight_py, whatever (if anything) pip has installed, with its bytecode
    # cached as after an install (see main)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **PIPELINE_ENV.get(name, {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    wall, cpu, rss, rc = measure([sys.executable, "-m", "hindsight_py.cli", "hindsight.cfg"], work, env)
    shipped = ep.docs(index) - docs_before
    if not ep.real and name == "upstream":
        shipped = min(shipped, lines)  # its counter payloads are set aside, not sent
    return {"name": name, "wall": wall, "cpu": cpu, "rss": rss, "rc": rc, "docs": shipped}


# -- the real Hindsight (--hindsight) ------------------------------------------------------------
HINDSIGHT_ROW = "hindsight (C)"


def hindsight_prefix(path: Path) -> Path:
    """The install prefix of `path` (a prefix, or its bin/hindsight_cli), checked for what the row needs."""
    path = path.expanduser().resolve()
    prefix = path.parent.parent if path.is_file() else path
    for need in ("bin/hindsight_cli", "etc/hindsight/hindsight.cfg"):
        if not (prefix / need).is_file():
            raise SystemExit(f"--hindsight {path}: no {prefix / need}; build it with python3 benchmarks/build_hindsight.py")
    try:
        upstream_dir(cache_base() / "upstream", "cloudtracker")
    except BuildError as e:
        raise SystemExit(f"--hindsight: CloudTracker's run/ is needed: {e}") from None
    return prefix


def _queue_records(directory: Path) -> int:
    """Messages in a queue directory Hindsight wrote."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's hindsight_py, as the pipelines run it
    from hindsight_py.queue import QueueReader

    n = 0
    with QueueReader(directory, None, 64 << 20) as reader:
        while (batch := reader.read_batch(100_000, 64 << 20)) is not None:
            n += len(batch)
    return n


def run_hindsight(prefix: Path, data: Path, lines: int, ep: Endpoint) -> dict:
    """CloudTracker's run/ as its users run it: unmodified but for the input file and the endpoint,
    under Hindsight's stock hindsight.cfg (its module paths pointed at the build)."""
    work = WORK / "run-hindsight"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    index = "bench-hindsight"
    shutil.copytree(upstream_dir(cache_base() / "upstream", "cloudtracker") / "hindsight/run", work / "run")
    shutil.copy(prefix / "etc/hindsight/hindsight.cfg", work / "hindsight.cfg")
    for kind in ("input", "analysis", "output"):
        (work / "load" / kind).mkdir(parents=True)  # sandbox_load_path: Hindsight will not start without it
    _sub(work / "run/input/file.cfg", {"input_filename": json.dumps(str(data))})
    _es_cfg(work / "run/output/elasticsearch_bulk_api.cfg", ep, index)
    ep.reset(index)
    docs_before = ep.docs(index)
    wall, cpu, rss, rc = measure([str(prefix / "bin/hindsight_cli"), "hindsight.cfg"], work)
    received = ep.docs(index) - docs_before
    # counter.lua's payloads go to the output too: the fake endpoint counts them, a real server
    # rejects them (they are not JSON). The input queue holds what the input read.
    payloads = 0 if ep.real else _queue_records(work / "output/analysis")
    shipped = received - payloads
    if shipped != lines:
        lost_in_input = lines - _queue_records(work / "output/input")
        print(f"{HINDSIGHT_ROW}: {lines - shipped:,} of {lines:,} lines not delivered; {lost_in_input:,} never left "
              "the input (file.lua skips a line whose decoding runs into the instruction limit)")
    return {"name": HINDSIGHT_ROW, "wall": wall, "cpu": cpu, "rss": rss, "rc": rc, "docs": shipped}


# -- baselines ----------------------------------------------------------------------------------
def _actions(data: Path, index: str):
    with open(data, "rb") as fh:
        for line in fh:
            yield {"_op_type": "index", "_index": index, "_source": line.rstrip(b"\n").decode()}


def _client(ep: Endpoint):
    import elasticsearch
    from elasticsearch import Elasticsearch

    if ep.real:
        # the installed client may be a major ahead of the server: ask for the server's own API
        # version (compatible-with=<server major>), which servers accept one major back
        import elasticsearch._sync.client._base as base

        major = json.loads(urllib3.request("GET", ep.url + "/").data)["version"]["number"].split(".")[0]
        base._COMPAT_MIMETYPE_TEMPLATE = "application/vnd.elasticsearch+%s; compatible-with=" + major
        base._COMPAT_MIMETYPE_SUB = base._COMPAT_MIMETYPE_TEMPLATE % (r"\g<1>",)

    client = Elasticsearch(ep.url, request_timeout=60)
    if not ep.real or elasticsearch.__versionstr__.split(".")[0] != "8":
        # the fake endpoint (and servers of another major version) would fail the client's product
        # and version checks; the bulk requests themselves are the same
        from elastic_transport import Transport

        client = Elasticsearch(ep.url, request_timeout=60, headers={"accept": "application/json",
                                                                     "content-type": "application/json"})
        orig = Transport.perform_request

        def perform_request(self, *a, **kw):
            resp = orig(self, *a, **kw)
            resp.meta.headers["x-elastic-product"] = "Elasticsearch"
            return resp

        Transport.perform_request = perform_request  # type: ignore[method-assign]
    return client


def _helper_source(data: Path, index: str, kind: str, url: str, real: bool) -> str:
    return f"""
import sys, time
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
from run import Endpoint, _actions, _client
ep = Endpoint.__new__(Endpoint); ep.url = {url!r}; ep.real = {real!r}
from elasticsearch import helpers
client = _client(ep)
n = 0
if {kind!r} == "streaming_bulk":
    for ok, _ in helpers.streaming_bulk(client, _actions(__import__('pathlib').Path({str(data)!r}), {index!r}),
                                        chunk_size={BATCH}, raise_on_error=True):
        n += 1
else:
    for ok, _ in helpers.parallel_bulk(client, _actions(__import__('pathlib').Path({str(data)!r}), {index!r}),
                                       chunk_size={BATCH}, thread_count=2):
        n += 1
print(n)
"""


def run_helper(kind: str, data: Path, ep: Endpoint) -> dict:
    index = f"bench-{kind}"
    ep.reset(index)
    before = ep.docs(index)
    wall, cpu, rss, rc = measure([sys.executable, "-c", _helper_source(data, index, kind, ep.url, ep.real)], WORK)
    return {"name": kind, "wall": wall, "cpu": cpu, "rss": rss, "rc": rc, "docs": ep.docs(index) - before}


def _bulk_bodies(data: Path, index: str) -> list[bytes]:
    action = json.dumps({"index": {"_index": index}}).encode() + b"\n"
    bodies, parts, n = [], [], 0
    with open(data, "rb") as fh:
        for line in fh:
            parts.append(action)
            parts.append(line if line.endswith(b"\n") else line + b"\n")
            n += 1
            if n % BATCH == 0:
                bodies.append(b"".join(parts))
                parts = []
    if parts:
        bodies.append(b"".join(parts))
    return bodies


def _post_all(bodies: list[bytes], port: int, connections: int) -> None:
    """Every body POSTed once, over `connections` keep-alive connections each taking the next."""
    pending = iter(bodies)
    lock = threading.Lock()
    failures: list[int] = []

    def worker() -> None:
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)
        while True:
            with lock:
                body = next(pending, None)
            if body is None:
                return
            r = pool.urlopen("POST", "/_bulk", body=body, headers={"Content-Type": "application/x-ndjson"})
            if r.status != 200:
                failures.append(r.status)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"server limit run: HTTP {failures[0]}")


def run_server_limit(data: Path, ep: Endpoint) -> dict:
    """Pre-built bodies of BATCH documents posted back to back: the best of 1, 2 and 4 connections.

    The row is what the server takes with no client work at all, however it likes to be fed.
    """
    index = "bench-server-limit"
    bodies = _bulk_bodies(data, index)
    best: dict | None = None
    for connections in (1, 2, 4):
        ep.reset(index)
        before = ep.docs(index)
        t0 = time.perf_counter()
        c0 = time.process_time()
        _post_all(bodies, ep.port, connections)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        docs = ep.docs(index) - before
        if best is None or docs / wall > best["docs"] / best["wall"]:
            best = {"wall": wall, "cpu": cpu, "docs": docs, "connections": connections}
    assert best is not None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"server_limit: best over {best['connections']} connection(s)")
    return {"name": "server_limit", "wall": best["wall"], "cpu": best["cpu"], "rss": rss, "rc": 0, "docs": best["docs"]}


# -- report ---------------------------------------------------------------------------------------
def report(results: list[dict], lines: int, baselines: list[str]) -> None:
    print(f"\n{lines:,} lines ({'documents/s counts what the endpoint received'})")
    print(f"{'run':<14}{'docs':>10}{'wall s':>9}{'docs/s':>11}{'cpu s':>8}{'cpu s/100k':>12}{'peak PSS MB':>13}{'rc':>4}",
          end="")
    for b in baselines:
        print(f"{'x ' + b:>18}", end="")
    print()
    rate = {r["name"]: r["docs"] / r["wall"] if r["wall"] else 0 for r in results}
    for r in results:
        per_100k = r["cpu"] / r["docs"] * 100_000 if r["docs"] else float("nan")
        print(f"{r['name']:<14}{r['docs']:>10,}{r['wall']:>9.2f}{rate[r['name']]:>11,.0f}{r['cpu']:>8.2f}"
              f"{per_100k:>12.2f}{r['rss']:>13.1f}{r['rc']:>4}", end="")
        for b in baselines:
            ratio = rate[r["name"]] / rate[b] if rate.get(b) else float("nan")
            print(f"{ratio:>18.2f}", end="")
        print()


def run_pass(ep: Endpoint, lines: int, names: list[str], *, baselines: bool, hs_prefix: Path | None,
             max_in_flight: int | None, warm_up: bool = False) -> list[dict]:
    """Every row of one table: the baselines, the real Hindsight and the pipelines on `lines` lines."""
    data = data_file(lines)
    results: list[dict] = []
    columns = ["server_limit", "streaming_bulk", "parallel_bulk"] if baselines else []
    if ep.real and warm_up:
        # A server that has just started indexes far slower for its first minute (JIT,
        # caches): one untimed pass of the server-limit bodies, so that it does not
        # flatter whatever runs after the first timed run.
        print("warming the server up (untimed) ...", flush=True)
        run_server_limit(data, ep)
    if baselines:
        results.append(run_server_limit(data, ep))
        for kind in ("streaming_bulk", "parallel_bulk"):
            results.append(run_helper(kind, data, ep))
    if hs_prefix:
        results.append(run_hindsight(hs_prefix, data, lines, ep))
        columns.append(HINDSIGHT_ROW)
    for name in names:
        if name == "upstream" and isinstance(why := upstream_sources(), str):
            print(f"upstream: skipped ({why})")
            continue
        results.append(run_pipeline(name, data, lines, ep, max_in_flight))
    report(results, lines, columns)
    return results


# -- issue 17's targets (--targets) ------------------------------------------------------------------
TARGET_LINES = 200_000
MEMORY_LINES = 2_000_000
MEMORY_LIMIT_MB = 150
ES_TARGET_LINES = 100_000
TARGET_PIPELINES = ["lua", "upstream", "native", "s3tree"]


def _rate(r: dict) -> float:
    return r["docs"] / r["wall"] if r["wall"] else 0.0


def _per_100k(r: dict) -> float:
    return r["cpu"] / r["docs"] * 100_000 if r["docs"] else float("inf")


def check_targets(fake: list[dict], real: list[dict], memory: list[dict]) -> bool:
    """Print each target of issue 17 beside what this invocation measured; True if all are met."""
    rows: list[tuple[str, str, bool]] = []
    by = {r["name"]: r for r in fake}
    hs = by[HINDSIGHT_ROW]
    complete = all(r["rc"] == 0 and r["docs"] == TARGET_LINES for r in fake if r["name"] != HINDSIGHT_ROW)
    rows.append(("every pipeline delivers every line, exit status 0", "yes" if complete else "NO", complete))

    def times_hindsight(name: str, need: float) -> None:
        x = _rate(by[name]) / _rate(hs)
        rows.append((f"{name} >= {need:g}x hindsight (C)", f"{x:.2f}x", x >= need))

    times_hindsight("upstream", 4)
    cpu_up, cpu_hs = _per_100k(by["upstream"]), _per_100k(hs)
    rows.append(("upstream: less CPU per document than hindsight (C)",
                 f"{cpu_up:.2f} vs {cpu_hs:.2f} CPU s/100k", cpu_up < cpu_hs))
    times_hindsight("lua", 6)
    times_hindsight("native", 12)
    s3 = _rate(by["s3tree"])
    rows.append(("s3tree >= 150,000 docs/s", f"{s3:,.0f} docs/s", s3 >= 150_000))
    ratio = _per_100k(by["s3tree"]) / _per_100k(by["native"])
    rows.append(("s3tree CPU per document <= 1.5x native's",
                 f"{_per_100k(by['s3tree']):.2f} vs {_per_100k(by['native']):.2f} CPU s/100k ({ratio:.2f}x)", ratio <= 1.5))
    if real:
        es = {r["name"]: r for r in real}
        pb = _rate(es["parallel_bulk"])
        for name, need in (("native", 1.0), ("lua", 0.9), ("upstream", 0.9)):
            x = _rate(es[name]) / pb
            rows.append((f"real server: {name} >= {need:g}x parallel_bulk", f"{x:.2f}x", x >= need))
    else:
        rows.append(("real server (--es URL)", "not run", False))
    before = {r["name"]: r["rss"] for r in fake}
    for r in memory:
        # flat: ten times the lines, at most half as much memory again (no per-document growth)
        flat = r["rss"] <= MEMORY_LIMIT_MB and r["rss"] <= 1.5 * before.get(r["name"], r["rss"])
        rows.append((f"{r['name']}: peak PSS flat and <= {MEMORY_LIMIT_MB} MB at {MEMORY_LINES:,} lines",
                     f"{before.get(r['name'], float('nan')):.0f} MB at {TARGET_LINES:,}, {r['rss']:.0f} MB at {MEMORY_LINES:,}",
                     flat and r["rc"] == 0 and r["docs"] == MEMORY_LINES))
    print("\nissue 17 targets")
    width = max(len(t) for t, _, _ in rows)
    for target, measured, met in rows:
        print(f"  {target:<{width}}  {measured:<44}{'met' if met else 'NOT MET'}")
    met_all = all(met for _, _, met in rows)
    print(f"  {'all targets':<{width}}  {'':<44}{'met' if met_all else 'NOT MET'}")
    return met_all


def run_targets(hs_prefix: Path, es_url: str | None, max_in_flight: int | None) -> int:
    """Everything issue 17 asks for, in one invocation: the fake endpoint with the real Hindsight,
    a real server against parallel_bulk (with --es), and the memory of each pipeline at 2M lines."""
    if isinstance(why := upstream_sources(), str):
        print(f"--targets needs the upstream row, whose sources are not available: {why}", file=sys.stderr)
        return 2  # (run_pass would skip the row, and the check would have no figure for it)
    ep = Endpoint(None)
    try:
        fake = run_pass(ep, TARGET_LINES, TARGET_PIPELINES + ["native_pure", "s3tree_pure"], baselines=True,
                           hs_prefix=hs_prefix, max_in_flight=max_in_flight)
        memory = run_pass(ep, MEMORY_LINES, TARGET_PIPELINES, baselines=False, hs_prefix=None,
                             max_in_flight=max_in_flight)
    finally:
        ep.close()
    real: list[dict] = []
    if es_url:
        server = Endpoint(es_url)
        try:
            real = run_pass(server, ES_TARGET_LINES, ["native", "lua", "upstream"], baselines=True,
                               hs_prefix=None, max_in_flight=max_in_flight, warm_up=True)
        finally:
            server.close()
    return 0 if check_targets(fake, real, memory) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, nargs="+", default=[TARGET_LINES])
    ap.add_argument("--es", help="a real Elasticsearch/OpenSearch URL instead of the fake endpoint "
                                 "(with --targets: as well as the fake endpoint)")
    ap.add_argument("--only", nargs="+", choices=list(PIPELINES), help="pipelines to run (default: all)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--max-in-flight", type=int, metavar="N",
                    help="the outputs' max_in_flight (bulk requests on their way at once; default: theirs)")
    ap.add_argument("--hindsight", type=Path, metavar="PATH",
                    help="add the real Hindsight: a prefix built by benchmarks/build_hindsight.py, or its bin/hindsight_cli")
    ap.add_argument("--targets", action="store_true",
                    help=f"issue 17's check (needs --hindsight; --es adds the real server): {TARGET_LINES:,} lines on the "
                         f"fake endpoint with every row, {MEMORY_LINES:,} lines for memory, {ES_TARGET_LINES:,} on the "
                         "server; prints each target with its figure and exits 1 if one is not met")
    args = ap.parse_args()
    if (args.targets or not args.no_baselines) and importlib.util.find_spec("elasticsearch") is None:
        ap.error("the elasticsearch-py baselines need the bench extra: pip install -e '.[bench]' "
                 "(or --no-baselines, without --targets: its rows include them)")
    if args.targets and (args.only or args.no_baselines or args.lines != [TARGET_LINES]):
        ap.error("--targets runs its own rows and line counts: drop --only, --no-baselines and --lines")
    if args.targets and not args.hindsight:
        ap.error("--targets compares with the real Hindsight: give --hindsight PATH "
                 "(python3 benchmarks/build_hindsight.py builds it)")
    hs_prefix = hindsight_prefix(args.hindsight) if args.hindsight else None
    # Each start would otherwise compile every module from source (tens of ms per process)
    # wherever PYTHONDONTWRITEBYTECODE is set, as in some CI shells; pip compiles them at install.
    for folder in ("hindsight_py", "plugins"):
        compileall.compile_dir(REPO / folder, quiet=1)
    if args.targets:
        assert hs_prefix is not None
        return run_targets(hs_prefix, args.es, args.max_in_flight)
    ep = Endpoint(args.es)
    try:
        for i, lines in enumerate(args.lines):
            run_pass(ep, lines, args.only or list(PIPELINES), baselines=not args.no_baselines,
                     hs_prefix=hs_prefix, max_in_flight=args.max_in_flight, warm_up=i == 0)
    finally:
        ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
