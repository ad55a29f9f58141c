"""A plugin's runtime cfg (`<output_path>/<name>.rtc`) as text: what a Lua sandbox evaluates.

The text is the plugin's own cfg followed by Hindsight's assignments, each value written as a Lua
literal that reads back exactly (strings as long brackets where Lua keeps them whole).
"""

from __future__ import annotations

__all__ = ["Assignments", "Scalar", "render_runtime_cfg"]

Scalar = int | float | str | bool
Assignments = list[tuple[str, Scalar]]


def _lua_long_string(s: str) -> str:
    """`s` as a Lua long string that reads back exactly, or a quoted string where none can."""
    if "\r" in s:
        # Long strings turn every \r and \r\n into \n; only an escaped string keeps them.
        return _lua_quoted(s)
    level = 0
    while True:
        eq = "=" * level
        close = f"]{eq}]"
        if close not in s and f"[{eq}[" not in s and not s.endswith(f"]{eq}"):
            break
        level += 1
    # Lua drops a newline right after the opening bracket, so keep a leading one by doubling it.
    lead = "\n" if s.startswith("\n") else ""
    return f"[{eq}[{lead}{s}{close}"


def _lua_quoted(s: str) -> str:
    escaped = (
        s.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\0", "\\000")
    )
    return f'"{escaped}"'


def _lua_literal(name: str, value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # upstream quotes read_queue (one of three plain words) and long-brackets every other string
        return f'"{value}"' if name == "read_queue" else _lua_long_string(value)
    return str(value)


def render_runtime_cfg(cfg_text: str, settings: Assignments, sandbox: Assignments) -> str:
    """The `.rtc` text: the plugin's own cfg, then what Hindsight assigns over it (its global
    `settings`, then the `sandbox` settings), in upstream's line format."""
    lines = ["-- original configuration", cfg_text, "-- Hindsight defaults and overrides"]
    lines += [f"{k} = {_lua_literal(k, v)}" for k, v in settings]
    lines += ["", "-- Sandbox defaults and overrides"]
    lines += [f"{k} = {_lua_literal(k, v)}" for k, v in sandbox]
    lines.append("-- end Hindsight configuration")
    return "\n".join(lines) + "\n"
