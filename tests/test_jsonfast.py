"""The request path's JSON (vibed.jsonfast, vibed.strictjson's prebuilt parser) against the
standard library's: the same text out, the same values in, the same errors, on the usual and
the unusual input alike."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from vibed import jsonfast, strictjson
from vibed.data import MAX_NESTING, _too_deep

VALUES: list[Any] = [
    {},
    [],
    {"_id": "notes:a", "_rev": "1-abc", "n": 42, "f": 1.5, "t": True, "x": None},
    {"nested": {"list": [1, [2, [3, {"deep": "é☃😀"}]]]}, "": "empty key"},
    ["a", 1, -0.0, 1e308, 10**40, "\u2028", '\x00\x1f"\\/'],
    {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
    "just a string",
    7,
    None,
    float("nan"),
    float("inf"),
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_dumps_is_json_dumps(value: Any) -> None:
    assert jsonfast.dumps(value) == json.dumps(value)


class Odd:
    pass


@pytest.mark.parametrize(
    "value", [{"a": Odd()}, [1, {(1, 2): 3}], {"a": {1j: 2}}], ids=["object", "tuple", "complex"]
)
def test_dumps_refuses_as_json_dumps_does(value: Any) -> None:
    with pytest.raises(TypeError) as expected:
        json.dumps(value)
    with pytest.raises(TypeError) as got:
        jsonfast.dumps(value)
    assert str(got.value) == str(expected.value)


def test_dumps_circular_and_after_an_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        jsonfast.dumps(loop)
    shared = {"k": 1}
    with pytest.raises(TypeError):
        jsonfast.dumps({"a": shared, "b": Odd()})
    # An error leaves no marker behind: the same dict encodes next time, twice over.
    assert jsonfast.dumps([shared, shared]) == '[{"k": 1}, {"k": 1}]'


TEXTS = [
    b'{"a":1}\n',
    b'{"a":1}',
    b' {"a":1}',
    b'{"a":1} ',
    b'{"a":1}\n\n',
    b'{"a":1}\r\n',
    b"[1,2] x",
    b"[1,2][3]",
    b"",
    b"\n",
    b'{"a":',
    b'{"a":1,}',
    b'"x"\n',
    b"1\n",
    b"nul",
    b"NaN",
    b'{"a":1}\n\t',
    b"\xff",
    b'{"a":"\xc3\xa9"}',
    b'{"a":1,"a":2}',
    b'{"a":1}  x',
]

#: Not UTF-8 as CouchDB sends it: json.loads detects the encoding (and decodes surrogates).
OTHER_ENCODINGS = [
    b'\xef\xbb\xbf{"a":1}',
    '{"a":1}'.encode("utf-16"),
    '{"a":1}'.encode("utf-16-le"),
    '{"a":1}'.encode("utf-16-be"),
    '{"a":1}'.encode("utf-32"),
    b'{"s":"\xed\xa0\x80"}',
    b"[\x00]\x00",
    b"\xff\xfe",
]


def _outcome(parse: Any, raw: bytes) -> tuple[str, Any]:
    try:
        value = parse(raw)
    except ValueError as e:
        return ("error", type(e).__name__)
    return (
        "value",
        json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value),
    )


@pytest.mark.parametrize("raw", TEXTS + OTHER_ENCODINGS, ids=range(len(TEXTS + OTHER_ENCODINGS)))
def test_loads_is_json_loads(raw: bytes) -> None:
    assert _outcome(jsonfast.loads, raw) == _outcome(json.loads, raw)


@pytest.mark.parametrize("text", ['{"a":1} x', '{"a":1}\n\n,', "[1]]", '"x" "y"', "1 2"])
def test_decode_errors_are_decodes(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.JSONDecoder().decode(text)
    with pytest.raises(json.JSONDecodeError) as got:
        jsonfast.decode(json.JSONDecoder(), text)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)


def test_a_body_is_parsed_once_whatever_follows_it() -> None:
    """Whitespace after the value (a client may send a megabyte of it) does not make the
    parser, and its hooks, run twice."""
    objects = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(items)
        return dict(items)

    decoder = json.JSONDecoder(object_pairs_hook=pairs)
    for text in ['{"a":{"b":1}}', '{"a":{"b":1}}\n', '{"a":{"b":1}}' + " \r\n\t" * 1000]:
        objects.clear()
        assert jsonfast.decode(decoder, text) == {"a": {"b": 1}}
        assert len(objects) == 2, text[:20]


def _strict_reference(raw: bytes) -> Any:
    """strictjson as it was: a new parser per call through json.loads."""
    return json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=strictjson._pairs,
        parse_constant=strictjson._constant,
        parse_float=strictjson._float,
        parse_int=strictjson._int,
    )


STRICT = [
    *TEXTS[:-3],
    b'{"a":1,"a":2}',
    b'{"a":{"b":1,"b":2}}',
    b'{"n":NaN}',
    b'{"n":-Infinity}',
    b'{"n":1e999}',
    b'{"n":' + b"9" * 401 + b"}",
    b'{"n":' + b"9" * 320 + b"}",
    b'{"n":' + b"9" * 300 + b"}",
    # Numbers near the edge of a double, each way the plain-number parse could be chosen
    # wrongly (strictjson._RISKY_NUMBER): long integer parts, exponents, signs.
    b'{"n":-' + b"9" * 320 + b"}",
    b'{"n":' + b"9" * 289 + b"}",
    b'{"n":1' + b"0" * 299 + b"e9}",
    b'{"n":1' + b"0" * 288 + b"e9}",
    b'{"n":' + b"9" * 300 + b"e9}",
    b'{"n":' + b"9" * 289 + b"e20}",
    b'{"n":' + b"9" * 289 + b"E+20}",
    b'{"n":' + b"9" * 289 + b"e-99}",
    b'{"n":' + b"9" * 289 + b"." + b"9" * 300 + b"e9}",
    b'{"n":' + b"9" * 289 + b".9e9}",
    b'{"n":1' + b"0" * 289 + b".5e9}",
    b'{"n":' + b"1" * 310 + b".5}",
    b'{"n":0.' + b"1" * 500 + b"}",
    b'{"n":1e308}',
    b'{"n":10e308}',
    b'{"n":1.7976931348623157e308}',
    b'{"n":1.8e308}',
    b'{"n":1E+99, "m":1e-999, "o":-5e-324}',
    b'{"n":100000e305}',
    b"[1e99, 9.9e9, 1e9, -0, -0.0, 0e0, 12345678901234567890]",
    b'{"s":"' + b"1" * 400 + b'", "n":' + b"9" * 320 + b"}",
    b'{"' + b"7" * 300 + b'":1}',
    # Over strictjson._SHAPE_CHECKED: the checked parse, whatever the numbers.
    b'{"pad":"' + b"x" * 70_000 + b'", "n":' + b"9" * 320 + b"}",
    b'{"pad":"' + b"x" * 70_000 + b'", "n":[1, 2.5, -3e2, 1e308]}',
    b'\t{"ok": [1, 2.5, "x"]}  \r\n',
    b"[" * 5000 + b"]" * 5000,
]


@pytest.mark.parametrize("raw", STRICT, ids=range(len(STRICT)))
def test_strict_loads_as_before(raw: bytes) -> None:
    try:
        expected: tuple[str, Any] = ("value", _strict_reference(raw))
    except (ValueError, RecursionError) as e:
        expected = ("error", type(e).__name__)
    try:
        got: tuple[str, Any] = ("value", strictjson.loads(raw))
    except strictjson.JSONError as e:
        got = ("error", str(e))
    assert got[0] == expected[0], (got, expected)
    if got[0] == "value":
        assert got[1] == expected[1]


def test_strict_loads_messages() -> None:
    cases = {
        b'{"a":1,"a":2}': 'Duplicate key "a"',
        b'{"n":NaN}': "NaN is not JSON",
        b'{"n":1e999}': "too large",
        b"[1,2] x": "Not valid JSON: Extra data (line 1, column 7)",
        b"": "Not valid JSON: Expecting value (line 1, column 1)",
        b"\xef\xbb\xbf{}": "byte order mark",
        b'{"s":"\\ud800"}': "lone UTF-16 surrogate",
    }
    for raw, words in cases.items():
        with pytest.raises(
            strictjson.JSONError, match=words.replace("(", r"\(").replace(")", r"\)")
        ):
            strictjson.loads(raw)


def _nest(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize(
    ("value", "deep"),
    [
        ("scalar", False),
        (7, False),
        ({}, False),
        ({"a": 1, "b": "x", "c": None}, False),
        (_nest(MAX_NESTING), False),
        (_nest(MAX_NESTING, {}), True),
        (_nest(MAX_NESTING + 1), True),
        ({"wide": [1] * 1000, "deep": _nest(MAX_NESTING - 1)}, False),
        ({"wide": [1] * 1000, "deep": _nest(MAX_NESTING)}, True),
        ([[], [[]], {"a": [{"b": []}]}], False),
    ],
    ids=range(10),
)
def test_too_deep(value: Any, deep: bool) -> None:
    assert _too_deep(value, MAX_NESTING) is deep
