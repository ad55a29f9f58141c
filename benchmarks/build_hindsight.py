#!/usr/bin/env python3
"""Build the real Hindsight 0.16 (C) from the pinned upstream sources, for benchmarks/run.py --hindsight.

    python3 scripts/fetch_upstream.py                 # once: the pinned sources into the cache
    python3 benchmarks/build_hindsight.py             # builds (or finds built) and prints the paths
    python3 benchmarks/run.py --hindsight "$(python3 benchmarks/build_hindsight.py | head -1)"

Builds, from `<upstream>/<name>-<version>/` as scripts/fetch_upstream.py unpacks them:
lua_sandbox, then the lua_sandbox_extensions that CloudTracker's run/ needs (heka, lpeg,
elasticsearch, cjson, socket, rjson), then hindsight; installs them into one prefix and writes
Hindsight's stock hindsight.cfg with its module paths pointed at that prefix to
`<prefix>/etc/hindsight/hindsight.cfg`.

The extensions' CMake files download third-party sources at build time (lpeg, lua-cjson,
luasocket, rapidjson). This script builds from a copy of lua_sandbox_extensions in the build
directory whose downloads point at the cache instead: a git download (`GIT_REPOSITORY` +
`GIT_TAG <commit>`) needs `<repo>-<that commit>/` in the cache; an archive download (`URL` +
`URL_MD5`) uses the archive itself when --from DIR (or $HINDSIGHT_PY_UPSTREAM_SOURCE) holds it,
so that CMake checks its MD5 as it would have, and otherwise the tree the fetch step unpacked
from it (after checking the archive's pinned sha256). Nothing is downloaded.

Idempotent: once a build is complete the prefix holds a stamp naming the sources it was built
from; a second run only prints the paths. Build trees and logs go under --build-dir, never into
the repository. Needs cmake, make, a C and a C++ compiler, and the OpenSSL headers.
Standard library only. Exit status 1 with a message naming what is missing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# lua_sandbox_extensions CloudTracker's run/ loads, directly or through their modules:
# decoders.payload (heka), encoders.elasticsearch.payload (elasticsearch, which requires cjson and
# heka's modules), rjson, socket.http and ltn12 (socket), and lpeg, which heka's modules require.
EXTENSIONS = ("heka", "lpeg", "elasticsearch", "cjson", "socket", "rjson")
STAMP = ".hindsight-py-build.json"
RECIPE = 1  # bump when this recipe changes what it builds
REPO = Path(__file__).resolve().parent.parent
FETCH_HINT = "run scripts/fetch_upstream.py first (with --from DIR, a directory of the archives, where GitHub is unreachable)"


class BuildError(RuntimeError):
    pass


def cache_base() -> Path:
    return Path(os.environ.get("HINDSIGHT_PY_CACHE") or Path.home() / ".cache" / "hindsight-py")


# -- the sources ----------------------------------------------------------------------------------
@functools.cache
def _pinned_version(name: str) -> str | None:
    """The version scripts/fetch_upstream.py pins for `name`, where that script is present."""
    script = REPO / "scripts" / "fetch_upstream.py"
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fetch_upstream", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_upstream", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    pin = module.PINS.get(name)
    return pin.version if pin else None


def upstream_dir(upstream: Path, name: str, version: str | None = None) -> Path:
    """`<upstream>/<name>-<version>/`: the given version, else the pinned one, else the only one there."""
    version = version or _pinned_version(name)
    if version:
        path = upstream / f"{name}-{version}"
        if path.is_dir():
            return path
        raise BuildError(f"{name} {version} is not in {upstream}: {FETCH_HINT}")
    pattern = re.compile(re.escape(name) + r"-([0-9a-f]{40}|\d[\w.]*)\Z")
    found = sorted(p for p in upstream.iterdir() if pattern.match(p.name) and p.is_dir()) if upstream.is_dir() else []
    if not found:
        raise BuildError(f"no {name}-<version>/ in {upstream}: {FETCH_HINT}")
    if len(found) > 1:
        raise BuildError(f"several versions of {name} in {upstream} ({', '.join(p.name for p in found)}): "
                         "remove the ones not pinned")
    return found[0]


_EP_FIELD = re.compile(r"^(?P<indent>[ \t]*)(?P<key>GIT_REPOSITORY|GIT_TAG|URL|URL_MD5|URL_HASH)[ \t]+(?P<value>\S+)[ \t]*$",
                       re.MULTILINE)


def local_downloads(cmake_text: str, upstream: Path, archives: Path | None) -> tuple[str, list[str]]:
    """`cmake_text` (an extension's CMakeLists.txt) with each ExternalProject download pointed at
    the local copy of the same pinned source, and a line per download saying what replaced it."""
    fields: dict[str, tuple[str, str]] = {}  # key -> (indent, value), of the one download here
    for m in _EP_FIELD.finditer(cmake_text):
        if m["key"] in fields:
            raise BuildError(f"more than one {m['key']} in one CMakeLists.txt: this recipe handles one download per extension")
        fields[m["key"]] = (m["indent"], m["value"])
    if not fields:
        return cmake_text, []
    drop = {"GIT_TAG"}
    if "GIT_REPOSITORY" in fields:
        url, tag = fields["GIT_REPOSITORY"][1], fields.get("GIT_TAG", ("", "master"))[1]
        repo = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        is_commit = re.fullmatch(r"[0-9a-f]{40}", tag) is not None
        # a branch cannot be checked offline: the fetch step's pin of that repository stands for it
        source = upstream_dir(upstream, repo, tag if is_commit else None)
        where = f"{url} at {'commit' if is_commit else 'branch'} {tag}"
        note = f"{where}: {source}" + ("" if is_commit else f" (commit {source.name[len(repo) + 1:]}, the pinned one)")
        key = "GIT_REPOSITORY"
    elif "URL" in fields:
        url = fields["URL"][1]
        archive_name = url.rsplit("/", 1)[-1]
        stem = re.sub(r"\.(tar\.gz|tgz|tar\.bz2|tar\.xz|zip)\Z", "", archive_name)
        archive = archives / archive_name if archives else None
        if archive is not None and archive.is_file():
            source = archive  # URL_MD5 stays: CMake checks the archive as it would the download
            note = f"{url}: {archive} (MD5 checked by CMake)"
        else:
            name, _, version = stem.rpartition("-")
            source = upstream_dir(upstream, name, version)
            drop |= {"URL_MD5", "URL_HASH"}  # a directory has no digest; the fetch step checked the archive's sha256
            note = f"{url}: {source} (unpacked by the fetch step after checking the archive's sha256)"
        key = "URL"
    else:
        raise BuildError(f"a download this recipe does not know: {sorted(fields)}")

    def replace(m: re.Match[str]) -> str:
        if m["key"] == key:
            return f'{m["indent"]}URL "{source}"'
        if m["key"] in drop:
            return ""
        return m[0]

    return _EP_FIELD.sub(replace, cmake_text), [note]


# -- building -------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        status = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise BuildError(f"{' '.join(cmd[:2])} failed in {cwd} (exit {status}); the end of {log}:\n" + "\n".join(tail))


def _cmake_project(name: str, source: Path, build: Path, prefix: Path, jobs: int, env: dict[str, str],
                   extra: list[str], install: bool = True) -> Path:
    tree = build / name
    tree.mkdir(parents=True, exist_ok=True)
    log = build / f"{name}.log"
    log.write_text("")
    print(f"build_hindsight: building {name} (log: {log})", file=sys.stderr, flush=True)
    _run(["cmake", "-DCMAKE_BUILD_TYPE=release", f"-DCMAKE_INSTALL_PREFIX={prefix}",
          "-DCMAKE_INSTALL_LIBDIR=lib",  # not lib64 or a multiarch directory: the paths printed below
          "-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib",  # the prefix runs without LD_LIBRARY_PATH
          *extra, str(source)], tree, log, env)
    _run(["make", f"-j{jobs}"], tree, log, env)
    if install:
        _run(["make", "install"], tree, log, env)
    return tree


def check_tools() -> None:
    missing = [tool for tool in ("cmake", "make") if shutil.which(tool) is None]
    if not (shutil.which("cc") or shutil.which("gcc")):
        missing.append("a C compiler (cc)")
    if not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler (c++, for rjson)")
    if missing:
        raise BuildError(f"missing: {', '.join(missing)} (Debian: apt-get install cmake make gcc g++ libssl-dev zlib1g-dev)")


def sources(upstream: Path) -> dict[str, Path]:
    if not upstream.is_dir():
        raise BuildError(f"{upstream} does not exist: {FETCH_HINT}")
    return {name: upstream_dir(upstream, name) for name in ("lua_sandbox", "lua_sandbox_extensions", "hindsight")}


def config_paths(prefix: Path) -> dict[str, str]:
    """The hindsight.cfg settings (Lua expressions) that locate this build's modules and sandboxes."""
    lib = prefix / "lib/luasandbox"
    return {
        "sandbox_install_path": f'"{prefix}/share/luasandbox/sandboxes/heka"',
        "analysis_lua_path": f'"{lib}/modules/?.lua"',
        "analysis_lua_cpath": f'"{lib}/modules/?.so"',
        "io_lua_path": f'analysis_lua_path .. ";{lib}/io_modules/?.lua"',
        "io_lua_cpath": f'analysis_lua_cpath .. ";{lib}/io_modules/?.so"',
    }


def stock_config(hindsight_src: Path, prefix: Path) -> str:
    """Hindsight's own hindsight.cfg, its module and sandbox paths pointed at `prefix`."""
    paths = config_paths(prefix)
    lines = (hindsight_src / "hindsight.cfg").read_text().splitlines()
    seen = set()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and key in paths:
            lines[i] = f"{key} = {paths[key]}"
            seen.add(key)
    if seen != set(paths):
        raise BuildError(f"{hindsight_src}/hindsight.cfg has no {', '.join(sorted(set(paths) - seen))}")
    return "\n".join(lines) + "\n"


def build(upstream: Path, prefix: Path, build_dir: Path, archives: Path | None, jobs: int) -> float:
    """Builds into `prefix` unless it holds a complete build of the same sources; returns the seconds taken."""
    src = sources(upstream)
    stamp = {"recipe": RECIPE, "sources": {name: path.name for name, path in src.items()}, "extensions": list(EXTENSIONS)}
    stamp_path = prefix / STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and (prefix / "bin/hindsight_cli").is_file():
        print(f"build_hindsight: already built in {prefix}", file=sys.stderr)
        return 0.0
    if prefix.exists() and any(prefix.iterdir()):
        if not stamp_path.is_file():
            raise BuildError(f"{prefix} is not empty and was not made by this script: choose another --prefix")
        shutil.rmtree(prefix)  # a build of other sources, or an interrupted one: start it over
    check_tools()
    t0 = time.monotonic()
    prefix.mkdir(parents=True)
    stamp_path.write_text("{}")  # marks the prefix as ours while it is incomplete
    build_dir = build_dir / f"hindsight-{src['hindsight'].name.rsplit('-', 1)[1][:12]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # The extensions and hindsight find lua_sandbox through these (its headers are included as
    # <luasandbox/...>, which its CMake config does not put on the include path).
    env = {**os.environ,
           "CMAKE_PREFIX_PATH": os.pathsep.join(filter(None, [str(prefix), os.environ.get("CMAKE_PREFIX_PATH")])),
           "CPATH": os.pathsep.join(filter(None, [str(prefix / "include"), os.environ.get("CPATH")]))}

    _cmake_project("lua_sandbox", src["lua_sandbox"], build_dir, prefix, jobs, env, [])

    # lua_sandbox_extensions, from a copy whose downloads point at local sources
    ext_src = build_dir / "lua_sandbox_extensions-src"
    shutil.rmtree(ext_src, ignore_errors=True)
    shutil.copytree(src["lua_sandbox_extensions"], ext_src)
    for ext in EXTENSIONS:
        cmake_file = ext_src / ext / "CMakeLists.txt"
        if not cmake_file.is_file():
            raise BuildError(f"{src['lua_sandbox_extensions']} has no {ext}/CMakeLists.txt")
        text, notes = local_downloads(cmake_file.read_text(), upstream, archives)
        cmake_file.write_text(text)
        for note in notes:
            print(f"build_hindsight: {ext} downloads {note}", file=sys.stderr)
    shutil.rmtree(build_dir / "lua_sandbox_extensions", ignore_errors=True)  # its copied sources changed
    ext_build = _cmake_project("lua_sandbox_extensions", ext_src, build_dir, prefix, jobs, env,
                               [f"-DEXT_{ext}=on" for ext in EXTENSIONS])
    # the extensions built as ExternalProjects install into the build tree's install/
    shutil.copytree(ext_build / "install", prefix, dirs_exist_ok=True, symlinks=True)

    _cmake_project("hindsight", src["hindsight"], build_dir, prefix, jobs, env, [])
    (prefix / "etc/hindsight").mkdir(parents=True, exist_ok=True)
    (prefix / "etc/hindsight/hindsight.cfg").write_text(stock_config(src["hindsight"], prefix))
    missing = [p for p in ("bin/hindsight_cli", *(f"lib/luasandbox/{d}/{m}.so" for d, m in
               [("modules", "lpeg"), ("modules", "cjson"), ("io_modules", "rjson"), ("io_modules", "socket/core")]))
               if not (prefix / p).is_file()]
    if missing:
        raise BuildError(f"the build did not install {', '.join(missing)} into {prefix} (logs in {build_dir})")
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n")
    return time.monotonic() - t0


def report(prefix: Path) -> None:
    print(prefix / "bin/hindsight_cli")
    print(f"-- Hindsight's stock configuration pointed at this build: {prefix}/etc/hindsight/hindsight.cfg")
    for key, value in config_paths(prefix).items():
        print(f"{key:<20} = {value}")


def main(argv: list[str] | None = None) -> int:
    base = cache_base()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=Path, default=base / "upstream",
                    help="the fetched sources (default: $HINDSIGHT_PY_CACHE/upstream, ~/.cache/hindsight-py/upstream)")
    ap.add_argument("--prefix", type=Path, default=base / "hindsight-0.16",
                    help="where to install (default: $HINDSIGHT_PY_CACHE/hindsight-0.16)")
    ap.add_argument("--build-dir", type=Path, default=base / "build", help="build trees and logs (default: $HINDSIGHT_PY_CACHE/build)")
    ap.add_argument("--from", dest="archives", type=Path, default=os.environ.get("HINDSIGHT_PY_UPSTREAM_SOURCE") or None,
                    help="a directory of the archives: archive downloads come from there, their MD5 checked "
                         "(default: $HINDSIGHT_PY_UPSTREAM_SOURCE)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    args = ap.parse_args(argv)
    prefix = args.prefix.expanduser().resolve()
    try:
        seconds = build(args.upstream.expanduser().resolve(), prefix, args.build_dir.expanduser().resolve(),
                        args.archives.expanduser().resolve() if args.archives else None, max(1, args.jobs))
    except BuildError as e:
        print(f"build_hindsight: {e}", file=sys.stderr)
        return 1
    if seconds:
        print(f"build_hindsight: built in {seconds:.0f} s", file=sys.stderr)
    report(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
