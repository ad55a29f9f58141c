"""Configuration in YAML: `hindsight.yaml` and `<type>/<name>.yaml` plugin files.

A YAML file holds the same keys as its Lua counterpart. It is turned into Lua cfg text and then
loaded exactly as a `.cfg` is (config.py), so the keys, defaults, validation and error messages
are the Lua cfg's, and a plugin's `.rtc` stays Lua. What YAML cannot say is a Lua expression
(`io_lua_path = analysis_lua_path .. ";..."`): write the resulting value. `hindsight-py convert`
goes between the two forms (the Lua side evaluated, so expressions become their values; comments
do not survive).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

# pyyaml is imported where a YAML file is read or written: every plugin process imports config,
# and most setups have no YAML, so its import (about 10 ms) would only slow each start.

YAML_SUFFIXES = (".yaml", ".yml")
_LUA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LUA_KEYWORDS = frozenset(
    "and break do else elseif end false for function if in local nil not or repeat return then true until "
    "while".split()
)


class YamlConfigError(ValueError):
    """A YAML file that is not a configuration; str() says where."""


def is_yaml(path: str) -> bool:
    return path.endswith(YAML_SUFFIXES)


def yaml_to_lua(text: str, shown: str) -> str:
    """The Lua cfg text that assigns the YAML mapping's keys."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise YamlConfigError(f"{shown}: {_yaml_problem(e)}") from None
    if data is None:
        return ""
    if not isinstance(data, dict):
        raise YamlConfigError(f"{shown}: the file must be a mapping of keys to values, not a {type(data).__name__}")
    lines = []
    for key, value in data.items():
        if not isinstance(key, str) or not _is_name(key):
            raise YamlConfigError(f"{shown}: {key!r} is not a configuration key (a Lua name)")
        if value is not None:  # `key:` alone, as `key = nil`: the default
            lines.append(f"{key} = {_lua_value(value, shown, key)}")
    return "\n".join(lines) + "\n"


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def _is_name(text: str) -> bool:
    return bool(_LUA_NAME.fullmatch(text)) and text not in _LUA_KEYWORDS


def _lua_value(value: Any, shown: str, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "0/0"
        if math.isinf(value):
            return "1/0" if value > 0 else "-1/0"
        return repr(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, list):
        return "{" + ", ".join(_lua_value(v, shown, f"{where}[{i + 1}]") for i, v in enumerate(value)) + "}"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise YamlConfigError(f"{shown}: {where}: key {k!r} must be a string or an integer")
            if v is None:
                continue
            key = k if isinstance(k, str) and _is_name(k) else f"[{_lua_value(k, shown, where)}]"
            items.append(f"{key} = {_lua_value(v, shown, f'{where}.{k}')}")
        return "{" + ", ".join(items) + "}"
    raise YamlConfigError(f"{shown}: {where}: a {type(value).__name__} has no Lua counterpart")


def lua_string(text: str) -> str:
    """A Lua 5.1 string literal of `text` (UTF-8), every control byte escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\{ord(ch):03d}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def values_to_yaml(values: dict[str, Any], order: list[str]) -> str:
    """A configuration's values (as the Lua cfg evaluates) as YAML, keys in `order` first."""
    import yaml

    ranked = {k: i for i, k in enumerate(order)}
    ordered = dict(sorted(values.items(), key=lambda kv: (ranked.get(kv[0], len(ranked)), kv[0])))
    return yaml.safe_dump(_plain(ordered), sort_keys=False, allow_unicode=True, default_flow_style=False)


def _plain(value: Any) -> Any:
    """Lua tables that are sequences (1..n) as lists, the rest as mappings; bytes as text."""
    if isinstance(value, dict):
        if value and all(isinstance(k, int) for k in value) and sorted(value) == list(range(1, len(value) + 1)):
            return [_plain(value[i]) for i in range(1, len(value) + 1)]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


def assignment_order(lua_text: str) -> list[str]:
    """The top-level keys in the order a Lua cfg first assigns them."""
    seen: dict[str, None] = {}
    for m in re.finditer(r"(?m)^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)", lua_text):
        seen.setdefault(m.group(1))
    return list(seen)


__all__ = ["YAML_SUFFIXES", "YamlConfigError", "assignment_order", "is_yaml", "lua_string", "values_to_yaml",
           "yaml_to_lua"]
