"""The Python halves of hindsight-py's stand-ins for lua_sandbox_extensions' C modules: the ones
whose C library has a maintained Python binding. Each is handed to the Lua sandbox as a host
function (None when its optional package is not installed: the Lua half then fails `require`
with the pip command), called once per check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def libinjection_check() -> Callable[[bytes, bytes], tuple[bool, bytes]] | None:
    """libinjection's SQLi and XSS detection (the `libinjection-python` package, libinjection's C):
    check(b"sqli" | b"xss", text) -> (detected, SQLi fingerprint). None without the package."""
    try:
        libinjection = importlib.import_module("libinjection")
    except ImportError:
        return None
    is_sql_injection, is_xss = libinjection.is_sql_injection, libinjection.is_xss

    def check(kind: bytes, text: bytes) -> tuple[bool, bytes]:
        # the binding takes str and encodes it as UTF-8: the same bytes for UTF-8 text
        s = text.decode("utf-8", "replace")
        if kind == b"xss":
            return bool(is_xss(s)["is_xss"]), b""
        result = is_sql_injection(s)
        return bool(result["is_sqli"]), result["fingerprint"].encode()

    return check
