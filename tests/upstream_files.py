"""Upstream files for tests, taken from the local mirrors at test time.

The project never carries upstream code or text: a test that runs CloudTracker's `hindsight/run/`
or lua_sandbox_extensions' modules materializes them into its own tmp dir from the bare git
mirrors under /work/.mirror, and skips when the mirrors are absent (mark such tests `upstream`).
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

MIRROR_ROOT = Path("/work/.mirror")
CLOUDTRACKER = "duo-labs+cloudtracker"
LUA_SANDBOX_EXTENSIONS = "mozilla-services+lua_sandbox_extensions"
# The extensions CloudTracker's pipeline requires from (hindsight-compat.md, section 9).
CLOUDTRACKER_EXTENSIONS = ("heka", "lpeg", "elasticsearch")


def mirror(name: str) -> Path:
    """The bare git repository of mirror `name` (owner+repo); skips the test if it is absent."""
    repo = MIRROR_ROOT / name / "repo"
    if not repo.is_dir():
        pytest.skip(f"upstream mirror {name} is not available under {MIRROR_ROOT}")
    return repo


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout


def has_tree(repo: Path, tree: str) -> bool:
    result = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-t", f"HEAD:{tree}"], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout.strip() == "tree"


def export_tree(repo: Path, tree: str, dest: Path) -> list[Path]:
    """Write the files of `tree` (a directory at HEAD) under `dest`, merging with what is there.

    Returns the files written. Two trees exported into one `dest` must not overlap: a name
    written twice would make which upstream copy runs depend on the export order.
    """
    archive = _git(repo, "archive", "--format=tar", f"HEAD:{tree}")
    written: list[Path] = []
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        clashes = [m.name for m in members if (dest / m.name).exists()]
        assert not clashes, f"{tree} overlaps files already in {dest}: {clashes}"
        tar.extractall(dest, filter="data")
        written = [dest / m.name for m in members]
    return written


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
    repo = mirror(CLOUDTRACKER)
    run = dest / "run"
    run.mkdir(parents=True)
    export_tree(repo, "hindsight/run", run)
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
    repo = mirror(LUA_SANDBOX_EXTENSIONS)
    modules, io_modules = dest / "modules", dest / "io_modules"
    modules.mkdir(parents=True)
    io_modules.mkdir(parents=True)
    found = 0
    for extension in extensions:
        for kind, target in (("modules", modules), ("io_modules", io_modules)):
            if has_tree(repo, f"{extension}/{kind}"):
                found += len(export_tree(repo, f"{extension}/{kind}", target))
    assert found, f"no modules found for {extensions} in {repo}"
    return modules, io_modules
