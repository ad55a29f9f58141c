"""The bulk sender as Lua plugins see it: `require "hindsight.elasticsearch"` (see sandbox/lua.py).

A Lua output hands over whole bulk bodies; delivery, retries and dead letters are the sender's,
so the Lua plugin and the native Python output share one path to the server.
"""

from __future__ import annotations

from collections.abc import Callable
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


def takeover_send(host: Any, address: str, port: int, body: bytes) -> tuple[bool, str | None]:
    """A bulk body an upstream Lua plugin posted through LuaSocket, delivered by the bulk sender.

    Synchronously, unlike the project's output: upstream's plugin reports each message done as
    soon as it is in its batch file, and empties that file once the request returns. Returning
    before the server took the body would leave its messages committed and nowhere on disk."""
    senders = host.__dict__.setdefault("_takeover_senders", {})
    sender = senders.get((address, port))
    if sender is None:
        cfg = dict(host.plugin.values)
        cfg.update(address=address, port=port)
        for key in ("discard_on_error", "abort_on_error"):
            cfg.pop(key, None)  # upstream gives up on these; we retry until delivered or dead-lettered
        sender = senders[(address, port)] = sender_from_config(
            cfg,
            dead_letter_path=host.runner.output_path / "dead_letter" / f"{host.plugin.name}.jsonl",
            log=host.log_fn,
            stop_event=host.stop_event(),
        )
    try:
        result = sender.send(body, bulk_body_count(body))
    except SendInterrupted as e:
        count_result(host.stats, e.result)
        return False, "stopped before the batch was delivered"
    count_result(host.stats, result)
    return True, None
