"""AWS Signature Version 4 for Amazon OpenSearch Service (`es`) and OpenSearch Serverless (`aoss`).

The signing is ours (hashlib/hmac, tested byte for byte against botocore's SigV4Auth); only
the credential lookup may use botocore, when it is installed, for what static files cannot
express (assumed roles, SSO, container and instance credentials, with their refresh).

Where credentials come from, in this order (the AWS CLI's order):
  1. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, unless a profile is named
     in the configuration;
  2. the profile's keys in the shared credentials file (AWS_SHARED_CREDENTIALS_FILE,
     default ~/.aws/credentials), then in the config file (AWS_CONFIG_FILE, ~/.aws/config);
  3. botocore's session for the same profile, if botocore can be imported.
The profile is `aws_profile` from the configuration, else AWS_PROFILE, else "default".
"""

from __future__ import annotations

import configparser
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "AwsCredentials",
    "CredentialsError",
    "SigV4Signer",
    "find_credentials",
    "find_region",
    "sign",
    "signer_from_config",
]

# Headers SigV4 must not sign (hop-by-hop, or changed by proxies); botocore's list.
_UNSIGNED_HEADERS = frozenset(
    {"connection", "expect", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# search-NAME-ID.REGION.es.amazonaws.com, ID.REGION.aoss.amazonaws.com
_AWS_HOST = re.compile(r"\.([a-z]{2}(?:-[a-z]+)+-\d+)\.(es|aoss)\.amazonaws\.com(?:\.cn)?$")


class CredentialsError(Exception):
    """No usable AWS credentials or region: the message says where we looked."""


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str
    token: str | None = None


def _canonical_query(query: str) -> str:
    # Each name and value URI-encoded exactly once, whatever the URL had; sorted by name, then value.
    pairs = []
    for pair in query.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _canonical_path(path: str) -> str:
    # Services other than S3 sign the path URI-encoded once more (so "%" becomes "%25"), with
    # "." and ".." segments resolved and repeated slashes merged (RFC 3986 5.2.4, plus AWS's rule).
    if not path:
        return "/"
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    normalized = ("/" if path.startswith("/") else "") + "/".join(segments)
    if path.endswith("/") and segments:
        normalized += "/"
    return quote(normalized, safe="/~")


def host_header(url: str) -> str:
    """The Host header for `url`, as SigV4 signs it: lowercase, no default port, no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    k_date = _hmac(f"AWS4{secret_key}".encode(), date)
    return _hmac(_hmac(_hmac(k_date, region), service), "aws4_request")


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime | None = None,
    key: bytes | None = None,
) -> dict[str, str]:
    """The headers that sign this request: X-Amz-Date, X-Amz-Content-SHA256, X-Amz-Security-Token
    (with temporary credentials) and Authorization. Send them along with `headers`.

    Every header in `headers` is signed (but the hop-by-hop ones), and Host too: give it
    explicitly or it is taken from the URL. `key` is a precomputed :func:`signing_key`.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%SZ")
    date = stamp[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    added = {"X-Amz-Date": stamp, "X-Amz-Content-SHA256": payload_hash}
    if credentials.token:
        added["X-Amz-Security-Token"] = credentials.token

    to_sign: dict[str, list[str]] = {}
    for name, value in list(headers.items()) + list(added.items()):
        lname = name.lower()
        if lname in _UNSIGNED_HEADERS or lname == "authorization":
            continue
        if lname in ("x-amz-date", "x-amz-content-sha256", "x-amz-security-token") and name not in added:
            continue  # ours replace any stale copies from an earlier attempt
        to_sign.setdefault(lname, []).append(" ".join(str(value).split()))
    if "host" not in to_sign:
        to_sign["host"] = [host_header(url)]
    names = sorted(to_sign)
    signed_headers = ";".join(names)
    parts = urlsplit(url)
    canonical_request = "\n".join([
        method.upper(),
        _canonical_path(parts.path),
        _canonical_query(parts.query),
        "".join(f"{n}:{','.join(to_sign[n])}\n" for n in names),
        signed_headers,
        payload_hash,
    ])
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join([
        "AWS4-HMAC-SHA256",
        stamp,
        scope,
        hashlib.sha256(canonical_request.encode()).hexdigest(),
    ])
    if key is None:
        key = signing_key(credentials.secret_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return added


class SigV4Signer:
    """Signs each request with fresh credentials; the per-day signing key is cached."""

    def __init__(self, credentials: Callable[[], AwsCredentials], region: str, service: str = "es") -> None:
        self.credentials = credentials
        self.region = region
        self.service = service
        self._key_for: tuple[str, str] = ("", "")
        self._key = b""

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> dict[str, str]:
        creds = self.credentials()
        now = datetime.now(UTC)
        date = now.strftime("%Y%m%d")
        if self._key_for != (date, creds.secret_key):
            self._key = signing_key(creds.secret_key, date, self.region, self.service)
            self._key_for = (date, creds.secret_key)
        return sign(method, url, headers, body, credentials=creds, region=self.region, service=self.service,
                    now=now, key=self._key)


# -- credentials ------------------------------------------------------------------------------


def _profile(explicit: str | None) -> str:
    return explicit or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


def _env_credentials() -> AwsCredentials | None:
    access = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (access and secret):
        return None
    token = os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN")
    return AwsCredentials(access, secret, token or None)


def _shared_files() -> list[tuple[Path, bool]]:
    """(path, is the config file): the config file names profiles "profile NAME"."""
    home = Path(os.path.expanduser("~"))
    return [
        (Path(os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")),
         False),
        (Path(os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config")), True),
    ]


def _read_profile(path: Path, profile: str, is_config: bool) -> dict[str, str] | None:
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from None
    sections = [f"profile {profile}", profile] if is_config else [profile]
    for section in sections:
        if parser.has_section(section):
            return {k.strip().lower(): v.strip() for k, v in parser.items(section)}
    return None


class _FileCredentials:
    """A profile's static keys from a shared file, read again when the file changes
    (tools that refresh temporary credentials rewrite it)."""

    def __init__(self, path: Path, profile: str, is_config: bool, first: AwsCredentials) -> None:
        self.path, self.profile, self.is_config = path, profile, is_config
        self._creds = first
        self._mtime = self._stat()

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def __call__(self) -> AwsCredentials:
        mtime = self._stat()
        if mtime != self._mtime:
            self._mtime = mtime
            found = _file_credentials(self.path, self.profile, self.is_config)
            if found is not None:
                self._creds = found
        return self._creds


def _file_credentials(path: Path, profile: str, is_config: bool) -> AwsCredentials | None:
    values = _read_profile(path, profile, is_config)
    if not values:
        return None
    access, secret = values.get("aws_access_key_id"), values.get("aws_secret_access_key")
    if not (access and secret):
        return None
    token = values.get("aws_session_token") or values.get("aws_security_token")
    return AwsCredentials(access, secret, token or None)


# What a missing-credentials error adds when the `aws` extra is not installed.
BOTOCORE_MISSING = (", and botocore is not installed (pip install 'hindsight-py[aws]' adds it, for assumed "
                    "roles, SSO, container and instance credentials)")


def _botocore_credentials(profile: str | None) -> Callable[[], AwsCredentials] | None:
    try:
        import botocore.session
    except ImportError:
        return None
    try:
        session = botocore.session.Session(profile=profile)
        found = session.get_credentials()
    except Exception as exc:  # botocore raises many types for a broken profile
        raise CredentialsError(f"botocore could not load AWS credentials: {exc}") from None
    if found is None:
        return None

    def frozen() -> AwsCredentials:
        # refreshable credentials renew themselves here when they are about to expire
        f = found.get_frozen_credentials()
        return AwsCredentials(f.access_key, f.secret_key, f.token or None)

    return frozen


def find_credentials(profile: str | None = None) -> Callable[[], AwsCredentials]:
    """The first source of the chain (module docstring) that has credentials, as a callable."""
    if profile is None:
        env = _env_credentials()
        if env is not None:
            return lambda: env
    name = _profile(profile)
    for path, is_config in _shared_files():
        creds = _file_credentials(path, name, is_config)
        if creds is not None:
            return _FileCredentials(path, name, is_config, creds)
    from_botocore = _botocore_credentials(profile)
    if from_botocore is not None:
        return from_botocore
    files = ", ".join(str(p) for p, _ in _shared_files())
    raise CredentialsError(
        f"no AWS credentials found: not in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, nor for profile "
        f"{name!r} in {files}" + ("" if _botocore_importable() else BOTOCORE_MISSING)
    )


def _botocore_importable() -> bool:
    try:
        import botocore  # noqa: F401
    except ImportError:
        return False
    return True


def find_region(explicit: str | None, url: str, profile: str | None = None) -> str:
    """`aws_region`, else AWS_REGION/AWS_DEFAULT_REGION, else the profile's region, else the endpoint's name."""
    if explicit:
        return explicit
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(var):
            return os.environ[var]
    config_path, is_config = _shared_files()[1]
    values = _read_profile(config_path, _profile(profile), is_config) or {}
    if values.get("region"):
        return values["region"]
    match = _AWS_HOST.search(urlsplit(url if "://" in url else f"https://{url}").hostname or "")
    if match:
        return match.group(1)
    raise CredentialsError(
        f"no AWS region for {url}: set aws_region (or AWS_REGION), or a region in the profile"
    )


def service_for(url: str, explicit: str | None = None) -> str:
    """`aws_service`, else "aoss" for an OpenSearch Serverless endpoint, else "es"."""
    if explicit:
        return explicit
    host = urlsplit(url if "://" in url else f"https://{url}").hostname or ""
    return "aoss" if ".aoss." in host else "es"


def signer_from_config(cfg: Mapping[str, Any], url: str) -> SigV4Signer | None:
    """A signer when the output's cfg asks for SigV4 (`aws_sigv4 = true`), else None."""
    if not cfg.get("aws_sigv4"):
        return None
    profile = cfg.get("aws_profile") or None
    return SigV4Signer(
        find_credentials(profile),
        find_region(cfg.get("aws_region"), url, profile),
        service_for(url, cfg.get("aws_service")),
    )
