"""`hindsight-py create-index`: the index set-up step of CloudTracker's recipe, for any server.

The recipe PUTs a mapping body with a mapping type (`{"mappings": {"doc": {"properties": ...}}}`)
and then raises `index.mapping.total_fields.limit`, two curl calls that only Elasticsearch 6
accepts as written. This command sends one create-index request with the user's mapping, the
user's settings and the field limit, and drops the mapping type for servers that have none
(Elasticsearch 7+, OpenSearch). It reaches the server the way the outputs do: TLS with
verification, basic auth, API keys or AWS SigV4.

Exit status: 0 created (or already there, with --exists-ok), 1 failure (a file, the server),
2 usage, 3 the index already exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hindsight_py.outputs.elasticsearch import BulkSender, ServerInfo

__all__ = ["EXIT_EXISTS", "IndexSetupError", "create_index_body", "main", "typeless_mappings"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EXISTS = 0, 1, 2, 3
DEFAULT_TOTAL_FIELDS_LIMIT = 10000
TOTAL_FIELDS_KEY = "index.mapping.total_fields.limit"

# Keys that may sit at the root of a mapping; any other single root key is a mapping type.
_MAPPING_ROOT_KEYS = frozenset({
    "properties", "dynamic", "dynamic_templates", "date_detection", "numeric_detection", "dynamic_date_formats",
    "enabled", "runtime", "subobjects", "_source", "_meta", "_routing", "_field_names", "_all", "_size",
    "_data_stream_timestamp", "_doc_count", "_parent", "_timestamp", "_ttl", "_id", "_index", "_type",
})


class IndexSetupError(Exception):
    """A problem to report in one line, and exit 1."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise IndexSetupError(f"{what} file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise IndexSetupError(f"{what} file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexSetupError(f"{what} file {path}: not valid JSON: {exc.msg} at line {exc.lineno} column "
                              f"{exc.colno}") from None
    if not isinstance(doc, dict):
        raise IndexSetupError(f"{what} file {path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def mapping_types(mappings: dict[str, Any]) -> list[str]:
    """The mapping type names of a typed mapping ({"doc": {"properties": ...}}), or [] if it has none."""
    if not mappings or any(key in _MAPPING_ROOT_KEYS for key in mappings):
        return []
    if all(isinstance(value, dict) for value in mappings.values()):
        return list(mappings)
    return []


def typeless_mappings(mappings: dict[str, Any], source: str = "the mapping") -> dict[str, Any]:
    """`mappings` without its mapping type, for servers that have none."""
    types = mapping_types(mappings)
    if not types:
        return mappings
    kept = [t for t in types if t != "_default_"]
    if len(kept) != 1:
        raise IndexSetupError(
            f"{source} has the mapping types {', '.join(types)}; servers without mapping types "
            "(Elasticsearch 7+, OpenSearch) take one mapping: keep one type"
        )
    inner = mappings[kept[0]]
    assert isinstance(inner, dict)
    return inner


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def normalized_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Index settings as flat `index.*` keys, whichever form they came in (flat, nested, under "settings")."""
    if set(settings) == {"settings"} and isinstance(settings["settings"], dict):
        settings = settings["settings"]
    return {(k if k.startswith("index.") else f"index.{k}"): v for k, v in _flatten(settings).items()}


def mappings_of(mapping_doc: dict[str, Any] | None, source: str = "the mapping") -> dict[str, Any] | None:
    """The mappings of a create-index body, or the document itself when it is a bare mapping."""
    if mapping_doc is None:
        return None
    if "mappings" in mapping_doc and set(mapping_doc) <= {"mappings", "settings", "aliases"}:
        mappings = mapping_doc["mappings"]
        if not isinstance(mappings, dict):
            raise IndexSetupError(f"{source}: \"mappings\" must be a JSON object")
        return mappings
    return mapping_doc


def create_index_body(
    mapping_doc: dict[str, Any] | None,
    settings_doc: dict[str, Any] | None,
    total_fields_limit: int | None,
    *,
    keep_types: bool,
    mapping_source: str = "the mapping",
    type_name: str = "doc",
) -> dict[str, Any]:
    """The create-index request body.

    `mapping_doc` is a create-index body ({"mappings": ..., "settings": ..., "aliases": ...}) or a
    bare mapping, typed or not; servers with mapping types (`keep_types`) get an untyped one under
    `type_name`. Settings: the mapping body's, then the settings file's, then the
    field limit (given, or kept from those files, or the default).
    """
    body: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    mappings = mappings_of(mapping_doc, mapping_source)
    if mapping_doc is not None and mappings is not mapping_doc:
        if isinstance(mapping_doc.get("settings"), dict):
            settings.update(normalized_settings(mapping_doc["settings"]))
        if "aliases" in mapping_doc:
            body["aliases"] = mapping_doc["aliases"]
    if settings_doc is not None:
        settings.update(normalized_settings(settings_doc))
    if total_fields_limit is not None:
        settings[TOTAL_FIELDS_KEY] = total_fields_limit
    else:
        settings.setdefault(TOTAL_FIELDS_KEY, DEFAULT_TOTAL_FIELDS_LIMIT)
    body["settings"] = settings
    if mappings is not None:
        if not keep_types:
            body["mappings"] = typeless_mappings(mappings, mapping_source)
        elif mapping_types(mappings):
            body["mappings"] = mappings
        else:  # Elasticsearch 6 and older need a type: the one the outputs send
            body["mappings"] = {type_name: mappings}
    return body


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hindsight-py create-index",
        description="Create an Elasticsearch/OpenSearch index with a mapping, settings and a total fields limit. "
        "A typed mapping (CloudTracker's {\"mappings\": {\"doc\": {...}}}) is converted for servers without types.",
        epilog="Exit status: 0 created, 1 failed, 2 usage, 3 the index already exists.",
    )
    p.add_argument("--url", required=True, help="the server, e.g. https://search.example.com:9200")
    p.add_argument("--index", required=True, help="the index to create, e.g. cloudtrail")
    p.add_argument("--mapping", type=Path, help="JSON: a create-index body or a mapping, typed or not")
    p.add_argument("--settings", type=Path, help="JSON: index settings (flat, nested or under \"settings\")")
    p.add_argument("--total-fields-limit", type=int, metavar="N",
                   help=f"index.mapping.total_fields.limit (default: the files' value, else {DEFAULT_TOTAL_FIELDS_LIMIT})")
    p.add_argument("--exists-ok", action="store_true", help="exit 0 when the index already exists")
    p.add_argument("--type-name", default="doc",
                   help="Elasticsearch 6 and older: the mapping type for an untyped mapping (default doc, "
                   "the outputs' type_name)")
    p.add_argument("--timeout", type=float, default=30, help="seconds per request (default 30)")
    auth = p.add_argument_group("authentication and TLS")
    auth.add_argument("--username")
    auth.add_argument("--password", help="visible to other local users: prefer --password-env")
    auth.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    auth.add_argument("--api-key", help="an Elasticsearch API key (base64 id:key)")
    auth.add_argument("--ca-certs", help="the CA bundle that signed the server certificate")
    auth.add_argument("--client-cert", help="a client certificate (PEM)")
    auth.add_argument("--client-key", help="its private key (PEM)")
    auth.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    auth.add_argument("--aws-sigv4", action="store_true", help="sign requests for Amazon OpenSearch Service")
    auth.add_argument("--aws-region")
    auth.add_argument("--aws-service", help='"es" (default) or "aoss" for OpenSearch Serverless')
    auth.add_argument("--aws-profile")
    return p


def _sender(args: argparse.Namespace) -> BulkSender:
    from hindsight_py.outputs.sigv4 import CredentialsError, signer_from_config

    password = args.password
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            raise IndexSetupError(f"--password-env: the environment variable {args.password_env} is not set")
    sender = BulkSender(
        [args.url], dead_letter_path=os.devnull, timeout=args.timeout, username=args.username, password=password,
        api_key=args.api_key, ca_certs=args.ca_certs, verify=not args.insecure, client_cert=args.client_cert,
        client_key=args.client_key, max_retries=0, log=lambda level, text: None,
    )
    cfg = {"aws_sigv4": args.aws_sigv4, "aws_region": args.aws_region, "aws_service": args.aws_service,
           "aws_profile": args.aws_profile}
    try:
        sender.signer = signer_from_config(cfg, args.url)
    except CredentialsError as exc:
        raise IndexSetupError(str(exc)) from None
    return sender


def _server(sender: BulkSender, url: str) -> ServerInfo | None:
    """What the server is; None for endpoints that do not say (OpenSearch Serverless, restricted users)."""
    answer = sender.request("GET", "/")
    if isinstance(answer, str):
        raise IndexSetupError(f"cannot reach {answer}")
    status, data = answer
    if status in (401, 407):
        raise IndexSetupError(f"{url} refused the credentials (HTTP {status}): check --username/--password, "
                              "--api-key or the AWS credentials")
    if status != 200:
        return None
    try:
        return ServerInfo.from_root(json.loads(data))
    except (ValueError, AttributeError):
        raise IndexSetupError(f"{url} does not answer like Elasticsearch or OpenSearch: "
                              f"{data[:200].decode('utf-8', 'replace')!r}") from None


def _reason(data: bytes) -> tuple[str, str]:
    """(error type, reason) of an error answer."""
    try:
        doc = json.loads(data)
        error = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        error = None
    if isinstance(error, dict):
        reason = str(error.get("reason", ""))
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            reason += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
        return str(error.get("type", "error")), reason
    return "error", (str(error) if error else data[:300].decode("utf-8", "replace"))


def _create(args: argparse.Namespace) -> int:
    mapping_doc = _read_json(args.mapping, "mapping") if args.mapping else None
    settings_doc = _read_json(args.settings, "settings") if args.settings else None
    if args.index != args.index.lower() or not args.index or args.index.startswith(("-", "_", "+")):
        raise IndexSetupError(f"invalid index name {args.index!r}: lowercase, not starting with -, _ or +")
    sender = _sender(args)
    try:
        info = _server(sender, args.url)
        keep_types = bool(info and info.accepts_types)
        body = create_index_body(mapping_doc, settings_doc, args.total_fields_limit, keep_types=keep_types,
                                 mapping_source=f"mapping file {args.mapping}", type_name=args.type_name)
        what = f"{info.distribution} {info.version}" if info else "a server that does not tell its version"
        answer = sender.request("PUT", "/" + args.index, body)
    finally:
        sender.close()
    if isinstance(answer, str):
        raise IndexSetupError(f"cannot reach {answer}")
    status, data = answer
    if 200 <= status < 300:
        types = mapping_types(mappings_of(mapping_doc) or {})
        note = f" (mapping type {', '.join(types)} dropped: this server has none)" if types and not keep_types else ""
        print(f"created index {args.index} on {args.url} ({what}){note}, "
              f"{TOTAL_FIELDS_KEY} = {body['settings'][TOTAL_FIELDS_KEY]}")
        return EXIT_OK
    kind, reason = _reason(data)
    if kind == "resource_already_exists_exception" or "already exists" in reason:
        print(f"index {args.index} already exists on {args.url}: nothing was changed", file=sys.stderr)
        return EXIT_OK if args.exists_ok else EXIT_EXISTS
    if status in (401, 403, 407):
        raise IndexSetupError(f"{args.url} refused to create index {args.index} (HTTP {status}): {kind}: {reason}")
    raise IndexSetupError(f"{args.url} could not create index {args.index}: HTTP {status}: {kind}: {reason}")


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: usage errors are 2, --help is 0
        return int(exit_.code or 0)
    try:
        return _create(args)
    except IndexSetupError as exc:
        print(f"hindsight-py create-index: {exc}", file=sys.stderr)
        return EXIT_FAILED
