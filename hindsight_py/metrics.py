"""The opt-in Prometheus endpoint: `metrics_address = "127.0.0.1:9108"` in hindsight.cfg.

GET /metrics answers with the latest live snapshot (live_stats.py, refreshed once a second) in the
Prometheus text format, version 0.0.4. The server runs in a thread of the supervisor and reads only
the snapshot it is handed, so a slow scraper never holds the daemon up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# (metric, stats key, help) of the per-plugin counters
_COUNTERS = (
    ("hindsight_plugin_injected_messages_total", "injected", "Messages the plugin injected."),
    ("hindsight_plugin_injected_bytes_total", "inject_bytes", "Bytes of the messages the plugin injected."),
    ("hindsight_plugin_processed_messages_total", "processed", "Messages process_message handled."),
    ("hindsight_plugin_process_failures_total", "failures", "process_message calls that failed (returned -1)."),
    ("hindsight_plugin_delivered_documents_total", "indexed", "Documents the search server accepted."),
    ("hindsight_plugin_dead_lettered_total", "dead_lettered", "Documents or messages put in the dead-letter file."),
    ("hindsight_plugin_set_aside_total", "set_aside", "Non-JSON payloads put in the dead-letter file."),
    ("hindsight_plugin_moved_aside_documents_total", "moved_aside",
     "Documents delivered with mistyped fields moved aside."),
    ("hindsight_plugin_dropped_messages_total", "dropped", 'Refused messages dropped (refused_messages = "drop").'),
    ("hindsight_plugin_retried_requests_total", "retried", "Requests sent again after a failure."),
)


def parse_address(text: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:9108") to (host, port); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_address must be 'host:port', not {text!r}")
    return host.strip("[]"), int(port)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(snap: dict[str, Any] | None) -> str:
    """The Prometheus text of one snapshot."""
    lines: list[str] = []
    if snap is None:
        return "# no figures yet\n"
    plugins: dict[str, dict[str, Any]] = snap.get("plugins", {})

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}" for labels, value in samples)

    for metric, key, help_text in _COUNTERS:
        family(metric, "counter", help_text,
               [(f'plugin="{_label(n)}",type="{s["type"]}"', s.get(key, 0)) for n, s in plugins.items()])
    family("hindsight_plugin_running", "gauge", "1 while the plugin runs, 0 once it ended or was terminated.",
           [(f'plugin="{_label(n)}",type="{s["type"]}"', int(bool(s.get("running")))) for n, s in plugins.items()])
    family("hindsight_plugin_memory_bytes", "gauge", "Memory the plugin's Lua state holds.",
           [(f'plugin="{_label(n)}",type="{s["type"]}"', s.get("mem_cur", 0)) for n, s in plugins.items()])
    readers = snap.get("readers", {})
    family("hindsight_queue_lag_bytes", "gauge", "Queue bytes between a reader's checkpoint and the queue's head.",
           [(f'reader="{_label(r["reader"])}",queue="{r["queue"]}"', r["lag_bytes"])
            for r in readers.values() if r.get("lag_bytes") is not None])
    family("hindsight_queue_lag_messages", "gauge", "Estimated messages behind (lag bytes / mean message size).",
           [(f'reader="{_label(r["reader"])}",queue="{r["queue"]}"', r["lag_messages"])
            for r in readers.values() if r.get("lag_messages") is not None])
    family("hindsight_uptime_seconds", "gauge", "Seconds since the daemon started.",
           [("", max(0.0, snap.get("time", 0) - snap.get("started", 0)))])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """GET /metrics on `address`, serving whatever `source()` returns at the time of the request."""

    def __init__(self, address: str, source: Callable[[], dict[str, Any] | None]) -> None:
        # imported here, where an endpoint is asked for: http.server (with http.client, email and ssl)
        # costs every hindsight_cli start about 20 ms, and most configurations serve no metrics
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host, port = parse_address(address)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = render(source()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a scrape every few seconds is not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["MetricsServer", "parse_address", "render"]
