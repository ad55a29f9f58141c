"""A Lua plugin in its own lupa runtime, inside lua_sandbox's environment.

The environment itself, the message codec and the per-message loops are Lua
(env.lua and the parts it loads, heka_pb.lua): Python hands over whole batches and
collects whole batches, so a message never costs a Python<->Lua crossing of its own.

The runtime is the boundary (docs/security.md): its real globals become the plugin's
globals, the Python callables below reach Lua only behind Lua functions (env.lua's
guard), and no Lua code may read or write an attribute of a Python object.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from hindsight_py._lupa import SYSTEM_LUA_CPATH, SYSTEM_LUA_PATH, LuaError, LuaMemoryError, LuaRuntime
from hindsight_py.message import random_uuids
from hindsight_py.sandbox.base import BatchResult, PluginError
from hindsight_py.sandbox.python_standins import libinjection_check

_HERE = Path(__file__).resolve().parent
BUNDLED_LUA_PATH = str(_HERE.parent / "lua" / "?.lua") + ";" + str(_HERE.parent / "lua" / "?" / "init.lua")


def _read(name: str) -> str:
    return resources.files("hindsight_py.sandbox").joinpath(name).read_text()


@functools.cache
def _host_sources() -> dict[bytes, bytes]:
    """The text of the sandbox's Lua files by name: env.lua loads the parts it names from these."""
    files = resources.files("hindsight_py.sandbox").iterdir()
    return {f.name.encode(): f.read_bytes() for f in files if f.name.endswith(".lua")}


def preload() -> None:
    """Read what every Lua sandbox reads first (3-6 ms), for the processes forked afterwards to
    inherit (sandbox.preload)."""
    _host_sources()


class SandboxHost(Protocol):
    """What a sandbox needs from the runner that hosts it."""

    def write_messages(self, data: bytes, count: int) -> None: ...
    def checkpoint(self, value: float | bytes) -> None: ...
    def is_running(self) -> bool: ...
    def log(self, level: int, text: str) -> None: ...
    def inject_input(self, framed: bytes) -> None: ...
    def commit_processed(self) -> None: ...
    def create_matcher(self, expr: str) -> Callable[[bytes], bool] | None: ...
    def dead_letter(self, reason: str, data: bytes) -> None: ...
    # optional: refused messages (plugin_host.PluginHost.refused)
    # def refused(self, reason: str, message: Any, offset: Any) -> bool: ...
    # def settle_refused(self, next_offset: Any) -> None: ...
    # optional: the Lua code of outputs (outputs/extension.py), loaded into the runtime
    # def lua_extensions(self) -> list[LuaExtension]: ...


class LuaExtension(Protocol):
    """Lua code an output ships (outputs/extension.LuaExtension): a chunk modules.lua runs as host code
    with its functions, which returns the modules it provides and the modules it wraps."""

    name: str
    source: str
    functions: dict[str, Callable[..., Any]]


class LuaSandbox:
    """One plugin's runtime, driven by the runner through the Sandbox interface (sandbox/__init__.py).

    A test harness that needs more than the runner does (tests/lua_harness.py: upstream's C test
    API) extends it by subclassing, through three members only: `_callables()`, to hand env.lua host
    hooks that hindsight-py's hosts leave unset (upstream's inject_callback and
    update_checkpoint_callback); `_control`, env.lua's control table (control.lua), whose functions
    under "for test harnesses" the runner never calls; and `_lift_memory_limit()`, due after any
    such call.
    Plugin code reaches none of them.
    """

    def __init__(
        self,
        *,
        name: str,
        plugin_type: str,
        source_path: Path,
        runtime_cfg: str,
        path: str,
        cpath: str,
        host: SandboxHost,
        logger: str | None,
        hostname: str,
        pid: int,
        log_level: int,
        output_limit: int,
        memory_limit: int,
        instruction_limit: int,
        restricted_headers: bool,
        max_message_size: int,
        async_buffer_size: int = 0,
        preserve_data: bool = False,
        state_path: Path | None = None,
        refused_messages: str = "dead_letter",
    ) -> None:
        self._preserve_data = preserve_data
        self._state_path = state_path
        self.name = name
        self.plugin_type = plugin_type
        self.source_path = source_path
        self._host = host
        self._memory_limit = memory_limit
        self._instruction_limit = instruction_limit
        self._settings = dict(
            plugin_type=plugin_type, name=name, path=path, cpath=cpath, logger=logger, hostname=hostname,
            pid=pid, log_level=log_level, output_limit=output_limit, restricted_headers=restricted_headers,
            max_message_size=max_message_size, runtime_cfg=runtime_cfg, async_buffer_size=async_buffer_size,
            refused_messages=refused_messages,
        )
        self._build()

    # -- the runtime, in named steps ----------------------------------------------------------
    def _build(self) -> None:
        """A fresh Lua runtime with the sandbox environment, the plugin not loaded yet."""
        self._rt = self._new_runtime()
        self._host_exception: BaseException | None = None
        self._control = self._run_environment(self._host_table())
        self._bind_control()

    def _new_runtime(self) -> LuaRuntime:
        # no Python builtins, no attribute access from Lua; max_memory=0 makes lupa count the state's
        # memory without a cap (the cap is set around plugin calls: _set_memory_limit)
        return LuaRuntime(
            encoding=None,
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            attribute_handlers=(_no_attribute, _no_attribute),
            max_memory=0 if self._memory_limit else None,
        )

    def _callables(self) -> dict[str, Callable[..., Any] | None]:
        """The Python functions env.lua gets (None: not for this plugin); Lua reaches each one only
        behind env.lua's guard."""
        host = self._host
        plugin_type = self._settings["plugin_type"]
        return {
            "log": self._log_from_lua,
            "memory_limit": self._set_memory_limit if self._memory_limit else None,
            "now_ns": time.time_ns,
            "random_uuids": lambda n: random_uuids(int(n)),
            "flush": self._flush_from_lua,
            "is_running": host.is_running,
            "inject_input": getattr(host, "inject_input", None),  # None: an output without inject_message
            "commit_now": host.commit_processed,
            "create_matcher": self._create_matcher,
            "erf": math.erf,
            "erfc": math.erfc,
            "dead_letter": self._dead_letter_from_lua,
            # io.popen where lupa's PUC Lua 5.1 has only a stub (inputs and outputs; modules.lua)
            "popen_read": _popen_read if plugin_type != "analysis" else None,
            "popen_write": _popen_write if plugin_type != "analysis" else None,
            # refused messages, when the host keeps them (SandboxHost)
            "refused": self._refused_from_lua if hasattr(host, "refused") else None,
            "settle_refused": self._settle_from_lua,
            # the Python halves of C module stand-ins (sandbox/python_standins.py)
            "libinjection": libinjection_check(),
        }

    def _host_table(self) -> Any:
        """env.lua's `host`: the callables, each reporting what it raises, and the settings."""
        extensions = getattr(self._host, "lua_extensions", list)()
        return _bytes_table(
            self._rt,
            {
                **{k: self._reporting(f) for k, f in self._callables().items()},
                **self._settings,
                "bundled_path": BUNDLED_LUA_PATH,
                "system_path": SYSTEM_LUA_PATH,
                "system_cpath": SYSTEM_LUA_CPATH,
                "instruction_limit": self._instruction_limit,
                "extensions": self._rt.table_from([self._extension_table(x) for x in extensions]),
            },
        )

    def _run_environment(self, host_table: Any) -> Any:
        """Run env.lua, which makes the runtime's globals the plugin's; its control table."""
        env_chunk = self._rt.compile(_read("env.lua"), name="=hindsight-py:env.lua")  # env.lua: HOST_SOURCE
        try:
            return env_chunk(host_table, self._rt.table_from(_host_sources()))
        except LuaError as e:
            raise PluginError(f"loading the runtime configuration failed: {_text(e)}") from None

    def _bind_control(self) -> None:
        # what every batch calls, looked up once
        control, host = self._control, self._host
        self._run_batch = control.run_batch
        self._run_input = control.run_input
        self._run_timer = control.run_timer
        # outputs: the files the plugin writes, flushed before each commit (message_read.lua)
        self._flush_files = control.flush_files if self._settings["plugin_type"] == "output" else _nothing
        self._write = host.write_messages
        self._checkpoint = host.checkpoint
        self._host_running = host.is_running

    # -- callbacks from Lua -------------------------------------------------------------------
    def _log_from_lua(self, level: int, text: bytes) -> None:
        self._host.log(int(level), text.decode("utf-8", "replace"))

    def _flush_from_lua(self, data: bytes, count: int, cp: Any, has_cp: bool) -> tuple[bool, int]:
        if count:
            self._write(data, int(count))
        if has_cp:
            # a string checkpoint (tail.lua's "inode:offset") is kept as text, as hindsight.cp holds it
            self._checkpoint(cp.decode("utf-8", "surrogateescape") if isinstance(cp, bytes) else cp)
        return self._host_running(), time.time_ns()

    def _dead_letter_from_lua(self, reason: bytes, data: bytes) -> None:
        self._host.dead_letter(reason.decode("utf-8", "replace"), data)

    def _refused_from_lua(self, reason: bytes, msg: Any, offset: Any) -> bool:
        # a protobuf string stays bytes; a message table becomes a dict (its strings as text)
        message = msg if isinstance(msg, bytes) else lua_to_python(msg)
        return bool(self._host.refused(reason.decode("utf-8", "replace"), message, lua_to_python(offset)))

    def _settle_from_lua(self, next_offset: Any) -> None:
        self._host.settle_refused(lua_to_python(next_offset))

    def _create_matcher(self, expr: bytes) -> Any:
        m = self._host.create_matcher(expr.decode("utf-8", "surrogateescape"))
        return m

    def _extension_table(self, ext: LuaExtension) -> Any:
        """An output's Lua extension as modules.lua loads it: its functions get Lua tables as Python
        values (strings stay bytes) and report what they raise, as the host's own callables."""

        def taking_tables(f: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                return f(*(a if isinstance(a, (bytes, int, float, bool)) or a is None else lua_to_python(a)
                           for a in args))

            return call

        functions = {k.encode(): self._reporting(taking_tables(f)) for k, f in ext.functions.items()}
        return self._rt.table_from({b"name": ext.name.encode(), b"source": ext.source.encode(),
                                    b"functions": self._rt.table_from(functions)})

    # The memory limit holds while Lua runs plugin code (env.lua turns it on and off around each
    # call) and never while Python has control: lupa's own work outside a protected call (the
    # arguments, the results) must never meet a full state, or Lua aborts the whole process.
    def _set_memory_limit(self, on: bool) -> None:
        self._rt.set_max_memory(self._memory_cap if on else 0, total=True)

    def _lift_memory_limit(self) -> None:
        if self._memory_limit:
            self._rt.set_max_memory(0)

    def _reporting(self, f: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """f, remembering what it raises: Lua only ever sees the text (env.lua's guard)."""
        if f is None:
            return None

        def call(*args: Any) -> Any:
            try:
                return f(*args)
            except BaseException as e:
                self._host_exception = e
                raise

        return call

    def _raise_host_exception(self) -> None:
        """A Python exception of the host that ended a Lua call goes on as itself."""
        exc, self._host_exception = self._host_exception, None
        if exc is not None:
            raise exc

    # -- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Run the plugin's top-level chunk under its limits, then restore its preserved state."""
        self._load_chunk()
        if self._preserve_data and self._state_path and self._state_path.exists():
            try:  # with the limits off, as lua_sandbox restores
                ok, err = self._control.restore_state(str(self._state_path).encode())
            except LuaError as e:
                ok, err = False, f"restore_global_data {_text(e)}"
            if not ok:
                # upstream: the state that cannot be restored is removed and the plugin created once more
                self._host.log(3, f"{_text(err)}; {self._state_path.name} removed, starting without it")
                self._state_path.unlink(missing_ok=True)
                self._build()
                self._load_chunk()

    def _load_chunk(self) -> None:
        self._control.set_instruction_limit(self._instruction_limit)
        # lua_sandbox does not count its own libraries; only what the plugin allocates
        self._memory_cap = self._rt.get_memory_used(total=True) + self._memory_limit if self._memory_limit else 0
        self._host_exception = None
        try:
            ok, err = self._control.load_plugin(str(self.source_path).encode())
        except LuaError as e:
            self._raise_host_exception()
            ok, err = False, _text(e)
        finally:
            self._lift_memory_limit()
        if not ok:
            raise PluginError(_text(err))

    def run_input(self, checkpoint: Any) -> tuple[int, str | None]:
        self._host_exception = None
        try:
            if isinstance(checkpoint, str):  # the runtime has no encoding: Lua strings are bytes
                checkpoint = checkpoint.encode("utf-8", "surrogateescape")
            good, rc, msg = (*self._run_input(checkpoint), None)[:3]
        except LuaError as e:
            self._raise_host_exception()
            raise PluginError(f"process_message() {_text(e)}") from None
        finally:
            self._lift_memory_limit()
        if not good:
            raise PluginError(_text(rc))
        return int(rc), _text(msg) if msg is not None else None

    def run_batch(self, raws: Sequence[bytes], inject_limit: int = -1) -> BatchResult:
        t = self._rt.table_from(raws)
        self._host_exception = None
        try:
            processed, status, err, commit, failures, batching = self._run_batch(t, len(raws), inject_limit)
        except LuaError as e:
            self._raise_host_exception()
            return BatchResult(0, "terminate", f"process_message() {_text(e)}", 0, 0, False)
        finally:
            self._lift_memory_limit()
            self._flush_files()  # the runner commits next: what the plugin wrote must be in its files
        return BatchResult(
            int(processed),
            status.decode(),
            _text(err) if err is not None else None,
            int(commit),
            int(failures),
            bool(batching),
        )

    def run_timer(self, ns: int, shutdown: bool, inject_limit: int = -1) -> None:
        self._host_exception = None
        try:
            ok, err = self._run_timer(ns, shutdown, inject_limit)
        except LuaError as e:
            self._raise_host_exception()
            ok, err = False, f"timer_event() {_text(e)}"
        finally:
            self._lift_memory_limit()
            self._flush_files()
        if not ok:
            raise PluginError(_text(err))

    def memory_used(self) -> int:
        """Bytes the Lua state holds (plugins.tsv's Current Memory); 0 when memory_limit = 0 (lupa
        counts only with a limit)."""
        return int(self._rt.get_memory_used(total=True) or 0) if self._memory_limit else 0

    def seq_counter(self) -> int:
        return int(self._control.seq_counter())

    def save_state(self) -> None:
        """preserve_data: write the plugin's globals in lua_sandbox's .data format.

        Raises PluginError when they cannot be written; the old .data is then removed, as upstream.
        """
        if not (self._preserve_data and self._state_path):
            return
        try:  # with the limits off, as lua_sandbox saves
            text, err = self._control.serialize_state()
        except LuaError as e:
            text, err = None, _text(e)
        if text is None:
            self._state_path.unlink(missing_ok=True)
            raise PluginError(_text(err))
        tmp = self._state_path.with_suffix(".data.tmp")
        tmp.write_bytes(text)
        os.replace(tmp, self._state_path)

    def take_acks(self) -> list[int]:
        acks = self._control.take_acks()
        return [] if acks is None else [int(v) for v in acks.values()]

    def set_ticker(self, seconds: int, inject_limit: int = -1) -> None:
        """Fire timer_event on data time inside batches (hindsight_cli's semantics)."""
        self._control.set_ticker(seconds, inject_limit)

    def data_now(self) -> int:
        """The newest message time seen by the data-time timer, in whole seconds (0: none yet)."""
        return int(self._control.data_now())


def _popen_read(cmd: bytes) -> tuple[bool, bytes]:
    """io.popen(cmd, "r") where the Lua has none: the command's whole standard output."""
    try:
        done = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, check=False)
    except OSError as e:
        return False, f"{cmd.decode(errors='replace')}: {e.strerror}".encode()
    return True, done.stdout


def _popen_write(cmd: bytes, data: bytes) -> tuple[bool, bytes | None]:
    """io.popen(cmd, "w") where the Lua has none: the command runs at close, fed what was written."""
    try:
        subprocess.run(cmd, shell=True, input=data, check=False)
    except OSError as e:
        return False, f"{cmd.decode(errors='replace')}: {e.strerror}".encode()
    return True, None


def _nothing() -> None:
    pass


def _no_attribute(obj: Any, name: Any, *value: Any) -> Any:
    # lupa's attribute handlers: Lua code never reads or writes an attribute of a Python object
    raise AttributeError("Python attributes are not accessible from Lua")


def _bytes_table(rt: LuaRuntime, d: dict[str, Any]) -> Any:
    # the runtime runs with encoding=None: Lua only sees bytes as strings
    return rt.table_from({k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in d.items()})


def lua_to_python(v: Any) -> Any:
    """A Lua value as plain Python: bytes become str, tables become dicts (or lists for 1..n keys)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if hasattr(v, "items") and callable(v.items):
        d = {lua_to_python(k): lua_to_python(val) for k, val in v.items()}
        if d and all(isinstance(k, int) for k in d) and sorted(d) == list(range(1, len(d) + 1)):
            return [d[i] for i in range(1, len(d) + 1)]
        return d
    return v


def _text(v: Any) -> str:
    if isinstance(v, LuaMemoryError):
        # raised when even the error report needed memory the plugin had used up (upstream's text)
        return "not enough memory"
    if isinstance(v, bytes):
        s = v.decode("utf-8", "replace")
    else:
        s = str(v)
    s = s.split("\nstack traceback:", 1)[0]
    # upstream truncates error strings to 255 bytes
    return s[:255]
