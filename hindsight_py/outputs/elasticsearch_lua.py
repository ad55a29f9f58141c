"""The Elasticsearch output as Lua plugins see it, behind the output extension point
(outputs/extension.py): `require "hindsight.elasticsearch"`, the `_type` probe of
encoders.elasticsearch.common, and the takeover of bulk requests an upstream plugin posts through
LuaSocket. The Lua half is outputs/elasticsearch_hooks.lua.

A Lua output hands over whole bulk bodies; delivery, retries and dead letters are the sender's,
so the Lua plugin and the native Python output share one path to the server.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hindsight_py.outputs.extension import LuaExtension, OutputHost

if TYPE_CHECKING:
    from hindsight_py.outputs.delivery import PipelinedSender
    from hindsight_py.outputs.elasticsearch import BulkSender

# The sender's modules (urllib3 among them) are imported where a sender is made: every plugin
# host creates this extension, and most plugin processes never send anything.

PROBE_INTERVAL = 1.0  # seconds between two questions to a server that has not answered yet

_HOOKS_SOURCE: str | None = None


def _hooks_source() -> str:
    global _HOOKS_SOURCE
    if _HOOKS_SOURCE is None:
        _HOOKS_SOURCE = resources.files("hindsight_py.outputs").joinpath("elasticsearch_hooks.lua").read_text()
    return _HOOKS_SOURCE


def server_accepts_types(cfg: dict[str, Any], log: Callable[[int, str], None]) -> bool | None:
    """Whether the server an output is configured for takes `_type`; None if it cannot be reached now."""
    from hindsight_py.outputs.delivery import urls_from_config
    from hindsight_py.outputs.elasticsearch import BulkSender

    probe = BulkSender(urls_from_config(cfg), dead_letter_path="/dev/null", timeout=5, max_retries=0, log=log,
                       username=cfg.get("username"), password=cfg.get("password"), api_key=cfg.get("api_key"),
                       ca_certs=cfg.get("ca_certs"), verify=cfg.get("verify_certs", True) is not False)
    try:
        info = probe.detect()
    finally:
        probe.close()
    return None if info is None else info.accepts_types


class ElasticsearchLua:
    """The Elasticsearch extension of one plugin: its takeover senders and spool, its `_type` answer."""

    def __init__(self, host: OutputHost,
                 probe: Callable[[dict[str, Any], Callable[[int, str], None]], bool | None] = server_accepts_types,
                 ) -> None:
        self.host = host
        self._probe = probe
        self._accepts_types: bool | None = None  # None: the server has not answered yet
        self._next_probe = 0.0
        self._takeover_pipes: dict[tuple[str, int], PipelinedSender] = {}
        self._spool_recovered = True  # False: a stop cut the delivery of the last run's spools short
        self._spools = 0  # spool files written in this run (each body on its way has one)

    def lua_extension(self) -> LuaExtension:
        functions: dict[str, Callable[..., Any]] = {"types_dropped": self.types_dropped, "takeover": self.takeover}
        if self.host.plugin.type != "analysis":
            functions["new_sender"] = self.new_sender
        return LuaExtension("elasticsearch_hooks.lua", _hooks_source(), functions)

    def before_reading(self) -> None:
        self.recover()

    # -- require "hindsight.elasticsearch" ------------------------------------------------------------
    def new_sender(self, cfg: dict[str, Any]) -> tuple[Callable[..., Any], Callable[[], bool]]:
        """The two functions behind the Lua `sender` object: send(body, n) and accepts_types()."""
        from hindsight_py.outputs import type_conflicts
        from hindsight_py.outputs.delivery import background_delivery, sender_from_config

        host = self.host
        # The Lua plugin forwards the keys it knows; these come from its cfg all the same.
        cfg = {**{k: host.plugin.values.get(k) for k in (*type_conflicts.CONFIG_KEYS, "max_in_flight")}, **cfg}
        sender = sender_from_config(cfg, dead_letter_path=self._dead_letter_path(), log=host.log_fn)
        pipe = background_delivery(host, sender, abort=bool(cfg.get("abort_on_error")))

        def send(body: bytes, count: float) -> tuple[Any, ...]:
            err = pipe.submit(body, int(count))
            if err:
                return (False, err.encode())
            return (True, 0, 0)  # the counts arrive with the delivery (stats), not now

        def accepts_types() -> bool:
            info = sender.detect()
            return bool(info and info.accepts_types)

        return send, accepts_types

    # -- the `_type` probe ----------------------------------------------------------------------------
    def types_dropped(self) -> tuple[bool, bool]:
        """(leave `_type` out of action lines, the server's answer is known). Until the server
        answers, `_type` is left out, as modern servers want, and it is asked again (at most once
        a PROBE_INTERVAL): an ES <= 6 server that is down at the first message gets its `_type`
        back once it answers."""
        if self._accepts_types is None and time.monotonic() >= self._next_probe:
            self._accepts_types = self._probe(self.host.plugin.values, self.host.log_fn)
            self._next_probe = time.monotonic() + PROBE_INTERVAL
            if self._accepts_types is False:
                self.host.log_fn(6, "the server does not accept mapping types: `_type` is left out of action lines")
        if self._accepts_types is None:
            return True, False
        return not self._accepts_types, True

    # -- the LuaSocket takeover ----------------------------------------------------------------------
    def takeover(self, address: bytes, port: Any, body: bytes) -> tuple[bool, bytes | None]:
        """A bulk body an upstream Lua plugin posted through LuaSocket, handed to the bulk sender.

        Upstream's plugin reports each message done once it is in its batch file, and empties that
        file when the request returns. So the body is first written to a spool file of its own
        (the plugin's `.bulk.<n>` beside the checkpoints: up to max_in_flight of them are on their
        way), then delivered in the background while the plugin goes on; each spool is removed once
        every document of its body is settled. Spools left by a crash or a stop are delivered
        before the plugin's next run reads anything (recover)."""
        ok, err = self._takeover(address.decode(), int(port), body)
        return ok, (err.encode() if err else None)

    def _takeover(self, address: str, port: int, body: bytes) -> tuple[bool, str | None]:
        from hindsight_py.outputs.delivery import background_delivery
        from hindsight_py.outputs.elasticsearch import bulk_body_count

        if not self._spool_recovered:
            return False, "stopped before the bulk request left by the last run was delivered"
        pipe = self._takeover_pipes.get((address, port))
        if pipe is None:
            pipe = background_delivery(self.host, self._takeover_sender(address, port))
            self._takeover_pipes[(address, port)] = pipe
        self._spools += 1  # a file per body: they may be delivered in any order
        spool = takeover_spool(self.host, self._spools)
        tmp = spool.with_name(spool.name + ".tmp")
        tmp.write_bytes(f"{address} {port}\n".encode() + body)
        os.replace(tmp, spool)
        err = pipe.submit(body, bulk_body_count(body), on_delivered=lambda: spool.unlink(missing_ok=True))
        if err:  # not handed over: the plugin hears of it and keeps its batch file
            spool.unlink(missing_ok=True)
            return False, err
        return True, None

    def recover(self) -> None:
        """Deliver the bulk bodies a previous run left in spools (before the plugin reads anything),
        in the order they were handed over.

        If a stop cuts the delivery short, the rest stay for the next run, and takeover refuses
        new bodies meanwhile (they would take the names of the old spools)."""
        for spool in left_spools(self.host):
            if not self._recover(spool):
                self._spool_recovered = False
                return

    def _recover(self, spool: Path) -> bool:
        from hindsight_py.outputs.delivery import count_result
        from hindsight_py.outputs.elasticsearch import SendInterrupted, bulk_body_count

        address, port, body = parse_spool(spool, spool.read_bytes())
        sender = self._takeover_sender(address, port)
        sender.stop_event = self.host.stop_event()
        self.host.log_fn(6, f"delivering the bulk request the last run left in {spool.name}")
        try:
            result = sender.send(body, bulk_body_count(body))
        except SendInterrupted as e:
            count_result(self.host.stats, e.result)
            return False
        finally:
            sender.close()
        count_result(self.host.stats, result)
        spool.unlink()
        return True

    def _takeover_sender(self, address: str, port: int) -> BulkSender:
        from hindsight_py.outputs.delivery import sender_from_config

        cfg = dict(self.host.plugin.values)
        cfg.update(address=address, port=port)
        for key in ("discard_on_error", "abort_on_error"):
            cfg.pop(key, None)  # upstream gives up on these; we retry until delivered or dead-lettered
        return sender_from_config(cfg, dead_letter_path=self._dead_letter_path(), log=self.host.log_fn)

    def _dead_letter_path(self) -> Path:
        return Path(self.host.output_path) / "dead_letter" / f"{self.host.plugin.name}.jsonl"


def takeover_spool(host: Any, number: int) -> Path:
    """Where the `number`th bulk body of a run is kept on its way: output_path/<plugin>.bulk.<number>."""
    return Path(host.output_path) / f"{host.plugin.name}.bulk.{number}"


def left_spools(host: Any) -> list[Path]:
    """The spools a previous run left, oldest first (`<plugin>.bulk` is one from before there
    were several)."""
    directory, name = Path(host.output_path), f"{host.plugin.name}.bulk"
    numbered = []
    for path in directory.glob(glob.escape(name) + ".*"):
        number = path.name[len(name) + 1:]
        if number.isdigit():
            numbered.append((int(number), path))
    single = directory / name
    return ([single] if single.exists() else []) + [path for _, path in sorted(numbered)]


def parse_spool(spool: Path, data: bytes) -> tuple[str, int, bytes]:
    """The address, port and body of a spool file; ValueError naming the file if it is not one."""
    head, _, body = data.partition(b"\n")
    address, _, port = head.decode("utf-8", "replace").partition(" ")
    if not (address and port.isdigit()):
        raise ValueError(f"{spool}: not a bulk request spooled by hindsight-py (its first line must be "
                         f"'<address> <port>', not {head[:80]!r}); move the file away to start without it")
    return address, int(port), body


__all__ = ["ElasticsearchLua", "left_spools", "parse_spool", "server_accepts_types", "takeover_spool"]
