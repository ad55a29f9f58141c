"""The extension point through which an output owns its delivery, whatever it delivers to.

The generic layers (plugin_host, read_loop, the sandboxes) know outputs only through this:
- **settle/commit tickets**: work that outlives the call that started it (a bulk body on its way,
  a file not yet synced) is a `Delivery` (read_loop.Delivery: ``ticket`` handed over, ``done``
  settled, ``wait()``) given to ``OutputHost.track``; the read loop commits no position made while
  one of its tickets was open until it is settled;
- **Lua modules**: a `LuaExtension` gives Lua plugins modules of its own (``provides``) and
  intercepts modules they require (``wraps``), in Lua code run as host code (sandbox/env.lua);
- **before reading**: ``before_reading()`` runs once before the output's read loop (to deliver
  what a killed run left on disk).

An output type registers its extension in outputs/registry.py; nothing outside outputs/ changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class LuaExtension:
    """Lua code loaded as host code into each Lua runtime of the plugin: ``source`` is a chunk
    called with (functions, api) that returns {provides = {name = fn}, wraps = {name = fn}}
    (see outputs/elasticsearch_hooks.lua). ``functions`` reach it behind the sandbox's guard; a
    Lua table they are given arrives as Python values, a string as bytes."""

    name: str
    source: str
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)


class OutputHost(Protocol):
    """What an output extension may use of the host of its plugin (plugin_host.PluginHost)."""

    plugin: Any  # config.PluginConfig: name, type, values
    output_path: Path
    stats: Any  # plugin_host.Stats: indexed, dead_lettered, set_aside, retried
    log_fn: Callable[[int, str], None]

    def is_running(self) -> bool: ...
    def stop_event(self) -> Any: ...
    def track(self, delivery: Any) -> None: ...


class OutputExtension(Protocol):
    def lua_extension(self) -> LuaExtension | None: ...
    def before_reading(self) -> None: ...


__all__ = ["LuaExtension", "OutputExtension", "OutputHost"]
