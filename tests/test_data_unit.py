"""The data API's input checks, without servers: every refusal is a 400 Problem (never another
exception), and what passes is safe to send to CouchDB or PouchDB Server."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vibed.data import (
    BookmarkCodec,
    SelectorChecker,
    check_body,
    check_regex,
    parse_fields,
    parse_limit,
    parse_selector,
    parse_sort,
    project,
    scope_allows,
)
from vibed.errors import BadRequest
from vibed.layout import TAG, from_storage, from_storage_in_place


def test_scopes() -> None:
    """data:* allows all; data:read:<c>/data:write:<c> allow just that action on just that
    collection; nothing else (no wildcard inside read/write, no prefix matching)."""
    assert scope_allows(["data:*"], "write", "notes")
    assert scope_allows(["data:read:notes"], "read", "notes")
    assert not scope_allows(["data:read:notes"], "write", "notes")
    assert not scope_allows(["data:read:notes"], "read", "todos")
    assert not scope_allows(["data:write:notes"], "read", "notes")
    assert not scope_allows(["data:read:*", "data:read:note", "blob:*", "data"], "read", "notes")


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "abc",
        "^abc",
        "^a.*z$",
        "colou?r",
        "^[A-Za-z]+$",
        r"\d{3}-\d{4}",
        "(?:ab|cd)",
        "^(?:ab)+$",
        "a|b",
        r"^\w+@example\.org$",
        "x{2,5}",
    ],
)
def test_regex_accepted(pattern: str) -> None:
    """Portable patterns that run in linear time pass unchanged."""
    assert check_regex(pattern) == pattern


@pytest.mark.parametrize(
    "pattern",
    [
        5,
        None,
        "(a+)+",
        "^(a+)+$",
        "(a|aa)*",
        "^(a|aa)*$",
        "^(a?a?)*$",
        "a.*b",
        "^.*a.*b",
        "(?i)x",
        "(?P<n>x)",
        "(?<n>x)",
        r"(a)\1",
        "(?=a)",
        "(?<=a)b",
        r"\p{L}",
        r"\u0041",
        r"\x41",
        r"\Z",
        "x{1,2000}",
        "(ab|cd|ef|gh|ij)" * 5,
        "a" * 300,
        "[",
        "\x01",
        "a++",
        "(?>a)",
    ],
)
def test_regex_refused(pattern: Any) -> None:
    """Catastrophic, quadratic, engine-specific or malformed patterns are 400."""
    with pytest.raises(BadRequest):
        check_regex(pattern)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_regex_text_is_refused_or_compiles(pattern: str) -> None:
    """Whatever text arrives as $regex: a 400, or a pattern that compiles."""
    try:
        check_regex(pattern)
    except BadRequest:
        return
    re.compile(pattern)


KEYS = st.sampled_from(
    [
        "_id",
        "_rev",
        "_deleted",
        TAG,
        "a",
        "a.b",
        "_id.x",
        "$and",
        "$or",
        "$nor",
        "$not",
        "$eq",
        "$gt",
        "$lt",
        "$in",
        "$nin",
        "$exists",
        "$regex",
        "$elemMatch",
        "$where",
        "",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from(["", "x", "todos:x", "notes:", "\ufff0", "^a", "(a+)+"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=12,
)


def _id_conditions(selector: Any) -> list[Any]:
    """Every value an output selector compares the top-level _id with."""
    found: list[Any] = []
    if not isinstance(selector, dict):
        return found
    for key, value in selector.items():
        if key in ("$and", "$or", "$nor"):
            for sub in value:
                found += _id_conditions(sub)
        elif key == "$not":
            found += _id_conditions(value)
        elif key == "_id":
            assert isinstance(value, dict)
            for op, operand in value.items():
                if op in ("$in", "$nin"):
                    found += operand
                elif op != "$exists":
                    found.append(operand)
        else:
            assert key != TAG and not key.startswith("_") or key == "_rev", key
    return found


@settings(max_examples=500, deadline=None)
@given(JSON)
@example({"_rev": {"_id": None}})  # found by CI: a nested condition under _rev
@example({"_id": {"a": 1}})
def test_any_selector_is_refused_or_stays_in_its_collection(selector: Any) -> None:
    """Whatever JSON arrives as q: a 400, or a selector in which every comparison with _id
    is a string in the collection's key space and no top-level field is reserved or the
    storage tag."""
    try:
        out = parse_selector(json.dumps(selector), "notes")
    except BadRequest:
        return
    assert out is not None
    for value in _id_conditions(out):
        assert isinstance(value, str) and value.startswith("notes:"), out


def test_selector_rewrites() -> None:
    """_id means the app's id; implicit equalities become explicit $eq."""
    checker = SelectorChecker("notes")
    assert checker.selector({"_id": "abc", "n": 1}) == {
        "_id": {"$eq": "notes:abc"},
        "n": {"$eq": 1},
    }
    assert checker.selector({"$or": [{"_id": {"$in": ["a", "b"]}}, {"a": {"b": [1]}}]}) == {
        # a nested-field condition goes out as its dotted path (PouchDB fails on the nested
        # form when some document has a: null)
        "$or": [{"_id": {"$in": ["notes:a", "notes:b"]}}, {"a.b": {"$eq": [1]}}]
    }
    assert checker.selector({"tags": {"$elemMatch": {"$eq": "x"}}}) == {
        "tags": {"$elemMatch": {"$eq": "x"}}
    }
    # Inside $elemMatch, names are the element's own fields.
    assert checker.selector({"xs": {"$elemMatch": {"_id": 1}}}) == {
        "xs": {"$elemMatch": {"_id": {"$eq": 1}}}
    }


@pytest.mark.parametrize(
    "selector",
    [
        [],
        "x",
        {TAG: "x"},
        {"_deleted": True},
        {"_id": {"$regex": "a"}},
        {"_id": 5},
        {"n": {"$not": {"$eq": 1}}},
        {"xs": {"$elemMatch": {"$or": [{"$eq": 1}]}}},
        {"n": {"$in": [None]}},
        {"n": {"$eq": {"$gt": 1}}},
        {"n": {}},
        {"$and": []},
        {"$gt": 1},
        {"n": {"$mod": [0, 1]}},
        {"n": {"$mod": [True, 1]}},
        {"n": {"$size": 1.5}},
        {"n": {"$eq": json.loads("[" * 120 + "]" * 120)}},
    ],
)
def test_selector_refused(selector: Any) -> None:
    """Non-objects, reserved fields, the tag, operators not portable to both servers: 400."""
    with pytest.raises(BadRequest):
        parse_selector(json.dumps(selector), "notes")


def test_sort_fields_limit_parsing() -> None:
    """sort is a JSON array of names or {name: dir} with one direction; fields a list or
    comma-separated names; limit 1..1000."""
    sort = parse_sort('["a", "b.c"]')
    assert sort is not None and sort.fields == ("a", "b.c") and not sort.descending
    sort = parse_sort('[{"a": "desc"}]')
    assert sort is not None and sort.descending
    assert sort.mango(True) == [{TAG: "desc"}, {"a": "desc"}]
    assert parse_sort("[]") is None
    for bad in ['"a"', "[1]", '[{"a": "down"}]', '["a", {"b": "desc"}]', '["_id", "a"]']:
        with pytest.raises(BadRequest):
            parse_sort(bad)
    assert parse_fields("a, b.c") == [["a"], ["b", "c"]]
    assert parse_fields('["a\\\\.b"]') == [["a.b"]]
    for bad in ["", "_x", TAG, "[]", "{}", "a,,b"]:
        with pytest.raises(BadRequest):
            parse_fields(bad)
    assert parse_limit(None) == 25 and parse_limit("1000") == 1000
    for bad in ["0", "1001", "-1", "1.5", "", "１"]:
        with pytest.raises(BadRequest):
            parse_limit(bad)


def test_projection() -> None:
    """fields keeps only the named (nested) fields; missing ones are left out."""
    doc = {"_id": "x", "a": {"b": 1, "c": 2}, "d": [1]}
    assert project(doc, [["_id"], ["a", "b"], ["nope"], ["d", "0"]]) == {"_id": "x", "a": {"b": 1}}


def test_bodies() -> None:
    """Reserved fields, the tag, a mismatched _id and deep nesting are refused."""
    assert check_body({"a": 1, "_id": "x"}, url_id="x") == {"a": 1, "_id": "x"}
    for body, url_id in [
        ({"_attachments": {}}, "x"),
        ({TAG: "x"}, "x"),
        ({"_id": "y"}, "x"),
        ({"_id": "x"}, None),
        ({"_rev": "zz"}, "x"),
        ({"a": json.loads("[" * 101 + "]" * 101)}, "x"),
    ]:
        with pytest.raises(BadRequest):
            check_body(body, url_id=url_id)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_bookmarks_are_unforgeable(garbage: str) -> None:
    """A bookmark round-trips for its identity only; anything else is a 400."""
    codec = BookmarkCodec(b"k" * 32)
    token = codec.encode("idn:a", {"m": "list", "next": "x"})
    assert codec.decode("idn:a", token) == {"m": "list", "next": "x"}
    for bad in (garbage, token + "x", token[:-2], "A" + token):
        with pytest.raises(BadRequest):
            codec.decode("idn:a", bad)
    with pytest.raises(BadRequest):
        codec.decode("idn:b", token)
    with pytest.raises(BadRequest):
        BookmarkCodec(b"j" * 32).decode("idn:a", token)


_storage_ids = st.one_of(
    st.sampled_from(["notes:abc", "notes:", "notes:_x", "notes:a:b", "todos:abc", "notes", ""]),
    st.builds(
        lambda c, d: f"{c}:{d}",
        st.sampled_from(["notes", "todos", "Notes", "_design", "notes2"]),
        st.text(alphabet="aZ09._~-:_/ é", max_size=12),
    ),
    st.text(max_size=20),
    st.integers(),
    st.none(),
)


@settings(max_examples=400, deadline=None)
@given(
    storage=_storage_ids,
    extra=st.dictionaries(st.sampled_from(["title", "n", TAG, "_rev", "nested"]), st.integers()),
)
def test_presenting_in_place_is_from_storage(storage: Any, extra: dict[str, Any]) -> None:
    """The in-place presentation that queries and listings use gives exactly what
    ``from_storage`` gives (same keys, order, ``_id``), whatever the stored id: one of the
    collection, of another collection, an invalid one, not a string, missing."""
    stored: dict[str, Any] = dict(extra)
    if storage is not None:
        stored["_id"] = storage
    expected = from_storage(stored)
    made = from_storage_in_place(dict(stored), "notes:")
    assert made == expected and list(made) == list(expected)
