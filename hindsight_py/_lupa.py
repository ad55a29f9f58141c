"""The one place that imports lupa.

Debian's LPeg, cjson and LuaSocket are C modules linked against the Lua API
symbols that lupa's extension module carries. They only resolve when lupa is
loaded with RTLD_GLOBAL, so every import of lupa must come through here.

The flavour is LuaJIT 2.1 (the Lua 5.1 language lua_sandbox speaks, several
times faster). Its count hook does not fire inside compiled traces, so under an
instruction limit a plugin's own code is kept out of the compiler and runs in
LuaJIT's interpreter, where the limit holds (sandbox/limits.lua).
HINDSIGHT_PY_LUA=lua51 selects PUC Lua 5.1 instead. Mixing flavours in one process crashes, so the
choice is made once, here, for the whole process.
"""

import importlib
import os
import subprocess
import sys
import sysconfig
from typing import Any

FLAVOURS = ("luajit21", "lua51")
FLAVOUR = os.environ.get("HINDSIGHT_PY_LUA") or FLAVOURS[0]
if FLAVOUR not in FLAVOURS:
    raise SystemExit(f"HINDSIGHT_PY_LUA must be one of {', '.join(FLAVOURS)}, not {FLAVOUR!r}")

_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
try:
    lua = importlib.import_module(f"lupa.{FLAVOUR}")
finally:
    sys.setdlopenflags(_flags)

#: The Lua version whose C modules the flavour loads: LuaJIT 2.1 speaks Lua 5.1's C API.
LUA_VERSION = {"luajit21": "5.1", "lua51": "5.1"}[FLAVOUR]
#: Variables that replace the search paths below; ';;' in them stands for the default, as in LUA_CPATH.
CPATH_VARIABLE = "HINDSIGHT_PY_LUA_CPATH"
PATH_VARIABLE = "HINDSIGHT_PY_LUA_PATH"


def multiarch() -> str | None:
    """This Python's multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu, ...): the directory
    under /usr/lib where Debian and Ubuntu install C libraries for its architecture. None where
    neither Python, dpkg nor gcc knows one (not a multiarch system)."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    if triplet:
        return str(triplet)
    for command in (["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], ["gcc", "-print-multiarch"]):
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return None


def default_cpath(triplet: str | None, version: str = LUA_VERSION) -> str:
    """Where lua-lpeg, lua-cjson and lua-socket put their C modules: Debian's multiarch directory,
    then the usual non-multiarch ones (LuaRocks' /usr/local, other distributions' /usr/lib)."""
    dirs = [f"/usr/lib/{triplet}/lua/{version}"] if triplet else []
    dirs += [f"/usr/local/lib/lua/{version}", f"/usr/lib/lua/{version}"]
    return ";".join(f"{d}/?.so" for d in dirs)


def default_path(version: str = LUA_VERSION) -> str:
    """Where the pure-Lua halves of those packages go (re.lua, socket.lua, ltn12.lua, mime.lua)."""
    return f"/usr/share/lua/{version}/?.lua;/usr/share/lua/{version}/?/init.lua;/usr/local/share/lua/{version}/?.lua"


def search_path(variable: str, default: str) -> str:
    """`variable` from the environment when set (';;' in it becomes the default), else the default."""
    value = os.environ.get(variable)
    if not value:
        return default
    return value.replace(";;", f";{default};")


#: Where the sandbox's `require` looks for the C modules LPeg, cjson and LuaSocket.
SYSTEM_LUA_CPATH = search_path(CPATH_VARIABLE, default_cpath(multiarch()))
#: Where it looks for their pure-Lua halves.
SYSTEM_LUA_PATH = search_path(PATH_VARIABLE, default_path())

LuaRuntime = lua.LuaRuntime
LuaError = lua.LuaError
LuaSyntaxError = lua.LuaSyntaxError
LuaMemoryError = getattr(lua, "LuaMemoryError", lua.LuaError)



def interpreted_runtime(**kwargs: Any) -> Any:
    """A LuaRuntime whose code is never compiled by LuaJIT, so that a count hook (an instruction
    cap) reaches every loop. For the small chunks of configuration and checkpoint files."""
    runtime = LuaRuntime(**kwargs)
    runtime.execute("if jit then jit.off() jit.flush() end")
    return runtime


__all__ = ["lua", "FLAVOUR", "interpreted_runtime", "LuaRuntime", "LuaError", "LuaSyntaxError", "LuaMemoryError", "SYSTEM_LUA_CPATH",
           "SYSTEM_LUA_PATH", "LUA_VERSION", "CPATH_VARIABLE", "PATH_VARIABLE", "multiarch", "default_cpath",
           "default_path", "search_path"]
