"""Validators of names and ids that reach CouchDB URLs: whole-string matches only."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vibed.layout import split_storage_id, valid_collection, valid_doc_id
from vibed.naming import is_idn, new_idn


def test_a_trailing_newline_never_passes() -> None:
    """Python's ``$`` matches before a final newline; every validator must refuse one."""
    assert valid_collection("notes") and not valid_collection("notes\n")
    assert valid_doc_id("abc") and not valid_doc_id("abc\n")
    idn = new_idn()
    assert is_idn(idn) and not is_idn(idn + "\n")
    assert split_storage_id("notes:abc\n") is None


@given(st.text(max_size=80))
def test_valid_names_are_url_safe(text: str) -> None:
    """Whatever the input, an accepted collection name or id has only URL-safe characters."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~-")
    if valid_collection(text) or valid_doc_id(text):
        assert set(text) <= safe
