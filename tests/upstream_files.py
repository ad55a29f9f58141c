"""Upstream files for tests, read at test time from the sources scripts/fetch_upstream.py fetched.

The project never carries upstream code or text: a test that runs CloudTracker's `hindsight/run/`
or lua_sandbox_extensions' modules copies them into its own tmp dir from the fetch cache
(`${HINDSIGHT_PY_CACHE:-~/.cache/hindsight-py}/upstream/<name>-<version>/`). Mark such tests
`upstream`. When a source is not there, they skip with the command that fetches it; in CI
(CI=true) they fail instead, since a skip there would hide lost coverage.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch_upstream.py"
FETCH_COMMAND = f"python3 {FETCH_SCRIPT}"

HINDSIGHT = "hindsight"
LUA_SANDBOX = "lua_sandbox"
LUA_SANDBOX_EXTENSIONS = "lua_sandbox_extensions"
CLOUDTRACKER = "cloudtracker"
STREAMING_ALGORITHMS = "streaming_algorithms"
SYMTSERIES = "symtseries"
# The extensions CloudTracker's pipeline requires from (docs/upstream-formats.md §9).
CLOUDTRACKER_EXTENSIONS = ("heka", "lpeg", "elasticsearch")


@functools.cache
def fetch_upstream_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_upstream", FETCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_upstream", module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")  # as scripts/test.sh reads it


def unavailable(reason: str) -> None:
    """Skip the test for a missing prerequisite, or fail it in CI, where a skip would hide lost coverage."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the test)", pytrace=False)
    pytest.skip(reason)


def cached(name: str) -> Path:
    """Where the fetch step puts upstream source `name` (whether it is there or not)."""
    fetch_upstream = fetch_upstream_module()
    return fetch_upstream.cache_dir(fetch_upstream.PINS[name])


def available(name: str) -> bool:
    return cached(name).is_dir()


def source(name: str) -> Path:
    """The directory of upstream source `name`; skips the test (fails it in CI) when it is not fetched."""
    path = cached(name)
    if not path.is_dir():
        unavailable(f"upstream source {name} is not fetched (no {path}): run `{FETCH_COMMAND}` "
                    f"(`{FETCH_COMMAND} --from DIR` with a directory of the pinned archives)")
    return path


def read_bytes(name: str, path: str) -> bytes:
    return (source(name) / path).read_bytes()


def read_text(name: str, path: str) -> str:
    return (source(name) / path).read_text()


def has_tree(name: str, tree: str) -> bool:
    return (source(name) / tree).is_dir()


def copy_tree(name: str, tree: str, dest: Path) -> list[Path]:
    """Copy the files of `tree` (a directory of source `name`) under `dest`, merging with what is there.

    Returns the files written. Two trees copied into one `dest` must not overlap: a name
    written twice would make which upstream copy runs depend on the copy order.
    """
    root = source(name) / tree
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    clashes = [str(rel) for rel in files if (dest / rel).exists()]
    assert not clashes, f"{name}/{tree} overlaps files already in {dest}: {clashes}"
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest / rel)
        if os.access(root / rel, os.X_OK):
            (dest / rel).chmod(0o755)
    return [dest / rel for rel in files]


def replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    """`text` with the single match of regex `pattern` replaced by `replacement` (taken literally,
    after the text of the group named `keep`, if any). Fails unless there is exactly one match, so
    that a changed upstream or project cfg cannot turn a rewrite into a silent no-op."""

    def replace(match: re.Match[str]) -> str:
        return (match.group("keep") if "keep" in match.re.groupindex else "") + replacement

    new, count = re.subn(pattern, replace, text, flags=re.MULTILINE)
    assert count == 1, f"expected exactly one {what} ({pattern!r}), found {count}"
    return new


def lua_string(value: str) -> str:
    """A Lua string literal for `value` (paths and index names: no newlines expected)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def point_output_at(text: str, port: int, index: str) -> str:
    """An elasticsearch_bulk_api.cfg shipping to 127.0.0.1:`port`, index `index`; all else kept."""
    text = replace_once(text, r"^(?P<keep>\s*port\s*=\s*)\d+", str(port), "port")
    text = replace_once(text, r'^(?P<keep>\s*address\s*=\s*)"[^"]*"', '"127.0.0.1"', "address")
    return replace_once(text, r'^(?P<keep>\s*index\s*=\s*)"[^"]*"', lua_string(index), "index")


def cloudtracker_run(dest: Path, *, input_filename: Path, port: int, index: str) -> Path:
    """CloudTracker's `hindsight/run/` as `dest`/run, with only what its README tells users to edit:
    YOUR_FILE in input/file.cfg, and the server and index in output/elasticsearch_bulk_api.cfg."""
    run = dest / "run"
    run.mkdir(parents=True)
    copy_tree(CLOUDTRACKER, "hindsight/run", run)
    file_cfg = run / "input" / "file.cfg"
    file_cfg.write_text(
        replace_once(file_cfg.read_text(), r'"YOUR_FILE"', lua_string(str(input_filename)), "YOUR_FILE")
    )
    es_cfg = run / "output" / "elasticsearch_bulk_api.cfg"
    es_cfg.write_text(point_output_at(es_cfg.read_text(), port, index))
    return run


def extension_modules(dest: Path, extensions: tuple[str, ...] = CLOUDTRACKER_EXTENSIONS) -> tuple[Path, Path]:
    """lua_sandbox_extensions' pure-Lua modules as installed: every extension's `modules/` merged
    into `dest`/modules and its `io_modules/` into `dest`/io_modules. Returns both directories."""
    modules, io_modules = dest / "modules", dest / "io_modules"
    modules.mkdir(parents=True)
    io_modules.mkdir(parents=True)
    found = 0
    for extension in extensions:
        for kind, target in (("modules", modules), ("io_modules", io_modules)):
            if has_tree(LUA_SANDBOX_EXTENSIONS, f"{extension}/{kind}"):
                found += len(copy_tree(LUA_SANDBOX_EXTENSIONS, f"{extension}/{kind}", target))
    assert found, f"no modules found for {extensions} in {source(LUA_SANDBOX_EXTENSIONS)}"
    return modules, io_modules
