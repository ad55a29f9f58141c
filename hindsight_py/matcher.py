"""Hindsight's ``message_matcher``: the expression a plugin uses to pick messages.

``compile_matcher(text)`` parses the expression once and turns it into one Python
function (generated source, compiled once), so evaluating a matcher costs a few
attribute loads and comparisons per message.

The language and its results follow lua_sandbox's matcher, including its quirks, because
a drop-in replacement must select exactly the messages Hindsight selects:

- ``&&``/``||`` grouping is rebuilt with upstream's operator-stack algorithm, which keeps a
  ``(`` on the stack after its ``)``. So ``A && (B) || C`` means ``A && (B || C)`` there,
  and here too.
- Strings compare as bytes with ``strncmp`` over the message value's length, then by
  length; for ``<=`` there is no length fallback, so a value equal to the literal followed
  by a NUL byte is ``<=`` the literal.
- A quoted RFC 3339 ``Timestamp`` is read with ``mktime``, i.e. in the process's local time
  zone, and its ``±HHMM`` offset is always *added* (upstream takes the sign from the wrong
  capture, so ``-0100`` adds an hour just like ``+0100``).
- An absent ``Pid`` compares as INT_MIN, an absent ``Severity`` as 7.
- An index left out of ``Fields[name]`` is not always 0: upstream's parser reuses a stale
  value slot, so after ``Fields[a][1]`` (or a quoted Timestamp, which leaves its hour and
  minute there) a later ``Fields[b]`` reads ``Fields[b][1][...]``.
- Field indices accept only ``2[0-5][0-5]|1[0-9][0-9]|[1-9][0-9]|[0-9]`` (so 206-209,
  216-219, ... 246-249 are syntax errors, as upstream).
- ``=~`` patterns are lua_sandbox's variant of Lua 5.1 patterns: parentheses are plain
  characters (no captures), ``%1``-``%9`` and ``%g`` are plain characters, and a
  malformed pattern never matches instead of raising (``hindsight_py.lua_pattern``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from hindsight_py.lua_pattern import pattern_test
from hindsight_py.matcher_parse import MatcherError, Node, Test, parse

__all__ = ["Matcher", "MatcherError", "compile_matcher"]


class Matcher:
    """A compiled message_matcher. Call it with a message to test it.

    ``match`` is the bare compiled function (the same test without the method call), for
    hot loops. ``always`` is True when no message can fail the test, so callers may skip
    decoding; ``headers_only`` when no ``Fields[...]`` is looked at.
    """

    __slots__ = ("expression", "always", "headers_only", "match", "header_test")

    def __init__(self, expression: str, match: Callable[[Any], bool], always: bool, headers_only: bool,
                 header_test: tuple[int, bytes, bool] | None = None) -> None:
        self.expression = expression
        self.match = match
        self.always = always
        self.headers_only = headers_only
        # (tag, literal, equal) for `Type == '...'` and the like: select() needs no decoding
        self.header_test = header_test

    def __call__(self, msg: Any) -> bool:
        return self.match(msg)

    def select(self, raws: list[bytes]) -> list[int] | None:
        """The indices of the messages (protobuf bytes, as a queue reader hands them over: valid
        ones) that match, or None when this matcher needs them decoded. For a single comparison of
        a string header with a literal (`Type == 'cloudtrail'`, `Logger != 'x'`), the header is
        compared as bytes in one pass over the batch; a message that pass cannot walk is decoded."""
        if self.header_test is None:
            return None
        from hindsight_py import message as hmsg
        from hindsight_py import peek

        tag, literal, equal = self.header_test
        verdicts = peek.header_selection(raws, tag, literal)
        if -1 in verdicts:
            for i, verdict in enumerate(verdicts):
                if verdict == -1:
                    try:
                        msg = hmsg.decode(raws[i], fields=False, payload=tag == hmsg.PAYLOAD)
                    except hmsg.DecodeError:
                        verdicts[i] = 0 if equal else -2  # matches neither way
                    else:
                        verdicts[i] = int(self.match(msg)) if equal else int(not self.match(msg))
        want = 1 if equal else 0
        return [i for i, verdict in enumerate(verdicts) if verdict == want]

    def __repr__(self) -> str:
        return f"<Matcher {self.expression!r}>"


# --------------------------------------------------------------------------------------
# String comparisons with upstream's strncmp semantics.
# --------------------------------------------------------------------------------------

def _encode(v: str) -> bytes:
    return v.encode("utf-8", "surrogateescape")


_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
# What a relational test says when the header is absent (upstream: a NULL string).
_ABSENT = {"==": False, "!=": True, "<": True, "<=": True, ">": False, ">=": False, "=~": False, "!~": True}


def _string_test(op: str, literal: bytes, pattern_literal: bool = False) -> Callable[[Any], bool]:
    """A test of a str/bytes value (or None for an absent header) against a literal."""
    absent = _ABSENT[op]
    if op in ("=~", "!~"):
        found = pattern_test(literal, pattern_literal)
        if op == "=~":
            return lambda v: False if v is None else found(v)
        return lambda v: True if v is None else not found(v)

    lit_b = literal
    # Equality holds for str too: surrogateescape decoding is one-to-one. For ordering,
    # an ASCII str compares like its bytes whatever the literal holds.
    lit_s = literal.decode("utf-8", "surrogateescape")
    if op == "==":
        return lambda v: v is not None and v == (lit_s if isinstance(v, str) else lit_b)
    if op == "!=":
        return lambda v: v is None or v != (lit_s if isinstance(v, str) else lit_b)

    cmp = _ORDER[op]
    nul_b, nul_s = lit_b + b"\0", lit_s + "\0"
    le = op == "<="

    def order(v: Any) -> bool:
        if v is None:
            return absent
        if isinstance(v, str):
            if v.isascii():
                return cmp(v, lit_s) or (le and v.startswith(nul_s))
            v = _encode(v)
        # strncmp stops at a NUL both sides share: past the literal's end that is a
        # match, and only <= lacks the length fallback that hides it.
        return cmp(v, lit_b) or (le and v.startswith(nul_b))

    return order


# --------------------------------------------------------------------------------------
# Code generation.
# --------------------------------------------------------------------------------------


def _fold(node: Node) -> Node:
    """Drop TRUE/FALSE operands that cannot change the result (tests have no side effects)."""
    if not isinstance(node, tuple):
        return node
    op, left, right = node[0], _fold(node[1]), _fold(node[2])
    absorbing = op == "or"  # TRUE absorbs ||, FALSE absorbs &&
    for side, other in ((left, right), (right, left)):
        if side is absorbing:
            return absorbing
        if side is (not absorbing):
            return other
    return (op, left, right)


def _uses(node: Node, var: str) -> bool:
    """Whether any test of the tree looks at ``var`` ("fields", "payload" or a header attribute)."""
    if isinstance(node, tuple):
        return _uses(node[1], var) or _uses(node[2], var)
    return isinstance(node, Test) and node.var == var


_NUMBER_CHECKS: dict[str, Callable[[float], Callable[[Any], bool]]] = {
    "==": lambda d: lambda v: float(v) == d,
    "!=": lambda d: lambda v: float(v) != d,
    "<": lambda d: lambda v: float(v) < d,
    "<=": lambda d: lambda v: float(v) <= d,
    ">": lambda d: lambda v: float(v) > d,
    ">=": lambda d: lambda v: float(v) >= d,
}
_STRING_TYPES, _NUMBER_TYPES, _TRUTH_TYPES = frozenset((0, 1)), frozenset((2, 3)), frozenset((2, 3, 4))


def _field_test(t: Test) -> Callable[[Any], bool]:
    name, fi, ai, op = t.name, t.fi, t.ai, t.op
    missing = False  # what a test says when Fields[name][fi][ai] does not exist
    if t.kind == "nil":
        missing = op == "=="
        types: frozenset[int] = frozenset(range(5))
        check: Callable[[Any], bool] = lambda v: op == "!="  # noqa: E731
    elif t.kind in ("string", "pattern"):
        types, check = _STRING_TYPES, _string_test(op, t.value, t.literal)
    elif t.kind == "number":
        types, check = _NUMBER_TYPES, _NUMBER_CHECKS[op](t.value)
    else:  # TRUE / FALSE also match numbers equal to 1 / 0
        target = 1 if t.kind == "true" else 0
        types = _TRUTH_TYPES
        check = (lambda v: v == target) if op == "==" else (lambda v: v != target)

    def test(m: Any) -> bool:
        skip = fi
        for f in m.fields:
            if f.name == name:
                if skip:
                    skip -= 1
                    continue
                values = f.values
                if ai >= len(values) or not 0 <= f.value_type <= 4:
                    return missing
                return f.value_type in types and check(values[ai])
        return missing

    return test


def _test_source(t: Test, bind: Callable[[Any], str]) -> str:
    var, op, kind = t.var, t.op, t.kind
    if var == "fields":
        return f"{bind(_field_test(t))}(m)"
    if kind == "nil":
        return f"m.{var} is {'' if op == '==' else 'not '}None"
    if var == "timestamp":
        # Upstream converts the int64 to a double first; so do we.
        return f"float(m.timestamp) {op} {bind(t.value)}"
    if var == "severity":
        return f"(7 if (s := m.severity) is None else s) {op} {bind(t.value)}"
    if var == "pid":
        return f"(-2147483648 if (p := m.pid) is None else p) {op} {bind(t.value)}"
    if kind == "string" and op in ("==", "!="):
        literal = t.value if var == "uuid" else t.value.decode("utf-8", "surrogateescape")
        return f"m.{var} {op} {bind(literal)}"
    return f"{bind(_string_test(op, t.value, t.literal))}(m.{var})"


def _source(node: Node, bind: Callable[[Any], str]) -> str:
    if node is True or node is False:
        return str(node)
    if isinstance(node, Test):
        return f"({_test_source(node, bind)})"
    op = node[0]
    # Flatten chains of one operator so deep expressions don't nest deeply in source.
    operands: list[Node] = []
    pending = [node[2], node[1]]
    while pending:
        n = pending.pop()
        if isinstance(n, tuple) and n[0] == op:
            pending.extend((n[2], n[1]))
        else:
            operands.append(n)
    return "(" + f" {op} ".join(_source(n, bind) for n in operands) + ")"


def compile_matcher(expression: str | bytes) -> Matcher:
    """Parse a message_matcher expression; raise MatcherError if it is not valid."""
    src = expression if isinstance(expression, bytes) else expression.encode("utf-8", "surrogateescape")
    text = expression if isinstance(expression, str) else expression.decode("utf-8", "surrogateescape")
    tree = _fold(parse(src))

    constants: list[Any] = []

    def bind(value: Any) -> str:
        constants.append(value)
        return f"_k{len(constants) - 1}"

    body = _source(tree, bind)
    params = ", ".join(f"_k{i}" for i in range(len(constants)))
    code = f"def _factory({params}):\n    def match(m):\n        return {body}\n    return match\n"
    namespace: dict[str, Any] = {}
    exec(compile(code, f"<message_matcher {text[:60]!r}>", "exec"), namespace)
    match = namespace["_factory"](*constants)
    return Matcher(text, match, always=tree is True, headers_only=not _uses(tree, "fields"),
                   header_test=_header_test(tree))


_HEADER_TAGS = {"type": 3, "logger": 4, "env_version": 7, "hostname": 9, "payload": 6}


def _header_test(tree: Node) -> tuple[int, bytes, bool] | None:
    """(tag, literal, equal) when the whole expression is `<string header> == '...'` (or !=)."""
    if isinstance(tree, Test) and tree.var in _HEADER_TAGS and tree.kind == "string" and tree.op in ("==", "!="):
        return _HEADER_TAGS[tree.var], tree.value, tree.op == "=="
    return None


def compile_raw_matcher(expression: str) -> Callable[[bytes], bool] | None:
    """A matcher over a message's protobuf bytes (create_message_matcher's); None if the expression is invalid.

    A plugin's matchers usually test the same message one after another (a router's): a single
    header comparison is read off the bytes, and the others share the last message decoded, so
    a message is decoded at most once whatever the number of matchers."""
    try:
        m = compile_matcher(expression)
    except MatcherError:
        return None
    if m.always:
        return lambda raw: True
    match = m.match
    if m.header_test is not None:
        from hindsight_py import peek

        tag, literal, equal = m.header_test

        def header_match(raw: bytes) -> bool:
            verdict = peek.header_selection([raw], tag, literal)[0]
            if verdict < 0:  # not walkable without decoding: the decoder has the last word
                return match(_decoded(raw))
            return verdict == equal

        return header_match
    return lambda raw: match(_decoded(raw))


# The last message the raw matchers decoded, with its bytes. One tuple, replaced whole, so a
# thread never sees one message's bytes with another's Message.
_last_decoded: tuple[bytes, Any] = (b"", None)


def _decoded(raw: bytes) -> Any:
    global _last_decoded
    last_raw, msg = _last_decoded
    if msg is not None and raw == last_raw:
        return msg
    from hindsight_py import message as hmsg

    msg = hmsg.decode(raw)
    _last_decoded = (raw, msg)
    return msg
