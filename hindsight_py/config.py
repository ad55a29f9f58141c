"""hindsight.cfg and plugin .cfg files: validation and defaults, the loaded configurations.

Both are evaluated in a bare Lua state (config_lua); this module checks what they assigned, key by
key with Hindsight's texts, and merges a plugin's cfg over its type's defaults. What Hindsight
assigns after a plugin's cfg is one list: rendered as the `.rtc` text for Lua plugins
(config_rtc), handed over as data to Python plugins (`PluginConfig.runtime_values`).
"""

from __future__ import annotations

import copy
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hindsight_py.config_lua import (
    UINT_MAX,
    BareLua,
    CfgTable,
    ChunkError,
    ConfigError,
    decode_text,
    encode_text,
    globals_as_python,
    lua_type,
)
from hindsight_py.config_rtc import Assignments, render_runtime_cfg
from hindsight_py.config_yaml import YAML_SUFFIXES, YamlConfigError, is_yaml, yaml_to_lua
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

_PLUGIN_EXTENSIONS = {".lua": "lua", ".py": "python"}

DefaultValue = int | bool | str


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
    metrics_address: str = ""  # hindsight-py: "host:port" of the Prometheus endpoint (metrics.py), "" = off

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
    """A cfg's Lua text; a `.yaml` file's is made from its YAML (config_yaml.py)."""
    try:
        text = decode_text(path.read_bytes())
    except OSError as e:
        raise ConfigError(shown, f"cannot open {shown}: {e.strerror}") from None
    if is_yaml(path.name):
        try:
            return yaml_to_lua(text, shown)
        except YamlConfigError as e:
            raise ConfigError(shown, str(e)) from None
    return text


def load_hindsight_config(path: str | os.PathLike[str], log_level: int = 6) -> HindsightConfig:
    """Evaluate and validate hindsight.cfg (same checks, order and texts as Hindsight)."""
    shown = os.fspath(path)
    text = _read_text(Path(path), shown)
    try:
        g = CfgTable(BareLua().run(text, shown), shown)
    except ChunkError as e:
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
    if len(encode_text(hostname)) > MAX_HOSTNAME:
        hostname = decode_text(encode_text(hostname)[:MAX_HOSTNAME])
        warnings.append(f"the configured hostname was truncated to: {hostname}")
    threads = g.uint8("analysis_threads", 1)
    if not 1 <= threads <= MAX_ANALYSIS_THREADS:
        raise g.fail("analysis_threads", f"analysis_threads must be 1-{MAX_ANALYSIS_THREADS}")

    metrics_address = g.string("metrics_address", "")
    host, _, port = metrics_address.rpartition(":")
    if metrics_address and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise g.fail("metrics_address", f"metrics_address must be 'host:port', not '{metrics_address}'")
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
        metrics_address=metrics_address,
    )


def _load_sandbox_defaults(g: CfgTable, plugin_type: str) -> dict[str, DefaultValue]:
    key = f"{plugin_type}_defaults"
    table = g.take(key)
    if lua_type(table) != "table":
        raise g.fail(key, f"{key} must be a table")
    d = CfgTable(table, g.file, parent=key)
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
        return render_runtime_cfg(self.cfg_text, *_hindsight_assignments(self))

    def runtime_values(self) -> dict[str, Any]:
        """What the runtime cfg evaluates to, as Python data (a Python plugin's ``read_config``):
        the cfg's own values, then Hindsight's assignments over them. A fresh copy each call."""
        settings, sandbox = _hindsight_assignments(self)
        return {**copy.deepcopy(self.values), **dict(settings), **dict(sandbox)}


def _plugin_cfg_stem(file_name: str) -> str:
    """The plugin name part of a cfg file's name ("" when it is not one: .cfg, .yaml, .yml)."""
    for suffix in (".cfg", *YAML_SUFFIXES):
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)]
    return ""


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
        cfgs = [p for p in entries if _plugin_cfg_stem(p.name) and p.is_file()]
        stems = [_plugin_cfg_stem(p.name) for p in cfgs]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:  # x.cfg and x.yaml: which one is the plugin?
            both = " and ".join(p.name for p in cfgs if _plugin_cfg_stem(p.name) == twice[0])
            raise ConfigError(directory / f"{twice[0]}.cfg", f"{plugin_type}.{twice[0]} has two configurations: {both}")
        found.extend(cfgs)
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
    stem = _plugin_cfg_stem(cfg_file.name)
    if not stem:
        raise ConfigError(shown, "a plugin cfg file name must end in .cfg (or .yaml)")
    name = f"{plugin_type}.{stem}"
    text = _read_text(cfg_file, shown)
    lua = BareLua()
    try:
        table = lua.run(text, shown)
    except ChunkError as e:
        raise ConfigError(shown, str(e)) from None

    warnings: list[str] = []
    values = globals_as_python(table, shown, warnings)
    g = CfgTable(table, shown)
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


def _hindsight_assignments(p: PluginConfig) -> tuple[Assignments, Assignments]:
    """What Hindsight assigns after a plugin's own cfg, in upstream's order: its global settings,
    then the sandbox's. The `.rtc` text renders these; a Python plugin's config takes them as data."""
    hs = p.hs
    settings: Assignments = [("Hostname", hs.hostname), ("Pid", p.pid), ("log_level", p.log_level)]
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
    sandbox: Assignments = [
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


def write_runtime_cfg(plugin: PluginConfig, output_path: str | os.PathLike[str]) -> Path:
    """Write `<output_path>/<name>.rtc` (through a temp file, so a crash never leaves half of one)."""
    target = Path(output_path) / f"{plugin.name}.rtc"
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_bytes(encode_text(plugin.runtime_cfg))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def previous_analysis_thread(hs: HindsightConfig, name: str) -> int | None:
    """The thread an analysis plugin ran on last time, from its old `.rtc` (None if unknown)."""
    rtc = hs.output_dir / f"{name}.rtc"
    try:
        text = decode_text(rtc.read_bytes())
        g = BareLua().run(text, str(rtc))
    except (OSError, ChunkError):
        return None
    thread = g[b"thread"]
    if lua_type(thread) != "number" or math.isnan(thread) or not 0 <= thread < UINT_MAX:
        return None
    return int(thread)
