"""lua_sandbox_extensions' module tests that drive a script through lua_sandbox's test API rather
than run it once: `<ext>/test_sandbox.c` calls the script's process(tc) and report(tc)
(lsb_test_process, lsb_test_report), gives it write_output (lsb_test_write_output: the output of
its arguments, userdata through their module's output function) and preserves its globals between
two sandboxes (lsb_destroy, then lsb_init with the same file). The expected outputs are read out
of the C file at test time; the call sequences below are the C functions', step by step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sandbox_fakes import FakeHost, lua_sandbox
from test_upstream_suites import _STR, INSTALL, c_string
from upstream_files import (
    LUA_SANDBOX_EXTENSIONS,
    STREAMING_ALGORITHMS,
    SYMTSERIES,
    available,
    copy_tree,
    read_bytes,
)

pytestmark = [
    pytest.mark.upstream,
    pytest.mark.skipif(not available(LUA_SANDBOX_EXTENSIONS), reason="lua_sandbox_extensions is not fetched"),
]

# lsb_test_write_output: what the script's last write_output call wrote
_WRITE_OUTPUT = """
local env = ...
local written = ""
env.write_output = function(...)
    local parts = {}
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        local mt = type(v) == "table" and debug.getmetatable(v)
        parts[i] = mt and mt.__lsb_output and mt.__lsb_output(v) or tostring(v)
    end
    written = table.concat(parts)
end
return function() return written end
"""


class Script:
    """One lsb_create + lsb_init of an extension's test script, with its test API."""

    def __init__(self, name: str, root: Path, preserve: Path | None) -> None:
        # lsb_create's default limits (its cfg is TEST_MODULE_PATH alone), except in test_sandbox's
        # first run: see there
        install = root / INSTALL
        self.sb, _ = lua_sandbox(Path(name), "input", FakeHost(), path=f"{install}/modules/?.lua",
                                 preserve_data=preserve is not None, state_path=preserve, load=False)
        self.written = self.sb.execute_privileged(_WRITE_OUTPUT, self.sb.globals_table())
        self.sb.load()

    def process(self, tc: float) -> Any:
        return self.sb.globals_table()[b"process"](tc)

    def report(self, tc: float) -> bytes:
        self.sb.globals_table()[b"report"](tc)
        return bytes(self.written())

    def output(self) -> bytes:
        return bytes(self.written())

    def destroy(self) -> None:
        self.sb.save_state()


def outputs(c_source: str, test: str) -> list[bytes]:
    """The outputs[] of one test function of test_sandbox.c (NULL ends it)."""
    start = c_source.index(f"static char* {test}()")
    body = c_source[start : c_source.index("\n}\n", start)]
    table = body[body.index("outputs[] = {") : body.index("NULL", body.index("outputs[] = {"))]
    return [c_string(m.group(1)) for m in re.finditer(_STR + r"\s*,", table)]


@pytest.fixture
def circular_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    root = tmp_path / "root"
    copy_tree(LUA_SANDBOX_EXTENSIONS, "circular_buffer/modules", root / INSTALL / "modules")
    copy_tree(LUA_SANDBOX_EXTENSIONS, "circular_buffer/tests", tmp_path / "tests")
    monkeypatch.chdir(tmp_path / "tests")
    return root, read_bytes(LUA_SANDBOX_EXTENSIONS, "circular_buffer/test_sandbox.c").decode()


def test_circular_buffer_test_sandbox(circular_buffer: tuple[Path, str], tmp_path: Path) -> None:
    root, c_source = circular_buffer
    expected = outputs(c_source, "test_sandbox")
    preserve = tmp_path / "circular_buffer.preserve"
    # upstream's first run has memory_limit = 32767, not applied here: the Lua stand-in's own code
    # takes about 56 KB of the plugin's memory, where upstream's C module takes a few hundred bytes
    s = Script("test_sandbox.lua", root, preserve)
    assert s.report(0) == expected[0]
    for tc in (0, 1e9, 1e9, 2e9, 2e9, 2e9):
        s.process(tc)
    assert s.report(0) == expected[1]
    s.process(4e9)
    assert s.report(0) == expected[2]
    s.process(10e9)
    assert s.report(0) == expected[3]
    s.destroy()

    s = Script("test_sandbox.lua", root, preserve)  # re-loaded from the preserved data
    assert s.report(0) == expected[3]


def test_circular_buffer_test_sandbox_delta(circular_buffer: tuple[Path, str], tmp_path: Path) -> None:
    root, c_source = circular_buffer
    expected = outputs(c_source, "test_sandbox_delta")
    preserve = tmp_path / "circular_buffer_delta.preserve"
    s = Script("test_sandbox_delta.lua", root, preserve)
    for tc in (0, 1e9, 1e9, 2e9, 2e9, 2e9):
        s.process(tc)
    assert s.report(0) == expected[0]
    assert s.report(1) == expected[1]
    for i in range(2, len(expected)):
        assert s.report(i - 2) == expected[i], i
    s.destroy()

    s = Script("test_sandbox_delta.lua", root, preserve)
    start = c_source.index("static char* test_sandbox_delta()")
    after_reload = re.search(r"strcmp\(" + _STR + r", lsb_test_output\)", c_source[start:])
    assert after_reload
    assert s.report(7) == c_string(after_reload.group(1))


def test_circular_buffer_test_sandbox_annotation(circular_buffer: tuple[Path, str]) -> None:
    root, c_source = circular_buffer
    expected = outputs(c_source, "test_sandbox_annotation")
    s = Script("test_sandbox_annotation.lua", root, None)
    for x, want in enumerate(expected):
        assert s.process(x) == 0
        if want:
            assert s.output() == want, x


# ------------------------------------------------------------------------------------------------
# trink/streaming_algorithms (lua_sandbox_extensions' streaming_algorithms package): its
# lua_binding/luasandbox/test_sandbox.c runs tests/test.lua, then each tests/test_*_serialize.lua
# through process, report, preservation and report again
# ------------------------------------------------------------------------------------------------
SA_MODULES = ["running_stats", "p2", "cm_sketch", "time_series", "matrix"]


def _sa_sections() -> dict[str, list[int]]:
    """test.lua's sections ("-- ####" banners), by the module each requires (a section without a
    require goes on testing the one before: the float matrix): line ranges."""
    lines = read_bytes(STREAMING_ALGORITHMS, "lua_binding/tests/test.lua").decode().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("-- ####")] + [len(lines)]
    out: dict[str, list[int]] = {}
    module = None
    for a, b in zip(starts, starts[1:], strict=False):
        m = re.search(r'require "streaming_algorithms\.(\w+)"', "\n".join(lines[a:b]))
        module = m.group(1) if m else module
        assert module, f"no module in test.lua's section at line {a + 1}"
        out.setdefault(module, []).extend(range(a, b))
    return out


@pytest.fixture
def sa_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not available(STREAMING_ALGORITHMS):
        pytest.skip("streaming_algorithms (an optional pin: not among the offline archives) is not fetched: "
                    "run `python3 scripts/fetch_upstream.py streaming_algorithms` where GitHub is reachable")
    copy_tree(STREAMING_ALGORITHMS, "lua_binding/tests", tmp_path / "tests")
    monkeypatch.chdir(tmp_path / "tests")
    return tmp_path


@pytest.mark.parametrize("module", SA_MODULES)
def test_streaming_algorithms_test_lua(module: str, sa_tests: Path) -> None:
    """test.lua's section for `module`, the others blanked (so that the lines, which its expected
    error texts name, stay where they are)."""
    sections = _sa_sections()
    lines = (sa_tests / "tests" / "test.lua").read_text().splitlines()
    others = {i for name, rows in sections.items() if name != module for i in rows}
    (sa_tests / "tests" / "test.lua").write_text("\n".join("" if i in others else line
                                                           for i, line in enumerate(lines)) + "\n")
    lua_sandbox(Path("test.lua"), "input", FakeHost(), path=str(sa_tests / "none" / "?.lua"))


def _sa_serialize_cases() -> list[tuple[str, str, bytes]]:
    if not available(STREAMING_ALGORITHMS):
        return []
    c_source = read_bytes(STREAMING_ALGORITHMS, "lua_binding/luasandbox/test_sandbox.c").decode()
    cases = []
    for m in re.finditer(r'static char\* test_(\w+)\(\)\s*\{(.*?)\n\}', c_source, re.S):
        script = re.search(r'lsb_create\(NULL, "(test_\w+\.lua)"', m.group(2))
        expected = re.search(r"strcmp\(" + _STR + r", lsb_test_output\)", m.group(2))
        if script and expected:
            module = re.search(r'require "streaming_algorithms\.(\w+)"',
                               read_bytes(STREAMING_ALGORITHMS, f"lua_binding/tests/{script.group(1)}").decode())
            assert module
            cases.append((module.group(1), script.group(1), c_string(expected.group(1))))
    assert cases, "no serialization tests in test_sandbox.c"
    return cases


@pytest.mark.parametrize("module, script, expected", _sa_serialize_cases() or [("(not fetched)", "", b"")])
def test_streaming_algorithms_preservation(module: str, script: str, expected: bytes, sa_tests: Path) -> None:
    preserve = sa_tests / "test.preserve"
    s = Script(script, sa_tests, preserve)
    assert s.process(0) == 0
    assert s.report(0) == expected
    s.destroy()
    s = Script(script, sa_tests, preserve)
    assert s.report(0) == expected


# ------------------------------------------------------------------------------------------------
# trink/symtseries (lua_sandbox_extensions' sax package): its CMake test runs lua/test.lua, the
# module's API, error cases, NaN and infinity handling and mindist values
# ------------------------------------------------------------------------------------------------
def test_symtseries_test_lua(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not available(SYMTSERIES):
        pytest.skip("symtseries (an optional pin: not among the offline archives) is not fetched: "
                    "run `python3 scripts/fetch_upstream.py symtseries` where GitHub is reachable")
    copy_tree(SYMTSERIES, "lua", tmp_path)
    monkeypatch.chdir(tmp_path)
    lua_sandbox(Path("test.lua"), "input", FakeHost(), path=str(tmp_path / "none" / "?.lua"))
