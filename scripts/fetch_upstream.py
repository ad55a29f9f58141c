#!/usr/bin/env python3
"""The public upstream sources the tests and benchmarks compare against, at pinned versions.

    python3 scripts/fetch_upstream.py [--from DIR] [NAME ...]   # fetch (default: every pin)
    python3 scripts/fetch_upstream.py --list                    # pins, and which are fetched
    python3 scripts/fetch_upstream.py --path NAME               # print where NAME is (or would be)

Each pin is unpacked as a plain directory tree under
`${HINDSIGHT_PY_CACHE:-~/.cache/hindsight-py}/upstream/<name>-<version>/`, once: a pin already
there is not fetched again, so the tests run offline after a first fetch. A fetch unpacks into a
staging directory beside it and renames it into place, so a directory there is always complete.

Sources:
- by default, a git clone of the pinned commit (the checked-out HEAD must be the pin), or for a
  release tarball its download (which must match the pinned sha256);
- with `--from DIR` (or HINDSIGHT_PY_UPSTREAM_SOURCE=DIR), a directory of archives named
  `<name>-<commit12>.tar.gz` (`<name>-<version>.tar.gz` for a release) whose single top folder has
  the same name, as `git archive --prefix=<name>-<commit12>/` makes them. Each archive must match
  the sha256 pinned below; one made by `git archive` must also carry the pinned commit id.

The project never carries upstream code or text: tests copy what they run out of this cache.
Exit status 1 when some pin could not be fetched (each failure is named on stderr), unless the
pin is optional: those (streaming_algorithms and symtseries, whose tests are extra) are fetched where they can be.
Standard library only: this runs before the project is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SOURCE_VARIABLE = "HINDSIGHT_PY_UPSTREAM_SOURCE"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str  # a full commit id, or a release version
    url: str  # a git clone URL (commit pins) or the release tarball's URL
    sha256: str  # of the archive named `archive`
    licence: str
    used_for: str
    # Not among the pinned archives an offline machine is given (the --from DIR set): a failed fetch
    # is a note, not a failure, and the tests that use it skip, saying so.
    optional: bool = False

    @property
    def is_commit(self) -> bool:
        return len(self.version) == 40 and all(c in "0123456789abcdef" for c in self.version)

    @property
    def stem(self) -> str:
        """The archive's name without `.tar.gz`, and its top folder."""
        return f"{self.name}-{self.version[:12] if self.is_commit else self.version}"

    @property
    def archive(self) -> str:
        return f"{self.stem}.tar.gz"


PINS = {pin.name: pin for pin in [
    Pin("hindsight", "6854b13e6a2c68c1c13c2b653e500ca512edaef5",
        "https://github.com/mozilla-services/hindsight.git",
        "807a34de0d0d4f9765e1eb0719d6b4fe49c6acd4b2f2713db51156204e3a7e89", "MPL-2.0",
        "the stock hindsight.cfg (tests/test_config.py)"),
    Pin("lua_sandbox", "78103a88ff8df2acd9d2c94360e977cf583d1c0c",
        "https://github.com/mozilla-services/lua_sandbox.git",
        "83bad01fc341e0aa9f1a97305a4d80089014536fd78bcaac27b0806c5cab701b", "MPL-2.0",
        "the Heka sandbox tests, message vectors and the C matcher"),
    Pin("lua_sandbox_extensions", "88ca3c5acd2df9e0a667643a92925df4acfd2af6",
        "https://github.com/mozilla-services/lua_sandbox_extensions.git",
        "a27f955b1860d81443f9a3f994af2a25904d197e310cb57b5468ba4e387aebab", "MPL-2.0",
        "the pure-Lua modules CloudTracker's run/ requires, and the extensions' own test suites"),
    Pin("cloudtracker", "822ef553266aca2b1d54fc44e09c230f6df77a8a",
        "https://github.com/duo-labs/cloudtracker.git",
        "7ef5928b7c873f71de682e95448a37e7b90cace59effe22d617fbc6136952464", "BSD-3-Clause",
        "CloudTracker's hindsight/run/, run unmodified"),
    # lua_sandbox_extensions' streaming_algorithms package (cm_sketch, time_series, p2, matrix,
    # running_stats) is built from this separate repository
    Pin("streaming_algorithms", "f497cdd777e4be28f0f5370762dbfca0515b377b",
        "https://github.com/trink/streaming_algorithms.git",
        "2d29e197cdab25fa87f01a8049053c80d6f0482822dd7a753c13774db67b8261", "MPL-2.0",
        "the streaming_algorithms modules' own tests (lua_binding/tests)", optional=True),
    # lua_sandbox_extensions' sax package is built from this separate repository (sax/CMakeLists.txt)
    Pin("symtseries", "62fbe4df396e68de637aca0cdb597e3593bab754",
        "https://github.com/trink/symtseries.git",
        "11c14476f6fd43b39cf5acaff3dd068395de4923fc035380f2b25ce8cf8fbd38", "MPL-2.0",
        "the sax module's own test (lua/test.lua)", optional=True),
    # What lua_sandbox_extensions' CMake files download when building the real Hindsight
    # (lpeg/, cjson/, socket/ and rjson/CMakeLists.txt), for building it offline.
    Pin("lpeg", "1.0.2", "http://www.inf.puc-rio.br/~roberto/lpeg/lpeg-1.0.2.tar.gz",
        "48d66576051b6c78388faad09b70493093264588fcd0f258ddaab1cdd4a15ffe", "MIT",
        "building the real Hindsight's lpeg extension"),
    Pin("lua-cjson", "1203222c4b35e9534f893ae475a9356ce6a688a6",
        "https://github.com/trink/lua-cjson.git",
        "ab55c66fdb4b24504374e74b71b7ba812c246cebda5d3d42839a889ad3fab0c5", "MIT",
        "building the real Hindsight's cjson extension (branch lua_sandbox)"),
    Pin("luasocket", "316a9455b9cb4637fe6e62b20fbe05f5141fec54",
        "https://github.com/diegonehab/luasocket.git",
        "34b3356581cbe89eb79bb436ca275c8041084ba2523f45199a831a60e3d4e7b2", "MIT",
        "building the real Hindsight's socket extension"),
    Pin("rapidjson", "67a17cfdbc25ff1fc8d01714be87e242b03a4cc9",
        "https://github.com/Tencent/rapidjson.git",
        "9199741394c72a4d0a5597b87380c93f8afdc8e15caec324b0a16eb563726e4b", "MIT",
        "building the real Hindsight's rjson extension"),
]}


class FetchError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("HINDSIGHT_PY_CACHE") or str(Path.home() / ".cache" / "hindsight-py")
    return Path(base) / "upstream"


def cache_dir(pin: Pin) -> Path:
    return cache_root() / f"{pin.name}-{pin.version}"


def default_source() -> Path | None:
    value = os.environ.get(SOURCE_VARIABLE)
    return Path(value) if value else None


# ---------------------------------------------------------------------------- sources


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(tar: tarfile.TarFile, pin: Pin, where: Path, origin: str) -> Path:
    """Unpack `tar`, whose members must all lie under the pin's top folder; returns that folder."""
    top = pin.stem
    stray = [m.name for m in tar.getmembers() if m.name != top and not m.name.startswith(top + "/")]
    if stray:
        raise FetchError(f"{origin}: expected everything under {top}/, found {stray[:3]}")
    commit = tar.pax_headers.get("comment")  # `git archive` records the commit id here
    if pin.is_commit and commit is not None and commit != pin.version:
        raise FetchError(f"{origin}: made from commit {commit}, the pin is {pin.version}")
    try:
        tar.extractall(where, filter="data")  # refuses absolute paths, `..` and links leading out
    except tarfile.FilterError as e:
        raise FetchError(f"{origin}: {e}") from e
    if not (where / top).is_dir():
        raise FetchError(f"{origin}: no {top}/ folder in it")
    return where / top


def unpack_archive(pin: Pin, archive: Path, staging: Path) -> Path:
    if not archive.is_file():
        raise FetchError(f"{archive} does not exist")
    digest = _sha256(archive)
    if digest != pin.sha256:
        raise FetchError(f"{archive}: sha256 {digest}, the pin is {pin.sha256}")
    with tarfile.open(archive) as tar:
        return _extract(tar, pin, staging / "tree", str(archive))


def _git(*args: str | Path) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(["git", *map(str, args)], capture_output=True, stdin=subprocess.DEVNULL, env=env)
    if result.returncode != 0:
        raise FetchError(f"git {' '.join(map(str, args))}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode(errors="replace")


def clone(pin: Pin, staging: Path) -> Path:
    repo = staging / "git"
    _git("init", "-q", repo)
    try:
        _git("-C", repo, "fetch", "-q", "--depth", "1", pin.url, pin.version)
    except FetchError:
        # a server that does not serve a commit by its id: everything, then the commit out of it
        _git("-C", repo, "fetch", "-q", "--tags", pin.url, "+refs/heads/*:refs/remotes/origin/*")
    _git("-C", repo, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach", pin.version)
    head = _git("-C", repo, "rev-parse", "HEAD").strip()
    if head != pin.version:
        raise FetchError(f"{pin.url}: HEAD is {head}, the pin is {pin.version}")
    # the tree as `git archive` gives it, so that both sources unpack to the same files
    tar_bytes = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", f"--prefix={pin.stem}/", "HEAD"],
                               check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return _extract(tar, pin, staging / "tree", pin.url)


def download(pin: Pin, staging: Path) -> Path:
    archive = staging / pin.archive
    try:
        with urllib.request.urlopen(pin.url, timeout=120) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as e:
        raise FetchError(f"{pin.url}: {e}") from e
    return unpack_archive(pin, archive, staging)


def fetch(pin: Pin, source: Path | None = None) -> Path:
    """The pin's directory in the cache, fetched from `source` (a directory of archives) or from
    its upstream URL unless it is there already."""
    dest = cache_dir(pin)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
    try:
        if source is not None:
            tree = unpack_archive(pin, source / pin.archive, staging)
        elif pin.is_commit:
            tree = clone(pin, staging)
        else:
            tree = download(pin, staging)
        try:
            tree.rename(dest)
        except OSError:
            if not dest.is_dir():  # else another fetch put the same pin in place first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"pins to fetch (default: all of {', '.join(PINS)})")
    parser.add_argument("--from", dest="source", type=Path, default=default_source(),
                        help=f"a directory of archives instead of the network (default: ${SOURCE_VARIABLE})")
    parser.add_argument("--list", action="store_true", help="list the pins and whether each is fetched")
    parser.add_argument("--path", metavar="NAME", help="print the cache directory of NAME and exit")
    args = parser.parse_args(argv)
    unknown = [name for name in [*args.names, *filter(None, [args.path])] if name not in PINS]
    if unknown:
        parser.error(f"unknown pin {', '.join(unknown)}; the pins are {', '.join(PINS)}")
    if args.path:
        print(cache_dir(PINS[args.path]))
        return 0
    if args.list:
        for pin in PINS.values():
            state = "fetched" if cache_dir(pin).is_dir() else "absent"
            print(f"{pin.name:<24}{pin.version:<42}{pin.licence:<14}{state:<9}{pin.url}")
        return 0
    failed = 0
    for pin in (PINS[name] for name in args.names or PINS):
        cached = cache_dir(pin).is_dir()
        origin = pin.url if args.source is None else args.source / pin.archive
        try:
            path = fetch(pin, args.source)
        except (FetchError, OSError, tarfile.TarError) as e:
            if pin.optional:
                print(f"fetch_upstream: {pin.name} {pin.version} (optional, going on without it): {e}",
                      file=sys.stderr)
                continue
            failed += 1
            print(f"fetch_upstream: {pin.name} {pin.version}: {e}", file=sys.stderr)
            continue
        print(f"fetch_upstream: {pin.name}: {'already in' if cached else 'fetched from ' + str(origin) + ' into'} {path}",
              file=sys.stderr)
    if failed:
        where = "from the network" if args.source is None else f"from {args.source}"
        print(f"fetch_upstream: {failed} of {len(args.names or PINS)} pins could not be fetched {where}; "
              f"with a directory of the archives: python3 scripts/fetch_upstream.py --from DIR", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
