"""A cfg chunk run in a bare Lua state, and what it evaluates to: its values read key by key with
Hindsight's checks (`CfgTable`), or all of them as Python data (`globals_as_python`).

hindsight.cfg and plugin .cfg files are both Lua 5.1 chunks run in a bare state, exactly as
Hindsight runs them: no standard library at all, so a cfg can only compute with literals,
operators, table constructors, locals and globals it assigned itself. Every error is a
`ConfigError` whose text names the file and the offending key, so the user can fix the cfg from
the one log line.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hindsight_py._lupa import LuaError, interpreted_runtime, lua

__all__ = [
    "UINT_MAX",
    "BareLua",
    "CfgTable",
    "ChunkError",
    "ConfigError",
    "decode_text",
    "encode_text",
    "globals_as_python",
    "lua_type",
]

UINT_MAX = 4294967295
_UINT8_MAX = 255

# A cfg only assigns a handful of values; these caps turn a runaway loop or a
# string-doubling accident into an error instead of a hung or OOM-killed start.
_INSTRUCTION_CAP = 10_000_000
_MEMORY_CAP = 128 * 1024 * 1024

# Control characters as escapes (tab stays): a cfg value with a newline in it, quoted in an
# error, must not split the error over several log lines.
_LINE_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127) if c != 9} | {10: "\\n", 13: "\\r"}


class ConfigError(Exception):
    """A cfg that cannot be used. `str()` is the single log line Hindsight prints."""

    def __init__(self, file: str | os.PathLike[str], reason: str, key: str | None = None) -> None:
        self.file = os.fspath(file).translate(_LINE_ESCAPES)
        self.key = key
        self.reason = reason.translate(_LINE_ESCAPES)
        super().__init__(f"loading {self.file} failed: {self.reason}")


# Lua shortens long chunk names to "...<tail>", so chunks run under this short name and the
# file's full path is put back into the message afterwards.
_CHUNK = b"cfg"

_RUNNER = """
local loadstring, setfenv, pcall, error, sethook = loadstring, setfenv, pcall, error, debug.sethook
-- A bare Hindsight state has no string library, so strings have no methods either.
debug.setmetatable("", nil)
return function(text, chunkname, env, limit, compile_only)
  local fn, err = loadstring(text, chunkname)
  if not fn then return false, err end
  if compile_only then return true, nil end
  setfenv(fn, env)
  sethook(function() error("instruction limit exceeded", 2) end, "", limit)
  local ok, msg = pcall(fn)
  sethook()
  return ok, msg
end
"""


def decode_text(b: bytes) -> str:
    """Lua string bytes as text."""
    # surrogateescape keeps non-UTF-8 bytes intact all the way into the .rtc text.
    return b.decode("utf-8", "surrogateescape")


def encode_text(s: str) -> bytes:
    """Text back to the Lua string bytes it came from."""
    return s.encode("utf-8", "surrogateescape")


class BareLua:
    """One private Lua state used to run one cfg chunk with an empty global table."""

    def __init__(self) -> None:
        self.runtime = interpreted_runtime(encoding=None, register_eval=False, register_builtins=False,
                                           max_memory=_MEMORY_CAP)
        self._run = self.runtime.execute(_RUNNER)

    def run(self, text: str, chunkname: str) -> Any:
        """Run the chunk and return its global table, or raise `ChunkError`."""
        env = self.runtime.table()
        try:
            ok, msg = self._run(encode_text(text), b"=" + _CHUNK, env, _INSTRUCTION_CAP, False)
        except LuaError as e:  # out of memory surfaces here
            raise ChunkError(str(e)) from None
        if not ok:
            raise ChunkError(_lua_message(msg, chunkname))
        return env

    def compile_error(self, text: str, chunkname: str) -> str | None:
        ok, msg = self._run(encode_text(text), b"=" + _CHUNK, None, 0, True)
        return None if ok else _lua_message(msg, chunkname)


class ChunkError(Exception):
    pass


def _lua_message(msg: Any, chunkname: str) -> str:
    if msg is None:
        return "not enough memory"
    text = decode_text(msg) if isinstance(msg, bytes) else str(msg)
    prefix = _CHUNK.decode() + ":"
    return chunkname + text[len(prefix) - 1 :] if text.startswith(prefix) else text


def _lua_tostring(value: Any) -> str | None:
    """Lua's lua_tolstring: strings as they are, numbers as "%.14g", anything else None."""
    if isinstance(value, bytes):
        return decode_text(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return _format_g14(value)
    return None


def _format_g14(n: int | float) -> str:
    f = float(n)
    if math.isnan(f):
        return "nan" if math.copysign(1, f) > 0 else "-nan"
    return format(f, ".14g")


def lua_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, bytes):
        return "string"
    return lua.lua_type(value) or type(value).__name__


def globals_as_python(table: Any, file: str, warnings: list[str]) -> dict[str, Any]:
    """An evaluated global table as Python data: strings as str, numbers and booleans as they are,
    tables as dicts (lists when their keys are 1..n). Any other value is dropped, with a warning."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = decode_text(k) if isinstance(k, bytes) else str(k)
        converted = _to_python(v, key, file, warnings, set())
        if converted is not _DROP:
            out[key] = converted
    return out


_DROP = object()


def _to_python(value: Any, where: str, file: str, warnings: list[str], seen: set[int]) -> Any:
    kind = lua_type(value)
    if kind == "string":
        return decode_text(value)
    if kind in ("number", "boolean"):
        return value
    if kind != "table":
        warnings.append(f"{where}: dropped a {kind} value (only strings, numbers, booleans and tables are kept)")
        return _DROP
    ident = id(value)
    if ident in seen:
        raise ConfigError(file, f"{where} contains a reference cycle", where.split(".", 1)[0].split("[", 1)[0])
    seen = seen | {ident}
    items: dict[Any, Any] = {}
    for k, v in value.items():
        if isinstance(k, bytes):
            key: Any = decode_text(k)
            sub = f"{where}.{key}"
        elif isinstance(k, int | float) and not isinstance(k, bool):
            key = k
            sub = f"{where}[{_format_g14(k)}]"
        else:
            warnings.append(f"{where}: dropped an entry with a {lua_type(k)} key")
            continue
        converted = _to_python(v, sub, file, warnings, seen)
        if converted is not _DROP:
            items[key] = converted
    n = len(items)
    if n and all(isinstance(k, int) and not isinstance(k, bool) for k in items) and set(items) == set(
        range(1, n + 1)
    ):
        return [items[i] for i in range(1, n + 1)]
    return items


class CfgTable:
    """An evaluated cfg table (the globals, or a table in them), consumed key by key like
    Hindsight's validation does: each read checks the Lua type and range, with Hindsight's texts."""

    def __init__(self, table: Any, file: str, parent: str | None = None) -> None:
        self.file = file
        self.parent = parent
        self.items: dict[Any, Any] = {}
        for k, v in table.items():
            self.items[decode_text(k) if isinstance(k, bytes) else k] = v

    def qualified(self, key: str) -> str:
        return f"{self.parent}.{key}" if self.parent else key

    def fail(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, reason, self.qualified(key) if key else self.parent)

    def take(self, key: str) -> Any:
        return self.items.pop(key, None)

    def unsigned(self, key: str, default: int) -> int:
        return self._number(key, default, UINT_MAX, "an unsigned int")

    def uint8(self, key: str, default: int) -> int:
        return self._number(key, default, _UINT8_MAX, "a uint8_t")

    def _number(self, key: str, default: int, maximum: int, kind: str) -> int:
        value = self.take(key)
        if value is None:
            return default
        if lua_type(value) != "number":
            raise self.fail(key, f"{key} must be set to a number")
        # NaN passes upstream's range check and becomes garbage; we reject it.
        if math.isnan(value) or value < 0 or value > maximum:
            raise self.fail(key, f"{key} must be {kind}")
        return int(value)  # fractions truncate, as the C cast does

    def boolean(self, key: str, default: bool) -> bool:
        value = self.take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            # Upstream says "preserve_data must be set to a bool" whatever the key is;
            # we name the key the user actually got wrong.
            raise self.fail(key, f"{key} must be set to a bool")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.take(key)
        text = _lua_tostring(value)
        if text is None:
            # Upstream silently falls back to the default for a boolean or a table when the
            # key has one; a value of the wrong type is always a mistake, so we report it.
            if value is None and default is not None:
                return default
            raise self.fail(key, f"{key} must be set to a string")
        return text

    def option(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.take(key)
        if value is None:
            return default
        if not isinstance(value, bytes):  # no number coercion here, as upstream
            raise self.fail(key, f"{key} must be set to a string")
        text = decode_text(value)
        if text not in options:
            raise self.fail(key, f"{key} invalid option {text}")
        return text

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        """A hindsight-py key with a few string values: the error names them."""
        value = self.take(key)
        if value is None:
            return default
        allowed = " or ".join(f'"{o}"' for o in options)
        text = decode_text(value) if isinstance(value, bytes) else None
        if text not in options:
            shown = f'"{text}"' if text is not None else f"a {lua_type(value)}"
            raise self.fail(key, f"{self.qualified(key)} must be {allowed}, not {shown}")
        return text

    def reject_unknown(self) -> None:
        for key in sorted(self.items, key=lambda k: (not isinstance(k, str), str(k))):
            if not isinstance(key, str):
                where = f" in '{self.parent}'" if self.parent else ""
                raise ConfigError(self.file, f"non string key{where}", self.parent)
            raise self.fail(key, f"invalid option: '{self.qualified(key)}'")
