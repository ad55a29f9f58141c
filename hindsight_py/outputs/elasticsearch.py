"""The Elasticsearch/OpenSearch bulk sender every output uses.

The rule here is that no document is ever dropped without a trace. Each document handed to
:meth:`BulkSender.send` is either indexed, or written to the dead-letter file with the
server's reason, and it is counted either way. Failures that may pass (the connection, a
timeout, 429, 5xx, an item the cluster could not take right now) are retried with
exponential backoff and full jitter, forever unless ``max_retries`` is set. The caller's
checkpoint advances only after ``send`` returns, so :class:`SendInterrupted` (raised when
``stop_event`` is set during a wait) leaves the batch in the queue for the next run.

Delivery is at-least-once: a request that timed out may still have been applied, so a
resend can duplicate documents that have no ``_id``.

urllib3 is used directly: the official elasticsearch client refuses to talk to OpenSearch.
"""

from __future__ import annotations

import gzip as gzip_module
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from hindsight_py import dead_letters
from hindsight_py.outputs.bulk_body import (
    Document,
    bulk_body_count,
    every_line_is_an_object,
    one_line_objects,
    split_bulk_body,
)
from hindsight_py.outputs.es_transport import (
    connection_pool,
    describe_error,
    error_from_body,
    request_headers,
    transport_problem,
)

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads

__all__ = [
    "BulkSender",
    "SendInterrupted",
    "SendResult",
    "ServerInfo",
    "bulk_body_count",  # (outputs/bulk_body.py, for the plugins that import it from here)
    "one_line_objects",
]

# Syslog severities, as lua_sandbox and Hindsight use them.
LOG_ERR = 3
LOG_WARNING = 4
LOG_INFO = 6
LOG_DEBUG = 7

# Whole-request statuses that say the configuration is wrong, not the documents: credentials
# (401/403/407), or a URL that is no bulk endpoint (404 for the whole request, 405 from a proxy;
# a missing index is a per-item 404). They are waited out, even past max_retries: dumping the
# whole stream to the dead-letter file because a password expired would help nobody.
_CONFIGURATION_STATUSES = frozenset({401, 403, 404, 405, 407})
# Whole-request statuses worth waiting out.
_RETRYABLE_REQUEST_STATUSES = _CONFIGURATION_STATUSES | {408, 429}
# At most one retry warning per this many seconds per sender; the rest are summarised.
_RETRY_LOG_INTERVAL = 10.0
# How far into a response the top-level "errors" flag can be: after "took" and, on ES 8,
# "ingest_took". Items come after it, so no document text can fake it.
_ERRORS_FLAG_WINDOW = 96
# filter_path keeps the response to a status per item (~30 B instead of ~200 B); items
# keep their order, which is what maps them back to documents.
# Sent percent-encoded: AWS SigV4 signs the query in that form, and the server decodes it.
_BULK_QUERY = "?filter_path=took%2Cerrors%2Citems.%2A.status%2Citems.%2A.error"

#: Signs one request: (method, URL, headers, body) -> headers to add (outputs/sigv4.py).
RequestSigner = Callable[[str, str, Mapping[str, str], bytes], Mapping[str, str]]


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /`` says about the cluster."""

    distribution: str  # "elasticsearch" or "opensearch"
    version: str
    major: int

    @property
    def accepts_types(self) -> bool:
        """Whether bulk action lines may carry ``_type``.

        Only Elasticsearch 6 and older need or accept it. ES 7 and OpenSearch 1 (an ES 7.10
        fork) work typeless; ES 8+ and OpenSearch 2+ reject ``_type``.
        """
        return self.distribution == "elasticsearch" and self.major <= 6

    @classmethod
    def from_root(cls, doc: dict[str, Any]) -> ServerInfo:
        version = doc.get("version") or {}
        number = str(version.get("number", "0"))
        distribution = str(version.get("distribution") or "elasticsearch").lower()
        try:
            major = int(number.split(".", 1)[0])
        except ValueError:
            major = 0
        return cls(distribution=distribution, version=number, major=major)


#: how a mended source names the fields moved aside (type_conflicts.RENAMED_KEY, which imports this
#: module): a document that has it was counted in moved_aside already
MENDED_MARK = b'"_hindsight_renamed"'


@dataclass
class SendResult:
    """The outcome of one :meth:`BulkSender.send`. ``retried`` counts extra requests."""

    indexed: int = 0
    dead_lettered: int = 0
    retried: int = 0
    #: sources that are not JSON objects (an analysis plugin's text report, say): no server can
    #: index them, so they go to the dead-letter file without being sent. Also in dead_lettered.
    set_aside: int = 0
    #: documents sent again with mistyped fields moved aside (outputs/type_conflicts.py): delivered
    #: (so also in indexed once the server took them), but not as they came
    moved_aside: int = 0


class SendInterrupted(Exception):
    """``stop_event`` was set while a send waited to retry. Do not commit the checkpoint.

    ``result`` holds what was settled before the interruption; the unsettled documents
    were neither indexed nor dead-lettered.
    """

    def __init__(self, message: str, result: SendResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class _Failure:
    """A request that got no usable answer, or an answer that says "try again"."""

    reason: str
    status: int | None = None
    error: dict[str, Any] = field(default_factory=dict)


class _Batch:
    """A bulk body on its way; cut into documents only when an answer needs it."""

    def __init__(self, body: bytes, count: int, docs: list[Document] | None = None) -> None:
        self.body = body
        self.count = count
        self.refusal: _Failure | None = None  # why these documents are being sent again
        self._docs = docs
        self._gzipped: bytes | None = None

    @classmethod
    def of(cls, docs: list[Document]) -> _Batch:
        return cls(b"".join(doc.to_ndjson() for doc in docs), len(docs), docs)

    def documents(self) -> list[Document]:
        if self._docs is None:
            self._docs = split_bulk_body(self.body)
            if len(self._docs) != self.count:
                # The caller's count was wrong; the body is what the server sees.
                self.count = len(self._docs)
        return self._docs

    def payload(self, gzip: bool) -> bytes:
        if not gzip:
            return self.body
        if self._gzipped is None:
            # Level 1: most of gzip's gain on JSON at a fraction of the CPU.
            self._gzipped = gzip_module.compress(self.body, compresslevel=1)
        return self._gzipped


class BulkSender:
    """POSTs NDJSON bulk bodies to ``/_bulk`` and settles every document in them.

    Safe to call from several threads at once: each :meth:`send` is one request at a time, over
    keep-alive connections (``connections`` per URL, one for each request that may be in flight);
    the state they share (the server detected, the index template, the retry log, the URL in use,
    the dead-letter file, the conflict resolver's record) is kept under locks. With several URLs,
    a transport failure moves to the next one.
    """

    def __init__(
        self,
        urls: list[str] | str,
        *,
        dead_letter_path: Path | str,
        timeout: float = 10,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        verify: bool = True,
        client_cert: str | None = None,
        client_key: str | None = None,
        gzip: bool = False,
        max_retries: int | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30,
        log: Callable[[int, str], None] | None = None,
        stop_event: threading.Event | None = None,
        conflict_resolver: Callable[[bytes, dict[str, Any]], bytes | None] | None = None,
        prepare: Callable[[BulkSender], str | None] | None = None,
        signer: RequestSigner | None = None,
        connections: int = 1,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("BulkSender needs at least one URL")
        self.dead_letter_path = Path(dead_letter_path)
        self.gzip = gzip
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_event = stop_event
        #: Given a rejected document's source and the server's error, returns a mended source to send
        #: again, or None to dead-letter it (outputs/type_conflicts.py moves mistyped fields aside).
        self.conflict_resolver = conflict_resolver
        #: Runs before the first request until it returns None (e.g. installs an index template);
        #: a reason returned instead is waited out like a failed request.
        self.prepare = prepare
        #: Adds per-request authentication headers (AWS SigV4); may be set after construction.
        self.signer = signer
        #: The HTTP status of the last failed detect() when a server answered, None when none did.
        self.detect_failure_status: int | None = None
        self._log = log if log is not None else _python_logging
        # Tests replace this to make the jitter deterministic.
        self._jitter: Callable[[], float] = random.random
        #: requests this sender may have in flight at once (outputs/delivery.py sends that many)
        self.connections = max(1, connections)
        self._lock = threading.Lock()  # the retry log's throttle, the URL in use
        self._detect_lock = threading.Lock()  # one GET / at a time: the first answer is kept
        self._prepare_lock = threading.Lock()  # every request waits for `prepare` (the template first)
        self._server_info: ServerInfo | None = None
        self._last_retry_log = float("-inf")
        self._suppressed_retry_logs = 0

        self._targets: list[tuple[urllib3.HTTPConnectionPool, str]] = []
        for url in urls:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.username and username is None:
                username, password = unquote(parts.username), unquote(parts.password or "")
            pool = connection_pool(parts, timeout=timeout, verify=verify, ca_certs=ca_certs,
                                    client_cert=client_cert, client_key=client_key, connections=self.connections)
            self._targets.append((pool, parts.path.rstrip("/")))
        self._current = 0
        self._headers = request_headers(api_key=api_key, username=username, password=password, gzip=gzip)

    # -- detection ------------------------------------------------------------------------

    def detect(self) -> ServerInfo | None:
        """``GET /`` on the first URL that answers; cached once it succeeds."""
        if self._server_info is not None:
            return self._server_info
        with self._detect_lock:
            return self._server_info or self._detect()

    def _detect(self) -> ServerInfo | None:
        headers = {k: v for k, v in self._headers.items() if k not in ("Content-Type", "Content-Encoding")}
        problems = []
        self.detect_failure_status = None
        for pool, prefix in self._targets:
            try:
                response = pool.request(
                    "GET", prefix + "/", headers=self._signed(pool, "GET", prefix + "/", headers, b""), retries=False
                )
            except (Urllib3Error, OSError) as exc:
                problems.append(f"{pool.host}:{pool.port}: {transport_problem(exc)}")
                continue
            if response.status != 200:
                self.detect_failure_status = response.status
                problems.append(
                    f"{pool.host}:{pool.port}: {error_from_body(response.status, response.data)[0]}"
                )
                continue
            try:
                self._server_info = ServerInfo.from_root(_loads(response.data))
            except (ValueError, AttributeError) as exc:
                problems.append(f"{pool.host}:{pool.port}: GET / is not a cluster's answer: {exc}")
                continue
            return self._server_info
        self._log(LOG_WARNING, "cannot detect the search server: " + "; ".join(problems))
        return None

    # -- sending --------------------------------------------------------------------------

    def send(self, body: bytes, count: int, *, sources_checked: bool = False) -> SendResult:
        """Deliver a bulk body of ``count`` documents; returns once each one is settled.

        Raises :class:`SendInterrupted` if ``stop_event`` is set while waiting to retry.
        """
        result = SendResult()
        if count <= 0 and not body.strip():
            return result
        batch = _Batch(body, count)
        # sources_checked: the caller already set aside every source that is not a JSON object
        if not sources_checked and not every_line_is_an_object(body):
            docs = batch.documents()
            good = [d for d in docs if d.source is None or d.source.lstrip().startswith(b"{")]
            if len(good) != len(docs):
                bad = [d for d in docs if d.source is not None and not d.source.lstrip().startswith(b"{")]
                self._dead_letter(bad, None, "not a JSON object, so it cannot be a document", {}, result)
                result.set_aside += len(bad)
                batch = _Batch.of(good)
        if batch.count:
            self._deliver(batch, result)
        return result

    def _deliver(self, batch: _Batch, result: SendResult) -> None:
        attempt = 0
        while True:
            target = self._current
            outcome = self._prepared() or self._post(target, batch.payload(self.gzip))
            if isinstance(outcome, _Failure):
                failure = outcome
            else:
                status, data = outcome
                if 200 <= status < 300:
                    if b'"errors":false' in data[:_ERRORS_FLAG_WINDOW]:
                        self._settle_indexed(batch.count, result)
                        return
                    settled = self._settle_items(batch, data, result)
                    if isinstance(settled, _Failure):
                        failure = settled
                    elif settled.refusal is None:
                        return
                    else:
                        batch, failure = settled, settled.refusal
                elif status == 413:
                    docs = batch.documents()
                    if len(docs) <= 1:
                        self._dead_letter(docs, status, *error_from_body(status, data), result)
                        return
                    half = len(docs) // 2
                    self._log(
                        LOG_INFO,
                        f"HTTP 413: splitting {len(docs)} documents into {half} + {len(docs) - half}",
                    )
                    self._deliver(_Batch.of(docs[:half]), result)
                    self._deliver(_Batch.of(docs[half:]), result)
                    return
                else:
                    reason, error = error_from_body(status, data)
                    if status < 500 and status not in _RETRYABLE_REQUEST_STATUSES:
                        self._dead_letter(batch.documents(), status, reason, error, result)
                        return
                    failure = _Failure(reason, status, error)

            attempt += 1
            if (self.max_retries is not None and attempt > self.max_retries
                    and failure.status not in _CONFIGURATION_STATUSES):
                reason = f"gave up after {self.max_retries} retries: {failure.reason}"
                self._dead_letter(batch.documents(), failure.status, reason, failure.error, result)
                return
            # A 5xx from one node (or the proxy in front of it) may not be the cluster's. Moved on
            # once per failed URL: the other requests in flight that failed there find it done.
            with self._lock:
                if self._current == target:
                    self._current = (target + 1) % len(self._targets)
            self._wait_before_retry(attempt, failure.reason, result)
            result.retried += 1

    def _prepared(self) -> _Failure | None:
        if self.prepare is None:
            return None
        with self._prepare_lock:
            prepare = self.prepare
            if prepare is None:  # another request did it meanwhile
                return None
            reason = prepare(self)
            if reason is None:
                self.prepare = None
                return None
        return _Failure(reason)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes] | str:
        """One JSON request (not a bulk) to the current URL: (status, body), or why there was no answer."""
        pool, prefix = self._targets[self._current]
        headers = {k: v for k, v in self._headers.items() if k != "Content-Encoding"}
        headers["Content-Type"] = "application/json"
        data = None if body is None else json.dumps(body).encode()
        headers = self._signed(pool, method, prefix + path, headers, data or b"")
        try:
            response = pool.urlopen(method, prefix + path, body=data, headers=headers, retries=False,
                                    redirect=False, preload_content=True)
        except (Urllib3Error, OSError) as exc:
            return f"{pool.scheme}://{pool.host}:{pool.port}: {transport_problem(exc)}"
        return response.status, response.data

    def _post(self, target: int, payload: bytes) -> tuple[int, bytes] | _Failure:
        pool, prefix = self._targets[target]
        path = prefix + "/_bulk" + _BULK_QUERY
        try:
            response = pool.urlopen(
                "POST",
                path,
                body=payload,
                headers=self._signed(pool, "POST", path, self._headers, payload),
                retries=False,
                redirect=False,
                preload_content=True,
            )
        except (Urllib3Error, OSError) as exc:
            return _Failure(f"{pool.scheme}://{pool.host}:{pool.port}: {transport_problem(exc)}")
        return response.status, response.data

    def _signed(
        self, pool: urllib3.HTTPConnectionPool, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Mapping[str, str]:
        """`headers`, plus the signer's (SigV4) for this very request when there is a signer."""
        if self.signer is None:
            return headers
        host = f"[{pool.host}]" if ":" in (pool.host or "") else str(pool.host)
        if pool.port is not None and pool.port != {"http": 80, "https": 443}.get(pool.scheme):
            host = f"{host}:{pool.port}"
        signed = {k: v for k, v in headers.items() if k != "Authorization"}
        signed["Host"] = host  # sent as signed: urllib3 keeps a Host header it is given
        signed.update(self.signer(method, f"{pool.scheme}://{host}{path}", signed, body))
        return signed

    def _settle_indexed(self, count: int, result: SendResult) -> None:
        result.indexed += count

    def _settle_items(self, batch: _Batch, data: bytes, result: SendResult) -> _Batch | _Failure:
        """Settle a 2xx answer item by item; returns the documents to send again."""
        try:
            doc = _loads(data)
            errors = doc["errors"]
            items = doc.get("items", []) if errors else []
        except (ValueError, KeyError, TypeError, AttributeError):
            # An answer we cannot read tells us nothing about what was indexed; resending
            # may duplicate, dropping would lose.
            text = data[:200].decode("utf-8", "replace")
            return _Failure(f"a 2xx answer that is not a bulk response: {text!r}")
        if not errors:
            self._settle_indexed(batch.count, result)
            return _Batch.of([])

        docs = batch.documents()
        if len(items) != len(docs):
            self._log(
                LOG_ERR,
                f"the bulk response has {len(items)} items for {len(docs)} documents; "
                "documents without an item are dead-lettered",
            )
        sorted_items = self._sort_items(docs, items)
        indexed, retry, resend, dead, refusal, moved_aside = sorted_items
        self._settle_indexed(indexed, result)
        result.moved_aside += moved_aside
        for (status, reason), (error, documents) in dead.items():
            self._dead_letter(documents, status, reason, error, result)
        if resend:
            self._log(LOG_INFO, f"{len(resend)} documents sent again with mistyped fields moved aside")
            self._deliver(_Batch.of(resend), result)
        again = _Batch.of(retry)
        if refusal is not None:
            again.refusal = _Failure(
                f"{len(retry)} of {len(docs)} documents refused for now, e.g. {refusal.reason}",
                refusal.status,
                refusal.error if isinstance(refusal.error, dict) else {"reason": str(refusal.error)},
            )
        return again

    def _sort_items(self, docs: list[Document], items: list[Any]) -> tuple[
            int, list[Document], list[Document], dict[tuple[int, str], tuple[dict[str, Any], list[Document]]],
            _Failure | None, int]:
        """The documents of an answer with errors by outcome: the number indexed, those to retry
        (429, 5xx), those mended to send again, those to dead-letter (by status and reason), a
        retried item's refusal to report, and how many were mended for the first time."""
        retry: list[Document] = []
        resend: list[Document] = []  # rejected, then mended by the conflict resolver
        refusal: _Failure | None = None
        indexed = 0
        moved_aside = 0
        dead: dict[tuple[int, str], tuple[dict[str, Any], list[Document]]] = {}
        for position, document in enumerate(docs):
            if position >= len(items):
                reason = "the server returned no item for this document"
                dead.setdefault((0, reason), ({}, []))[1].append(document)
                continue
            item = items[position]
            outcome = next(iter(item.values()), None) if isinstance(item, dict) else None
            if not isinstance(outcome, dict) or not isinstance(outcome.get("status"), int):
                reason = f"the server returned an unreadable item: {str(item)[:200]}"
                dead.setdefault((0, reason), ({}, []))[1].append(document)
                continue
            status = outcome["status"]
            # An item failed if and only if it carries an error (that is the server's own
            # rule); a delete of a missing document is a 404 without one.
            if "error" not in outcome:
                indexed += 1
            elif status == 429 or status >= 500:
                retry.append(document)
                error = outcome.get("error")
                refusal = _Failure(f"item {status}: {describe_error(error)}", status, error or {})
            else:
                error = outcome.get("error")
                error = error if isinstance(error, dict) else {"reason": str(error)}
                mended = self._mend(document, error)
                if mended is not None:
                    if MENDED_MARK not in (document.source or b""):  # mended for the first time
                        moved_aside += 1
                    resend.append(mended)
                    continue
                dead.setdefault((status, describe_error(error)), (error, []))[1].append(document)
        return indexed, retry, resend, dead, refusal, moved_aside

    def _mend(self, document: Document, error: dict[str, Any]) -> Document | None:
        if self.conflict_resolver is None or document.source is None:
            return None
        source = self.conflict_resolver(document.source, error)
        return None if source is None else Document(document.action, source)

    def _wait_before_retry(self, attempt: int, reason: str, result: SendResult) -> None:
        # The exponent is bounded: retrying forever must not overflow a float.
        cap = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt - 1, 60))
        delay = cap * self._jitter()
        now = time.monotonic()
        with self._lock:  # one report per interval, whichever request failed
            report = now - self._last_retry_log >= _RETRY_LOG_INTERVAL
            if report:
                suppressed, self._suppressed_retry_logs = self._suppressed_retry_logs, 0
                self._last_retry_log = now
            else:
                self._suppressed_retry_logs += 1
        if report:
            note = f" ({suppressed} more failures since the last report)" if suppressed else ""
            self._log(LOG_WARNING, f"bulk request failed: {reason}; retry {attempt} in {delay:.2f}s{note}")
        self._pause(delay, result)

    def _pause(self, seconds: float, result: SendResult) -> None:
        if self.stop_event is None:
            time.sleep(seconds)
        elif self.stop_event.wait(seconds):
            raise SendInterrupted("stopped while waiting to retry a bulk request", result)

    # -- dead letters ---------------------------------------------------------------------

    def _dead_letter(
        self,
        docs: list[Document],
        status: int | None,
        reason: str,
        error: dict[str, Any],
        result: SendResult,
    ) -> None:
        if not docs:
            return
        records = []
        for doc in docs:
            try:
                action: Any = _loads(doc.action)
            except ValueError:
                action = doc.action.decode("utf-8", "surrogateescape")
            records.append(dead_letters.record("document", reason, doc.source, status=status, error=error,
                                               action=action))
        # The caller commits its checkpoint right after send returns: the writer fsync()s first.
        dead_letters.dead_letter_file(self.dead_letter_path).append(records)
        result.dead_lettered += len(docs)
        self._log(LOG_WARNING, f"{len(docs)} documents dead-lettered to {self.dead_letter_path}: {reason}")

    def close(self) -> None:
        for pool, _ in self._targets:
            pool.close()

    def __enter__(self) -> BulkSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SYSLOG_TO_LOGGING = {0: 50, 1: 50, 2: 50, 3: 40, 4: 30, 5: 20, 6: 20, 7: 10}
_logger = logging.getLogger("hindsight_py.outputs.elasticsearch")


def _python_logging(level: int, text: str) -> None:
    _logger.log(_SYSLOG_TO_LOGGING.get(level, 20), text)
