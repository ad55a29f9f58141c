"""`hindsight.cp`: reading and atomically rewriting the checkpoint file in Hindsight's own syntax.

The file is a Lua chunk of `_G['<key>'] = <value>` lines, so an existing `output_path` written by
Hindsight resumes here and ours resumes there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from hindsight_py._lupa import LuaError, interpreted_runtime

__all__ = ["CheckpointError", "load_checkpoints", "render_checkpoints", "save_checkpoints"]

# hindsight.cp holds a few lines per plugin; the caps only stop a corrupt file from hanging startup.
_INSTRUCTION_CAP = 10_000_000
_MEMORY_CAP = 256 * 1024 * 1024

# Lua shortens long chunk names to "...<tail>", so errors are reported under this short name
# and the prefix is swapped for the full path afterwards.
_CHUNK = b"hindsight.cp"

_RUNNER = """
local loadstring, setfenv, pcall, error, sethook = loadstring, setfenv, pcall, error, debug.sethook
return function(text, chunkname, limit)
  local fn, err = loadstring(text, chunkname)
  if not fn then return false, err end
  local env = {}
  env._G = env  -- the only name Hindsight's checkpoint state provides
  setfenv(fn, env)
  sethook(function() error("instruction limit exceeded", 2) end, "", limit)
  local ok, msg = pcall(fn)
  sethook()
  if not ok then return false, msg end
  env._G = nil
  return true, env
end
"""


class CheckpointError(Exception):
    """hindsight.cp cannot be read. Fatal at startup, as in Hindsight."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"loading {self.path} failed: {reason}")


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def load_checkpoints(path: str | os.PathLike[str]) -> dict[str, str | float]:
    """The checkpoints in `path`; {} if the file does not exist.

    Only string keys with string or number values are checkpoints (Hindsight writes nothing
    else back), so anything else a hand-edited file assigns is ignored.
    """
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CheckpointError(path, e.strerror or str(e)) from None

    runtime = interpreted_runtime(encoding=None, register_eval=False, register_builtins=False,
                                  max_memory=_MEMORY_CAP)
    try:
        ok, result = runtime.execute(_RUNNER)(text, b"=" + _CHUNK, _INSTRUCTION_CAP)
    except LuaError as e:  # out of memory
        raise CheckpointError(path, str(e)) from None
    if not ok:
        msg = _decode(result) if isinstance(result, bytes) else str(result)
        if msg.startswith(_CHUNK.decode() + ":"):
            msg = os.fspath(path) + msg[len(_CHUNK) :]
        raise CheckpointError(path, msg)

    values: dict[str, str | float] = {}
    for key, value in result.items():
        if not isinstance(key, bytes):
            continue
        if isinstance(value, bytes):
            values[_decode(key)] = _decode(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[_decode(key)] = float(value)
    return values


def _lua_string(s: str) -> str:
    # Upstream (hs_output_lua_string) escapes \n \r " and backslash, but not the ' that
    # delimits the string, so a value containing ' makes a file Hindsight itself cannot load.
    # We write \' there; everything without a ' comes out byte-identical to upstream's.
    # NUL never reached upstream's output (C strings); \000 keeps it loadable here.
    return (
        s.replace("\\", "\\\\")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace('"', '\\"')
        .replace("'", "\\'")
        .replace("\0", "\\000")
    )


def _lua_number(n: float) -> str:
    if math.isfinite(n):
        return format(n, ".17g")  # upstream's %.17g: doubles read back bit-exact
    # C writes inf/nan, which Lua reads as undefined globals (nil): the checkpoint would
    # silently vanish. These expressions evaluate to the same values in a bare state.
    if math.isnan(n):
        return "0/0"
    return "1/0" if n > 0 else "-1/0"


def render_checkpoints(values: Mapping[str, str | float]) -> str:
    """The text of a checkpoint file, one line per key in the mapping's order."""
    lines = []
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint key must be a str, not {type(key).__name__}")
        if isinstance(value, str):
            rendered = f"'{_lua_string(value)}'"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rendered = _lua_number(float(value))
        else:
            raise TypeError(f"checkpoint {key!r} must be a str or a number, not {type(value).__name__}")
        lines.append(f"_G['{_lua_string(key)}'] = {rendered}\n")
    return "".join(lines)


def save_checkpoints(path: str | os.PathLike[str], values: Mapping[str, str | float]) -> None:
    """Replace `path` with `values`, atomically: readers see the old file or the new, never half."""
    data = render_checkpoints(values).encode("utf-8", "surrogateescape")
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable, so a power cut cannot bring back an older checkpoint.
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
