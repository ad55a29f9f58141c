"""message_matcher: grammar, semantics and upstream's quirks (docs/upstream-formats.md §6).

The expressions and expected outcomes of the first groups are those of lua_sandbox's
src/util/test/test_heka_message_matcher.c, run against the same message rebuilt here.
Lua patterns are checked against real Lua 5.1, and (with the `upstream` marker) whole
expressions against lua_sandbox's own matcher built from the fetched sources.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from upstream_files import LUA_SANDBOX, copy_tree, source, unavailable

from hindsight_py._lupa import LuaRuntime
from hindsight_py.lua_pattern import parse_pattern, pattern_test, reference_search
from hindsight_py.matcher import (
    Matcher,
    MatcherError,
    compile_matcher,
    compile_raw_matcher,
)
from hindsight_py.message import Field, Message, encode

BYTES, INTEGER, DOUBLE, BOOL = 1, 2, 3, 4


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Quoted Timestamps are read as local time (upstream uses mktime): pin the zone."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def full_message() -> Message:
    """The message of upstream's matcher tests."""
    return Message(
        b"\x23\x00\x81\xdc\x32\x6f\x4e\x3f\x9a\x5a\x93\x86\xa3\x7e\x24\x6f",
        1428773426113040228,
        type="TEST",
        logger="GoSpec",
        severity=6,
        payload="Test Payload with a longer string to attempt to create a difference in pattern "
        "match time versus the string literal match time for a unique-item",
        env_version="0.8",
        pid=32157,
        hostname="trink-x230",
        fields=[
            Field("foo", values=["bar"]),
            Field("number", INTEGER, values=[64]),
            Field("bytes", BYTES, values=[b"data"]),
            Field("int", INTEGER, values=[999, 1024]),
            Field("double", DOUBLE, values=[99.9]),
            Field("bool", BOOL, values=[True]),
            Field("foo", values=["alternate"]),
            Field("Payload", values=["name=test;type=web;"]),
            Field("Timestamp", representation="date-time", values=["Mon Jan 02 15:04:05 -0700 2006"]),
            Field("zero", INTEGER, values=[0]),
            Field("string", values=["43"]),
        ],
    )


def minimal_message() -> Message:
    """Only the required headers."""
    return Message(b"\x23\x00\x81\xdc\x32\x6f\x4e\x3f\x9a\x5a\x93\x86\xa3\x7e\x24\x6f", 0)


T128 = " && ".join(["Type =~ '.'"] * 128)  # 127 operators: the most allowed
S255 = ("0123456789" * 26)[:255]

TRUE_ON_FULL = [
    "TRUE",
    "Timestamp > 1.428773420000e+18",
    "Timestamp < 1.428773426999e18",
    "Timestamp == 1428773426113040228",
    "Timestamp > '2015-04-11T17:30:26Z'",
    "Timestamp > '2015-04-11T17:30:26.112Z'",
    "Timestamp < '2015-04-11T17:30:26.114Z'",
    "(Severity == 7 || Logger == 'GoSpec') && Type == 'TEST'",
    'EnvVersion == "0.8"',
    "EnvVersion == '0.8'",
    "EnvVersion != '0.9'",
    "EnvVersion > '0.7'",
    "EnvVersion >= '0.8'",
    "EnvVersion < '0.9'",
    "EnvVersion <= '0.8'",
    "Hostname != ''",
    "Logger == 'GoSpec'",
    "Pid != 0",
    "Pid != NIL",
    "Severity != 5",
    "Severity < 7",
    "Severity <= 7",
    "Severity <= 6",
    "Severity == 6",
    "Severity > 5",
    "Severity >= 5",
    "Severity >= 6",
    "Timestamp > 0",
    "Type != 'test'",
    "Type == 'TEST' && Severity == 6",
    "Type == 'test' && Severity == 7 || Logger == 'GoSpec'",
    "Type == 'TEST'",
    "Type == 'foo' || Type == 'bar' || Type == 'TEST'",
    "Fields[foo] == 'bar'",
    "Fields[foo][0] == 'bar'",
    "Fields[foo][0][0] == 'bar'",
    "Fields[foo][1] == 'alternate'",
    "Fields[foo][1][0] == 'alternate'",
    "Fields[foo] <= 'barx'",
    "Fields[foo] < 'barx'",
    "Fields[foo] >= 'bar'",
    "Uuid > '#'",
    "Uuid >= '#'",
    "Fields[foo] > 'baq'",
    "Fields[foo] != 'bara'",
    "Fields[bytes] == 'data'",
    "Fields[int] == 999",
    "Fields[int][0][1] == 1024",
    "Fields[double] == 99.9",
    "Fields[bool] == TRUE",
    "Fields[bool] != FALSE",
    "Fields[int] != NIL",
    "Fields[int][0][1] != NIL",
    "Fields[int][0][2] == NIL",
    "Fields[missing] == NIL",
    "Type =~ 'TEST'",
    "Type !~ 'bogus'",
    "Type =~ 'TEST' && Payload =~ 'Payload'",
    "Fields[foo][1] =~ 'alt'",
    "Fields[Payload] =~ 'name=%w+'",
    "Type =~ 'ST'",
    "Type =~ '^TE'",
    "Type =~ 'ST$'",
    "Type !~ '^te'",
    "Type !~ 'st$'",
    "Fields[foo][255] == NIL",
    "Fields[foo][0][255] == NIL",
    T128,
    "Payload =~ 'unique-item'%",
    "Fields[Timestamp] =~ ' -0700'%",
    "Type != NIL",
    "Hostname != NIL",
    "EnvVersion != NIL",
    "Pid != NIL",
    "Logger != NIL",
    "Payload != NIL",
    "Pid == 32157",
    "Uuid < '\\\\'",
    'Uuid < "\\\\"',
    "(Severity == 7 || Logger == 'GoSpec') \r\n\t&& Type == 'TEST'",
]

FALSE_ON_FULL = [
    "FALSE",
    "Timestamp == 1e9",
    "Timestamp > '2015-04-11T17:30:27Z'",
    "Type == 'test'&&(Severity==7||Payload=='Test Payload')",
    "EnvVersion == '0.9'",
    "EnvVersion != '0.8'",
    "EnvVersion > '0.9'",
    "EnvVersion >= '0.9'",
    "EnvVersion < '0.8'",
    "EnvVersion <= '0.7'",
    "Severity == 5",
    "Severity != 6",
    "Severity < 6",
    "Severity <= 5",
    "Severity > 6",
    "Severity >= 7",
    "Fields[foo] == 'ba'",
    "Fields[foo][1] == 'bar'",
    "Fields[foo][0][1] == 'bar'",
    "Fields[bool] == FALSE",
    "Fields[bool] != TRUE",
    "Fields[foo] > 'bara'",
    "Fields[foo] >= 'bara'",
    "Fields[foo] == 'bara'",
    "Type =~ 'Test'",
    "Type !~ 'TEST'",
    "Payload =~ '^Payload'",
    "Type == \"te'st\"",
    "Type == 'te\"st'",
    "Fields[int] =~ '999'",
    'Fields[zero] == "0"',
    "Fields[string] == 43",
    "Fields[int] == NIL",
    "Fields[int][0][1] == NIL",
    "Fields[missing] != NIL",
    "Type =~ '^te'",
    "Type =~ 'st$'",
    "Type !~ '^TE'",
    "Type !~ 'ST$'",
    "Logger =~ '.' && Type =~ '^anything'",
    f"Type == '{S255}'",
    "Payload =~ 'not.found'%",
    "Fields[foo][1] =~ 'not.found'%",
    "Type == NIL",
    "Hostname == NIL",
    "EnvVersion == NIL",
    "Pid == NIL",
    "Logger == NIL",
    "Payload == NIL",
    "Uuid > '\\\\'",
]

TRUE_ON_MINIMAL = [
    "Type == NIL",
    "Type != ''",
    "Type < ''",
    "Type <= ''",
    "Type !~ '.'",
    "Type !~ 'foo'",
    "Hostname == NIL",
    "EnvVersion == NIL",
    "Pid == NIL",
    "Logger == NIL",
    "Payload == NIL",
]

FALSE_ON_MINIMAL = [
    "Type != NIL",
    "Type == '%b()'",
    "Type == ''",
    "Type > ''",
    "Type >= ''",
    "Type =~ '.'",
    "Type =~ 'foo'",
    "Hostname != NIL",
    "Hostname == ''",
    "EnvVersion != NIL",
    "EnvVersion == ''",
    "Pid != NIL",
    "Logger != NIL",
    "Logger == ''",
    "Payload != NIL",
    "Payload == ''",
]

MALFORMED = [
    "",
    "bogus",
    "Type = 'test'",
    "Pid == 'test='",
    "Type == 'test' && (Severity==7 || Payload == 'Test Payload'",
    "Invalid == 'bogus'",
    "Fields[]",
    "Fields[test][]",
    "Fields[test][a]",
    "Fields[test][0][]",
    "Fields[test][0][a]",
    "Fields[test][0][0][]",
    "Fields[test][xxxx",
    "Pid =~ '6'",
    "Pid !~ '6'",
    "Type =~ 'test",
    "Type != 'test\"",
    "Pid =~ 6",
    "NIL",
    "Type         > NIL",
    "Pid > NIL",
    "Fields[test] > NIL",
    "Uuid == NIL",
    "Severity == NIL",
    "TRUE FALSE",
    "Timestamp == '20150411T173026'",
    T128 + " && Type =~ '.'",
    f"Type == '{S255}5'",
    "Fields[test][256] == 1",
    "Fields[test][0][256] == 1",
    "Payload =~ 'foo'i",
    "Uuid < '\\'",
]


@pytest.mark.parametrize("expression", TRUE_ON_FULL)
def test_upstream_true_cases(expression: str) -> None:
    assert compile_matcher(expression)(full_message()) is True


@pytest.mark.parametrize("expression", FALSE_ON_FULL)
def test_upstream_false_cases(expression: str) -> None:
    assert compile_matcher(expression)(full_message()) is False


@pytest.mark.parametrize("expression", TRUE_ON_MINIMAL)
def test_upstream_absent_header_true_cases(expression: str) -> None:
    assert compile_matcher(expression)(minimal_message()) is True


@pytest.mark.parametrize("expression", FALSE_ON_MINIMAL)
def test_upstream_absent_header_false_cases(expression: str) -> None:
    assert compile_matcher(expression)(minimal_message()) is False


@pytest.mark.parametrize("expression", MALFORMED)
def test_upstream_malformed_cases(expression: str) -> None:
    with pytest.raises(MatcherError):
        compile_matcher(expression)


# --- API ------------------------------------------------------------------------------


def test_matcher_attributes() -> None:
    m = compile_matcher("Type == 'TEST' && Severity == 6")
    assert isinstance(m, Matcher)
    assert m.expression == "Type == 'TEST' && Severity == 6"
    assert (m.always, m.headers_only) == (False, True)
    assert m.match(full_message()) is True and m(minimal_message()) is False

    assert compile_matcher("TRUE").always is True
    assert compile_matcher("  TRUE\n").always is True
    assert compile_matcher("TRUE || Fields[x] == 1").always is True  # nothing can fail it
    assert compile_matcher("FALSE").always is False
    assert compile_matcher("Fields[foo] == 'bar'").headers_only is False
    assert compile_matcher("FALSE && Fields[foo] == 'bar'").headers_only is True


def test_bytes_expression_is_accepted() -> None:
    assert compile_matcher(b"Type == 'TEST'")(full_message()) is True


@pytest.mark.parametrize(
    ("expression", "offset", "words"),
    [
        ("Type = 'x'", 5, "comparison operator"),
        ("Type == 'x' &&", 14, "expected a test"),
        ("Type == 'x' Logger == 'y'", 12, "&& or ||"),
        ("Severity == NIL", 12, "number"),
        ("Type == 'abc", 8, "unterminated string"),
        ("Fields[x][300] == 1", 9, "field index"),
        ("Timestamp > '2015-04-11 17:30:26Z'", 12, "RFC 3339"),
        ("(Type == 'x'", 12, "expected )"),
        ("Type == 'a\0'", 10, "NUL"),
    ],
)
def test_errors_name_the_offset_and_problem(expression: str, offset: int, words: str) -> None:
    with pytest.raises(MatcherError) as info:
        compile_matcher(expression)
    assert info.value.position == offset
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


# --- grammar limits ---------------------------------------------------------------------


def test_operator_limit_counts_both_operators() -> None:
    ors = " || ".join(["Type == 'x'"] * 64)
    ands = " && ".join(["Type == 'x'"] * 64)
    compile_matcher(f"({ors}) && ({ands})")  # 63 + 1 + 63 = 127
    with pytest.raises(MatcherError, match="127"):
        compile_matcher(f"({ors}) && ({ands}) || TRUE")


def test_string_length_counts_unescaped_bytes() -> None:
    escaped = "\\'" * 255  # 510 characters in the text, 255 bytes of value
    m = compile_matcher(f"Type == '{escaped}'")
    assert m(Message(bytes(16), 0, type="'" * 255)) is True
    with pytest.raises(MatcherError):
        compile_matcher(f"Type == '{escaped}x'")
    with pytest.raises(MatcherError):
        compile_matcher("Type == '" + "é" * 128 + "'")  # 256 bytes of UTF-8


def test_escapes() -> None:
    msg = Message(bytes(16), 0, type="it's \"q\" \\")
    assert compile_matcher("Type == 'it\\'s \"q\" \\\\'")(msg) is True
    assert compile_matcher('Type == "it\\\'s \\"q\\" \\\\"')(msg) is True  # \' works in "..." too
    assert compile_matcher("Type == 'a\\b'")(Message(bytes(16), 0, type="a\\b")) is True  # other \ stay


def test_numbers() -> None:
    msg = Message(bytes(16), 0, severity=0, pid=-5)
    for good in ("Severity == 0", "Severity == -0", "Severity == +0.0", "Severity == 0e5", "Pid == -5E0",
                 "Pid == -0.5e1", "Pid<-4.999"):
        assert compile_matcher(good)(msg) is True, good
    for bad in ("Severity == 00", "Severity == 1.", "Severity == .5", "Severity == 1e", "Severity == 0x1",
                "Severity == - 1"):
        with pytest.raises(MatcherError):
            compile_matcher(bad)


def test_spacing_is_optional_and_only_space_tab_cr_lf() -> None:
    assert compile_matcher("(Type=='TEST'&&Severity==6)||FALSE")(full_message()) is True
    assert compile_matcher("\t\r\n Type \n==\r 'TEST' \t")(full_message()) is True
    for bad in ("Type ==\v'TEST'", "Type\f== 'TEST'", "Fields[foo] [0] == 'bar'", "Fields [foo] == 'bar'",
                "Type == 'TEST' %"):
        with pytest.raises(MatcherError):
            compile_matcher(bad)


def test_field_names_take_any_byte_but_close_bracket() -> None:
    msg = Message(bytes(16), 0, fields=[Field("a b'\"[", values=["x"]), Field("", values=["y"])])
    assert compile_matcher("Fields[a b'\"[] == 'x'")(msg) is True
    assert compile_matcher("Fields[] == 'y'")(msg) is True
    with pytest.raises(MatcherError, match="255"):
        compile_matcher(f"Fields[{'n' * 256}] == 1")


def test_field_index_grammar_quirk() -> None:
    # upstream's index rule is 2[0-5][0-5]|1[0-9][0-9]|[1-9][0-9]|[0-9]
    valid = {i for i in range(256) if compile_ok(f"Fields[x][{i}] == NIL")}
    assert valid == set(range(256)) - {206, 207, 208, 209, 216, 217, 218, 219, 226, 227, 228, 229,
                                       236, 237, 238, 239, 246, 247, 248, 249}
    assert not compile_ok("Fields[x][01] == NIL")


def compile_ok(expression: str) -> bool:
    try:
        compile_matcher(expression)
    except MatcherError:
        return False
    return True


# --- semantics --------------------------------------------------------------------------


def test_type_mismatches_are_false_both_ways() -> None:
    msg = full_message()
    for expression in ("Fields[foo] == 1", "Fields[foo] != 1", "Fields[int] == '999'", "Fields[int] != '999'",
                       "Fields[int] !~ 'x'", "Fields[bool] == 1", "Fields[bool] != 1", "Fields[foo] != TRUE",
                       "Fields[bytes] == TRUE", "Fields[missing] != 'x'", "Fields[missing] !~ 'x'"):
        assert compile_matcher(expression)(msg) is False, expression


def test_true_false_match_numbers() -> None:
    msg = Message(bytes(16), 0, fields=[Field("one", INTEGER, values=[1]), Field("zero", DOUBLE, values=[0.0]),
                                        Field("two", INTEGER, values=[2]), Field("f", BOOL, values=[False])])
    for expression, expected in [
        ("Fields[one] == TRUE", True), ("Fields[one] != FALSE", True), ("Fields[zero] == FALSE", True),
        ("Fields[two] == TRUE", False), ("Fields[two] != TRUE", True), ("Fields[two] == FALSE", False),
        ("Fields[f] == FALSE", True), ("Fields[f] != TRUE", True), ("Fields[missing] != TRUE", False),
    ]:
        assert compile_matcher(expression)(msg) is expected, expression


def test_nil_on_fields_and_indices() -> None:
    msg = Message(bytes(16), 0, fields=[Field("a", values=["x", "y"]), Field("a", INTEGER, values=[]),
                                        Field("b", 9, values=["odd type"])])
    for expression, expected in [
        ("Fields[a] != NIL", True), ("Fields[a][0][1] != NIL", True), ("Fields[a][0][2] == NIL", True),
        ("Fields[a][1] == NIL", True),  # present, but without values
        ("Fields[a][2] == NIL", True), ("Fields[b] == NIL", True),  # unknown value_type reads as missing
    ]:
        assert compile_matcher(expression)(msg) is expected, expression


def test_numbers_compare_as_doubles() -> None:
    big = 2**53 + 1  # not a double: upstream converts it to 2**53 before comparing
    msg = Message(bytes(16), big, fields=[Field("n", INTEGER, values=[big])])
    assert compile_matcher(f"Fields[n] == {2**53}")(msg) is True
    assert compile_matcher(f"Fields[n] > {2**53}")(msg) is False
    assert compile_matcher(f"Timestamp == {2**53}")(msg) is True


def test_absent_numeric_headers() -> None:
    msg = minimal_message()
    assert compile_matcher("Severity == 7")(msg) is True  # the default
    assert compile_matcher("Pid < -2147483647")(msg) is True  # upstream's INT_MIN marker
    assert compile_matcher("Pid == -2147483648")(msg) is True
    assert compile_matcher("Pid == NIL")(Message(bytes(16), 0, pid=-2147483648)) is False


def test_string_ordering_is_bytewise() -> None:
    # U+E000 is EE 80 80 in UTF-8; a lone 0xFF byte decodes to U+DCFF. Bytes order them the
    # other way round from code points.
    msg = Message(bytes(16), 0, type="\udcff", logger="é")
    assert compile_matcher("Type > '\ue000'")(msg) is True
    assert compile_matcher("Logger > 'z'")(msg) is True
    assert compile_matcher("Logger < 'é!'")(msg) is True
    assert compile_matcher("Type == '\udcff'")(msg) is True


def test_strncmp_quirk_of_less_or_equal() -> None:
    # strncmp stops at a NUL both strings share; only <= lacks the length fallback.
    msg = Message(bytes(16), 0, type="ab\0zz", fields=[Field("f", BYTES, values=[b"ab\0"])])
    assert compile_matcher("Type <= 'ab'")(msg) is True
    assert compile_matcher("Type < 'ab'")(msg) is False
    assert compile_matcher("Type > 'ab'")(msg) is True
    assert compile_matcher("Type >= 'ab'")(msg) is True
    assert compile_matcher("Type == 'ab'")(msg) is False
    assert compile_matcher("Fields[f] <= 'ab'")(msg) is True
    assert compile_matcher("Type <= 'a'")(msg) is False  # no NUL right after the literal
    assert compile_matcher("Uuid <= ''")(minimal_message()) is False  # first byte is '#'
    assert compile_matcher("Uuid <= ''")(Message(b"\0" * 16, 0)) is True


def test_uuid_is_raw_bytes() -> None:
    msg = Message(b"0123456789abcdef", 0)
    assert compile_matcher("Uuid == '0123456789abcdef'")(msg) is True
    assert compile_matcher("Uuid =~ '^0123'")(msg) is True
    assert compile_matcher("Uuid < '1'")(msg) is True


def test_bytes_fields_match_strings_and_patterns() -> None:
    msg = Message(bytes(16), 0, fields=[Field("b", BYTES, values=[b"\xc3\xa9t\xe9"])])
    assert compile_matcher("Fields[b] =~ '^\udcc3'")(msg) is True  # patterns work on bytes
    assert compile_matcher("Fields[b] =~ '^..t.$'")(msg) is True
    assert compile_matcher("Fields[b] == '\udcc3\udca9t\udce9'")(msg) is True


def test_patterns_work_on_bytes_of_non_ascii_strings() -> None:
    msg = Message(bytes(16), 0, type="é", payload="caf\u00e9 au lait")
    assert compile_matcher("Type =~ '^..$'")(msg) is True  # two bytes
    assert compile_matcher("Type =~ '^.$'")(msg) is False
    assert compile_matcher("Type =~ '\udca9'")(msg) is True  # a continuation byte alone
    assert compile_matcher("Type =~ '\udca9'%")(msg) is True
    assert compile_matcher("Payload =~ '^caf.. au'")(msg) is True
    assert compile_matcher("Payload =~ '%a+ au'")(msg) is False  # é is not %a in the C locale
    assert compile_matcher("Payload =~ '%a+ lait'")(msg) is True


def test_literal_patterns() -> None:
    msg = Message(bytes(16), 0, payload="a.b(c)[d]")
    assert compile_matcher("Payload =~ 'x.b'%")(msg) is False
    assert compile_matcher("Payload =~ 'a.b'%")(msg) is True
    assert compile_matcher("Payload =~ '(c)'")(msg) is True  # no pattern characters: literal
    assert compile_matcher("Payload =~ ''")(msg) is True
    assert compile_matcher("Payload !~ ''")(msg) is False
    assert compile_matcher("Payload =~ 'b(c)%['")(msg) is True  # () are plain characters upstream
    assert compile_matcher("Type =~ '^a%1b'")(Message(bytes(16), 0, type="a1b")) is True  # no back-references


def test_malformed_patterns_never_match() -> None:
    msg = Message(bytes(16), 0, type="a[b%")
    for pattern in ("a[", "a[b", "%", "b%", "[%", "%b(", "%f", "%fa", "[]"):
        assert compile_matcher(f"Type =~ '{pattern}'")(msg) is False, pattern
        assert compile_matcher(f"Type !~ '{pattern}'")(msg) is True, pattern


def test_balance_and_frontier() -> None:
    msg = Message(bytes(16), 0, payload="f(a(b)c) THE (quick) fox")
    assert compile_matcher("Payload =~ '^f%b()'")(msg) is True
    assert compile_matcher("Payload =~ '^f%b() THE'")(msg) is True
    assert compile_matcher("Payload =~ '%b[]'")(msg) is False
    assert compile_matcher("Payload =~ '%f[%a]quick'")(msg) is True
    assert compile_matcher("Payload =~ '%f[%a]uick'")(msg) is False
    assert compile_matcher("Payload =~ '%f[%a]f'")(msg) is True  # the start counts as a NUL
    assert compile_matcher("Payload =~ 'x%f[%z]'")(msg) is True  # and so does the end


def test_short_circuit_and_precedence() -> None:
    msg = full_message()
    assert compile_matcher("TRUE || FALSE && FALSE")(msg) is True
    assert compile_matcher("(TRUE || FALSE) && FALSE")(msg) is False
    assert compile_matcher("FALSE && FALSE || TRUE")(msg) is True
    assert compile_matcher("FALSE || TRUE && TRUE || FALSE && TRUE")(msg) is True
    # Fields[x] would raise on a message without fields; short-circuiting skips it.
    bare = Message(bytes(16), 0, type="a")
    bare.fields = None  # type: ignore[assignment]
    assert compile_matcher("Type == 'a' || Fields[x] == 1")(bare) is True
    assert compile_matcher("Type == 'b' && Fields[x] == 1")(bare) is False


# --- upstream quirks kept on purpose ----------------------------------------------------


def test_upstream_grouping_quirk_after_a_closed_group() -> None:
    # upstream leaves "(" on its operator stack after ")", so a later || binds inside:
    # A && (B) || C is A && (B || C) there.
    msg = full_message()
    assert compile_matcher("FALSE && (TRUE) || TRUE")(msg) is False
    assert compile_matcher("FALSE && TRUE || TRUE")(msg) is True
    assert compile_matcher("(FALSE && TRUE) || TRUE")(msg) is True
    assert compile_matcher("Type == 'x' && (Severity == 6) || Logger == 'GoSpec'")(msg) is False


def test_upstream_stale_field_indices() -> None:
    # An omitted index reuses the parser's last value in that slot.
    msg = full_message()
    assert compile_matcher("Fields[foo] == 'bar'")(msg) is True
    assert compile_matcher("Fields[int][0][1] == 1024 && Fields[foo] == 'bar'")(msg) is False  # foo[0][1]
    assert compile_matcher("Fields[foo][1] == 'alternate' && Fields[foo] == 'alternate'")(msg) is True
    assert compile_matcher("Fields[foo][1][0] == 'alternate' && Fields[foo] == 'alternate'")(msg) is True
    # A quoted Timestamp leaves its hour and minute (or the offset's) in the slots.
    assert compile_matcher("Timestamp > '2000-01-01T01:00:00Z' && Fields[foo] == 'alternate'")(msg) is True
    assert compile_matcher("Timestamp > '2000-01-01T00:00:00+0100' && Fields[foo] == 'alternate'")(msg) is True
    assert compile_matcher("Timestamp > '2000-01-01T01:00:00Z' && Fields[foo][0] == 'bar'")(msg) is True
    assert compile_matcher("Timestamp > '2000-01-01T00:00:00Z' && Fields[foo] == 'bar'")(msg) is True


def test_rfc3339_offsets_are_always_added() -> None:
    hour = 3600 * 10**9
    for text, seconds in [("1970-01-01T01:00:00Z", 3600), ("1970-01-01T00:00:00+0100", 3600),
                          ("1970-01-01T00:00:00-0100", 3600), ("1970-01-01T00:00:00-0130", 5400),
                          ("1970-01-01T00:00:00.25Z", 0.25), ("2015-02-31T00:00:60Z", 1425340860)]:
        m = compile_matcher(f"Timestamp == '{text}'")
        assert m(Message(bytes(16), int(seconds * 10**9))) is True, text
    assert compile_matcher("Timestamp < \"1970-01-01T00:00:00-0100\"")(Message(bytes(16), hour - 1)) is True


def test_rfc3339_is_read_in_local_time() -> None:
    os.environ["TZ"] = "UTC-02"  # POSIX: two hours east of UTC
    time.tzset()
    m = compile_matcher("Timestamp == '1970-01-01T02:00:00Z'")
    assert m(Message(bytes(16), 0)) is True


@pytest.mark.parametrize("bad", ["2015-4-11T17:30:26Z", "2015-04-11t17:30:26Z", "2015-04-11T17:30:26z",
                                 "2015-04-11T17:30:26+01:00", "2015-13-11T17:30:26Z", "2015-04-32T17:30:26Z",
                                 "2015-04-11T24:00:00Z", "2015-04-11T17:30:61Z", "2015-04-11T17:30:26.Z"])
def test_rfc3339_grammar(bad: str) -> None:
    with pytest.raises(MatcherError):
        compile_matcher(f"Timestamp == '{bad}'")
    with pytest.raises(MatcherError):
        compile_matcher("Timestamp == '2015-04-11T17:30:26Z\"")


# --- Lua patterns against Lua 5.1 -------------------------------------------------------

LUA_CASES = [
    ("hello world", "o w"), ("hello world", "^hello"), ("hello world", "^world"), ("hello world", "world$"),
    ("hello world", "hello$"), ("hello", "h.l"), ("hello", "^h.-o$"), ("hello", "l+"), ("hello", "^hel*o"),
    ("heo", "^hel*o"), ("heo", "^hel?o"), ("hello", "^hel?o"), ("hello", "^hel-lo$"), ("a+b", "a%+b"),
    ("a+b", "a+b"), ("2024-01-02", "^%d%d%d%d%-%d%d%-%d%d$"), ("x 1", "%s%d"), ("AbC", "^%u%l%u$"),
    ("AbC", "^%U"), ("a_b", "^[%w_]+$"), ("a-b", "^[%w_]+$"), ("a-b", "[a-]b"), ("zz", "[^z]"),
    ("]", "[]]"), ("a]", "[^]]"), ("%", "%%"), ("a.b", "%."), ("tab\there", "%c"), ("!?", "^%p+$"),
    ("cafe", "^%x+$"), ("cafg", "^%x+$"), ("\0a", "%z"), ("a", "%Z"), ("THE (quick) fox", "%b()"),
    ("THE (quick fox", "%b()"), ("THE (quick) fox", "%f[%a]%a+%f[%A]"), ("hello", "%f[%l]"), ("", "^$"),
    ("", ".*"), ("", "."), ("abc", "[%a-]+c"), ("a-c", "^[%a-]+$"), ("ab", "[b-a]"), ("abc", "a*b*c*$"),
    ("aaa", "^a-$"), ("x$y", "x$y"), ("x^y", "x^y"), ("^x", "^^x"), ("ab", "a**"), ("a*", "a**"),
    ("\xe9t\xe9", "^%a"), ("\xe9t\xe9", "[\x80-\xff]t"), ("a%", "a%"), ("a[", "a["), ("abc", "[%a"),
    ("aXb", "a%Xb"), ("g", "%g"),
]


def lua_finder() -> object:
    lua = LuaRuntime(encoding=None)
    return lua.eval("function(s, p) local ok, r = pcall(string.find, s, p); return ok and r ~= nil end")


def lua51_finds(find: object, subject: bytes, pattern: bytes) -> bool:
    return bool(find(subject, pattern))  # type: ignore[operator]


def both_matchers(pattern: bytes, subject: bytes) -> tuple[bool, bool]:
    """(the compiled path, the reference backtracker) for `subject =~ pattern`."""
    compiled = pattern_test(pattern, literal=False)(subject)
    parsed = parse_pattern(pattern)
    reference = False if parsed is None else reference_search(parsed[0], parsed[1], subject)
    return compiled, reference


@pytest.mark.parametrize(("subject", "pattern"), LUA_CASES)
def test_lua_patterns_agree_with_lua51(subject: str, pattern: str) -> None:
    s, p = subject.encode("latin-1"), pattern.encode("latin-1")
    expected = lua51_finds(lua_finder(), s, p)
    assert both_matchers(p, s) == (expected, expected)
    # and the same through a str value (the ASCII fast path or the encoded one)
    as_str = s.decode("utf-8", "surrogateescape")
    assert pattern_test(p, literal=False)(as_str) is expected


def test_random_lua_patterns_agree_with_lua51() -> None:
    find = lua_finder()
    rng = random.Random(51)
    # No ( ) or %1-%9: Lua 5.1 treats those as captures; lua_sandbox as plain characters.
    alphabet = [b"a", b"b", b".", b"%a", b"%d", b"%s", b"%w", b"%A", b"%S", b"[ab]", b"[^a]", b"[%d.]", b"*",
                b"+", b"-", b"?", b"^", b"$", b"%b<>", b"%f[%w]", b"%f[%W]", b"%%", b"[a-", b"]", b"%", b"[", b"\xe9"]
    subjects = [b"a", b"b", b"1", b" ", b".", b"<", b">", b"%", b"\xe9", b"\0"]
    compared = 0
    for _ in range(3000):
        pattern = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        for _ in range(4):
            subject = b"".join(rng.choice(subjects) for _ in range(rng.randint(0, 7)))
            expected = lua51_finds(find, subject, pattern)
            assert both_matchers(pattern, subject) == (expected, expected), (pattern, subject)
            compared += 1
    assert compared == 12000


# --- against lua_sandbox itself ---------------------------------------------------------

LSB_SOURCES = ["heka_message.c", "heka_message_matcher.c", "heka_message_matcher_parser.c", "output_buffer.c",
               "protobuf.c", "string.c", "string_matcher.c", "util.c"]
SHIM = """
#include "luasandbox/util/heka_message.h"
#include "luasandbox/util/heka_message_matcher.h"
int shim_eval(const char *exp, const char *pb, size_t len) {
  lsb_message_matcher *mm = lsb_create_message_matcher(exp);
  if (!mm) return -1;
  lsb_heka_message m;
  lsb_init_heka_message(&m, 8);
  int r = lsb_decode_heka_message(&m, pb, len, NULL) ? lsb_eval_message_matcher(mm, &m) : -2;
  lsb_free_heka_message(&m);
  lsb_destroy_message_matcher(mm);
  return r;
}
"""


@pytest.fixture(scope="module")
def lua_sandbox_matcher(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lua_sandbox = source(LUA_SANDBOX)
    if shutil.which("gcc") is None:
        unavailable("gcc is not installed: it builds lua_sandbox's matcher to compare with")
    work = tmp_path_factory.mktemp("lsb")
    for tree in ("src/util", "include"):
        copy_tree(LUA_SANDBOX, tree, work / tree)
    shutil.copyfile(lua_sandbox / "src" / "luasandbox_defines.h", work / "src" / "luasandbox_defines.h")
    (work / "shim.c").write_text(SHIM)
    lib = work / "libmatcher.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-std=gnu99", "-w", f"-I{work / 'include'}", "-o", str(lib),
                    *(str(work / "src" / "util" / name) for name in LSB_SOURCES), str(work / "shim.c"), "-lm"],
                   check=True)
    dll = ctypes.CDLL(str(lib))
    dll.shim_eval.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    return dll


def random_expression(rng: random.Random, depth: int = 0) -> str:
    def quoted(text: str) -> str:
        q = rng.choice("'\"")
        return q + text.replace("\\", "\\\\").replace(q, "\\" + q) + q

    strings = ["", "a", "ab", "abc", "b", "te'st", "ab\x01", "é", "\udcff", "(x)", "a.b"]
    numbers = ["0", "1", "-1", "6", "7", "1.5", "1e3", "999", "01", "1."]
    pattern = "".join(rng.choice("ab.%[]^$*+-?()dwsAf") for _ in range(rng.randint(0, 5)))
    space = rng.choice(["", " ", "\t", "\r\n"])
    kind = rng.randint(0, 11)
    if depth < 3 and kind >= 9:
        if kind == 9:
            return f"({space}{random_expression(rng, depth + 1)})"
        op = rng.choice(["&&", "||"])
        return f"{random_expression(rng, depth + 1)}{space}{op} {random_expression(rng, depth + 1)}"
    header = rng.choice(["Type", "Logger", "Hostname", "EnvVersion", "Payload"])
    relational = rng.choice(["==", "!=", "<", "<=", ">", ">="])
    name = rng.choice(["s", "i", "d", "b", "x", ""]) + rng.choice(["", "", "[0]", "[1]", "[0][1]", "[1][1]", "[249]"])
    return rng.choice([
        rng.choice(["TRUE", "FALSE"]),
        f"{header}{space}{relational}{space}{quoted(rng.choice(strings))}",
        f"{header} {rng.choice(['=~', '!~'])} {quoted(pattern)}{rng.choice(['', '%'])}",
        f"{header} {rng.choice(['==', '!=', '<'])} {rng.choice(['NIL', '1'])}",
        f"{rng.choice(['Severity', 'Pid'])} {relational} {rng.choice(numbers + ['NIL'])}",
        f"Uuid {relational} {quoted(rng.choice(strings))}",
        f"Timestamp {relational} {rng.choice(['1e9', '0', quoted('1970-01-01T00:00:01Z'), quoted('1970-01-01T01:00:00-0100')])}",
        f"Fields[{name}] {relational} {rng.choice([quoted(rng.choice(strings)), rng.choice(numbers)])}",
        f"Fields[{name}] {rng.choice(['==', '!='])} {rng.choice(['TRUE', 'FALSE', 'NIL'])}",
        f"Fields[{name}] {rng.choice(['=~', '!~'])} {quoted(pattern)}",
    ])


def random_message(rng: random.Random) -> Message:
    def text() -> str | None:
        return rng.choice([None, "", "a", "ab", "abc", "ab\x00c", "é", "te'st", "(x)", "a.b"])

    fields = []
    for _ in range(rng.randint(0, 5)):
        value_type = rng.randint(0, 4)
        values = [[rng.choice(["a", "ab", "é"]), rng.choice([b"a", b"\xff"]), rng.choice([0, 1, 999, -1, 2**53 + 1]),
                   rng.choice([0.0, 1.0, 1.5]), rng.choice([True, False])][value_type] for _ in range(rng.randint(1, 3))]
        fields.append(Field(rng.choice(["s", "i", "d", "b", ""]), value_type, values=values))
    return Message(rng.choice([bytes(16), b"a" + bytes(15), bytes(range(16))]),
                   rng.choice([0, 10**9, 3600 * 10**9, 10**9 + 1]),
                   type=text(), logger=text(), severity=rng.choice([None, 6, 7]), payload=text(),
                   env_version=text(), pid=rng.choice([None, 0, 32157]), hostname=text(), fields=fields)


@pytest.mark.upstream
def test_agrees_with_lua_sandbox_matcher(lua_sandbox_matcher: ctypes.CDLL) -> None:
    rng = random.Random(1428773426)
    valid = invalid = evaluated = 0
    for _ in range(2500):
        expression = random_expression(rng)
        raw = expression.encode("utf-8", "surrogateescape")
        try:
            matcher = compile_matcher(expression)
        except MatcherError:
            matcher = None
        probe = encode(minimal_message())
        upstream_ok = lua_sandbox_matcher.shim_eval(raw, probe, len(probe)) >= 0
        assert upstream_ok == (matcher is not None), expression
        if matcher is None:
            invalid += 1
            continue
        valid += 1
        for _ in range(4):
            msg = random_message(rng)
            pb = encode(msg)
            upstream = lua_sandbox_matcher.shim_eval(raw, pb, len(pb))
            assert upstream in (0, 1)
            assert matcher(msg) is bool(upstream), (expression, msg)
            evaluated += 1
    assert valid > 1000 and invalid > 100 and evaluated == 4 * valid


# --------------------------------------------------------------------------------------
# Matchers over raw bytes (create_message_matcher): what they decode.
# --------------------------------------------------------------------------------------

def _raw(**kw: Any) -> bytes:
    fields = [Field("x", values=["y"]), Field("n", INTEGER, values=[1])]
    msg = Message(uuid=bytes(16), timestamp=10**18, type=kw.get("type", "t"), logger="l", severity=6,
                  payload=kw.get("payload", "p"), fields=kw.get("fields", fields))
    return encode(msg)


def test_raw_matchers_decode_a_message_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from hindsight_py import matcher as matcher_module
    from hindsight_py import message as hmsg

    decodes: list[tuple[bool, bool]] = []
    real = hmsg.decode

    def counting(raw: bytes, *, fields: bool = True, payload: bool = True) -> Message:
        decodes.append((fields, payload))
        return real(raw, fields=fields, payload=payload)

    monkeypatch.setattr(hmsg, "decode", counting)
    monkeypatch.setattr(matcher_module, "_last_decoded", (b"", None))
    expressions = ["TRUE", "Type == 't'", "Logger != 'l'", "Fields[x] == 'y'", "Severity < 7 && Fields[n] == 1",
                   "Payload =~ '^p'", "Fields[x] == 'z' || Type == 'u'"]
    raw_matchers = [compile_raw_matcher(e) for e in expressions]
    messages = [_raw(), _raw(type="u", payload="q", fields=[])]
    for raw in messages:
        expected = [compile_matcher(e)(real(raw)) for e in expressions]
        # the bytes the Lua sandbox passes are a new object at each eval
        assert [m(bytes(bytearray(raw))) for m in raw_matchers if m is not None] == expected
        assert [m(bytes(bytearray(raw))) for m in raw_matchers if m is not None] == expected
    # TRUE and the header comparisons decode nothing; the others share one decode per message
    assert decodes == [(True, True), (True, True)]


def test_raw_matchers_of_one_header_decode_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from hindsight_py import message as hmsg

    def no_decoding(raw: bytes, **kw: Any) -> Message:
        raise AssertionError("decoded")

    monkeypatch.setattr(hmsg, "decode", no_decoding)
    for expression, matching in (("Type == 't'", True), ("Type != 't'", False), ("Hostname == 'h'", False),
                                 ("Hostname != 'h'", True), ("Payload == 'p'", True)):
        m = compile_raw_matcher(expression)
        assert m is not None and m(_raw()) is matching, expression
    assert compile_raw_matcher("Type ==") is None
