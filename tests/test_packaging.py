"""Packaging: pyproject.toml declares what the code imports and nothing else, the Lua C modules
are found on the machine's architecture, and the built wheel works on its own in a fresh venv.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from delivery_helpers import SUMMARY, Index, project_workdir

from hindsight_py import _lupa

PACKAGE_SOURCES = (REPO_ROOT / "hindsight_py", REPO_ROOT / "plugins")  # plugins/ installs as hindsight_py.plugins
OWN_PACKAGES = {"hindsight_py"}
# Extras for the project's own work, not for users: what tests/ and scripts/ import or run, and
# what benchmarks/ imports.
DEVELOPMENT_EXTRAS = {"test": (REPO_ROOT / "tests", REPO_ROOT / "scripts"), "bench": (REPO_ROOT / "benchmarks",)}
CLOUDTRAIL_SAMPLE = REPO_ROOT / "examples" / "cloudtrail-sample.ndjson"
STEP_TIMEOUT = 600  # a hung build, install or run fails its test instead of the CI job


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- what is declared


def declared() -> dict[str, set[str]]:
    """Normalized distribution names per group: "" for `dependencies`, else the extra's name.
    An extra that names the project itself (`hindsight-py[aws]`) gets those extras' names."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    raw = {"": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    own = normalize(project["name"])

    def names(group: str) -> set[str]:
        out = set()
        for requirement in raw[group]:
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
            assert match, f"pyproject.toml: cannot read the requirement {requirement!r}"
            if normalize(match.group(1)) == own:
                for extra in (match.group(2) or "").split(","):
                    out |= names(extra.strip())
            else:
                out.add(normalize(match.group(1)))
        return out

    return {group: names(group) for group in raw}


# --------------------------------------------------------------------------- what is imported


@dataclass(frozen=True)
class Import:
    module: str  # the top-level name
    optional: bool  # inside `try: ... except ImportError`
    where: str  # file:line


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types)


class _ImportFinder(ast.NodeVisitor):
    """`import x`, `from x import y` and importlib.import_module("x..." or f"x.{...}")."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.found: list[Import] = []
        self._guards = 0

    def _add(self, dotted: str, node: ast.AST) -> None:
        self.found.append(Import(dotted.split(".")[0], self._guards > 0, f"{self.where}:{node.lineno}"))

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self._guards += guarded
        for stmt in node.body:
            self.visit(stmt)
        self._guards -= guarded
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(stmt)

    visit_TryStar = visit_Try

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "import_module" and node.args:
            first = node.args[0]
            if isinstance(first, ast.JoinedStr) and first.values:
                first = first.values[0]  # f"lupa.{FLAVOUR}": its constant head
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(first.value, node)
        self.generic_visit(node)


def _source_files(roots: Iterable[Path], suffixes: tuple[str, ...] = (".py",)) -> Iterator[Path]:
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and "_upstream" not in path.parts and path.is_file():
                yield path


def third_party_imports(roots: Iterable[Path]) -> list[Import]:
    """Imports of the .py files under `roots` that are neither the standard library, the project
    itself, nor a module beside the importing file (tests' helpers)."""
    found = []
    for path in _source_files(roots):
        finder = _ImportFinder(str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path))
        finder.visit(ast.parse(path.read_text(), str(path)))
        local = {p.stem for p in path.parent.glob("*.py")}
        found += [i for i in finder.found
                  if i.module not in sys.stdlib_module_names and i.module not in OWN_PACKAGES | local]
    return found


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """The installed distributions that provide top-level `module`; where none is installed, the
    distribution of the same name (a wrong guess then shows up as undeclared, never as declared)."""
    return {normalize(d) for d in _installed().get(module, [module])}


def package_problems(imports: list[Import], groups: dict[str, set[str]]) -> list[str]:
    """What breaks "a dependency you declare, you use; one you use, you declare" for the package:
    a plain import must be a dependency, a guarded one (try/except ImportError) a dependency or in
    a user extra, and every dependency and user extra must be imported."""
    required = groups[""]
    user_extras = {name: dists for name, dists in groups.items() if name and name not in DEVELOPMENT_EXTRAS}
    optional = set().union(*user_extras.values())
    problems = []
    for imp in imports:
        dists = distributions(imp.module)
        if imp.optional:
            if not dists & (optional | required):
                problems.append(f"{imp.where}: optional import {imp.module} ({', '.join(dists)}) is in no extra")
        elif not dists & required:
            hint = " (it is only in an extra: guard it with try/except ImportError)" if dists & optional else ""
            problems.append(f"{imp.where}: {imp.module} ({', '.join(dists)}) is not in dependencies{hint}")
    used = set().union(*(distributions(i.module) for i in imports))
    problems += [f"dependency {d} is imported nowhere" for d in sorted(required - used)]
    problems += [f"extra {name!r}: {d} is imported nowhere" for name, dists in user_extras.items()
                 for d in sorted(dists - used)]
    return problems


def test_the_package_declares_every_import_it_makes_and_nothing_else() -> None:
    imports = third_party_imports(PACKAGE_SOURCES)
    assert {i.module for i in imports} >= {"lupa", "urllib3", "orjson", "botocore"}, "the scan misses imports"
    assert {i.module for i in imports if i.optional} >= {"orjson", "botocore"}, "the scan misses the guards"
    problems = package_problems(imports, declared())
    assert not problems, "in hindsight_py/ and plugins/:\n" + "\n".join(problems)


def test_the_check_fails_on_undeclared_unguarded_and_unused(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(
        "import json\nimport lupa.luajit21\nfrom urllib3 import Timeout\nimport some_undeclared_lib\n"
        "try:\n    import orjson\n    from isal import isal_zlib\nexcept ImportError:\n    orjson = None\nimport botocore.session\n"
        "importlib.import_module(f'requests.{x}')\nimport yaml\n"
    )
    imports = third_party_imports([tmp_path])
    assert {(i.module, i.optional) for i in imports} == {
        ("lupa", False), ("urllib3", False), ("some_undeclared_lib", False), ("orjson", True), ("isal", True),
        ("botocore", False), ("requests", False), ("yaml", False)}
    # the extras this module exercises (the others, e.g. libinjection, it leaves unimported on purpose)
    groups = {name: dists for name, dists in declared().items() if name in ("", "aws", "fast")}
    groups[""].add("elasticsearch")
    problems = package_problems(imports, groups)
    assert [p.split(": ", 1)[-1] for p in problems] == [
        "some_undeclared_lib (some-undeclared-lib) is not in dependencies",
        "botocore (botocore) is not in dependencies (it is only in an extra: guard it with try/except ImportError)",
        "requests (requests) is not in dependencies",
        "dependency elasticsearch is imported nowhere",
    ], problems


def test_tests_scripts_and_benchmarks_declare_what_they_import_or_run() -> None:
    """tests/ and scripts/ use only dependencies and the test extra, benchmarks/ only dependencies
    and the bench extra; each distribution of those extras is imported there, or run as
    `python -m NAME` (ruff, build)."""
    groups = declared()
    problems = []
    for extra, roots in DEVELOPMENT_EXTRAS.items():
        allowed = groups[""] | groups[extra]
        imports = third_party_imports(roots)
        for imp in imports:
            dists = distributions(imp.module)
            if not dists & allowed:
                problems.append(f"{imp.where}: {imp.module} ({', '.join(dists)}) is declared neither in "
                                f"dependencies nor in the {extra!r} extra")
        text = "\n".join(p.read_text() for p in _source_files(roots, (".py", ".sh")))
        run = {normalize(m) for m in re.findall(r"""-m["',\s]+([A-Za-z_][\w.]*)""", text)}
        used = set().union(*(distributions(i.module) for i in imports)) | run
        own_extras = groups[extra] - set().union(*(groups[g] for g in groups if g not in DEVELOPMENT_EXTRAS))
        problems += [f"extra {extra!r}: {d} is neither imported nor run in {', '.join(r.name for r in roots)}"
                     for d in sorted(own_extras - used)]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- Lua C modules


def test_lua_c_modules_are_found_in_the_machines_multiarch_directory() -> None:
    triplet = _lupa.multiarch()
    assert triplet and triplet == sysconfig.get_config_var("MULTIARCH"), triplet  # Debian's Python knows it
    assert _lupa.LUA_VERSION == "5.1"  # LuaJIT 2.1 and PUC Lua 5.1 load the same C modules
    assert _lupa.default_cpath("aarch64-linux-gnu", "5.1").split(";") == [
        "/usr/lib/aarch64-linux-gnu/lua/5.1/?.so", "/usr/local/lib/lua/5.1/?.so", "/usr/lib/lua/5.1/?.so"]
    assert _lupa.default_cpath(None, "5.1").split(";") == ["/usr/local/lib/lua/5.1/?.so", "/usr/lib/lua/5.1/?.so"]
    if not os.environ.get(_lupa.CPATH_VARIABLE):
        assert _lupa.SYSTEM_LUA_CPATH == _lupa.default_cpath(triplet)
    for name in ("lpeg", "cjson", "socket/core"):  # Debian's lua-lpeg, lua-cjson, lua-socket
        found = [p.replace("?", name) for p in _lupa.SYSTEM_LUA_CPATH.split(";") if Path(p.replace("?", name)).is_file()]
        assert found and found[0].startswith(f"/usr/lib/{triplet}/lua/5.1/"), (name, _lupa.SYSTEM_LUA_CPATH)


def test_multiarch_falls_back_to_dpkg_then_gcc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where Python was built without a MULTIARCH (python.org, conda, uv), dpkg-architecture and
    then gcc say it; stand-ins for both show which answered."""

    def tool(name: str, script: str) -> None:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(0o755)

    monkeypatch.setattr(_lupa.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    tool("dpkg-architecture", '[ "$1" = -qDEB_HOST_MULTIARCH ] && echo riscv64-linux-gnu')
    tool("gcc", '[ "$1" = -print-multiarch ] && echo s390x-linux-gnu')
    assert _lupa.multiarch() == "riscv64-linux-gnu"
    tool("dpkg-architecture", "exit 2")
    assert _lupa.multiarch() == "s390x-linux-gnu"
    (tmp_path / "dpkg-architecture").unlink()
    assert _lupa.multiarch() == "s390x-linux-gnu"
    tool("gcc", "echo")  # a gcc without multiarch (Fedora's) prints an empty line
    assert _lupa.multiarch() is None
    (tmp_path / "gcc").unlink()
    assert _lupa.multiarch() is None


# A plugin that needs Debian's LPeg and cjson, loaded the way hindsight_cli loads one.
_REQUIRE_PROBE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sandbox_fakes import lua_sandbox
plugin = Path(sys.argv[2])
plugin.write_text('local l = require "lpeg"; assert(l.match(l.P"ab", "abc") == 3); require "cjson"\\n'
                  'function process_message() return 0 end\\nfunction timer_event() end\\n')
lua_sandbox(plugin, "output", path=str(plugin.parent / "?.lua"))
print("loaded")
"""


def _require_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (_lupa.CPATH_VARIABLE, _lupa.PATH_VARIABLE)}
    return subprocess.run(
        [sys.executable, "-c", _REQUIRE_PROBE, str(REPO_ROOT / "tests"), str(tmp_path / "probe.lua")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, env={**clean, **env},
    )


def test_hindsight_py_lua_cpath_replaces_the_search_path(tmp_path: Path) -> None:
    default = _require_probe(tmp_path)
    assert default.returncode == 0 and default.stdout.strip() == "loaded", default.stderr

    elsewhere = tmp_path / "modules"
    elsewhere.mkdir()
    for name in ("lpeg", "cjson"):
        found = next(p.replace("?", name) for p in _lupa.default_cpath(_lupa.multiarch()).split(";")
                     if Path(p.replace("?", name)).is_file())
        shutil.copy(found, elsewhere / f"{name}.so")
    copied = _require_probe(tmp_path, HINDSIGHT_PY_LUA_CPATH=f"{elsewhere}/?.so")
    assert copied.returncode == 0 and copied.stdout.strip() == "loaded", copied.stderr

    # only the variable's directories are searched: an empty one finds nothing, and says so
    (tmp_path / "empty").mkdir()
    empty = _require_probe(tmp_path, HINDSIGHT_PY_LUA_CPATH=f"{tmp_path}/empty/?.so")
    assert empty.returncode != 0
    assert f"module 'lpeg' not found in {tmp_path}/empty/?.so" in empty.stderr, empty.stderr[-3000:]
    assert "HINDSIGHT_PY_LUA_CPATH" in empty.stderr

    # ';;' stands for the default path, as in LUA_CPATH
    both = _require_probe(tmp_path, HINDSIGHT_PY_LUA_CPATH=f"{tmp_path}/empty/?.so;;")
    assert both.returncode == 0 and both.stdout.strip() == "loaded", both.stderr


def test_search_path_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HSP_TEST_PATH", raising=False)
    assert _lupa.search_path("HSP_TEST_PATH", "/d/?.so") == "/d/?.so"
    monkeypatch.setenv("HSP_TEST_PATH", "")
    assert _lupa.search_path("HSP_TEST_PATH", "/d/?.so") == "/d/?.so"
    monkeypatch.setenv("HSP_TEST_PATH", "/mine/?.so")
    assert _lupa.search_path("HSP_TEST_PATH", "/d/?.so") == "/mine/?.so"
    monkeypatch.setenv("HSP_TEST_PATH", "/mine/?.so;;")
    assert _lupa.search_path("HSP_TEST_PATH", "/d/?.so") == "/mine/?.so;/d/?.so;"


# --------------------------------------------------------------------------- the built wheel


def _checkout_files() -> list[str]:
    """The checkout as git sees it: tracked and new files, less what .gitignore ignores."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, capture_output=True, check=True)
    return [f for f in listed.stdout.decode().split("\0") if f and (REPO_ROOT / f).is_file()]


def _package_files(files: list[str]) -> Iterator[tuple[str, str]]:
    """(path in the checkout, path in the wheel) of every .py and .lua the package ships."""
    for f in files:
        if f.endswith((".py", ".lua")):
            if f.startswith("hindsight_py/"):
                yield f, f
            elif f.startswith("plugins/"):
                yield f, "hindsight_py/" + f


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=STEP_TIMEOUT, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(sdist, wheel, build output): `python -m build` on a copy of the checkout, which builds
    the sdist, then the wheel from the unpacked sdist (so the sdist must hold what a build needs)."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / f, src / f)
    result = _run([sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(src)], root)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    (sdist,) = (root / "dist").glob("*.tar.gz")
    (wheel,) = (root / "dist").glob("*.whl")
    return sdist, wheel, output


def test_build_gives_no_deprecation_warning_and_the_sdist_holds_the_sources(built: tuple[Path, Path, str]) -> None:
    sdist, _, output = built
    deprecated = [line for line in output.splitlines() if "deprecat" in line.lower()]
    assert not deprecated, "\n".join(deprecated)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"LICENSE", "README.md", "pyproject.toml", "hindsight_py/_speedups.c"}
    wanted |= {f for f, _ in _package_files(_checkout_files())}
    assert not wanted - names, sorted(wanted - names)
    assert not {n for n in names if n.startswith("tests/")}, "the sdist holds no half test suite"


def test_the_wheel_in_a_fresh_venv_ships_cloudtrail_into_es8(
    built: tuple[Path, Path, str], tmp_path: Path, es8_url: str, scratch_index
) -> None:
    """The wheel alone (no checkout on sys.path, no extras) installs, runs the project's run/ on
    the CloudTrail sample into a real Elasticsearch 8, and has its package data and extension."""
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = {w for _, w in _package_files(_checkout_files())} - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert [n for n in names if re.fullmatch(r"hindsight_py/_speedups\..*\.so", n)], "no C extension in the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MPL-2.0" in metadata

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "HINDSIGHT_PY_", "PYTHON")) and k != "VIRTUAL_ENV"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.aws
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                      str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # the package comes from the venv, with its extension; the extras' libraries are not there
    probe = _run([str(venv / "bin" / "python"), "-c",
                  "import hindsight_py, hindsight_py._accel as a, importlib.util as u\n"
                  "print(hindsight_py.__file__)\nprint(a.speedups is not None)\n"
                  "print(u.find_spec('orjson') is None, u.find_spec('botocore') is None)"], tmp_path, env)
    assert probe.returncode == 0, probe.stderr
    where, has_speedups, no_extras = probe.stdout.split("\n")[:3]
    assert Path(where).is_relative_to(venv), where
    assert has_speedups == "True"
    assert no_extras == "True True"

    # a missing optional library names its extra
    sigv4 = _run([str(venv / "bin" / "hindsight-py"), "create-index", "--url", "http://127.0.0.1:9", "--index", "x",
                  "--aws-sigv4", "--aws-region", "us-east-1"], tmp_path, env)
    assert sigv4.returncode == 1, sigv4.stderr
    assert "botocore is not installed (pip install 'hindsight-py[aws]'" in sigv4.stderr, sigv4.stderr

    index = scratch_index(es8_url)
    lines = CLOUDTRAIL_SAMPLE.read_bytes().splitlines()[:200]
    sample = tmp_path / "cloudtrail.ndjson"
    sample.write_bytes(b"\n".join(lines) + b"\n")
    wd = project_workdir(tmp_path / "work", sample, es8_url, index)
    run = _run([str(venv / "bin" / "hindsight_cli"), "hindsight.cfg"], wd.path, env)
    summary = SUMMARY.search(run.stderr)
    assert run.returncode == 0 and summary, run.stderr[-4000:]
    assert (int(summary["read"]), int(summary["delivered"]), int(summary["dead"])) == (200, 200, 0), summary[0]
    # the Lua analysis drained the input queue; its last count reached the log through
    # hindsight_py.plugins' log_payloads.py
    assert "output.counter_log count: 200 message analysed" in run.stderr, run.stderr[-4000:]

    counts = Index(es8_url, index).event_counts()
    assert counts == {json.loads(line)["eventID"]: 1 for line in lines}
