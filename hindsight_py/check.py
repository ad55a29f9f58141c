"""`hindsight-py check hindsight.cfg`: every cfg loaded and every plugin compiled, nothing run.

Where the daemon stops at the first bad cfg, this goes on and reports them all, one line each
(`file: key: reason`, or `file: reason` when no single key is to blame), so that one pass fixes a
setup. The plugins' sources are compiled only: their top-level code, which could open files or
sockets, does not run. Exit status 0 when everything loads, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hindsight_py._lupa import LuaRuntime
from hindsight_py.config import (
    PLUGIN_TYPES,
    ConfigError,
    HindsightConfig,
    PluginConfig,
    discover_plugin_configs,
    load_hindsight_config,
    load_plugin_config,
)
from hindsight_py.config_yaml import YAML_SUFFIXES

_LUA_COMPILER = "return function(source, name) local f, err = loadstring(source, name); return err end"


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}" if self.key else f"{self.file}: {self.reason}"


def _from_config_error(e: ConfigError) -> Problem:
    reason = e.reason
    if e.key and reason.startswith(e.key + " "):
        reason = reason[len(e.key) + 1:]  # "output_path must be set" says the key already
    return Problem(e.file, reason, e.key)


def check(cfg_path: str) -> tuple[list[Problem], list[PluginConfig]]:
    """Every problem of the setup, and the plugins that loaded."""
    try:
        hs = load_hindsight_config(cfg_path)
    except ConfigError as e:
        return [_from_config_error(e)], []
    problems: list[Problem] = []
    plugins: list[PluginConfig] = []
    try:
        cfgs = discover_plugin_configs(hs)
    except ConfigError as e:
        return [_from_config_error(e)], []
    cfgs += _load_path_cfgs(hs)
    compile_lua = LuaRuntime(encoding=None).execute(_LUA_COMPILER)
    for path in cfgs:
        shown = _shown(path, hs)
        try:
            plugin = load_plugin_config(shown, path.parent.name, hs)
        except ConfigError as e:
            problems.append(_from_config_error(e))
            continue
        plugins.append(plugin)
        problem = _compile(plugin, hs, compile_lua)
        if problem is not None:
            problems.append(problem)
    return problems, plugins


def _load_path_cfgs(hs: HindsightConfig) -> list[Path]:
    """Plugin cfgs waiting in sandbox_load_path/<type>/ (the daemon would start them next)."""
    if not hs.sandbox_load_path:
        return []
    found: list[Path] = []
    for plugin_type in PLUGIN_TYPES:
        directory = hs.resolve(hs.sandbox_load_path) / plugin_type
        if directory.is_dir():
            found += sorted(p for p in directory.iterdir() if p.name.endswith((".cfg", *YAML_SUFFIXES))
                            and p.is_file())
    return found


def _compile(plugin: PluginConfig, hs: HindsightConfig, compile_lua: Callable[[bytes, bytes], object]) -> Problem | None:
    shown = str(_shown(plugin.source_path, hs))
    try:
        source = plugin.source_path.read_bytes()
    except OSError as e:
        return Problem(shown, f"cannot read the plugin's source: {e.strerror}")
    if plugin.language == "python":
        try:
            compile(source, shown, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            line = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
            return Problem(shown, f"does not compile{line}: {e.msg if isinstance(e, SyntaxError) else e}")
        return None
    err = compile_lua(source, b"@" + shown.encode())
    if err is not None:
        text = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
        return Problem(shown, f"does not compile: {text}")
    return None


def _shown(path: Path, hs: HindsightConfig) -> Path:
    try:
        return path.relative_to(hs.base_dir)
    except ValueError:
        return path


def main(args: list[str]) -> int:
    if len(args) != 1 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: hindsight-py check <hindsight.cfg>\n")
        return 0 if args and args[0] in ("-h", "--help") else 1
    problems, plugins = check(args[0])
    for problem in problems:
        sys.stdout.write(f"{problem}\n")
    if problems:
        files = len({p.file for p in problems})
        sys.stdout.write(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {files} "
                         f"file{'s' if files > 1 else ''}\n")
        return 1
    sys.stdout.write(f"{os.fspath(args[0])}: ok, {len(plugins)} plugin{'s' if len(plugins) != 1 else ''}\n")
    return 0


__all__ = ["Problem", "check", "main"]
