"""The Lua sandbox as lua_sandbox's C test harness drives it (test_heka_sandbox.c, lsb_test_*):
HarnessSandbox, a LuaSandbox with upstream's test API on top.

hindsight-py's runner drives a plugin by batches; upstream's tests also call process_message with
arguments of their choosing (lsb_heka_pm_*), add functions to a plugin's globals and read them
(lsb_add_function, lsb_get_lua), and pass per-call inject and checkpoint callbacks. None of that
belongs on the production class: this subclass reaches it through the three members LuaSandbox
documents for that (`_callables()`, `_control`, `_lift_memory_limit()`). What a plugin sees is
the production sandbox's, plus upstream's callbacks when a test's host sets them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hindsight_py._lupa import LuaError
from hindsight_py.sandbox.lua import LuaSandbox, _text


class HarnessSandbox(LuaSandbox):
    def _callables(self) -> dict[str, Callable[..., Any] | None]:
        # upstream's per-call callbacks, when the test's host has them (tests/sandbox_fakes.FakeHost):
        # inject_callback(pb | None, checkpoint) -> rv, update_checkpoint_callback(seq | None) -> rv
        return {
            **super()._callables(),
            "inject_callback": getattr(self._host, "inject_callback", None),
            "update_checkpoint_callback": getattr(self._host, "update_checkpoint_callback", None),
        }

    def process_message_direct(self, raw: bytes | None, *args: Any) -> tuple[bool, Any, Any]:
        """One process_message call with `raw` as the current message, as lsb_heka_pm_* make it."""
        try:
            good, a, b = (*self._control.pm_direct(raw, *args), None)[:3]
        except LuaError as e:
            return False, f"process_message() {_text(e)}", None
        finally:
            self._lift_memory_limit()
        return bool(good), (_text(a) if isinstance(a, bytes) else a), (_text(b) if isinstance(b, bytes) else b)

    def zero_copy_value(self, ud: Any) -> bytes | None:
        """What lua_sandbox's test function read_message_zc returns for a zero-copy reference."""
        return self._control.zero_copy_value(ud)

    def has_timer(self) -> bool:
        return bool(self._control.has_timer())

    def globals_table(self) -> Any:
        """The plugin's globals (a Lua table): to read values, and to add functions as
        lsb_add_function does."""
        return self._control.env()

    def execute_privileged(self, source: str, *args: Any) -> Any:
        """Run Lua with the unrestricted standard library in this runtime (lua_sandbox's generic
        test sandbox gives its scripts loadfile, for one)."""
        return self._control.execute_privileged(source.encode(), *args)
