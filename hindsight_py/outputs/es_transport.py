"""HTTP to an Elasticsearch/OpenSearch server for the bulk sender (outputs/elasticsearch.py): a
connection per URL with its TLS settings, the request headers, and failures read as reasons."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult

import urllib3

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads


def transport_problem(exc: BaseException) -> str:
    """A failed connection in words, with what to do when it is the certificate check."""
    text = f"{type(exc).__name__}: {exc}"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        text += (
            " -- the server's TLS certificate could not be verified: give the CA bundle that signed it"
            " (ca_certs), or check the host name in the URL against the certificate"
        )
    return text


def describe_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    cause = error.get("caused_by")
    if isinstance(cause, dict):
        text += f" (caused by {cause.get('type', 'error')}: {cause.get('reason', '')})"
    return text


def error_from_body(status: int, data: bytes) -> tuple[str, dict[str, Any]]:
    """The reason and the error object of a whole-request failure."""
    try:
        doc = _loads(data)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        error = doc["error"]
        if not isinstance(error, dict):
            error = {"reason": str(error)}
        return f"HTTP {status}: {describe_error(error)}", error
    text = data[:2000].decode("utf-8", "replace")
    # one line in the log, even for a proxy's HTML page
    return f"HTTP {status}: {' '.join(text.split())[:300]}", {"body": text}


def connection_pool(parts: SplitResult, *, timeout: float, verify: bool, ca_certs: str | None,
                    client_cert: str | None, client_key: str | None,
                    connections: int = 1) -> urllib3.HTTPConnectionPool:
    """Keep-alive connections to a URL's origin (as many as requests may be in flight at once),
    TLS settings included for https."""
    pool_kwargs: dict[str, Any] = {
        "maxsize": connections,
        "timeout": urllib3.Timeout(connect=timeout, read=timeout),
        "retries": False,
    }
    if parts.scheme == "https":
        pool_kwargs.update(
            cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
            ca_certs=ca_certs,
            cert_file=client_cert,
            key_file=client_key,
            assert_hostname=None if verify else False,
        )
    origin = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib3.connection_from_url(origin, **pool_kwargs)


def request_headers(*, api_key: str | None, username: str | None, password: str | None,
                    gzip: bool) -> dict[str, str]:
    """The headers of every bulk request: content types, authentication, compression."""
    headers = {
        "Content-Type": "application/x-ndjson",
        "Accept": "application/json",
        "User-Agent": "hindsight-py",
    }
    if api_key:
        headers["Authorization"] = f"ApiKey {api_key}"
    elif username is not None:
        basic = urllib3.make_headers(basic_auth=f"{username}:{password or ''}")
        headers["Authorization"] = basic["authorization"]
    if gzip:
        headers["Content-Encoding"] = "gzip"
    return headers


__all__ = ["connection_pool", "describe_error", "error_from_body", "request_headers", "transport_problem"]
