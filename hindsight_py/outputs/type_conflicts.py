"""Lossless loading of JSON whose field types vary between documents (CloudTrail's, for one).

An Elasticsearch/OpenSearch index maps each field path to one type, fixed by the first document
that has it. CloudTrail does not keep to one: `responseElements.role` is an object in one record
and a string in the next, `requestParameters.disableApiTermination` a boolean or `{"value": ..}`,
and so on. Such a record is rejected with a mapping error. The policy here (docs/cloudtrail.md):

1. An index template, installed by the output before its first request when `index_template` is
   configured: no date or numeric detection (an `apiVersion` such as "2012-10-17" stays a string),
   `index.mapping.total_fields.limit` raised, every dynamic string `text` with a `.keyword`
   subfield (what CloudTracker queries), `eventTime` and `@timestamp` dates.
2. A conflict resolver the bulk sender calls when the server rejects a document: the offending
   value moves to a sibling field named after its JSON type (`role` -> `role_string`,
   `role_object`, `role_number`, `role_boolean`; an array mixing types becomes `role_json`, a
   string holding the value's exact JSON text), the move is recorded in the document's
   `_hindsight_renamed` list (`{"from": "responseElements.role", "to": "responseElements.role_string"}`)
   and the document is sent again. Nothing is dropped or rewritten: numbers keep their exact text,
   keys their order, and :func:`undo_renames` gives back the original record. Only what still
   fails is dead-lettered.

The resolver knows the server's messages on Elasticsearch 7/8 and OpenSearch 1/2 (reason texts of
document_parsing_exception, mapper_parsing_exception and illegal_argument_exception).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hindsight_py.outputs.elasticsearch import BulkSender

__all__ = [
    "CONFIG_KEYS",
    "RENAMED_KEY",
    "ConflictResolver",
    "IndexTemplate",
    "TemplateInstaller",
    "configure",
    "undo_renames",
]

#: The output cfg keys read here (a Lua output forwards only the keys it knows; these are added).
CONFIG_KEYS = ("type_conflicts", "index_template")
#: Where a document lists the moves made to it.
RENAMED_KEY = "_hindsight_renamed"
#: A document needing more moves than this is dead-lettered: something else is wrong with it.
MAX_RENAMES_PER_DOCUMENT = 100
_LOGGED_PATHS_CAP = 1000

_LOG_ERR, _LOG_WARNING, _LOG_INFO = 3, 4, 6

# -- the server's error texts ----------------------------------------------------------------------
# (pattern, how the field is mapped: a fixed "object", or the pattern group holding the type)
_OBJECT = "object"
_ERROR_PATTERNS: tuple[tuple[re.Pattern[str], str | int], ...] = (
    # ES 7/8, OS 1/2: the index maps an object, the document has a value (or an array of values).
    (re.compile(r"object mapping for \[([^\]]+)\] tried to parse field \[[^\]]*\] as object, "
                r"but found a concrete value"), _OBJECT),
    # the index maps a value type, the document has an object or a value of another type.
    (re.compile(r"failed to parse field \[([^\]]+)\] of type \[([^\]]+)\]"), 2),
    # one document (or two racing ones) brought two types for a new field.
    (re.compile(r"mapper \[([^\]]+)\] cannot be changed from type \[([^\]]+)\] to \[[^\]]+\]"), 2),
    (re.compile(r"[Cc]an't merge a non object mapping \[([^\]]+)\] with an object mapping"), "unknown"),
    # a dotted key (`{"a.b": 1}`) under a field the index maps as a value.
    (re.compile(r"Could not dynamically add mapping for field \[[^\]]+\]\. "
                r"Existing mapping for \[([^\]]+)\] must be of type object but found \[([^\]]+)\]"), 2),
    # too deep: the object is kept as its JSON text.
    (re.compile(r"Limit of mapping depth \[\d+\] has been exceeded due to object field \[([^\]]+)\]"), "depth"),
)
# OpenSearch names no field when a document is too deep; the objects at the limit are found here.
_DEPTH_LIMIT = re.compile(r"The depth of the field has exceeded the allowed limit of \[(\d+)\]")

_TEXT_TYPES = frozenset({"text", "keyword", "wildcard", "match_only_text", "constant_keyword",
                         "search_as_you_type", "version", "flat_object", "flattened"})
_NUMERIC_TYPES = frozenset({"long", "integer", "short", "byte", "double", "float", "half_float",
                            "scaled_float", "unsigned_long"})


@dataclass(frozen=True)
class _Conflict:
    path: str
    mapped: str  # "object", a field type, "unknown", or "depth"


def _conflict_of(error: Any) -> _Conflict | None:
    """The field path and mapped type a rejection names, looking through its caused_by chain."""
    seen = 0
    while isinstance(error, dict) and seen < 8:
        reason = error.get("reason")
        if isinstance(reason, str):
            m = _DEPTH_LIMIT.search(reason)
            if m:
                return _Conflict("", f"depth-limit:{m.group(1)}")
            for pattern, mapped in _ERROR_PATTERNS:
                m = pattern.search(reason)
                if m:
                    kind = m.group(mapped) if isinstance(mapped, int) else mapped
                    return _Conflict(m.group(1), kind)
        error = error.get("caused_by")
        seen += 1
    return None


# -- exact JSON: numbers keep their text ----------------------------------------------------------
class _Number(str):
    """A JSON number that is not an integer, kept as its source text (a float would round it)."""


def _loads(text: bytes | str) -> Any:
    return json.loads(text, parse_float=_Number, parse_constant=_Number)


def _dumps(value: Any, ensure_ascii: bool = False) -> str:
    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ensure_ascii)
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(k, ensure_ascii=ensure_ascii) + ":" + _dumps(v, ensure_ascii) for k, v in value.items()
        ) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value)  # int, bool, None


def _encode(doc: dict[str, Any]) -> bytes:
    try:
        return _dumps(doc).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): only ASCII escapes can carry it
        return _dumps(doc, ensure_ascii=True).encode("ascii")


# -- values and where they are ----------------------------------------------------------------------
def _kind(value: Any) -> str:
    """The JSON type of a value as a sibling name suffix; an array is the type of its elements."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | _Number):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        kinds = {_kind(v) for v in value if v is not None}
        kinds.discard("null")
        if len(kinds) == 1:
            return kinds.pop()
        return "null" if not kinds else "json"
    return "null"


def _fits(value: Any, mapped: str) -> bool | None:
    """Whether the server can index `value` as a field mapped `mapped`; None when it cannot be told."""
    if value is None:
        return True
    if isinstance(value, list):
        verdicts = [_fits(v, mapped) for v in value]
        if False in verdicts:
            return False
        return None if None in verdicts else True
    if mapped == _OBJECT:
        return isinstance(value, dict)
    if mapped == "unknown":
        return None
    if isinstance(value, dict):
        return False
    if mapped in _TEXT_TYPES:
        return True
    if mapped in _NUMERIC_TYPES:
        if isinstance(value, bool):
            return False
        if isinstance(value, int | _Number):
            return True
        try:
            float(value)
        except ValueError:
            return False
        return True
    if mapped == "boolean":
        return isinstance(value, bool) or value in ("true", "false", "")
    if mapped in ("date", "date_nanos"):
        if isinstance(value, bool):
            return False
        return True if isinstance(value, int | _Number) else None
    return None


@dataclass
class _Place:
    parent: dict[str, Any]
    key: str
    #: the part of the path this key stands for (the whole key, or its first part when dotted)
    head: str
    #: the key continues the path with dots (`{"a.b": 1}` found for path `a`): it stands for an object
    dotted: bool

    @property
    def value(self) -> Any:
        return {} if self.dotted else self.parent[self.key]


def _locate(node: Any, path: str, out: list[_Place]) -> None:
    """Every place the dotted `path` reaches, through arrays and dotted keys, as the server does."""
    if isinstance(node, list):
        for item in node:
            _locate(item, path, out)
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        if key == path:
            out.append(_Place(node, key, key, False))
        elif key.startswith(path + "."):
            out.append(_Place(node, key, path, True))
        elif path.startswith(key + "."):
            _locate(node[key], path[len(key) + 1:], out)


def _replace_key(parent: dict[str, Any], old: str, new: str, value: Any) -> None:
    """Rename a key in place, keeping its position (the document reads as the record did)."""
    items = [(new, value) if k == old else (k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)


# -- the resolver ----------------------------------------------------------------------------------
class ConflictResolver:
    """Called by the bulk sender with a rejected document's source and the server's error.

    Returns the document with the offending value moved aside, or None when the error is not a
    type conflict this can mend (the sender then dead-letters the document). Called from each
    request in flight: the counts and the record of what was logged are kept under a lock.
    """

    def __init__(self, log: Callable[[int, str], None] | None = None) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._logged: set[tuple[str, str]] = set()
        #: documents given back for another try, and fields moved, over the resolver's life
        self.documents = 0
        self.moves = 0

    def __call__(self, source: bytes, error: dict[str, Any]) -> bytes | None:
        conflict = _conflict_of(error)
        if conflict is None:
            return None
        try:
            doc = _loads(source)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        renamed = doc.get(RENAMED_KEY)
        if renamed is not None and not isinstance(renamed, list):
            return None  # not ours: leave the document as it is
        renamed = renamed or []
        if len(renamed) >= MAX_RENAMES_PER_DOCUMENT:
            return None
        moves = _move_aside(doc, conflict)
        if not moves:
            return None
        for move in moves:
            if move not in renamed:
                renamed.append(move)
        doc[RENAMED_KEY] = renamed
        with self._lock:
            self.documents += 1
            self.moves += len(moves)
            first = self._first_seen(moves)
        self._report(conflict, first)
        return _encode(doc)

    def _first_seen(self, moves: list[dict[str, str]]) -> list[dict[str, str]]:
        """The moves not logged yet (up to the cap), now recorded as logged."""
        new = []
        for move in moves:
            key = (move["from"], move["to"])
            if key in self._logged or len(self._logged) >= _LOGGED_PATHS_CAP:
                continue
            self._logged.add(key)
            new.append(move)
        return new

    def _report(self, conflict: _Conflict, moves: list[dict[str, str]]) -> None:
        if self._log is None:
            return
        for move in moves:
            self._log(_LOG_INFO, f"type conflict at {move['from']}: {_describe(conflict.mapped)}; such values go to "
                                 f"{move['to']} (listed in {RENAMED_KEY} of each document)")


def _describe(mapped: str) -> str:
    if mapped == _OBJECT:
        return "the index maps an object there"
    if mapped == "depth" or mapped.startswith("depth-limit:"):
        return "nested deeper than the index allows, kept as JSON text"
    if mapped == "unknown":
        return "the index maps another type there"
    return f"the index maps it as {mapped}"


def _objects_at_depth(node: Any, depth: int, prefix: str, out: list[str]) -> None:
    """Paths of the objects `depth` fields down (dotted keys count each part), as the server counts."""
    if isinstance(node, list):
        for item in node:
            _objects_at_depth(item, depth, prefix, out)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        below = depth - (key.count(".") + 1)
        if below == 0 and _kind(value) == "object" and path not in out:
            out.append(path)
        elif below > 0:
            _objects_at_depth(value, below, path, out)


def _move_aside(doc: dict[str, Any], conflict: _Conflict) -> list[dict[str, str]]:
    if conflict.mapped.startswith("depth-limit:"):
        limit = int(conflict.mapped.split(":", 1)[1])
        paths: list[str] = []
        _objects_at_depth(doc, limit, "", paths)
        moves: list[dict[str, str]] = []
        for path in paths:
            moves += [m for m in _move_aside(doc, _Conflict(path, "depth")) if m not in moves]
        return moves
    places: list[_Place] = []
    _locate(doc, conflict.path, places)
    places = [p for p in places if p.parent is not doc or p.key != RENAMED_KEY]
    if not places:
        return []
    if conflict.mapped == "depth":
        chosen = [p for p in places if not p.dotted]
        as_json = True
    else:
        verdicts = [_fits(p.value, conflict.mapped) for p in places]
        chosen = [p for p, v in zip(places, verdicts, strict=True) if v is False]
        if not chosen:
            chosen = [p for p, v in zip(places, verdicts, strict=True) if v is None]
        if not chosen:  # the server says a value here does not fit: believe it
            chosen = places
        as_json = False
    moves: list[dict[str, str]] = []
    for place in chosen:
        move = _move(place, conflict.path, as_json)
        if move is not None and move not in moves:
            moves.append(move)
    return moves


def _move(place: _Place, path: str, as_json: bool) -> dict[str, str] | None:
    parent, key = place.parent, place.key
    if place.dotted:
        # `{"a.b": 1}` for path `a`: the key stands for an object at `a`; it becomes "a_object.b"
        rest = key[len(place.head):]
        suffix = _free_suffix(parent, place.head, "object", rest)
        _replace_key(parent, key, place.head + suffix + rest, parent[key])
        return {"from": path, "to": path + suffix}
    value = parent[key]
    kind = "json" if as_json else _kind(value)
    if kind == "null":
        return None
    suffix = _free_suffix(parent, key, kind, "")
    new_value = _dumps(value) if kind == "json" else value
    _replace_key(parent, key, key + suffix, new_value)
    return {"from": path, "to": path + suffix}


def _free_suffix(parent: dict[str, Any], stem: str, kind: str, rest: str) -> str:
    suffix = f"_{kind}"
    n = 2
    while stem + suffix + rest in parent:
        suffix = f"_{kind}_{n}"
        n += 1
    return suffix


def undo_renames(doc: dict[str, Any]) -> dict[str, Any]:
    """The record a renamed document was made from (in place; returns `doc`)."""
    moves = doc.pop(RENAMED_KEY, None)
    if not isinstance(moves, list):
        return doc
    for move in reversed(moves):
        if not isinstance(move, dict):
            continue
        source, target = move.get("from"), move.get("to")
        if not isinstance(source, str) or not isinstance(target, str) or not target.startswith(source):
            continue
        suffix = target[len(source):]
        places: list[_Place] = []
        _locate(doc, target, places)
        for place in places:
            key = place.key
            if place.dotted:
                head = place.head
                _replace_key(place.parent, key, head[: len(head) - len(suffix)] + key[len(head):], place.parent[key])
                continue
            value = place.parent[key]
            if re.fullmatch(r"_json(_\d+)?", suffix) and isinstance(value, str):
                value = _loads(value)
            _replace_key(place.parent, key, key[: len(key) - len(suffix)], value)
    return doc


# -- the index template ----------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexTemplate:
    """The mapping policy for the indices an output writes (see the module docstring)."""

    name: str
    index_patterns: tuple[str, ...]
    total_fields_limit: int = 10000
    ignore_above: int = 1024
    priority: int = 200
    #: every index made from the template joins these aliases: CloudTracker's default index name
    #: "cloudtrail" can then stand for all the daily indices
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, value: Any) -> IndexTemplate:
        """`index_template = "cloudtrail-*"`, or a table with `index_patterns` and optional keys."""
        if isinstance(value, str):
            return cls(name=_template_name(value), index_patterns=(value,))
        if not isinstance(value, dict):
            raise ValueError("index_template must be an index pattern or a table with index_patterns")
        patterns = value.get("index_patterns")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError("index_template.index_patterns must be a pattern or a list of patterns")
        known = {"name", "index_patterns", "total_fields_limit", "ignore_above", "priority", "aliases"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"index_template: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(
            name=str(value.get("name") or _template_name(patterns[0])),
            index_patterns=tuple(patterns),
            total_fields_limit=int(value.get("total_fields_limit", 10000)),
            ignore_above=int(value.get("ignore_above", 1024)),
            priority=int(value.get("priority", 200)),
            aliases=_names(value.get("aliases"), "index_template.aliases"),
        )

    def mappings(self) -> dict[str, Any]:
        return {
            "date_detection": False,
            "numeric_detection": False,
            "dynamic_templates": [{
                "strings_as_text_and_keyword": {
                    "match_mapping_type": "string",
                    "mapping": {"type": "text",
                                "fields": {"keyword": {"type": "keyword", "ignore_above": self.ignore_above}}},
                },
            }],
            "properties": {
                "@timestamp": {"type": "date"},
                "eventTime": {"type": "date"},
                RENAMED_KEY: {"properties": {"from": {"type": "keyword"}, "to": {"type": "keyword"}}},
            },
        }

    def settings(self) -> dict[str, Any]:
        return {"index.mapping.total_fields.limit": self.total_fields_limit}

    def composable_body(self) -> dict[str, Any]:
        """For `PUT _index_template/<name>` (Elasticsearch 7.8+, OpenSearch)."""
        return {
            "index_patterns": list(self.index_patterns),
            "priority": self.priority,
            "template": {"settings": self.settings(), "mappings": self.mappings(),
                         "aliases": {alias: {} for alias in self.aliases}},
            "_meta": {"managed_by": "hindsight-py", "policy": "docs/cloudtrail.md"},
        }

    def legacy_body(self) -> dict[str, Any]:
        """For `PUT _template/<name>` (Elasticsearch 7.0 to 7.7)."""
        return {"index_patterns": list(self.index_patterns), "order": self.priority,
                "settings": self.settings(), "mappings": self.mappings(),
                "aliases": {alias: {} for alias in self.aliases}}


def _names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{what} must be a name or a list of names")


def _template_name(pattern: str) -> str:
    stem = re.sub(r"[^a-z0-9_]+", "-", pattern.lower()).strip("-_") or "index"
    return f"hindsight-{stem}"


class TemplateInstaller:
    """The sender's `prepare` hook: puts the template before the first bulk request.

    Returns None once done (or when it cannot be done and documents should go without it: a
    server refusing templates still gets every document, through the resolver), or the reason to
    wait and try again (the server cannot be reached, or is busy).
    """

    def __init__(self, template: IndexTemplate, log: Callable[[int, str], None]) -> None:
        self.template = template
        self._log = log

    def __call__(self, sender: BulkSender) -> str | None:
        info = sender.detect()
        if info is None:
            return f"cannot reach the server to install index template {self.template.name}"
        version = tuple(int(p) for p in re.findall(r"\d+", info.version)[:2]) or (info.major,)
        if info.distribution == "elasticsearch" and version < (7, 0):
            self._log(_LOG_WARNING, f"index template {self.template.name} not installed: Elasticsearch "
                                    f"{info.version} needs a typed template; see docs/cloudtrail.md")
            return None
        if info.distribution == "elasticsearch" and version < (7, 8):
            path, body = f"/_template/{self.template.name}", self.template.legacy_body()
        else:
            path, body = f"/_index_template/{self.template.name}", self.template.composable_body()
        answer = sender.request("PUT", path, body)
        if isinstance(answer, str):
            return f"installing index template {self.template.name}: {answer}"
        status, data = answer
        if 200 <= status < 300:
            aliases = f" (aliases: {', '.join(self.template.aliases)})" if self.template.aliases else ""
            self._log(_LOG_INFO, f"index template {self.template.name} installed for "
                                 f"{', '.join(self.template.index_patterns)}{aliases}")
            return None
        text = data[:300].decode("utf-8", "replace")
        if status in (408, 429) or status >= 500:
            return f"installing index template {self.template.name}: HTTP {status}: {text}"
        self._log(_LOG_ERR, f"index template {self.template.name} not installed (HTTP {status}: {text}); "
                            "documents go on without it, mapping conflicts are still resolved")
        return None


def configure(sender: BulkSender, cfg: dict[str, Any], log: Callable[[int, str], None]) -> None:
    """Set up a sender from an output cfg: `type_conflicts` ("rename", the default, or
    "dead_letter") and `index_template` (a pattern or a table; nothing is installed without it)."""
    policy = cfg.get("type_conflicts") or "rename"
    if policy not in ("rename", "dead_letter"):
        raise ValueError(f"type_conflicts must be 'rename' or 'dead_letter', not {policy!r}")
    if policy == "rename":
        sender.conflict_resolver = ConflictResolver(log)
    template = cfg.get("index_template")
    if template:
        sender.prepare = TemplateInstaller(IndexTemplate.from_config(template), log)
