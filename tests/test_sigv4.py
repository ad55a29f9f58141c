"""AWS SigV4 (hindsight_py/outputs/sigv4.py) against botocore's own signer, and on the wire.

The signatures must be byte-equal to botocore.auth.SigV4Auth's at a fixed time, for the requests
the outputs make. Then a fake cluster that checks every request with botocore takes a whole
hindsight_cli run signed by the native output. Credentials come from the AWS chain (environment,
shared files, botocore's session), each step checked in an isolated HOME.

Cost: well under a second, plus one short hindsight_cli run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
import threading
from datetime import UTC, datetime
from unittest import mock

import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest
from native_pipeline import FakeCluster, NativePipeline, Request

from hindsight_py.outputs import sigv4
from hindsight_py.outputs.elasticsearch import BulkSender
from hindsight_py.outputs.sigv4 import AwsCredentials, CredentialsError, find_credentials, find_region, sign

MOMENT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
KEYS = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
TEMPORARY = AwsCredentials("ASIAEXAMPLE", "secret/with+chars=", "FwoGZXIvYXdzEXAMPLE//token==")
NDJSON = b'{"index":{"_index":"cloudtrail"}}\n{"eventName":"ListRoles"}\n'
BASE_HEADERS = {"Content-Type": "application/x-ndjson", "Accept": "application/json", "User-Agent": "hindsight-py"}


def botocore_signature(method: str, url: str, headers: dict[str, str], body: bytes, creds: AwsCredentials,
                       region: str, service: str, moment: datetime) -> dict[str, str]:
    """What botocore's SigV4Auth adds to the same request at `moment`."""
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    signer = botocore.auth.SigV4Auth(botocore.credentials.Credentials(creds.access_key, creds.secret_key,
                                                                      creds.token), service, region)
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: moment.replace(tzinfo=None)):
        signer.add_auth(request)
    return dict(request.headers.items())


CASES = [
    # (method, url, extra headers, body, credentials, region, service)
    ("POST", "https://search-logs-abc.eu-west-1.es.amazonaws.com/_bulk"
             "?filter_path=took%2Cerrors%2Citems.%2A.status%2Citems.%2A.error", {}, NDJSON, KEYS, "eu-west-1", "es"),
    ("GET", "https://search-logs-abc.eu-west-1.es.amazonaws.com/", {}, b"", TEMPORARY, "eu-west-1", "es"),
    ("PUT", "http://127.0.0.1:9200/cloudtrail-2024.01.02?wait_for_active_shards=1&master_timeout=30s",
     {"Content-Type": "application/json"}, b'{"settings":{}}', KEYS, "us-east-1", "es"),
    ("POST", "https://abc123.us-west-2.aoss.amazonaws.com/_bulk", {"Content-Encoding": "gzip"},
     gzip.compress(NDJSON, mtime=0), TEMPORARY, "us-west-2", "aoss"),
    ("POST", "https://vpc-x.ap-southeast-2.es.amazonaws.com/logs%2Bold/_doc/./a/../b//c",
     {"X-Opaque-Id": "  several   spaces  "}, b"{}", KEYS, "ap-southeast-2", "es"),
]


@pytest.mark.parametrize(("method", "url", "extra", "body", "creds", "region", "service"), CASES)
def test_signatures_are_byte_equal_to_botocores(method, url, extra, body, creds, region, service):
    headers = {**BASE_HEADERS, **extra}
    ours = sign(method, url, headers, body, credentials=creds, region=region, service=service, now=MOMENT)
    # botocore signs what it is given: the same headers, our payload hash included
    theirs = botocore_signature(method, url, {**headers, "X-Amz-Content-SHA256": ours["X-Amz-Content-SHA256"]},
                                body, creds, region, service, MOMENT)

    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"] == "20240102T030405Z"
    assert ours["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token") == creds.token


def test_a_changed_body_or_time_changes_the_signature():
    url = CASES[0][1]
    first = sign("POST", url, BASE_HEADERS, NDJSON, credentials=KEYS, region="eu-west-1", service="es", now=MOMENT)
    other_body = sign("POST", url, BASE_HEADERS, NDJSON + b"\n", credentials=KEYS, region="eu-west-1",
                      service="es", now=MOMENT)
    later = sign("POST", url, BASE_HEADERS, NDJSON, credentials=KEYS, region="eu-west-1", service="es",
                 now=MOMENT.replace(second=6))
    assert len({first["Authorization"], other_body["Authorization"], later["Authorization"]}) == 3


# -- on the wire ------------------------------------------------------------------------------


class SignatureChecker:
    """A FakeCluster gate: every request must carry a SigV4 signature botocore agrees with."""

    def __init__(self, creds: AwsCredentials, region: str, service: str = "es") -> None:
        self.creds, self.region, self.service = creds, region, service
        self.checked = 0
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> tuple[int, bytes] | None:
        auth = request.headers.get("Authorization", "")
        match = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), Signature=(\w+)", auth)
        if not match:
            return 403, b'{"message":"missing SigV4 Authorization"}'
        lower = {k.lower(): v for k, v in request.headers.items()}
        signed = {name: lower[name] for name in match.group(2).split(";")}
        if lower.get("x-amz-content-sha256") != hashlib.sha256(request.wire_body).hexdigest():
            return 403, b'{"message":"the payload hash does not match the body"}'
        moment = datetime.strptime(lower["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        url = f"http://{lower['host']}{request.path}"
        with self.lock:  # botocore's clock is patched for the check
            expected = botocore_signature(request.method, url, signed, request.wire_body, self.creds, self.region,
                                          self.service, moment)["Authorization"]
        if expected != auth:
            return 403, b'{"message":"The request signature we calculated does not match the signature you provided."}'
        self.checked += 1
        return None


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """An isolated AWS environment: no credentials anywhere unless the test puts them there."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "home" / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "home" / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups from botocore
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_the_native_output_signs_every_request_it_makes(tmp_path, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEMPORARY.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEMPORARY.secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TEMPORARY.token or "")
    checker = SignatureChecker(TEMPORARY, "eu-west-1")
    cluster = FakeCluster(gate=checker)
    lines = [b'{"eventID":"e%d","n":%d}' % (i, i) for i in range(300)]
    try:
        pipeline = NativePipeline(tmp_path / "run", lines, {
            "url": cluster.url, "aws_sigv4": True, "aws_region": "eu-west-1", "gzip": True, "flush_count": 100,
            "encoders_elasticsearch_common": {"index": "cloudtrail", "type_name": "doc"},
        })
        assert pipeline.run().returncode == 0, pipeline.stderr
    finally:
        cluster.close()
    # each exactly once; two requests in flight at once (max_in_flight) may arrive in either order
    assert sorted(cluster.sources()) == sorted(lines)
    assert checker.checked == len(cluster.requests) >= 4  # GET / and three bulk requests, each verified


def test_the_checker_refuses_a_wrong_signature(tmp_path):
    cluster = FakeCluster(gate=SignatureChecker(KEYS, "eu-west-1"))
    try:
        wrong = AwsCredentials(KEYS.access_key, "not-the-secret")
        sender = BulkSender([cluster.url], dead_letter_path=tmp_path / "d.jsonl", log=lambda level, text: None,
                            signer=sigv4.SigV4Signer(lambda: wrong, "eu-west-1"))
        assert sender.detect() is None and sender.detect_failure_status == 403
        sender.signer = sigv4.SigV4Signer(lambda: KEYS, "eu-west-1")
        assert sender.detect() is not None
    finally:
        cluster.close()


# -- credentials and region -------------------------------------------------------------------


def test_environment_variables_come_first(aws_env, monkeypatch):
    (aws_env / "credentials").write_text("[default]\naws_access_key_id = FILE\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    assert find_credentials()() == AwsCredentials("ENV", "env-secret")


def test_a_named_profile_is_read_from_the_shared_files_and_reread_when_they_change(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENV")  # a named profile does not use the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    credentials = aws_env / "credentials"
    credentials.write_text("[default]\naws_access_key_id = D\naws_secret_access_key = d\n"
                           "[ops]\naws_access_key_id = OPS\naws_secret_access_key = ops-secret\n"
                           "aws_session_token = tok1\n")
    source = find_credentials("ops")
    assert source() == AwsCredentials("OPS", "ops-secret", "tok1")

    credentials.write_text("[ops]\naws_access_key_id = OPS2\naws_secret_access_key = ops-secret2\n"
                           "aws_session_token = tok2\n")
    stat = credentials.stat()
    os.utime(credentials, (stat.st_atime, stat.st_mtime + 5))
    assert source() == AwsCredentials("OPS2", "ops-secret2", "tok2")


def test_the_config_file_names_profiles_with_a_prefix(aws_env, monkeypatch):
    (aws_env / "config").write_text("[profile dev]\naws_access_key_id = DEV\naws_secret_access_key = dev-secret\n"
                                    "region = eu-north-1\n")
    monkeypatch.setenv("AWS_PROFILE", "dev")
    assert find_credentials()() == AwsCredentials("DEV", "dev-secret")
    assert find_region(None, "https://search-x.us-east-1.es.amazonaws.com") == "eu-north-1"


def test_botocore_resolves_what_the_files_cannot_express(aws_env):
    # a credential_process profile: no keys in the files, botocore runs the process
    answer = json.dumps({"Version": 1, "AccessKeyId": "PROC", "SecretAccessKey": "proc-secret",
                         "SessionToken": "proc-token"})
    script = aws_env / "creds.py"
    script.write_text(f"print({answer!r})\n")
    (aws_env / "config").write_text(f"[profile proc]\ncredential_process = {sys.executable} {script}\n")
    assert find_credentials("proc")() == AwsCredentials("PROC", "proc-secret", "proc-token")


def test_no_credentials_is_a_clear_error(aws_env):
    with pytest.raises(CredentialsError, match=r"no AWS credentials found.*AWS_ACCESS_KEY_ID.*credentials"):
        find_credentials()


def test_the_region_comes_from_the_setting_the_environment_or_the_endpoint(aws_env, monkeypatch):
    url = "https://search-logs-abc123.ap-southeast-2.es.amazonaws.com"
    assert find_region(None, url) == "ap-southeast-2"
    assert find_region(None, "https://0123abcd.us-gov-west-1.aoss.amazonaws.com") == "us-gov-west-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert find_region(None, url) == "ca-central-1"
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    assert find_region(None, url) == "sa-east-1"
    assert find_region("eu-west-3", url) == "eu-west-3"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(CredentialsError, match="no AWS region"):
        find_region(None, "https://search.internal:9200")


def test_serverless_endpoints_sign_for_aoss():
    assert sigv4.service_for("https://abc.us-east-1.aoss.amazonaws.com") == "aoss"
    assert sigv4.service_for("https://search-x.us-east-1.es.amazonaws.com") == "es"
    assert sigv4.service_for("https://proxy.internal", "aoss") == "aoss"
