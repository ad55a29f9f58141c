"""tests/lua_harness.py: upstream's test API lives on a subclass in tests, not on the runner's
LuaSandbox, and the subclass gives a plugin nothing more than the runner's sandbox does unless a
test's host sets upstream's callbacks. The sandbox tests (tests/test_sandbox_security.py among
them) run through it, so what they show holds for the production class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sandbox_fakes import FakeHost, lua_sandbox

from hindsight_py.sandbox import Sandbox
from hindsight_py.sandbox.lua import LuaSandbox


def handed_to_lua(callables: dict[str, Callable[..., Any] | None]) -> set[str]:
    return {name for name, f in callables.items() if f is not None}


def test_the_runners_sandbox_has_only_what_the_runner_calls() -> None:
    public = {name for name in dir(LuaSandbox) if not name.startswith("_")}
    # memory_used: plugins.tsv's memory column (plugin_host)
    assert public - set(dir(Sandbox)) == {"memory_used"}


@pytest.mark.parametrize("kind", ["input", "analysis", "output"])
def test_the_harness_hands_env_lua_what_the_runner_does(tmp_path: Path, kind: str) -> None:
    plugin = tmp_path / "plugin.lua"
    plugin.write_text("function process_message() return 0 end")
    sb, _ = lua_sandbox(plugin, kind)
    assert handed_to_lua(sb._callables()) == handed_to_lua(LuaSandbox._callables(sb))

    host = FakeHost()
    host.inject_callback = lambda pb, cp: 0
    sb, _ = lua_sandbox(plugin, kind, host)
    assert handed_to_lua(sb._callables()) - handed_to_lua(LuaSandbox._callables(sb)) == {"inject_callback"}
