"""TLS and authentication against a real TLS-terminating reverse proxy in front of Elasticsearch 8.

nginx (Debian's nginx-light) listens on a loopback port with a server certificate from a CA made
for the test (scripts/tls_proxy.py, openssl CLI), checks basic auth against an htpasswd file, and
proxies to the es8 test server. The native output must deliver through it when it can verify the
certificate, and fail loudly without losing anything when it cannot or when the password is wrong.

Cost: certificates and nginx start in about a second; each pipeline run 2-5 s.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from conftest import REPO_ROOT
from native_pipeline import NativePipeline, count

from hindsight_py.outputs.elasticsearch import BulkSender, SendInterrupted
from hindsight_py.outputs.index_setup import main as create_index

USER, PASSWORD = "hindsight", "correct horse battery"
LINES = [b'{"eventID":"e%d","eventName":"ListRoles","n":%d}' % (i, i) for i in range(200)]


def _tls_proxy_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tls_proxy", REPO_ROOT / "scripts" / "tls_proxy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tls_proxy = _tls_proxy_module()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tls_proxy.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, es8_url: str, pki: Any) -> Iterator[Any]:
    """https://127.0.0.1:<port> -> es8, basic auth required."""
    directory = tmp_path_factory.mktemp("nginx")
    htpasswd = tls_proxy.write_htpasswd(directory / "htpasswd", USER, PASSWORD)
    server = tls_proxy.TlsProxy(directory, es8_url, pki, htpasswd=htpasswd)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_proxy(tmp_path_factory: pytest.TempPathFactory, es8_url: str, pki: Any) -> Iterator[Any]:
    """https://127.0.0.1:<port> -> es8, a client certificate signed by the CA required."""
    server = tls_proxy.TlsProxy(tmp_path_factory.mktemp("nginx-mtls"), es8_url, pki, require_client_cert=True)
    server.start()
    yield server
    server.stop()


def output(url: str, index: str, **keys: Any) -> dict[str, Any]:
    return {"url": url, "encoders_elasticsearch_common": {"index": index, "type_name": "doc"}, **keys}


def test_verified_tls_and_basic_auth_deliver_every_document(tmp_path, proxy, pki, es8_url, scratch_index):
    index = scratch_index(es8_url)
    pipeline = NativePipeline(tmp_path, LINES, output(proxy.url, index, ca_certs=str(pki.ca_cert), username=USER,
                                                       password=PASSWORD))
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert count(es8_url, index) == len(LINES)
    assert pipeline.dead_letters() == []
    assert 200 in proxy.statuses()


def test_without_the_ca_bundle_verification_fails_and_every_message_stays_queued(
        tmp_path, proxy, pki, es8_url, scratch_index):
    index = scratch_index(es8_url)
    pipeline = NativePipeline(tmp_path, LINES, output(proxy.url, index, username=USER, password=PASSWORD))
    proc = pipeline.start()
    log = pipeline.wait_for_log("CERTIFICATE_VERIFY_FAILED", proc, count=2)
    pipeline.stop(proc)

    assert "give the CA bundle that signed it (ca_certs)" in log  # the error says what to do
    assert count(es8_url, index) == 0
    assert pipeline.checkpoint() in (None, "0:0")  # nothing committed: the messages are still queued
    assert pipeline.dead_letters() == []

    pipeline.write_output(output(proxy.url, index, ca_certs=str(pki.ca_cert), username=USER, password=PASSWORD))
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert count(es8_url, index) == len(LINES)  # the same messages, delivered once


def test_a_wrong_password_gets_401_which_is_retried_not_dead_lettered(tmp_path, proxy, pki, es8_url, scratch_index):
    index = scratch_index(es8_url)
    pipeline = NativePipeline(tmp_path, LINES, output(proxy.url, index, ca_certs=str(pki.ca_cert), username=USER,
                                                       password="wrong", max_retry=0, discard_on_error=True))
    before = len(proxy.statuses())
    proc = pipeline.start()
    pipeline.wait_for_log(r"HTTP 401", proc, count=3)
    pipeline.stop(proc)

    assert proxy.statuses()[before:].count(401) >= 3  # asked again and again, despite max_retry = 0
    assert count(es8_url, index) == 0
    assert pipeline.dead_letters() == []
    assert pipeline.checkpoint() in (None, "0:0")

    pipeline.write_output(output(proxy.url, index, ca_certs=str(pki.ca_cert), username=USER, password=PASSWORD))
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert count(es8_url, index) == len(LINES)


def test_bulk_requests_refused_with_401_outlast_max_retries(tmp_path, proxy, pki):
    """The sender itself: credentials that stop working mid-run are waited out, even past max_retries."""
    stop = threading.Event()
    before = len(proxy.statuses())

    def stop_after_three_refusals() -> None:
        while not stop.wait(0.05):
            if proxy.statuses()[before:].count(401) >= 3:
                stop.set()

    watcher = threading.Thread(target=stop_after_three_refusals, daemon=True)
    watcher.start()
    sender = BulkSender([proxy.url], dead_letter_path=tmp_path / "dead.jsonl", ca_certs=str(pki.ca_cert),
                        username=USER, password="wrong", max_retries=0, backoff_initial=0.01, backoff_max=0.05,
                        log=lambda level, text: None, stop_event=stop)
    with pytest.raises(SendInterrupted) as interrupted:
        sender.send(b'{"index":{"_index":"never"}}\n{"a":1}\n', 1)
    sender.close()
    watcher.join()
    assert interrupted.value.result.dead_lettered == 0
    assert not (tmp_path / "dead.jsonl").exists()


def test_a_client_certificate_opens_a_server_that_requires_one(tmp_path, mtls_proxy, pki, es8_url, scratch_index):
    index = scratch_index(es8_url)
    pipeline = NativePipeline(tmp_path, LINES[:20], output(mtls_proxy.url, index, ca_certs=str(pki.ca_cert),
                                                            client_cert=str(pki.client_cert),
                                                            client_key=str(pki.client_key)))
    assert pipeline.run().returncode == 0, pipeline.stderr
    assert count(es8_url, index) == 20

    without = BulkSender([mtls_proxy.url], dead_letter_path=tmp_path / "d.jsonl", ca_certs=str(pki.ca_cert),
                         log=lambda level, text: None)
    assert without.detect() is None and without.detect_failure_status == 400  # nginx: no certificate sent
    without.close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_certs_false_accepts_an_unknown_certificate(tmp_path, proxy):
    insecure = BulkSender([proxy.url], dead_letter_path=tmp_path / "d.jsonl", verify=False, username=USER,
                          password=PASSWORD, log=lambda level, text: None)
    info = insecure.detect()
    insecure.close()
    assert info is not None and info.distribution == "elasticsearch" and info.major == 8


def test_create_index_through_tls_and_basic_auth(tmp_path, proxy, pki, es8_url, scratch_index, monkeypatch, capsys):
    index = scratch_index(es8_url)
    mapping = tmp_path / "mapping.json"
    mapping.write_text('{"mappings": {"doc": {"properties": {"eventName": {"type": "keyword"}}}}}')
    monkeypatch.setenv("TEST_ES_PASSWORD", PASSWORD)
    common = ["--url", proxy.url, "--index", index, "--mapping", str(mapping), "--username", USER,
              "--password-env", "TEST_ES_PASSWORD"]

    assert create_index(common) == 1  # no CA bundle: the certificate cannot be verified
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    assert create_index([*common, "--ca-certs", str(pki.ca_cert)]) == 0
    assert re.search(rf"created index {index} .*elasticsearch 8", capsys.readouterr().out)
