"""A sandbox host for tests: LuaSandbox/PythonSandbox driven directly, no runner, no queues.

FakeHost implements the SandboxHost protocol of hindsight_py/sandbox/lua.py and records what a
plugin did: the framed messages it injected, its checkpoints, its log lines, what it injected
into the input queue (outputs), its dead letters. `lua_sandbox(...)` builds a Lua sandbox the way
sandbox/__init__.py does, from a plugin file and a few cfg values: a HarnessSandbox
(tests/lua_harness.py), which adds upstream's test API to the production LuaSandbox.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lua_harness import HarnessSandbox

from hindsight_py import message as hmsg
from hindsight_py.matcher import compile_raw_matcher
from hindsight_py.outputs.elasticsearch_lua import ElasticsearchLua
from hindsight_py.outputs.extension import LuaExtension


def _not_here(*args: Any) -> Any:
    raise NotImplementedError("no Elasticsearch server behind the fake host")


def split_framed(data: bytes) -> list[bytes]:
    """The protobuf messages of a run of framed records (as written to the queue)."""
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x1E, f"no record separator at {pos}"
        hlen = data[pos + 1]
        header = data[pos + 2 : pos + 2 + hlen]
        assert data[pos + 2 + hlen] == 0x1F
        length, shift, i = 0, 0, 1
        while True:
            b = header[i]
            length |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if b < 0x80:
                break
        start = pos + 3 + hlen
        out.append(data[start : start + length])
        pos = start + length
    return out


# An output plugin's return codes (the payload of each message) and what the batch makes of them:
# (codes, status, processed, commit index, failures, batching). Lua and Python sandboxes alike.
OUTPUT_RETURN_CODE_CASES = [
    ([0, 0], "ok", 2, 2, 0, False),
    ([0, -1, -2], "ok", 3, 3, 1, False),
    ([0, -3, 0], "retry", 1, 1, 0, False),
    ([0, -4, -4], "ok", 3, 1, 0, True),
    ([-4, -4, 0], "ok", 3, 3, 0, False),
    ([-4, -4, 9], "ok", 3, 3, 0, True),
    ([0, 1], "terminate", 1, 1, 0, False),
]


class FakeHost:
    def __init__(self, *, running: bool = True) -> None:
        self.written: list[bytes] = []  # protobuf messages, in order
        self.write_calls = 0
        self.checkpoints: list[Any] = []
        self.logs: list[tuple[int, str]] = []
        self.input_injected: list[bytes] = []
        self.commits = 0
        self.dead_letters: list[tuple[str, bytes]] = []
        # refused messages: (reason, message, offset, next_offset), as the host would write them
        self.refusals: list[tuple[str, Any, Any, Any]] = []
        self.refused_pending: list[Any] | None = None
        self.running = running
        # upstream's inject callbacks, for the upstream test harness: (pb | None, cp) -> rv
        self.inject_callback: Callable[[bytes | None, Any], int] | None = None
        self.plugin = SimpleNamespace(type="output", name="test.plugin", values={})  # lua_sandbox sets the type

    def write_messages(self, data: bytes, count: int) -> None:
        msgs = split_framed(data)
        assert len(msgs) == count
        self.written.extend(msgs)
        self.write_calls += 1

    def checkpoint(self, value: float | bytes) -> None:
        self.checkpoints.append(value)

    def is_running(self) -> bool:
        return self.running

    def log(self, level: int, text: str) -> None:
        self.logs.append((level, text))

    def inject_input(self, framed: bytes) -> None:
        self.input_injected.extend(split_framed(framed))

    def commit_processed(self) -> None:
        self.commits += 1

    def create_matcher(self, expr: str) -> Callable[[bytes], bool] | None:
        return compile_raw_matcher(expr)

    def dead_letter(self, reason: str, data: bytes) -> None:
        self.dead_letters.append((reason, data))

    def lua_extensions(self) -> list[LuaExtension]:
        """The Elasticsearch output's Lua code, as PluginHost loads it, with no server behind it: no
        sender can be made, and `_type` is left out (as for a server without mapping types)."""
        ext = ElasticsearchLua(self).lua_extension()  # type: ignore[arg-type]
        functions: dict[str, Callable[..., Any]] = {**ext.functions, "types_dropped": lambda: (True, True),
                                                    "takeover": _not_here}
        if "new_sender" in functions:
            functions["new_sender"] = _not_here
        return [replace(ext, functions=functions)]

    def refused(self, reason: str, message: Any, offset: Any) -> bool:
        self.settle_refused(None)
        self.refused_pending = [reason, message, offset]
        return True  # held until settle_refused, as an input's

    def settle_refused(self, next_offset: Any) -> None:
        if self.refused_pending is not None:
            reason, message, offset = self.refused_pending
            self.refusals.append((reason, message, offset, next_offset))
            self.refused_pending = None

    # helpers
    def messages(self) -> list[hmsg.Message]:
        return [hmsg.decode(m) for m in self.written]


def lua_sandbox(
    source: Path,
    plugin_type: str,
    host: FakeHost | None = None,
    *,
    cfg: str = "",
    logger: str | None = "test.plugin",
    hostname: str = "test.host",
    pid: int = 0,
    log_level: int = 6,
    output_limit: int = 65536,
    memory_limit: int = 8388608,
    instruction_limit: int = 1000000,
    restricted_headers: bool | None = None,
    max_message_size: int = 65536,
    async_buffer_size: int = 0,
    path: str = "",
    cpath: str = "",
    preserve_data: bool = False,
    state_path: Path | None = None,
    load: bool = True,
) -> tuple[HarnessSandbox, FakeHost]:
    host = host or FakeHost()
    if isinstance(getattr(host, "plugin", None), SimpleNamespace):
        host.plugin.type = plugin_type
    if restricted_headers is None:
        restricted_headers = plugin_type == "analysis"
    sb = HarnessSandbox(
        name=logger or "test.plugin",
        plugin_type=plugin_type,
        source_path=source,
        runtime_cfg=cfg,
        path=path,
        cpath=cpath,
        host=host,
        logger=logger,
        hostname=hostname,
        pid=pid,
        log_level=log_level,
        output_limit=output_limit,
        memory_limit=memory_limit,
        instruction_limit=instruction_limit,
        restricted_headers=restricted_headers,
        max_message_size=max_message_size,
        async_buffer_size=async_buffer_size,
        preserve_data=preserve_data,
        state_path=state_path,
    )
    if load:
        sb.load()
    return sb, host
