"""The one place that imports lupa.

Debian's LPeg, cjson and LuaSocket are C modules linked against the Lua API
symbols that lupa's extension module carries. They only resolve when lupa is
loaded with RTLD_GLOBAL, so every import of lupa must come through here.
Mixing Lua flavours in one process crashes, so the flavour is fixed: PUC Lua
5.1 (the only one where the instruction limit is exact and setfenv exists).
"""

import os
import sys

_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
try:
    import lupa.lua51 as lua  # noqa: E402
finally:
    sys.setdlopenflags(_flags)

#: Where Debian installs the Lua 5.1 C modules (lua-lpeg, lua-cjson, lua-socket).
SYSTEM_LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/local/lib/lua/5.1/?.so"
#: Where Debian installs their pure-Lua halves (re.lua, socket.lua, ltn12.lua, mime.lua).
SYSTEM_LUA_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;/usr/local/share/lua/5.1/?.lua"

LuaRuntime = lua.LuaRuntime
LuaError = lua.LuaError
LuaSyntaxError = lua.LuaSyntaxError
LuaMemoryError = getattr(lua, "LuaMemoryError", lua.LuaError)

__all__ = ["lua", "LuaRuntime", "LuaError", "LuaSyntaxError", "LuaMemoryError", "SYSTEM_LUA_CPATH", "SYSTEM_LUA_PATH"]
