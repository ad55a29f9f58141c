"""The bulk sender as Lua plugins see it: `require "hindsight.elasticsearch"` (see sandbox/lua.py).

A Lua output hands over whole bulk bodies; delivery, retries and dead letters are the sender's,
so the Lua plugin and the native Python output share one path to the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hindsight_py.outputs import type_conflicts
from hindsight_py.outputs.delivery import count_result, sender_from_config, urls_from_config
from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted, ServerInfo, bulk_body_count


def make_lua_sender(cfg: dict[str, Any], host: Any) -> tuple[Callable[..., Any], Callable[[], bool]]:
    """The two functions behind the Lua `sender` object: send(body, n) and accepts_types()."""
    output_dir = host.runner.output_path
    # The Lua plugin forwards the keys it knows; these come from its cfg all the same.
    cfg = {**{k: host.plugin.values.get(k) for k in type_conflicts.CONFIG_KEYS}, **cfg}
    sender = sender_from_config(
        cfg,
        dead_letter_path=output_dir / "dead_letter" / f"{host.plugin.name}.jsonl",
        log=host.log_fn,
    )
    pipe = host.background_delivery(sender, abort=bool(cfg.get("abort_on_error")))

    def send(body: bytes, count: float) -> tuple[Any, ...]:
        err = pipe.submit(body, int(count))
        if err:
            return (False, err.encode())
        return (True, 0, 0)  # the counts arrive with the delivery (stats), not now

    def accepts_types() -> bool:
        info = sender.detect()
        return bool(info and info.accepts_types)

    return send, accepts_types


def server_accepts_types(cfg: dict[str, Any], log: Callable[[int, str], None]) -> bool | None:
    """Whether the server an output is configured for takes `_type`; None if it cannot be reached now."""
    probe = BulkSender(urls_from_config(cfg), dead_letter_path="/dev/null", timeout=5, max_retries=0, log=log,
                       username=cfg.get("username"), password=cfg.get("password"), api_key=cfg.get("api_key"),
                       ca_certs=cfg.get("ca_certs"), verify=cfg.get("verify_certs", True) is not False)
    try:
        info: ServerInfo | None = probe.detect()
    finally:
        probe.close()
    return None if info is None else info.accepts_types


def _takeover_sender(host: Any, address: str, port: int) -> BulkSender:
    cfg = dict(host.plugin.values)
    cfg.update(address=address, port=port)
    for key in ("discard_on_error", "abort_on_error"):
        cfg.pop(key, None)  # upstream gives up on these; we retry until delivered or dead-lettered
    return sender_from_config(
        cfg,
        dead_letter_path=host.runner.output_path / "dead_letter" / f"{host.plugin.name}.jsonl",
        log=host.log_fn,
    )


def takeover_spool(host: Any) -> Path:
    """Where the bulk body on its way is kept: output_path/<plugin>.bulk."""
    return Path(host.runner.output_path) / f"{host.plugin.name}.bulk"


def takeover_send(host: Any, address: str, port: int, body: bytes) -> tuple[bool, str | None]:
    """A bulk body an upstream Lua plugin posted through LuaSocket, handed to the bulk sender.

    Upstream's plugin reports each message done once it is in its batch file, and empties that
    file when the request returns. So the body is first written to a spool file (the plugin's
    `.bulk` beside the checkpoints), then delivered in the background while the plugin goes on;
    the spool is removed once every document is settled. A spool left by a crash or a stop is
    delivered before the plugin's next run reads anything (takeover_recover)."""
    if not host.__dict__.get("_spool_recovered", True):
        return False, "stopped before the bulk request left by the last run was delivered"
    pipes = host.__dict__.setdefault("_takeover_pipes", {})
    pipe = pipes.get((address, port))
    if pipe is None:
        pipe = pipes[(address, port)] = host.background_delivery(_takeover_sender(host, address, port))
    err = pipe.wait()  # one body on its way at a time: the spool holds one
    if err:
        return False, err
    spool = takeover_spool(host)
    tmp = spool.with_name(spool.name + ".tmp")
    tmp.write_bytes(f"{address} {port}\n".encode() + body)
    os.replace(tmp, spool)
    err = pipe.submit(body, bulk_body_count(body), on_delivered=lambda: spool.unlink(missing_ok=True))
    return (False, err) if err else (True, None)


def takeover_recover(host: Any) -> None:
    """Deliver the bulk body a previous run left in the spool (before the plugin reads anything).

    If a stop cuts the delivery short, the spool stays for the next run, and takeover_send
    refuses new bodies meanwhile (one would replace it)."""
    spool = takeover_spool(host)
    try:
        data = spool.read_bytes()
    except FileNotFoundError:
        return
    head, _, body = data.partition(b"\n")
    address, _, port = head.decode("utf-8", "replace").partition(" ")
    if not (address and port.isdigit()):
        raise ValueError(f"{spool}: not a bulk request spooled by hindsight-py (its first line must be "
                         f"'<address> <port>', not {head[:80]!r}); move the file away to start without it")
    sender = _takeover_sender(host, address, int(port))
    sender.stop_event = host.stop_event()
    host.log_fn(6, f"delivering the bulk request the last run left in {spool.name}")
    try:
        result = sender.send(body, bulk_body_count(body))
    except SendInterrupted as e:
        count_result(host.stats, e.result)
        host.__dict__["_spool_recovered"] = False
        return
    finally:
        sender.close()
    count_result(host.stats, result)
    spool.unlink()
