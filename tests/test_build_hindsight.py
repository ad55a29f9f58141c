"""benchmarks/build_hindsight.py without building: where its sources come from, how the
extensions' downloads are pointed at them, and its errors. (The build itself takes minutes and a
C toolchain: benchmarks/run.py --hindsight exercises it.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "build_hindsight.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_hindsight", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bh = load()


def git_download(tag: str) -> str:
    return f"""externalproject_add(
    ep_thing
    GIT_REPOSITORY https://example.org/someone/libthing.git
    GIT_TAG {tag}
    CMAKE_ARGS ${{EP_CMAKE_ARGS}}
)
"""


ARCHIVE_DOWNLOAD = """externalproject_add(
    ep_other
    URL http://example.org/dist/other-2.1.tar.gz
    URL_MD5 00112233445566778899aabbccddeeff
    CMAKE_ARGS ${EP_CMAKE_ARGS}
)
"""


def test_a_git_download_at_a_commit_needs_that_commit_in_the_cache(tmp_path: Path) -> None:
    (tmp_path / f"libthing-{COMMIT}").mkdir()
    text, notes = bh.local_downloads(git_download(COMMIT), tmp_path, None)
    assert f'    URL "{tmp_path}/libthing-{COMMIT}"\n' in text
    assert "GIT_REPOSITORY" not in text and "GIT_TAG" not in text
    assert "CMAKE_ARGS ${EP_CMAKE_ARGS}" in text
    assert notes == [f"https://example.org/someone/libthing.git at commit {COMMIT}: {tmp_path}/libthing-{COMMIT}"]

    (tmp_path / f"libthing-{COMMIT}").rename(tmp_path / f"libthing-{OTHER}")
    with pytest.raises(bh.BuildError, match=f"libthing {COMMIT} is not in .*scripts/fetch_upstream.py"):
        bh.local_downloads(git_download(COMMIT), tmp_path, None)


def test_a_git_download_of_a_branch_takes_the_one_fetched_commit(tmp_path: Path) -> None:
    with pytest.raises(bh.BuildError, match="no libthing-<version>/ in .*fetch_upstream.py"):
        bh.local_downloads(git_download("some_branch"), tmp_path, None)
    (tmp_path / f"libthing-{COMMIT}").mkdir()
    text, notes = bh.local_downloads(git_download("some_branch"), tmp_path, None)
    assert f'URL "{tmp_path}/libthing-{COMMIT}"' in text
    assert "branch some_branch" in notes[0] and f"commit {COMMIT}, the pinned one" in notes[0]
    (tmp_path / f"libthing-{OTHER}").mkdir()
    with pytest.raises(bh.BuildError, match="several versions of libthing"):
        bh.local_downloads(git_download("some_branch"), tmp_path, None)


def test_an_archive_download_keeps_its_md5_when_the_archive_is_at_hand(tmp_path: Path) -> None:
    upstream, archives = tmp_path / "upstream", tmp_path / "archives"
    (upstream / "other-2.1").mkdir(parents=True)
    archives.mkdir()
    # without the archive: the unpacked tree, which has no MD5 to check
    text, _ = bh.local_downloads(ARCHIVE_DOWNLOAD, upstream, archives)
    assert f'URL "{upstream}/other-2.1"' in text and "URL_MD5" not in text
    # with it: CMake checks the archive against URL_MD5 as it would the download
    (archives / "other-2.1.tar.gz").write_bytes(b"")
    text, notes = bh.local_downloads(ARCHIVE_DOWNLOAD, upstream, archives)
    assert f'URL "{archives}/other-2.1.tar.gz"' in text
    assert "URL_MD5 00112233445566778899aabbccddeeff" in text
    assert "MD5 checked by CMake" in notes[0]


def test_a_cmake_file_without_downloads_is_left_alone(tmp_path: Path) -> None:
    text = "project(plain LANGUAGES C)\ninclude(sandbox_module)\n"
    assert bh.local_downloads(text, tmp_path, None) == (text, [])


def test_the_stock_config_gets_the_prefix_paths_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "hindsight.cfg").write_text(
        'output_path = "output"\n'
        'sandbox_install_path = "/usr/share/x"\n'
        'analysis_lua_path   = "/usr/lib/x/?.lua"\n'
        'analysis_lua_cpath  = "/usr/lib/x/?.so"\n'
        'io_lua_path = analysis_lua_path .. ";/usr/lib/y/?.lua"\n'
        'io_lua_cpath = analysis_lua_cpath .. ";/usr/lib/y/?.so"\n'
        "max_message_size = 64 * 1024\n")
    cfg = bh.stock_config(tmp_path, Path("/opt/hs"))
    assert cfg.splitlines() == [
        'output_path = "output"',
        'sandbox_install_path = "/opt/hs/share/luasandbox/sandboxes/heka"',
        'analysis_lua_path = "/opt/hs/lib/luasandbox/modules/?.lua"',
        'analysis_lua_cpath = "/opt/hs/lib/luasandbox/modules/?.so"',
        'io_lua_path = analysis_lua_path .. ";/opt/hs/lib/luasandbox/io_modules/?.lua"',
        'io_lua_cpath = analysis_lua_cpath .. ";/opt/hs/lib/luasandbox/io_modules/?.so"',
        "max_message_size = 64 * 1024",
    ]
    (tmp_path / "hindsight.cfg").write_text('output_path = "output"\n')
    with pytest.raises(bh.BuildError, match="has no analysis_lua_cpath"):
        bh.stock_config(tmp_path, Path("/opt/hs"))


def version(name: str) -> str:
    """The version the script looks for: scripts/fetch_upstream.py's pin where there is one."""
    return bh._pinned_version(name) or COMMIT


def run_script(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HINDSIGHT_PY_CACHE": str(cache)})


def test_without_the_sources_it_says_to_fetch_them(tmp_path: Path) -> None:
    result = run_script(cache=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert f"{tmp_path}/upstream does not exist: run scripts/fetch_upstream.py first" in result.stderr
    (tmp_path / "upstream" / f"lua_sandbox-{version('lua_sandbox')}").mkdir(parents=True)
    result = run_script(cache=tmp_path)
    assert result.returncode == 1
    assert "lua_sandbox_extensions" in result.stderr and "run scripts/fetch_upstream.py first" in result.stderr


def test_it_never_builds_over_a_directory_it_did_not_make(tmp_path: Path) -> None:
    for name in ("lua_sandbox", "lua_sandbox_extensions", "hindsight"):
        (tmp_path / "upstream" / f"{name}-{version(name)}").mkdir(parents=True)
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "keep.txt").write_text("not the script's")
    result = run_script("--prefix", str(prefix), cache=tmp_path)
    assert result.returncode == 1
    assert f"{prefix} is not empty and was not made by this script" in result.stderr
    assert (prefix / "keep.txt").read_text() == "not the script's"
