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
#: The same parser, but numbers made by the C scanner itself rather than by _int and
#: _float (a Python call per number): for text in which no number can be too large.
_PLAIN_NUMBERS = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)
#: Where a number could be too large: a run of 290 digits (an integer of up to 300 digits is
#: always within a double's range, and an integer part of up to 289 digits times an exponent
#: of one digit, at most 10^298, is too), or a positive exponent of two digits or more (a
#: negative one only makes it smaller). Looked for anywhere in the text, strings included
#: (a false alarm only costs the checked parse), in a copy where every digit is "0" and "E"
#: is "e" (in JSON a digit always comes just before an exponent): a translate and three
#: finds, about 1 ns a byte on usual text (a regular expression took 50 to 100) but up to 10
#: on text made of long runs of digits. So only a text of up to _SHAPE_CHECKED bytes is
#: looked at (every document and message an app usually sends); a longer one gets the
#: checked parse, whose hooks then cost less than the look would.
_NUMBER_SHAPE = bytes.maketrans(b"0123456789E", b"0000000000e")
_LONG_RUN = b"0" * 290
_SHAPE_CHECKED = 64 * 1024


def loads(raw: bytes) -> Any:
    """Parse ``raw`` as strict JSON; :class:`JSONError` otherwise."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise JSONError("The JSON starts with a byte order mark; send UTF-8 without one.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONError("The JSON is not valid UTF-8.") from None
    if len(raw) > _SHAPE_CHECKED:
        decoder = _DECODER
    else:
        shape = raw.translate(_NUMBER_SHAPE)
        risky = shape.find(_LONG_RUN) >= 0 or shape.find(b"0e00") >= 0 or shape.find(b"0e+00") >= 0
        decoder = _DECODER if risky else _PLAIN_NUMBERS
    try:
        value = jsonfast.decode(decoder, text)
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
