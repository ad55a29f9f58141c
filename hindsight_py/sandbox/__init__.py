"""Plugin sandboxes: Lua plugins in lupa (lua.py) and Python plugins (python.py) behind one interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from hindsight_py.sandbox.base import BatchResult, PluginError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from hindsight_py.config import HindsightConfig, PluginConfig


class Sandbox(Protocol):
    """What the runner drives, whatever language the plugin is written in."""

    def load(self) -> None: ...
    def run_input(self, checkpoint: Any) -> tuple[int, str | None]: ...
    def run_batch(self, raws: Sequence[bytes], inject_limit: int = -1) -> BatchResult: ...
    def run_timer(self, ns: int, shutdown: bool, inject_limit: int = -1) -> None: ...
    def set_ticker(self, seconds: int, inject_limit: int = -1) -> None: ...
    def data_now(self) -> int: ...
    def take_acks(self) -> list[int]: ...
    def seq_counter(self) -> int: ...
    def save_state(self) -> None: ...


def preload(plugins: Iterable[PluginConfig]) -> None:
    """Load the sandbox code these plugins need into this process. The supervisor calls it before it
    forks their processes: each then inherits it instead of importing and reading it again (a Lua
    configuration's input, analysis and output processes all build Lua sandboxes)."""
    languages = {p.language for p in plugins}
    if "python" in languages:
        import hindsight_py.sandbox.python  # noqa: F401
    if "lua" in languages:
        from hindsight_py.sandbox.lua import preload as preload_lua

        preload_lua()


def create_sandbox(plugin: PluginConfig, hs: HindsightConfig, host: Any, *, log_level: int, pid: int) -> Sandbox:
    """The sandbox for one plugin; `load()` it before use."""
    if plugin.language == "python":
        from hindsight_py.sandbox.python import PythonSandbox

        return PythonSandbox(plugin, hs, host, log_level=log_level, pid=pid)

    from hindsight_py.sandbox.lua import LuaSandbox

    if plugin.type == "analysis":
        path, cpath = hs.analysis_lua_path, hs.analysis_lua_cpath
    else:
        path, cpath = hs.io_lua_path, hs.io_lua_cpath
    return LuaSandbox(
        name=plugin.name,
        plugin_type=plugin.type,
        source_path=plugin.source_path,
        runtime_cfg=plugin.runtime_cfg,
        path=path,
        cpath=cpath,
        host=host,
        logger=plugin.name,
        hostname=hs.hostname,
        pid=pid,
        log_level=log_level,
        output_limit=plugin.output_limit,
        memory_limit=plugin.memory_limit,
        instruction_limit=plugin.instruction_limit,
        restricted_headers=plugin.restricted_headers,
        max_message_size=hs.max_message_size,
        async_buffer_size=plugin.async_buffer_size or 0,
        preserve_data=plugin.preserve_data,
        state_path=hs.output_dir / f"{plugin.name}.data",
        refused_messages=plugin.refused_messages,
    )


__all__ = ["BatchResult", "PluginError", "Sandbox", "create_sandbox", "preload"]
