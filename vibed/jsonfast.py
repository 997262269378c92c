"""``json.dumps`` and ``json.loads`` for the request path, without their Python layers.

``json.dumps(value)`` passes through ``dumps``, ``JSONEncoder.encode`` and ``iterencode`` and
``json.loads(raw)`` through ``loads``, ``detect_encoding``, ``JSONDecoder.decode`` and
``raw_decode`` before the C encoder or scanner does the work: on a proxied request that sends
and reads two or three JSON bodies, those layers cost more than the encoding itself
(``bench/calls.py``). These call the C parts directly, with the settings ``json.dumps`` and
``json.loads`` use by default, so the text and the errors are the same; where the C
accelerator is missing (another Python), they are ``json.dumps`` and ``json.loads``.
"""

from __future__ import annotations

import json
from json import encoder as _encoder
from typing import Any

__all__ = ["decode", "dumps", "loads"]

_make_encoder = _encoder.c_make_encoder  # type: ignore[attr-defined]
_escape = _encoder.encode_basestring_ascii
_default = json.JSONEncoder().default  # TypeError: "Object of type X is not JSON serializable"
_decoder = json.JSONDecoder()


def dumps(value: Any) -> str:
    """``json.dumps(value)``: the same text (ASCII, ``", "`` and ``": "``), the same errors."""
    if _make_encoder is None or value.__class__ is str:
        return json.dumps(value)
    # A new encoder per call, as iterencode makes one: its circular-reference markers start
    # empty, so an error in one call leaves nothing behind for the next.
    encode = _make_encoder({}, _default, _escape, None, ": ", ", ", False, False, True)
    return "".join(encode(value, 0))


def decode(decoder: json.JSONDecoder, text: str) -> Any:
    """``decoder.decode(text)``, the usual case (a value from the first character on, then
    nothing or CouchDB's closing newline) in one call to the C scanner."""
    try:
        value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]
    except StopIteration:  # whitespace first, or no value at all: decode says which
        return decoder.decode(text)
    if end == len(text) or (end == len(text) - 1 and text[end] == "\n"):
        return value
    return decoder.decode(text)  # more after the value: decode's own rules


def loads(raw: bytes) -> Any:
    """``json.loads(raw)`` for UTF-8 ``raw`` (what CouchDB sends); ValueError if not JSON."""
    return decode(_decoder, raw.decode("utf-8"))
