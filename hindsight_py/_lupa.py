"""The one place that imports lupa.

Debian's LPeg, cjson and LuaSocket are C modules linked against the Lua API
symbols that lupa's extension module carries. They only resolve when lupa is
loaded with RTLD_GLOBAL, so every import of lupa must come through here.

The flavour is LuaJIT 2.1 (the Lua 5.1 language lua_sandbox speaks, several
times faster). Its count hook does not fire inside compiled traces, so under an
instruction limit a plugin's own code is kept out of the compiler and runs in
LuaJIT's interpreter, where the limit holds (sandbox/env.lua).
HINDSIGHT_PY_LUA=lua51 selects PUC Lua 5.1 instead. Mixing flavours in one process crashes, so the
choice is made once, here, for the whole process.
"""

import importlib
import os
import sys
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

#: Where Debian installs the Lua 5.1 C modules (lua-lpeg, lua-cjson, lua-socket); LuaJIT loads them too.
SYSTEM_LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/local/lib/lua/5.1/?.so"
#: Where Debian installs their pure-Lua halves (re.lua, socket.lua, ltn12.lua, mime.lua).
SYSTEM_LUA_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;/usr/local/share/lua/5.1/?.lua"

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
           "SYSTEM_LUA_PATH"]
