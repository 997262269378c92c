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
import re
from json import encoder as _encoder
from typing import Any

__all__ = ["decode", "dumps", "loads"]

_make_encoder = _encoder.c_make_encoder  # type: ignore[attr-defined]
_escape = _encoder.encode_basestring_ascii
_default = json.JSONEncoder().default  # TypeError: "Object of type X is not JSON serializable"
_decoder = json.JSONDecoder()
_whitespace = re.compile(r"[ \t\n\r]*").match  # JSON's whitespace, as json.decoder's


def dumps(value: Any) -> str:
    """``json.dumps(value)``: the same text (ASCII, ``", "`` and ``": "``), the same errors."""
    if _make_encoder is None or value.__class__ is str:
        return json.dumps(value)
    # A new encoder per call, as iterencode makes one: its circular-reference markers start
    # empty, so an error in one call leaves nothing behind for the next.
    encode = _make_encoder({}, _default, _escape, None, ": ", ", ", False, False, True)
    return "".join(encode(value, 0))


def decode(decoder: json.JSONDecoder, text: str) -> Any:
    """``decoder.decode(text)`` (the same value, the same errors), the usual case (a value from
    the first character on) in one call to the C scanner and the text parsed once."""
    try:
        value, end = decoder.scan_once(text, 0)  # type: ignore[attr-defined]
    except StopIteration:  # whitespace first, or no value at all: decode says which
        return decoder.decode(text)
    if end != len(text):  # whitespace may follow (CouchDB ends with a newline), nothing else
        after = _whitespace(text, end).end()  # type: ignore[union-attr]  # "*": always matches
        if after != len(text):
            raise json.JSONDecodeError("Extra data", text, after)  # decode's own error
    return value


def loads(raw: bytes) -> Any:
    """``json.loads(raw)``: UTF-8 (what CouchDB sends) here, anything else (a byte order mark,
    UTF-16 or -32, an encoded surrogate) by ``json.loads`` itself; ValueError if not JSON."""
    if raw[:4].find(b"\x00") >= 0 or raw[:3] == b"\xef\xbb\xbf":
        return json.loads(raw)  # UTF-16/32 or a BOM: json's own encoding detection
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return json.loads(raw)  # json decodes with surrogatepass; it raises or parses
    return decode(_decoder, text)
