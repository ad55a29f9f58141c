"""hindsight.cfg and plugin .cfg files: evaluation, validation, defaults and the `.rtc` text.

Both kinds of file are Lua 5.1 chunks run in a bare state, exactly as Hindsight runs them: no
standard library at all, so a cfg can only compute with literals, operators, table constructors,
locals and globals it assigned itself. Every error is a `ConfigError` whose text names the file
and the offending key, so the user can fix the cfg from the one log line.
"""

from __future__ import annotations

import copy
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hindsight_py._lupa import LuaError, interpreted_runtime, lua
from hindsight_py.matcher import MatcherError, compile_matcher

__all__ = [
    "PLUGIN_TYPES",
    "ConfigError",
    "HindsightConfig",
    "PluginConfig",
    "discover_plugin_configs",
    "load_hindsight_config",
    "load_plugin_config",
    "previous_analysis_thread",
    "write_runtime_cfg",
]

PLUGIN_TYPES = ("input", "analysis", "output")
READ_QUEUES = ("both", "input", "analysis")
DEFAULT_INSTALL_PATH = "/usr/share/luasandbox/sandboxes/heka"
MAX_ANALYSIS_THREADS = 64
MAX_HOSTNAME = 64
UINT_MAX = 4294967295
UINT8_MAX = 255

# A cfg only assigns a handful of values; these caps turn a runaway loop or a
# string-doubling accident into an error instead of a hung or OOM-killed start.
_INSTRUCTION_CAP = 10_000_000
_MEMORY_CAP = 128 * 1024 * 1024

_PLUGIN_EXTENSIONS = {".lua": "lua", ".py": "python"}

Scalar = int | float | str | bool
DefaultValue = int | bool | str


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


# --------------------------------------------------------------------------- bare Lua evaluation

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


def _decode(b: bytes) -> str:
    # surrogateescape keeps non-UTF-8 bytes intact all the way into the .rtc text.
    return b.decode("utf-8", "surrogateescape")


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _BareLua:
    """One private Lua state used to run one cfg chunk with an empty global table."""

    def __init__(self) -> None:
        self.runtime = interpreted_runtime(encoding=None, register_eval=False, register_builtins=False,
                                           max_memory=_MEMORY_CAP)
        self._run = self.runtime.execute(_RUNNER)

    def run(self, text: str, chunkname: str) -> Any:
        """Run the chunk and return its global table, or raise `_ChunkError`."""
        env = self.runtime.table()
        try:
            ok, msg = self._run(_encode(text), b"=" + _CHUNK, env, _INSTRUCTION_CAP, False)
        except LuaError as e:  # out of memory surfaces here
            raise _ChunkError(str(e)) from None
        if not ok:
            raise _ChunkError(_lua_message(msg, chunkname))
        return env

    def compile_error(self, text: str, chunkname: str) -> str | None:
        ok, msg = self._run(_encode(text), b"=" + _CHUNK, None, 0, True)
        return None if ok else _lua_message(msg, chunkname)


class _ChunkError(Exception):
    pass


def _lua_message(msg: Any, chunkname: str) -> str:
    if msg is None:
        return "not enough memory"
    text = _decode(msg) if isinstance(msg, bytes) else str(msg)
    prefix = _CHUNK.decode() + ":"
    return chunkname + text[len(prefix) - 1 :] if text.startswith(prefix) else text


def _lua_tostring(value: Any) -> str | None:
    """Lua's lua_tolstring: strings as they are, numbers as "%.14g", anything else None."""
    if isinstance(value, bytes):
        return _decode(value)
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


def _lua_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, bytes):
        return "string"
    return lua.lua_type(value) or type(value).__name__


class _Globals:
    """The evaluated global table, consumed key by key like Hindsight's validation does."""

    def __init__(self, table: Any, file: str, parent: str | None = None) -> None:
        self.file = file
        self.parent = parent
        self.items: dict[Any, Any] = {}
        for k, v in table.items():
            self.items[_decode(k) if isinstance(k, bytes) else k] = v

    def qualified(self, key: str) -> str:
        return f"{self.parent}.{key}" if self.parent else key

    def fail(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, reason, self.qualified(key) if key else self.parent)

    def take(self, key: str) -> Any:
        return self.items.pop(key, None)

    def unsigned(self, key: str, default: int) -> int:
        return self._number(key, default, UINT_MAX, "an unsigned int")

    def uint8(self, key: str, default: int) -> int:
        return self._number(key, default, UINT8_MAX, "a uint8_t")

    def _number(self, key: str, default: int, maximum: int, kind: str) -> int:
        value = self.take(key)
        if value is None:
            return default
        if _lua_type(value) != "number":
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
        text = _decode(value)
        if text not in options:
            raise self.fail(key, f"{key} invalid option {text}")
        return text

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        """A hindsight-py key with a few string values: the error names them."""
        value = self.take(key)
        if value is None:
            return default
        allowed = " or ".join(f'"{o}"' for o in options)
        text = _decode(value) if isinstance(value, bytes) else None
        if text not in options:
            shown = f'"{text}"' if text is not None else f"a {_lua_type(value)}"
            raise self.fail(key, f"{self.qualified(key)} must be {allowed}, not {shown}")
        return text

    def reject_unknown(self) -> None:
        for key in sorted(self.items, key=lambda k: (not isinstance(k, str), str(k))):
            if not isinstance(key, str):
                where = f" in '{self.parent}'" if self.parent else ""
                raise ConfigError(self.file, f"non string key{where}", self.parent)
            raise self.fail(key, f"invalid option: '{self.qualified(key)}'")


# --------------------------------------------------------------------------- hindsight.cfg

_SANDBOX_BUILTINS: dict[str, DefaultValue] = {
    "output_limit": 64 * 1024,
    "memory_limit": 8 * 1024 * 1024,
    "instruction_limit": 1_000_000,
    "ticker_interval": 0,
    "preserve_data": False,
    "restricted_headers": True,
    "shutdown_on_terminate": False,
    # hindsight-py: what becomes of a message inject_message/inject_payload refuses (docs/compatibility.md)
    "refused_messages": "dead_letter",
}
REFUSED_MESSAGES = ("dead_letter", "drop")
_TYPE_BUILTINS: dict[str, dict[str, DefaultValue]] = {
    "input": {**_SANDBOX_BUILTINS, "restricted_headers": False},
    "analysis": {**_SANDBOX_BUILTINS, "process_message_inject_limit": 0, "timer_event_inject_limit": 10},
    "output": {
        **_SANDBOX_BUILTINS,
        "restricted_headers": False,
        "remove_checkpoints_on_terminate": False,
        "read_queue": "both",
    },
}
_UNSIGNED_KEYS = (
    "output_limit",
    "memory_limit",
    "instruction_limit",
    "ticker_interval",
    "process_message_inject_limit",
    "timer_event_inject_limit",
    "async_buffer_size",
)


@dataclass(frozen=True)
class HindsightConfig:
    """A validated hindsight.cfg. Path values are kept as written (relative to `base_dir`)."""

    path: Path
    base_dir: Path  # the working directory at load time: what relative paths are relative to
    output_path: str
    output_size: int
    sandbox_load_path: str
    sandbox_run_path: str
    sandbox_install_path: str
    analysis_threads: int
    analysis_utilization_limit: int
    analysis_lua_path: str
    analysis_lua_cpath: str
    io_lua_path: str
    io_lua_cpath: str
    max_message_size: int
    backpressure: int
    backpressure_disk_free: int
    hostname: str
    input_defaults: dict[str, DefaultValue]
    analysis_defaults: dict[str, DefaultValue]
    output_defaults: dict[str, DefaultValue]
    log_level: int = 6
    warnings: tuple[str, ...] = ()

    def resolve(self, path: str) -> Path:
        return self.base_dir / path

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output_path)

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.sandbox_run_path)

    @property
    def install_dir(self) -> Path:
        return self.resolve(self.sandbox_install_path)

    def defaults_for(self, plugin_type: str) -> dict[str, DefaultValue]:
        return {
            "input": self.input_defaults,
            "analysis": self.analysis_defaults,
            "output": self.output_defaults,
        }[plugin_type]


def _read_text(path: Path, shown: str) -> str:
    try:
        return _decode(path.read_bytes())
    except OSError as e:
        raise ConfigError(shown, f"cannot open {shown}: {e.strerror}") from None


def load_hindsight_config(path: str | os.PathLike[str], log_level: int = 6) -> HindsightConfig:
    """Evaluate and validate hindsight.cfg (same checks, order and texts as Hindsight)."""
    shown = os.fspath(path)
    text = _read_text(Path(path), shown)
    try:
        g = _Globals(_BareLua().run(text, shown), shown)
    except _ChunkError as e:
        raise ConfigError(shown, str(e)) from None
    warnings: list[str] = []

    max_message_size = g.unsigned("max_message_size", 64 * 1024)
    if max_message_size < 1024:
        raise g.fail("max_message_size", "max_message_size must be > 1023")
    output_path = g.string("output_path")
    output_size = g.unsigned("output_size", 64 * 1024 * 1024)
    backpressure = g.unsigned("backpressure", 0)
    backpressure_disk_free = g.unsigned("backpressure_disk_free", 4)
    load_path = g.string("sandbox_load_path", "")
    utilization = g.uint8("analysis_utilization_limit", 95)
    if utilization > 100:
        raise g.fail("analysis_utilization_limit", "analysis_utilization_limit must be 0-100")
    run_path = g.string("sandbox_run_path")
    install_path = g.string("sandbox_install_path", DEFAULT_INSTALL_PATH)
    io_lua_path = g.string("io_lua_path")
    io_lua_cpath = g.string("io_lua_cpath")
    analysis_lua_path = g.string("analysis_lua_path")
    analysis_lua_cpath = g.string("analysis_lua_cpath")
    hostname = g.string("hostname", socket.gethostname())
    if len(_encode(hostname)) > MAX_HOSTNAME:
        hostname = _decode(_encode(hostname)[:MAX_HOSTNAME])
        warnings.append(f"the configured hostname was truncated to: {hostname}")
    threads = g.uint8("analysis_threads", 1)
    if not 1 <= threads <= MAX_ANALYSIS_THREADS:
        raise g.fail("analysis_threads", f"analysis_threads must be 1-{MAX_ANALYSIS_THREADS}")

    defaults = {t: _load_sandbox_defaults(g, t) for t in PLUGIN_TYPES}
    if any(max_message_size < d["output_limit"] for d in defaults.values()):  # type: ignore[operator]
        raise g.fail(
            "max_message_size",
            "max_message_size must be greater than or equal to the sandbox output_limit",
        )
    g.reject_unknown()

    base_dir = Path.cwd()
    for sub in PLUGIN_TYPES:
        _require_dir(shown, "sandbox_run_path", base_dir, run_path, sub)
        if load_path:
            _require_dir(shown, "sandbox_load_path", base_dir, load_path, sub)

    return HindsightConfig(
        path=Path(path),
        base_dir=base_dir,
        output_path=output_path,
        output_size=output_size,
        sandbox_load_path=load_path,
        sandbox_run_path=run_path,
        sandbox_install_path=install_path,
        analysis_threads=threads,
        analysis_utilization_limit=utilization,
        analysis_lua_path=analysis_lua_path,
        analysis_lua_cpath=analysis_lua_cpath,
        io_lua_path=io_lua_path,
        io_lua_cpath=io_lua_cpath,
        max_message_size=max_message_size,
        backpressure=backpressure,
        backpressure_disk_free=backpressure_disk_free,
        hostname=hostname,
        input_defaults=defaults["input"],
        analysis_defaults=defaults["analysis"],
        output_defaults=defaults["output"],
        log_level=log_level,
        warnings=tuple(warnings),
    )


def _load_sandbox_defaults(g: _Globals, plugin_type: str) -> dict[str, DefaultValue]:
    key = f"{plugin_type}_defaults"
    table = g.take(key)
    if _lua_type(table) != "table":
        raise g.fail(key, f"{key} must be a table")
    d = _Globals(table, g.file, parent=key)
    result = dict(_TYPE_BUILTINS[plugin_type])
    for name, default in result.items():
        if name == "read_queue":
            result[name] = d.option(name, str(default), READ_QUEUES)
        elif name == "refused_messages":
            result[name] = d.choice(name, str(default), REFUSED_MESSAGES)
        elif isinstance(default, bool):
            result[name] = d.boolean(name, default)
        else:
            result[name] = d.unsigned(name, int(default))
    # message_matcher, thread, filename and async_buffer_size are per plugin only:
    # they are unknown here and rejected with the rest.
    d.reject_unknown()
    return result


def _require_dir(file: str, key: str, base_dir: Path, root: str, sub: str) -> None:
    shown = os.path.join(root, sub)
    if not (base_dir / shown).is_dir():
        raise ConfigError(file, f"{key}: {shown}: directory does not exist", key)


# --------------------------------------------------------------------------- plugin .cfg


@dataclass
class PluginConfig:
    """A validated plugin cfg, merged over its type's defaults.

    `values` holds every key of the cfg as Python data; the named fields are the keys Hindsight
    itself interprets. Set `assigned_thread` (analysis) before rendering `runtime_cfg`.
    """

    name: str
    type: str
    cfg_path: Path
    filename: str
    source_path: Path
    language: str
    output_limit: int
    memory_limit: int
    instruction_limit: int
    ticker_interval: int
    preserve_data: bool
    restricted_headers: bool
    shutdown_on_terminate: bool
    message_matcher: str | None
    thread: int | None  # as configured; None means "not pinned"
    process_message_inject_limit: int
    timer_event_inject_limit: int
    async_buffer_size: int
    remove_checkpoints_on_terminate: bool
    read_queue: str
    refused_messages: str  # "dead_letter" | "drop"
    values: dict[str, Any]
    cfg_text: str
    hs: HindsightConfig
    log_level: int
    pid: int
    warnings: list[str] = field(default_factory=list)
    assigned_thread: int | None = None

    @property
    def thread_id(self) -> int | None:
        """The analysis thread this plugin runs on, if pinned or assigned."""
        if self.assigned_thread is not None:
            return self.assigned_thread
        if self.thread is not None:
            return self.thread % self.hs.analysis_threads
        return None

    @property
    def rtc_path(self) -> Path:
        return self.hs.output_dir / f"{self.name}.rtc"

    @property
    def runtime_cfg(self) -> str:
        """The cfg a Lua sandbox evaluates: the original text, then Hindsight's assignments."""
        return _render_runtime_cfg(self)

    def runtime_values(self) -> dict[str, Any]:
        """What the runtime cfg evaluates to, as Python data (a Python plugin's ``read_config``):
        the cfg's own values, then Hindsight's assignments over them. A fresh copy each call."""
        settings, sandbox = _hindsight_assignments(self)
        return {**copy.deepcopy(self.values), **dict(settings), **dict(sandbox)}


def discover_plugin_configs(hs: HindsightConfig) -> list[Path]:
    """The plugin cfgs under `<run>/{input,analysis,output}`, in that order, sorted by name."""
    found: list[Path] = []
    for plugin_type in PLUGIN_TYPES:
        directory = hs.run_dir / plugin_type
        try:
            entries = sorted(directory.iterdir())
        except OSError as e:
            raise ConfigError(
                hs.path,
                f"sandbox_run_path: {os.path.join(hs.sandbox_run_path, plugin_type)}: {e.strerror}",
                "sandbox_run_path",
            ) from None
        found.extend(p for p in entries if len(p.name) > 4 and p.name.endswith(".cfg") and p.is_file())
    return found


def load_plugin_config(
    cfg_path: str | os.PathLike[str],
    plugin_type: str,
    hs: HindsightConfig,
    log_level: int | None = None,
    pid: int | None = None,
) -> PluginConfig:
    """Evaluate and validate one plugin cfg. `log_level` defaults to the hindsight.cfg load's level."""
    if plugin_type not in PLUGIN_TYPES:
        raise ValueError(f"unknown plugin type: {plugin_type!r}")
    shown = os.fspath(cfg_path)
    cfg_file = Path(cfg_path).absolute()
    if not cfg_file.name.endswith(".cfg") or len(cfg_file.name) <= 4:
        raise ConfigError(shown, "a plugin cfg file name must end in .cfg")
    name = f"{plugin_type}.{cfg_file.name[:-4]}"
    text = _read_text(cfg_file, shown)
    lua = _BareLua()
    try:
        table = lua.run(text, shown)
    except _ChunkError as e:
        raise ConfigError(shown, str(e)) from None

    warnings: list[str] = []
    values = _to_python_globals(table, shown, warnings)
    g = _Globals(table, shown)
    d = hs.defaults_for(plugin_type)

    limits = {k: g.unsigned(k, int(d[k])) for k in _UNSIGNED_KEYS[:4]}
    filename = g.string("filename")
    if "/" in filename or "\\" in filename:
        raise g.fail("filename", "filename must not contain a path component")
    language = _PLUGIN_EXTENSIONS.get(os.path.splitext(filename)[1])
    if language is None or len(filename) <= len(os.path.splitext(filename)[1]):
        # Upstream's text is ".lua must have a filename extension" (arguments swapped).
        raise g.fail("filename", f"filename must have a .lua or .py extension: {filename}")
    flags = {k: g.boolean(k, bool(d[k])) for k in ("preserve_data", "restricted_headers", "shutdown_on_terminate")}

    message_matcher = None
    if plugin_type != "input":
        message_matcher = g.string("message_matcher")
        _check_matcher(shown, message_matcher)

    thread = None
    pm_limit, te_limit = 0, 10  # meaningful for analysis only
    if plugin_type == "analysis":
        thread = g.unsigned("thread", UINT_MAX)
        thread = None if thread == UINT_MAX else thread
        pm_limit = g.unsigned("process_message_inject_limit", int(d["process_message_inject_limit"]))
        te_limit = g.unsigned("timer_event_inject_limit", int(d["timer_event_inject_limit"]))

    refused_messages = g.choice("refused_messages", str(d["refused_messages"]), REFUSED_MESSAGES)

    async_buffer_size, rm_cp, read_queue = 0, False, "both"
    if plugin_type == "output":
        async_buffer_size = g.unsigned("async_buffer_size", 0)
        rm_cp = g.boolean("remove_checkpoints_on_terminate", bool(d["remove_checkpoints_on_terminate"]))
        read_queue = g.option("read_queue", str(d["read_queue"]), READ_QUEUES)

    plugin = PluginConfig(
        name=name,
        type=plugin_type,
        cfg_path=cfg_file,
        filename=filename,
        source_path=_find_source(shown, name, plugin_type, filename, cfg_file.parent, hs),
        language=language,
        **limits,
        **flags,
        message_matcher=message_matcher,
        thread=thread,
        process_message_inject_limit=pm_limit,
        timer_event_inject_limit=te_limit,
        async_buffer_size=async_buffer_size,
        remove_checkpoints_on_terminate=rm_cp,
        read_queue=read_queue,
        refused_messages=refused_messages,
        values=values,
        cfg_text=text,
        hs=hs,
        log_level=hs.log_level if log_level is None else log_level,
        pid=os.getpid() if pid is None else pid,
        warnings=warnings,
    )
    # A cfg ending in `return ...` evaluates fine alone but cannot take the appended
    # assignments; upstream only finds out when the sandbox fails to start.
    err = lua.compile_error(plugin.runtime_cfg, f"{name}.rtc")
    if err is not None:
        raise ConfigError(shown, f"the runtime cfg does not compile (does the cfg end with a return?): {err}")
    return plugin


def _check_matcher(file: str, expr: str) -> None:
    try:
        compile_matcher(expr)
    except MatcherError as e:
        # Upstream logs "<name> invalid message_matcher: <expr>" and quietly skips the plugin;
        # we refuse to start so the mistake cannot go unnoticed.
        detail = str(e).removeprefix("invalid message_matcher: ")
        raise ConfigError(file, f"invalid message_matcher: {expr} ({detail})", "message_matcher") from None


def _bundled_plugins_dir() -> Path:
    import importlib.util

    try:
        spec = importlib.util.find_spec("hindsight_py.plugins")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # Running from a source checkout: plugins/ sits next to the package.
    return Path(__file__).resolve().parent.parent / "plugins"


def _find_source(file: str, name: str, plugin_type: str, filename: str, cfg_dir: Path, hs: HindsightConfig) -> Path:
    # The run dir is the cfg's own directory, as upstream (they are the same for discovered cfgs).
    for candidate in (
        cfg_dir / filename,
        hs.install_dir / plugin_type / filename,
        _bundled_plugins_dir() / filename,
    ):
        if candidate.is_file():
            return candidate
    raise ConfigError(file, f"{name} failed to find the specified filename: {filename}", "filename")


def _to_python_globals(table: Any, file: str, warnings: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = _decode(k) if isinstance(k, bytes) else str(k)
        converted = _to_python(v, key, file, warnings, set())
        if converted is not _DROP:
            out[key] = converted
    return out


_DROP = object()


def _to_python(value: Any, where: str, file: str, warnings: list[str], seen: set[int]) -> Any:
    kind = _lua_type(value)
    if kind == "string":
        return _decode(value)
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
            key: Any = _decode(k)
            sub = f"{where}.{key}"
        elif isinstance(k, int | float) and not isinstance(k, bool):
            key = k
            sub = f"{where}[{_format_g14(k)}]"
        else:
            warnings.append(f"{where}: dropped an entry with a {_lua_type(k)} key")
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


# --------------------------------------------------------------------------- runtime cfg (.rtc)


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


def _hindsight_assignments(p: PluginConfig) -> tuple[list[tuple[str, Scalar]], list[tuple[str, Scalar]]]:
    """What Hindsight assigns after a plugin's own cfg, in upstream's order: its global settings,
    then the sandbox's. The `.rtc` text renders these; a Python plugin's config takes them as data."""
    hs = p.hs
    settings: list[tuple[str, Scalar]] = [("Hostname", hs.hostname), ("Pid", p.pid), ("log_level", p.log_level)]
    if p.type == "analysis":
        settings += [("path", hs.analysis_lua_path), ("cpath", hs.analysis_lua_cpath)]
    else:
        settings += [
            ("path", hs.io_lua_path),
            ("cpath", hs.io_lua_cpath),
            ("output_path", hs.output_path),
            ("output_size", hs.output_size),
            ("max_message_size", hs.max_message_size),
            ("sandbox_load_path", hs.sandbox_load_path),
            ("sandbox_run_path", hs.sandbox_run_path),
            ("sandbox_install_path", hs.sandbox_install_path),
        ]
    sandbox: list[tuple[str, Scalar]] = [
        ("Logger", p.name),
        ("output_limit", p.output_limit),
        ("memory_limit", p.memory_limit),
        ("instruction_limit", p.instruction_limit),
        ("ticker_interval", p.ticker_interval),
        ("preserve_data", p.preserve_data),
        ("restricted_headers", p.restricted_headers),
        ("shutdown_on_terminate", p.shutdown_on_terminate),
    ]
    if p.type == "analysis":
        thread = p.thread_id
        sandbox += [
            # UINT_MAX is upstream's "not assigned"; a later start then ignores this file's thread.
            ("thread", UINT_MAX if thread is None else thread),
            ("process_message_inject_limit", p.process_message_inject_limit),
            ("timer_event_inject_limit", p.timer_event_inject_limit),
        ]
    if p.type == "output":
        sandbox += [
            ("async_buffer_size", p.async_buffer_size),
            ("remove_checkpoints_on_terminate", p.remove_checkpoints_on_terminate),
            ("read_queue", p.read_queue),
        ]
    return settings, sandbox


def _lua_literal(name: str, value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # upstream quotes read_queue (one of three plain words) and long-brackets every other string
        return f'"{value}"' if name == "read_queue" else _lua_long_string(value)
    return str(value)


def _render_runtime_cfg(p: PluginConfig) -> str:
    settings, sandbox = _hindsight_assignments(p)
    lines = ["-- original configuration", p.cfg_text, "-- Hindsight defaults and overrides"]
    lines += [f"{k} = {_lua_literal(k, v)}" for k, v in settings]
    lines += ["", "-- Sandbox defaults and overrides"]
    lines += [f"{k} = {_lua_literal(k, v)}" for k, v in sandbox]
    lines.append("-- end Hindsight configuration")
    return "\n".join(lines) + "\n"


def write_runtime_cfg(plugin: PluginConfig, output_path: str | os.PathLike[str]) -> Path:
    """Write `<output_path>/<name>.rtc` (through a temp file, so a crash never leaves half of one)."""
    target = Path(output_path) / f"{plugin.name}.rtc"
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_bytes(_encode(plugin.runtime_cfg))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def previous_analysis_thread(hs: HindsightConfig, name: str) -> int | None:
    """The thread an analysis plugin ran on last time, from its old `.rtc` (None if unknown)."""
    rtc = hs.output_dir / f"{name}.rtc"
    try:
        text = _decode(rtc.read_bytes())
        g = _BareLua().run(text, str(rtc))
    except (OSError, _ChunkError):
        return None
    thread = g[b"thread"]
    if _lua_type(thread) != "number" or math.isnan(thread) or not 0 <= thread < UINT_MAX:
        return None
    return int(thread)
