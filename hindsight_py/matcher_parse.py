"""A ``message_matcher`` text parsed into a tree of tests, as lua_sandbox's parser reads it.

Upstream's grouping, index and Timestamp quirks are replayed here (the list is in
hindsight_py.matcher's docstring); hindsight_py.matcher turns the tree into a predicate.
"""

from __future__ import annotations

import re
import time
from typing import Any

__all__ = ["MatcherError", "Node", "Test", "parse"]


class MatcherError(ValueError):
    """The matcher text is not a valid expression; ``position`` is a byte offset."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


_SPACE = frozenset(b" \t\r\n")
_OPS2 = {b"==": "==", b"!=": "!=", b">=": ">=", b"<=": "<=", b"=~": "=~", b"!~": "!~"}
_OPS1 = {b">": ">", b"<": "<"}
_RELATIONAL = frozenset(("==", "!=", ">", ">=", "<", "<="))
_NUMBER = re.compile(rb"[-+]?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_INDEX = re.compile(rb"\[(2[0-5][0-5]|1[0-9][0-9]|[1-9][0-9]|[0-9])\]")
_RFC3339 = re.compile(
    rb"""(['"])([0-9]{4})-(0[1-9]|1[0-2])-([1-2][0-9]|0[1-9]|3[0-1])"""
    rb"""T([0-1][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9]|60)(\.[0-9]+)?"""
    rb"""(?:Z|[-+]([0-1][0-9]|2[0-3])([0-5][0-9]))\1"""
)
_STRING_HEADERS = {b"Type": "type", b"Logger": "logger", b"Hostname": "hostname",
                   b"EnvVersion": "env_version", b"Payload": "payload"}
_MAX_STRING = 255
_MAX_OPERATORS = 127  # upstream keeps 2n+1 nodes in an unsigned char

_OPEN, _OR, _AND = 10, 11, 12  # upstream's precedence order on its operator stack
_LOGICAL = {_OR: "or", _AND: "and"}


class Test:
    """One comparison: ``var op value`` (var is a Message attribute name or "fields")."""

    __slots__ = ("var", "op", "kind", "value", "literal", "name", "fi", "ai")

    def __init__(self, var: str, op: str, kind: str, value: Any = None, literal: bool = False,
                 name: str = "", fi: int = 0, ai: int = 0) -> None:
        self.var, self.op, self.kind, self.value, self.literal = var, op, kind, value, literal
        self.name, self.fi, self.ai = name, fi, ai


# A parsed tree: True/False constants, a Test, or (op, left, right) with op "and"/"or".
Node = Any


class _Parser:
    def __init__(self, src: bytes) -> None:
        self.src = src
        self.pos = 0
        self.operators = 0
        # Upstream's shunting-yard output (tests and "and"/"or") and operator stack.
        self.out: list[Any] = []
        self.stack: list[int] = []
        # Upstream's generated parser keeps rule variables in one reused array and never
        # resets them: Fields' two indices share it with the date and time parts of a
        # quoted Timestamp. An index left out takes the stale value, so Fields[a][1] ...
        # && Fields[b] reads Fields[b][1][0]. Replayed here in source order.
        self.slots = [0, 0, 0]

    # -- errors and tokens --------------------------------------------------------------

    def fail(self, what: str, pos: int | None = None) -> MatcherError:
        pos = self.pos if pos is None else pos
        rest = self.src[pos:pos + 20].decode("utf-8", "replace")
        near = f"near {rest!r}" if rest else "at the end"
        return MatcherError(f"invalid message_matcher: {what} at offset {pos} ({near})", pos)

    def skip_space(self) -> None:
        src, pos = self.src, self.pos
        while pos < len(src) and src[pos] in _SPACE:
            pos += 1
        self.pos = pos

    def take(self, token: bytes) -> bool:
        if self.src.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def operator(self) -> str:
        two = self.src[self.pos:self.pos + 2]
        op = _OPS2.get(two)
        if op is None:
            op = _OPS1.get(two[:1])
            if op is None:
                raise self.fail("expected a comparison operator (== != < <= > >= =~ !~)")
            self.pos += 1
        else:
            self.pos += 2
        self.skip_space()
        return op

    def string(self) -> bytes:
        src, start = self.src, self.pos
        quote = src[start:start + 1]
        if quote not in (b"'", b'"'):
            raise self.fail("expected a quoted string")
        q = quote[0]
        i = start + 1
        while True:
            if i >= len(src):
                raise self.fail("unterminated string", start)
            c = src[i]
            if c == 0x5C and i + 1 < len(src) and src[i + 1] in (0x5C, q):
                i += 2
            elif c == q:
                break
            else:
                i += 1
        raw = src[start + 1:i]
        # Upstream unescapes \" \' and \\ whichever quote is used.
        out = bytearray()
        j = 0
        while j < len(raw):
            if raw[j] == 0x5C and j + 1 < len(raw) and raw[j + 1] in b"\"'\\":
                j += 1
            out.append(raw[j])
            j += 1
        if len(out) > _MAX_STRING:
            raise self.fail(f"string longer than {_MAX_STRING} bytes", start)
        self.pos = i + 1
        return bytes(out)

    def number(self) -> float:
        m = _NUMBER.match(self.src, self.pos)
        if m is None:
            raise self.fail("expected a number")
        self.pos = m.end()
        return float(m.group())

    def keyword_value(self) -> str | None:
        for word in ("TRUE", "FALSE", "NIL"):
            if self.take(word.encode()):
                return word
        return None

    # -- grammar ------------------------------------------------------------------------

    def parse(self) -> Node:
        self.skip_space()
        self.ored()
        if self.pos != len(self.src):
            raise self.fail("expected && or || or the end of the expression")
        for op in reversed(self.stack):
            if op != _OPEN:
                self.out.append(_LOGICAL[op])
        return self.tree()

    def ored(self) -> None:
        self.anded()
        while self.src.startswith(b"||", self.pos):
            self.logical(_OR)
            self.anded()
        self.skip_space()

    def anded(self) -> None:
        self.expr()
        while self.src.startswith(b"&&", self.pos):
            self.logical(_AND)
            self.expr()
        self.skip_space()

    def logical(self, op: int) -> None:
        self.operators += 1
        if self.operators > _MAX_OPERATORS:
            raise self.fail(f"more than {_MAX_OPERATORS} && / || operators")
        self.pos += 2
        self.skip_space()
        stack = self.stack
        # Upstream pops at most one operator here, and never pops a "(" left over from a
        # closed group; replaying that keeps its grouping, quirk included.
        if not stack or op > stack[-1]:
            stack.append(op)
        else:
            self.out.append(_LOGICAL[stack[-1]])
            stack[-1] = op

    def expr(self) -> None:
        if self.take(b"("):
            self.stack.append(_OPEN)
            self.skip_space()
            self.ored()
            if not self.take(b")"):
                raise self.fail("expected )")
            while self.stack and self.stack[-1] != _OPEN:
                self.out.append(_LOGICAL[self.stack.pop()])
            self.skip_space()
        else:
            self.out.append(self.test())
            self.skip_space()

    def test(self) -> Any:
        src, pos = self.src, self.pos
        if self.take(b"TRUE"):
            return True
        if self.take(b"FALSE"):
            return False
        for word, attr in _STRING_HEADERS.items():
            if self.take(word):
                return self.header_test(attr, nil=True)
        if self.take(b"Uuid"):
            return self.header_test("uuid", nil=False)
        if self.take(b"Timestamp"):
            return self.timestamp_test()
        if self.take(b"Severity"):
            return self.numeric_test("severity", nil=False)
        if self.take(b"Pid"):
            return self.numeric_test("pid", nil=True)
        if src.startswith(b"Fields[", pos):
            return self.field_test()
        raise self.fail("expected a test (a header name, Fields[...], TRUE, FALSE or '(')")

    def header_test(self, attr: str, nil: bool) -> Test:
        self.skip_space()
        op = self.operator()
        if op in ("=~", "!~"):
            return self.pattern(attr, op)
        if self.src[self.pos:self.pos + 1] in (b"'", b'"'):
            return Test(attr, op, "string", self.string())
        if nil and op in ("==", "!=") and self.take(b"NIL"):
            return Test(attr, op, "nil")
        raise self.fail("expected a quoted string" + (" or NIL" if nil and op in ("==", "!=") else ""))

    def pattern(self, var: str, op: str, **where: Any) -> Test:
        value = self.string()
        literal = self.take(b"%")
        if not literal and re.search(rb"[\^$*+?.\[%-]", value) is None:
            literal = True
        return Test(var, op, "pattern", value, literal, **where)

    def numeric_test(self, attr: str, nil: bool) -> Test:
        self.skip_space()
        op = self.operator()
        if op not in _RELATIONAL:
            raise self.fail(f"{op} needs a string variable", self.pos)
        if nil and op in ("==", "!=") and self.take(b"NIL"):
            return Test(attr, op, "nil")
        return Test(attr, op, "number", self.number())

    def timestamp_test(self) -> Test:
        self.skip_space()
        op = self.operator()
        if op not in _RELATIONAL:
            raise self.fail(f"{op} needs a string variable", self.pos)
        if self.src[self.pos:self.pos + 1] in (b"'", b'"'):
            m = _RFC3339.match(self.src, self.pos)
            if m is None:
                raise self.fail("expected an RFC 3339 time like '2016-05-24T21:51:00Z'")
            self.pos = m.end()
            hour, minute, second = int(m.group(5)), int(m.group(6)), int(m.group(7))
            self.slots = [hour, minute, second] if m.group(9) is None else [int(m.group(9)), int(m.group(10)), second]
            return Test("timestamp", op, "number", _rfc3339_ns(m))
        return Test("timestamp", op, "number", self.number())

    def field_test(self) -> Test:
        src = self.src
        start = self.pos + len(b"Fields[")
        close = src.find(b"]", start)
        if close < 0:
            raise self.fail("unterminated Fields[")
        raw_name = src[start:close]
        if len(raw_name) > _MAX_STRING:
            # Upstream keeps the length in a byte and silently tests a truncated name.
            raise self.fail(f"field name longer than {_MAX_STRING} bytes", start)
        self.pos = close + 1
        for slot in range(2):
            m = _INDEX.match(src, self.pos)
            if m is None:
                break
            self.slots[slot] = int(m.group(1))
            self.pos = m.end()
        # An index left out is whatever the parser's value slot holds (see _Parser.slots).
        where = {"name": raw_name.decode("utf-8", "surrogateescape"), "fi": self.slots[0], "ai": self.slots[1]}
        self.skip_space()
        if src[self.pos:self.pos + 1] == b"[":
            raise self.fail("invalid field index (0-255)")
        op = self.operator()
        if op in ("=~", "!~"):
            return self.pattern("fields", op, **where)
        head = src[self.pos:self.pos + 1]
        if head in (b"'", b'"'):
            return Test("fields", op, "string", self.string(), **where)
        if op in ("==", "!=") and (word := self.keyword_value()) is not None:
            return Test("fields", op, word.lower(), **where)
        if _NUMBER.match(src, self.pos):
            return Test("fields", op, "number", self.number(), **where)
        raise self.fail("expected a quoted string or a number"
                        + (" or TRUE/FALSE/NIL" if op in ("==", "!=") else ""))

    def tree(self) -> Node:
        stack: list[Node] = []
        for item in self.out:
            if isinstance(item, str):
                right = stack.pop()
                left = stack.pop()
                stack.append((item, left, right))
            else:
                stack.append(item)
        (root,) = stack
        return root


def _rfc3339_ns(m: re.Match[bytes]) -> float:
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(2, 8))
    # Same float steps as upstream: fraction, plus the offset (always added, see the module
    # docstring), plus mktime() of the fields as local time, times 1e9.
    value = float(m.group(8)) if m.group(8) else 0.0
    if m.group(9) is not None:
        value += int(m.group(9)) * 3600 + int(m.group(10)) * 60
    try:
        seconds = time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
    except (OverflowError, ValueError):
        seconds = -1.0  # what mktime() reports when it cannot represent the time
    return (value + seconds) * 1e9


def parse(src: bytes) -> Node:
    """The tree of ``src``; raise MatcherError if it is not a valid expression."""
    nul = src.find(b"\0")
    if nul >= 0:
        raise MatcherError(f"invalid message_matcher: NUL byte at offset {nul}", nul)
    return _Parser(src).parse()
