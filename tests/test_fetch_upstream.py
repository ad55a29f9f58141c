"""scripts/fetch_upstream.py, and how the tests behave when an upstream source is missing.

Each test builds its own small archives and git repository and points HINDSIGHT_PY_CACHE at a
tmp dir: nothing here needs the network or the real pinned sources. Cost: about 3 s.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from upstream_files import FETCH_COMMAND, FETCH_SCRIPT, REPO_ROOT, fetch_upstream_module, source

fu = fetch_upstream_module()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {"README": b"read me\n", "src/a.lua": b"return 1\n", "tests/run.sh": b"#!/bin/sh\nexit 0\n"}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HINDSIGHT_PY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(fu.SOURCE_VARIABLE, raising=False)
    return tmp_path / "cache" / "upstream"


def archive(directory: Path, top: str, files: dict[str, bytes], commit: str | None = COMMIT,
            name: str | None = None) -> Path:
    """A .tar.gz as `git archive --prefix=<top>/` makes it (the commit id in the pax header)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": commit} if commit else None) as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.size, info.mode = len(data), 0o755 if rel.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{top}.tar.gz")
    path.write_bytes(buffer.getvalue())
    return path


def pin_for(path: Path, version: str = COMMIT) -> object:
    return fu.Pin("demo", version, "https://example.invalid/demo.git", hashlib.sha256(path.read_bytes()).hexdigest(),
                  "MIT", "tests")


def test_an_archive_is_checked_unpacked_into_the_cache_and_then_reused(tmp_path, cache):
    path = archive(tmp_path / "archives", "demo-0123456789ab", FILES)
    pin = pin_for(path)

    got = fu.fetch(pin, tmp_path / "archives")

    assert got == cache / f"demo-{COMMIT}"
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()} == FILES
    assert (got / "tests" / "run.sh").stat().st_mode & 0o111
    assert sorted(p.name for p in cache.iterdir()) == [got.name]  # no staging directory left behind
    path.unlink()
    assert fu.fetch(pin, tmp_path / "archives") == got  # already there: the source is not needed again


@pytest.mark.parametrize(("top", "files", "commit", "error"), [
    ("demo-0123456789ab", FILES, "f" * 40, "made from commit ffff"),
    ("demo-fedcba987654", FILES, COMMIT, "expected everything under demo-0123456789ab/"),
    ("", FILES, COMMIT, "expected everything under demo-0123456789ab/"),
    ("demo-0123456789ab", {"../../escape": b"x"}, COMMIT, "outside the destination"),
])
def test_an_archive_that_is_not_the_pin_is_refused(tmp_path, cache, top, files, commit, error):
    path = archive(tmp_path / "archives", top, files, commit, name="demo-0123456789ab.tar.gz")
    with pytest.raises(fu.FetchError, match=error):
        fu.fetch(pin_for(path), tmp_path / "archives")
    assert list(cache.iterdir()) == []


def test_an_archive_with_other_bytes_than_pinned_is_refused(tmp_path, cache):
    path = archive(tmp_path / "archives", "demo-0123456789ab", FILES)
    pin = replace(pin_for(path), sha256="0" * 64)
    with pytest.raises(fu.FetchError, match=f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}, the pin is 0000"):
        fu.fetch(pin, tmp_path / "archives")
    assert list(cache.iterdir()) == []


def test_a_release_archive_is_named_by_its_version(tmp_path, cache):
    path = archive(tmp_path / "archives", "demo-1.0.2", FILES, commit=None)
    pin = pin_for(path, version="1.0.2")
    assert pin.archive == "demo-1.0.2.tar.gz"
    assert fu.fetch(pin, tmp_path / "archives") == cache / "demo-1.0.2"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repository(tmp_path: Path) -> tuple[Path, str, str]:
    """A git repository with two commits: (path, first commit, second commit)."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "-q")
    commits = []
    for n in (1, 2):
        (repo / "file.txt").write_text(f"version {n}\n")
        git(repo, "add", "file.txt")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"v{n}")
        commits.append(git(repo, "rev-parse", "HEAD"))
    return repo, commits[0], commits[1]


def test_a_commit_pin_is_cloned_at_that_commit(repository, cache):
    repo, first, _ = repository
    pin = fu.Pin("demo", first, repo.as_uri(), "", "MIT", "tests")

    got = fu.fetch(pin)

    assert got == cache / f"demo-{first}"
    assert (got / "file.txt").read_text() == "version 1\n"  # not the branch head
    assert sorted(p.name for p in got.iterdir()) == ["file.txt"]  # a plain tree: no .git
    assert sorted(p.name for p in cache.iterdir()) == [got.name]


def test_a_commit_the_repository_does_not_have_is_an_error(repository, cache):
    repo, _, _ = repository
    pin = fu.Pin("demo", "f" * 40, repo.as_uri(), "", "MIT", "tests")
    with pytest.raises(fu.FetchError, match="git "):
        fu.fetch(pin)
    assert list(cache.iterdir()) == []


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FETCH_SCRIPT), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


def test_the_command_names_each_pin_it_could_not_fetch_and_exits_1(tmp_path, monkeypatch):
    empty = tmp_path / "no-archives"
    empty.mkdir()
    monkeypatch.setenv(fu.SOURCE_VARIABLE, str(empty))
    result = run_script("hindsight", "cloudtracker")
    assert result.returncode == 1
    assert f"hindsight {fu.PINS['hindsight'].version}: {empty}/hindsight-6854b13e6a2c.tar.gz does not exist" in result.stderr
    assert "cloudtracker 822ef553266aca2b1d54fc44e09c230f6df77a8a" in result.stderr
    assert "2 of 2 pins could not be fetched" in result.stderr
    assert run_script("--path", "lpeg").stdout.strip() == str(tmp_path / "cache" / "upstream" / "lpeg-1.0.2")
    unknown = run_script("nosuch")
    assert unknown.returncode == 2 and "unknown pin nosuch" in unknown.stderr


def test_every_pin_names_an_archive_and_a_digest():
    for pin in fu.PINS.values():
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0, pin.name
        assert pin.archive == f"{pin.stem}.tar.gz"
        assert pin.is_commit or pin.name == "lpeg", pin.name
    assert {"hindsight", "lua_sandbox", "lua_sandbox_extensions", "cloudtracker"} <= set(fu.PINS)


# -- the tests' side: a missing source skips the test, or fails it in CI ------------------------------
def test_a_missing_source_skips_with_the_command_or_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"upstream source hindsight is not fetched .* run `{FETCH_COMMAND}`"):
        source("hindsight")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        source("hindsight")


def test_an_upstream_test_skips_offline_and_fails_in_ci(tmp_path, monkeypatch):
    """A real upstream test run by pytest with an empty cache: skipped with the command, or failed."""
    test = "tests/test_config.py::test_stock_upstream_hindsight_cfg_loads"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test]
    for ci, status, outcome in (("", 0, "1 skipped"), ("true", 1, "1 failed")):
        monkeypatch.setenv("CI", ci)
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=300)
        assert result.returncode == status, result.stdout[-2000:]
        assert outcome in result.stdout
        assert FETCH_COMMAND in result.stdout
