"""Strict JSON in: the one parser for every body and WebSocket message vibed reads.

Strict means UTF-8 without a byte order mark, no duplicate keys (CVE-2017-12635 rode on two
parsers disagreeing about one), no NaN/Infinity, no number outside the double range (it would
reach JavaScript as Infinity), and no string that is not valid Unicode: a lone UTF-16
surrogate escape such as ``"\\ud800"`` parses in Python but cannot be encoded again, so it
would fail later, deep inside a hash, a URL or CouchDB. Every refusal is a :class:`JSONError`
whose message is ours, written for the person who sent the JSON (Python's own messages name
interpreter internals and are never shown).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from vibed import jsonfast

__all__ = ["JSONError", "loads"]

#: integers longer than this are refused before Python's own digit limit (4300) can speak
MAX_INT_DIGITS = 400

#: a \uD800-\uDFFF escape somewhere in the text (the backslash may itself be escaped: the
#: parsed strings are then checked, which is exact)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JSONError(ValueError):
    """Not strict JSON; ``str()`` says why in words a client can act on."""


class _Refused(ValueError):
    pass


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise _Refused(f"Duplicate key {_show(key)} in the JSON.")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON; numbers must be finite.")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"The number {text[:40]} is too large.")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"A number with {digits} digits is too large.")
    value = int(text)
    if digits > 300:
        try:
            float(value)
        except OverflowError:
            raise _Refused(f"The number {text[:40]}... is too large.") from None
    return value


def _show(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, safe to encode whatever it holds."""
    return json.dumps(text[:limit])


def _valid_unicode(value: Any) -> bool:
    """Whether every string (keys included) in ``value`` is valid Unicode (no surrogates)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


#: one parser for every call: building a JSONDecoder (and its C scanner) per body cost more
#: than parsing a small body; the scanner keeps no state between calls
_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float, parse_int=_int
)


def loads(raw: bytes) -> Any:
    """Parse ``raw`` as strict JSON; :class:`JSONError` otherwise."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise JSONError("The JSON starts with a byte order mark; send UTF-8 without one.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONError("The JSON is not valid UTF-8.") from None
    try:
        value = jsonfast.decode(_DECODER, text)
    except _Refused as e:
        raise JSONError(str(e)) from None
    except RecursionError:
        raise JSONError("The JSON is nested too deeply.") from None
    except json.JSONDecodeError as e:
        raise JSONError(f"Not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}).") from None
    except ValueError:
        raise JSONError("Not valid JSON.") from None
    if _SURROGATE_ESCAPE.search(raw) and not _valid_unicode(value):
        raise JSONError(
            "A string in the JSON is not valid Unicode (a lone UTF-16 surrogate escape)."
        )
    return value
