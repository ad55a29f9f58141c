"""Lua patterns, lua_sandbox's string_matcher flavour, over bytes: the engine behind the
message matcher's ``=~`` and ``!~``.

The flavour differs from Lua 5.1's: parentheses are plain characters (no captures), ``%1``-``%9``
and ``%g`` are plain characters, and a malformed pattern never matches instead of raising.
Character classes are the C locale's (Hindsight never calls setlocale).

``pattern_test(pattern, literal)`` turns a pattern into a test of a value (str or bytes):
a substring search for a literal, a translated regular expression where the pattern has one,
and otherwise ``reference_search``, a direct interpreter of the parsed items.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["parse_pattern", "pattern_test", "reference_search"]


_ALL = [True] * 256


def _ctype(pred: Callable[[int], bool]) -> list[bool]:
    return [pred(c) for c in range(256)]


def _is_alpha(c: int) -> bool:
    return 65 <= c <= 90 or 97 <= c <= 122


def _is_digit(c: int) -> bool:
    return 48 <= c <= 57


# The C locale's <ctype.h>, which is what the matcher sees (Hindsight never calls setlocale).
_CLASSES: dict[int, list[bool]] = {
    ord("a"): _ctype(_is_alpha),
    ord("c"): _ctype(lambda c: c < 32 or c == 127),
    ord("d"): _ctype(_is_digit),
    ord("l"): _ctype(lambda c: 97 <= c <= 122),
    ord("p"): _ctype(lambda c: 33 <= c <= 126 and not (_is_alpha(c) or _is_digit(c))),
    ord("s"): _ctype(lambda c: c == 32 or 9 <= c <= 13),
    ord("u"): _ctype(lambda c: 65 <= c <= 90),
    ord("w"): _ctype(lambda c: _is_alpha(c) or _is_digit(c)),
    ord("x"): _ctype(lambda c: _is_digit(c) or 65 <= c <= 70 or 97 <= c <= 102),
    ord("z"): _ctype(lambda c: c == 0),
}


def _in_class(c: int, cl: int) -> bool:
    """``%cl`` against byte c: known letters are classes (upper case complements)."""
    table = _CLASSES.get(cl + 32 if 65 <= cl <= 90 else cl)
    if table is None:
        return c == cl
    return table[c] if 97 <= cl <= 122 else not table[c]


def _in_set(c: int, pat: bytes, start: int, close: int) -> bool:
    """``[...]`` (``pat[start]`` is the ``[``, ``pat[close]`` its ``]``) against byte c."""
    p = start
    found = True
    if pat[p + 1] == 0x5E:  # ^
        found = False
        p += 1
    while True:
        p += 1
        if p >= close:
            return not found
        ch = pat[p]
        if ch == 0x25:  # %
            p += 1
            if _in_class(c, pat[p]):
                return found
        elif pat[p + 1] == 0x2D and p + 2 < close:  # a range like a-z
            p += 2
            if pat[p - 2] <= c <= pat[p]:
                return found
        elif ch == c:
            return found


def _item_end(pat: bytes, i: int) -> int | None:
    """Index just past the single-character item at ``pat[i]``; None if malformed."""
    n = len(pat)
    ch = pat[i]
    i += 1
    if ch == 0x25:  # %
        return None if i >= n else i + 1
    if ch == 0x5B:  # [
        if i < n and pat[i] == 0x5E:
            i += 1
        while True:  # the first character after [ or [^ is always a member, even ]
            if i >= n:
                return None
            ch = pat[i]
            i += 1
            if ch == 0x25 and i < n:
                i += 1
            if i < n and pat[i] == 0x5D:
                return i + 1
    return i


def _item_table(pat: bytes, i: int, end: int) -> list[bool]:
    ch = pat[i]
    if ch == 0x2E:  # .
        return _ALL
    if ch == 0x25:
        cl = pat[i + 1]
        return [_in_class(c, cl) for c in range(256)]
    if ch == 0x5B:
        return [_in_set(c, pat, i, end - 1) for c in range(256)]
    return [c == ch for c in range(256)]


# Pattern items: (_SINGLE, table, quantifier byte or 0), (_BALANCE, open, close),
# (_FRONTIER, table), (_END,).
_SINGLE, _BALANCE, _FRONTIER, _END = range(4)
_QUANTIFIERS = frozenset(b"?*+-")


def parse_pattern(pat: bytes) -> tuple[bool, list[tuple[Any, ...]]] | None:
    """Split a pattern into items; None when it is malformed (then it never matches)."""
    anchored = pat[:1] == b"^"
    i = 1 if anchored else 0
    n = len(pat)
    items: list[tuple[Any, ...]] = []
    while i < n:
        ch = pat[i]
        nxt = pat[i + 1] if i + 1 < n else -1
        if ch == 0x25 and nxt == 0x62:  # %bxy
            if i + 3 >= n:
                return None
            items.append((_BALANCE, pat[i + 2], pat[i + 3]))
            i += 4
            continue
        if ch == 0x25 and nxt == 0x66:  # %f[set]
            i += 2
            if i >= n or pat[i] != 0x5B:
                return None
            end = _item_end(pat, i)
            if end is None:
                return None
            items.append((_FRONTIER, _item_table(pat, i, end)))
            i = end
            continue
        if ch == 0x24 and i == n - 1:  # $ only anchors as the last character
            items.append((_END,))
            break
        end = _item_end(pat, i)
        if end is None:
            return None
        quantifier = pat[end] if end < n and pat[end] in _QUANTIFIERS else 0
        items.append((_SINGLE, _item_table(pat, i, end), quantifier))
        i = end + 1 if quantifier else end
    return anchored, items


def _match_items(items: Sequence[tuple[Any, ...]], s: bytes, i: int, k: int) -> bool:
    """Reference backtracking matcher: do items[k:] match s starting at i?"""
    n = len(s)
    while k < len(items):
        item = items[k]
        kind = item[0]
        if kind == _SINGLE:
            table, q = item[1], item[2]
            hit = i < n and table[s[i]]
            if q == 0:
                if not hit:
                    return False
                i += 1
            elif q == 0x3F:  # ?
                return (hit and _match_items(items, s, i + 1, k + 1)) or _match_items(items, s, i, k + 1)
            elif q == 0x2D:  # - (lazy)
                while True:
                    if _match_items(items, s, i, k + 1):
                        return True
                    if i < n and table[s[i]]:
                        i += 1
                    else:
                        return False
            else:  # * and +
                if q == 0x2B:
                    if not hit:
                        return False
                    i += 1
                j = i
                while j < n and table[s[j]]:
                    j += 1
                while j >= i:
                    if _match_items(items, s, j, k + 1):
                        return True
                    j -= 1
                return False
        elif kind == _BALANCE:
            opening, closing = item[1], item[2]
            if i >= n or s[i] != opening:
                return False
            depth = 1
            i += 1
            while True:
                if i >= n:
                    return False
                c = s[i]
                i += 1
                if c == closing:
                    depth -= 1
                    if depth == 0:
                        break
                elif c == opening:
                    depth += 1
        elif kind == _FRONTIER:
            table = item[1]
            # Lua strings end in a NUL, so the subject is bracketed by NULs here.
            if table[s[i - 1] if i > 0 else 0] or not table[s[i] if i < n else 0]:
                return False
        else:  # _END
            return i == n
        k += 1
    return True


def reference_search(anchored: bool, items: Sequence[tuple[Any, ...]], s: bytes) -> bool:
    if anchored:
        return _match_items(items, s, 0, 0)
    return any(_match_items(items, s, start, 0) for start in range(len(s) + 1))


def _regex_class(table: Sequence[bool]) -> str:
    members = [c for c in range(256) if table[c]]
    if not members:
        return r"[^\x00-\xff]"  # never matches a byte (nor a character of an ASCII str)
    if len(members) == 1:
        return f"\\x{members[0]:02x}"
    ranges = []
    first = prev = members[0]
    for c in members[1:] + [-2]:
        if c != prev + 1:
            ranges.append(f"\\x{first:02x}" if first == prev else f"\\x{first:02x}-\\x{prev:02x}")
            first = c
        prev = c
    return "[" + "".join(ranges) + "]"


_REGEX_QUANTIFIER = {0: "", 0x3F: "?", 0x2A: "*", 0x2B: "+", 0x2D: "*?"}


def _items_to_regex(items: Sequence[tuple[Any, ...]]) -> str | None:
    """The same pattern as a Python regex over bytes mapped to latin-1; None if %b is used."""
    parts = []
    for item in items:
        kind = item[0]
        if kind == _SINGLE:
            parts.append(_regex_class(item[1]) + _REGEX_QUANTIFIER[item[2]])
        elif kind == _FRONTIER:
            table = item[1]
            if table[0]:  # the NUL before the subject is in the set: need a real byte outside it
                parts.append(f"(?<={_regex_class([not t for t in table])})")
                parts.append(f"(?={_regex_class(table)}|\\Z)")
            else:
                parts.append(f"(?<!{_regex_class(table)})")
                parts.append(f"(?={_regex_class(table)})")
        elif kind == _END:
            parts.append(r"\Z")
        else:
            return None  # balanced matches need a counter; the reference matcher does it
    return "".join(parts)


def _encode(v: str) -> bytes:
    return v.encode("utf-8", "surrogateescape")


def pattern_test(pattern: bytes, literal: bool) -> Callable[[str | bytes], bool]:
    """A test of a present value (str or bytes) against ``=~ pattern``."""
    if literal:
        lit_b = pattern
        lit_s = pattern.decode("latin-1")  # only ever used against ASCII strings

        def find(v: str | bytes) -> bool:
            if isinstance(v, str):
                if v.isascii():
                    return lit_s in v
                v = _encode(v)
            return lit_b in v

        return find

    parsed = parse_pattern(pattern)
    if parsed is None:
        return lambda v: False
    anchored, items = parsed
    source = _items_to_regex(items)
    if source is None:

        def slow(v: str | bytes) -> bool:
            return reference_search(anchored, items, _encode(v) if isinstance(v, str) else v)

        return slow

    # The str twin runs on ASCII strings, where characters and bytes coincide; that skips
    # encoding the common case.
    rx_b = re.compile(source.encode("latin-1"), re.DOTALL)
    rx_s = re.compile(source, re.DOTALL)
    run_b = rx_b.match if anchored else rx_b.search
    run_s = rx_s.match if anchored else rx_s.search

    def search(v: str | bytes) -> bool:
        if isinstance(v, str):
            if v.isascii():
                return run_s(v) is not None
            v = _encode(v)
        return run_b(v) is not None

    return search
