"""The data API's CouchDB side: an identity's collections of JSON documents in ``db_<idn>_data``.

This module owns what the data API sends to CouchDB and what it accepts before sending
anything: collection names, document ids, bodies, revisions, Mango selectors, sort
specifications, field lists, limits and paging bookmarks are all checked here, and every
refusal is a :class:`~vibed.errors.Problem` (400/404/409/413), raised before a CouchDB URL
or body is built.

Layout (see :mod:`vibed.layout`): the document ``abc`` of collection ``notes`` is stored
as ``notes:abc`` with the storage tag ``vibe:collection: "notes"``.

- A plain listing is ``_all_docs`` over the collection's key range with
  ``include_docs``: no index and no Mango. Its bookmark carries the id of the next
  document, which becomes the next page's ``startkey``.
- A query (``q``, or a ``sort``) is ``_find`` with the app's selector ANDed with the
  collection's ``_id`` range *and* the storage tag, so nothing it matches on can reach
  another collection. ``_id`` in an app's selector means the app's id: every condition
  on it is rewritten into the collection's key space (``"abc"`` -> ``"notes:abc"``), which
  also keeps servers that merge ``$and`` clauses (PouchDB Server replaces a range with an
  ``$eq`` on the same field) inside the collection.
- Sorting on a field needs a declared index: a Mango JSON index on
  ``["vibe:collection", *fields]`` in its own design doc ``_design/vidx.<collection>.<hash>``.
  A sorted query sends ``sort: [tag, *fields]`` and ``{field: {$exists: true}}`` for each
  sort field (a JSON index holds only documents that have every indexed field, so this is
  what CouchDB does anyway); with the tag as a constant first column, CouchDB 3 and PouchDB
  Server both pick the index.

Bookmarks are opaque to apps: a signed (HMAC-SHA256, a secret derived from the token signing
key, so every replica accepts every other's) token bound to the identity, the collection and
the query, so nothing an app invents reaches CouchDB as a bookmark.

Regular expressions (``$regex``) are limited to a subset that runs in linear time: the
embedded CouchDB-protocol server evaluates them with JavaScript's backtracking engine on one
thread, where one catastrophic pattern would stall every identity.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import re._constants as sre_c  # type: ignore[import-not-found]  # no stub; 3.11+ name
import re._parser as sre_parse  # type: ignore[import-not-found]
import time
from typing import Any, Literal, cast
from urllib.parse import quote

from attrs import define, field, frozen
from twisted.logger import Logger

from vibed import layout
from vibed.api.http import parse_json
from vibed.couch import (
    CouchBadRequest,
    CouchConflict,
    CouchDatabase,
    CouchNotFound,
    CouchServer,
)
from vibed.errors import BadRequest, Conflict, NotFound, Problem, ServiceUnavailable
from vibed.naming import IDENTITIES_DB, identity_db

_log = Logger(namespace="vibed.data")

_DB_CACHE_SIZE = 4096  # identities whose CouchDatabase handle DataService keeps

MAX_DOC_BYTES = 1024 * 1024
DEFAULT_LIMIT = 25
MAX_LIMIT = 1000
MAX_QUERY_CHARS = 8192
MAX_SELECTOR_NODES = 500
MAX_SELECTOR_DEPTH = 16
MAX_ARRAY_OPERAND = 1000
MAX_FIELD_CHARS = 256
MAX_FIELDS = 100
MAX_SORT_FIELDS = 8
MAX_INDEX_FIELDS = 8
MAX_INDEXES_PER_COLLECTION = 16
MAX_REGEX_CHARS = 256
MAX_BOOKMARK_CHARS = 4096
MAX_NESTING = 100  # JSON depth of a document or a value in 'q'

# CouchDB revisions are "<generation>-<hash>"; treated as opaque beyond this shape check.
_REV_RE = re.compile(r"^[0-9]{1,10}-[0-9A-Za-z]{1,128}\Z")
_COLLECTION_RE = layout.COLLECTION_RE
_DOC_ID_RE = layout.DOC_ID_RE

Action = Literal["read", "write"]

#: Mango condition operators vibed passes on: the set CouchDB 3 and PouchDB Server share.
CONDITION_OPERATORS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$exists",
        "$type",
        "$in",
        "$nin",
        "$all",
        "$size",
        "$mod",
        "$regex",
        "$elemMatch",
        "$allMatch",
    }
)
COMBINATION_OPERATORS = frozenset({"$and", "$or", "$nor", "$not"})
_COMPARISONS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_ID_OPERATORS = _COMPARISONS | {"$in", "$nin", "$exists"}
_TYPES = frozenset({"null", "boolean", "number", "string", "array", "object"})


# -- scopes ------------------------------------------------------------------------------


def scope_allows(scopes: tuple[str, ...], action: Action, collection: str) -> bool:
    """Whether access-token scopes allow ``action`` on ``collection``.

    ``data:*`` allows everything; ``data:read:<collection>`` reads (documents, listings,
    queries, the index list) and ``data:write:<collection>`` writes (create, update, delete,
    declare an index) of that one collection.
    """
    return "data:*" in scopes or f"data:{action}:{collection}" in scopes


# -- validation of names, ids, bodies ----------------------------------------------------


def new_doc_id() -> str:
    """A new document id: 12 hex digits of the Unix time in milliseconds, then 80 random bits.

    32 lowercase hex characters, like the uuid4 ids before it, but in creation order: CouchDB
    keeps a database's documents in a b-tree by id, and ids that arrive in order are appended
    at the tree's right edge instead of landing on a random leaf each time (CouchDB's own
    ``sequential`` uuids exist for the same reason). Measured with ``bench/data.py --ops
    create``: CouchDB's CPU per create through vibed fell to that of the ordered ids the direct
    run uses. Replicas stay roughly in order (their clocks agree to milliseconds), and within
    one millisecond the random part keeps ids unique. The id shows when a document was
    created, to whoever may read the document."""
    # (os.urandom is what secrets.token_hex reads, without its three calls in between.)
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


# (check_collection and check_doc_id match layout's expressions themselves, where
# layout.valid_* would be one more call on every request.)


def check_collection(name: object) -> str:
    if not isinstance(name, str) or _COLLECTION_RE.match(name) is None:
        raise BadRequest(
            "Collection names are 1 to 64 characters: a lowercase letter, then lowercase "
            "letters, digits, '_' or '-'.",
            slug="invalid-collection",
        )
    return name


def check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or _DOC_ID_RE.match(doc_id) is None:
        raise BadRequest(
            "Document ids are 1 to 200 characters: a letter or digit, then letters, digits, "
            "'.', '_', '~' or '-'.",
            slug="invalid-id",
        )
    return doc_id


def check_rev(rev: object) -> str:
    if not isinstance(rev, str) or not _REV_RE.match(rev):
        raise BadRequest(
            "A revision looks like '1-967a00dff5e02add41819138abb3284d'.", slug="invalid-rev"
        )
    return rev


def check_body(body: dict[str, Any], *, url_id: str | None) -> dict[str, Any]:
    """Refuse what an app may not store: CouchDB's reserved fields, the storage tag, an
    ``_id`` other than the URL's (``url_id`` None: no ``_id`` at all, the server picks)."""
    for key in body:
        if key == layout.TAG:
            raise BadRequest(
                f"'{layout.TAG}' is reserved for the server and may not be sent.",
                slug="reserved-field",
            )
        if key.startswith("_") and key not in ("_id", "_rev"):
            raise BadRequest(
                f"Top-level fields starting with '_' are reserved by CouchDB: {key!r}.",
                slug="reserved-field",
            )
    if _too_deep(body, MAX_NESTING):
        raise BadRequest(f"Documents may nest at most {MAX_NESTING} levels deep.", slug="too-deep")
    if "_id" in body:
        if url_id is None:
            raise BadRequest(
                "The server chooses the id of a new document; to choose it yourself, "
                "use PUT /data/<collection>/<id>.",
                slug="id-mismatch",
            )
        if body["_id"] != url_id:
            raise BadRequest(
                "'_id' in the body differs from the id in the URL.", slug="id-mismatch"
            )
    if "_rev" in body:
        check_rev(body["_rev"])
    return body


def _too_deep(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (iteratively: no recursion)."""
    if not isinstance(value, (dict, list)):
        return False  # a scalar
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth >= limit:
            return True
        # Only containers go on the stack: a scalar cannot nest (most fields are scalars).
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_LIMIT}.", slug="bad-query")
    return int(raw)


# -- field paths -------------------------------------------------------------------------


class _Nested(list[tuple[list[str], Any]]):
    """Conditions on nested fields, each with its path from the selector's level."""


def _dotted(parts: list[str]) -> str:
    """The Mango dotted path of ``parts`` (dots and backslashes in a name escaped)."""
    return ".".join(p.replace("\\", "\\\\").replace(".", "\\.") for p in parts)


def parse_field_path(name: str) -> list[str]:
    """Mango's dotted path: ``a.b`` is ``b`` inside ``a``; ``\\.`` is a literal dot."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(name)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            if nxt in (".", "$", "\\"):
                current.append(nxt)
            else:
                current.append(ch + nxt)
        elif ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _check_field_name(name: object, *, top: bool, what: str) -> list[str]:
    """A field name an app may use in a selector/sort/fields/index (``top``: a top-level
    document field, where CouchDB's reserved names and the storage tag are refused)."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"Field names in {what} must be non-empty strings.", slug="bad-query")
    if len(name) > MAX_FIELD_CHARS:
        raise BadRequest(
            f"Field names in {what} may be at most {MAX_FIELD_CHARS} characters.",
            slug="bad-query",
        )
    if any(ord(ch) < 0x20 for ch in name):
        raise BadRequest(
            f"Field names in {what} may not hold control characters.", slug="bad-query"
        )
    path = parse_field_path(name)
    if any(part == "" for part in path):
        raise BadRequest(f"Field {name!r} in {what} has an empty part.", slug="bad-query")
    if path[0].startswith("$"):
        raise BadRequest(f"Unsupported operator {path[0]!r} in {what}.", slug="bad-query")
    if top:
        if path[0] == layout.TAG:
            raise BadRequest(
                f"'{layout.TAG}' is the server's storage tag, not a field of your documents.",
                slug="reserved-field",
            )
        if path[0].startswith("_") and (path[0] not in ("_id", "_rev") or len(path) > 1):
            raise BadRequest(
                f"Field {name!r} in {what}: names starting with '_' are reserved "
                "(only '_id' and '_rev' may be used).",
                slug="reserved-field",
            )
    return path


def parse_fields(raw: str | None) -> list[list[str]] | None:
    """``fields``: comma-separated names or a JSON list of names; parsed paths, or None."""
    if raw is None:
        return None
    if raw.lstrip()[:1] in ("{", '"'):
        raise BadRequest(
            "'fields' is comma-separated names or a JSON array of names.", slug="bad-query"
        )
    if raw.lstrip().startswith("["):
        names = _parse_json_param(raw, "fields")
        if not isinstance(names, list):
            raise BadRequest("'fields' must be a JSON list of field names.", slug="bad-query")
    else:
        names = [name.strip() for name in raw.split(",")]
    if not names or len(names) > MAX_FIELDS:
        raise BadRequest(f"'fields' must name 1 to {MAX_FIELDS} fields.", slug="bad-query")
    return [_check_field_name(name, top=True, what="'fields'") for name in names]


def project(doc: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """Only the fields at ``paths`` (as Mango's ``fields`` does); missing ones are left out."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = doc
        for part in path:
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            target = out
            for part in path[:-1]:
                nested = target.get(part)
                if not isinstance(nested, dict):
                    nested = target[part] = {}
                target = nested
            target[path[-1]] = value
    return out


# -- sort --------------------------------------------------------------------------------


@frozen
class Sort:
    """A validated sort: field names in order, one direction for all (CouchDB's rule)."""

    fields: tuple[str, ...]
    descending: bool

    @property
    def by_id(self) -> bool:
        return self.fields == ("_id",)

    def mango(self, tagged: bool) -> list[Any]:
        direction = "desc" if self.descending else "asc"
        names = [layout.TAG, *self.fields] if tagged else list(self.fields)
        return [{name: direction} for name in names]


def parse_sort(raw: str | None) -> Sort | None:
    if raw is None:
        return None
    spec = _parse_json_param(raw, "sort")
    hint = 'e.g. ["title"] or [{"title": "desc"}]'
    if not isinstance(spec, list):
        raise BadRequest(f"'sort' must be a JSON array, {hint}.", slug="bad-query")
    if not spec:
        return None
    if len(spec) > MAX_SORT_FIELDS:
        raise BadRequest(f"'sort' may name at most {MAX_SORT_FIELDS} fields.", slug="bad-query")
    fields: list[str] = []
    directions: set[str] = set()
    for item in spec:
        if isinstance(item, str):
            name, direction = item, "asc"
        elif isinstance(item, dict) and len(item) == 1:
            name, direction = next(iter(item.items()))
            if direction not in ("asc", "desc"):
                raise BadRequest("Sort directions are 'asc' or 'desc'.", slug="bad-query")
        else:
            raise BadRequest(f"Each 'sort' entry is a field name or {{field: dir}}, {hint}.")
        _check_field_name(name, top=True, what="'sort'")
        if name == "_rev":
            raise BadRequest("Sorting by '_rev' is not supported.", slug="bad-query")
        if name in fields:
            raise BadRequest(f"'sort' names {name!r} twice.", slug="bad-query")
        fields.append(name)
        directions.add(direction)
    if len(directions) > 1:
        raise BadRequest("All 'sort' fields must have the same direction.", slug="bad-query")
    if "_id" in fields and len(fields) > 1:
        raise BadRequest("'_id' can only be sorted on alone.", slug="bad-query")
    return Sort(tuple(fields), directions == {"desc"})


# -- selectors ---------------------------------------------------------------------------


def parse_selector(raw: str | None, collection: str) -> dict[str, Any] | None:
    """``q``: a Mango selector (a JSON object) checked and rewritten for ``collection``."""
    if raw is None:
        return None
    if len(raw) > MAX_QUERY_CHARS:
        raise BadRequest(f"'q' may be at most {MAX_QUERY_CHARS} characters.", slug="bad-query")
    selector = _parse_json_param(raw, "q")
    return SelectorChecker(collection).selector(selector)


@define
class SelectorChecker:
    """Walks a Mango selector, refusing what is not plain, portable Mango and rewriting
    ``_id`` conditions into the collection's key space. Returns a new selector."""

    collection: str
    nodes: int = 0

    def _count(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_SELECTOR_NODES:
            raise BadRequest(
                f"'q' is too large (over {MAX_SELECTOR_NODES} parts).", slug="bad-query"
            )
        if depth > MAX_SELECTOR_DEPTH:
            raise BadRequest(
                f"'q' nests deeper than {MAX_SELECTOR_DEPTH} levels.", slug="bad-query"
            )

    def selector(self, value: Any, *, top: bool = True, depth: int = 0) -> dict[str, Any]:
        """A selector object; ``top`` False inside ``$elemMatch``/``$allMatch`` (fields there
        are relative to an array element, and bare operators apply to the element)."""
        self._count(depth)
        if not isinstance(value, dict):
            raise BadRequest("A Mango selector must be a JSON object.", slug="bad-query")
        out: dict[str, Any] = {}
        flat: list[tuple[str, Any]] = []  # nested-field conditions, by dotted path
        for key, operand in value.items():
            if key in COMBINATION_OPERATORS and not top:
                # PouchDB Server cannot apply them to an array's scalar elements.
                raise BadRequest(
                    f"{key} is not supported inside $elemMatch/$allMatch; put the "
                    "combination around the whole condition.",
                    slug="bad-query",
                )
            if key in ("$and", "$or", "$nor"):
                if not isinstance(operand, list) or not operand:
                    raise BadRequest(
                        f"{key} takes a non-empty array of selectors.", slug="bad-query"
                    )
                if len(operand) > MAX_ARRAY_OPERAND:
                    raise BadRequest(f"{key} takes at most {MAX_ARRAY_OPERAND} selectors.")
                out[key] = [self.selector(s, top=top, depth=depth + 1) for s in operand]
            elif key == "$not":
                out[key] = self.selector(operand, top=top, depth=depth + 1)
            elif key.startswith("$"):
                if top or key not in CONDITION_OPERATORS:
                    raise BadRequest(f"Unsupported operator {key!r} in 'q'.", slug="bad-query")
                out[key] = self.condition(key, operand, path=None, depth=depth + 1)
            else:
                path = _check_field_name(key, top=top, what="'q'")
                cond = self.field(path, operand, top=top, depth=depth + 1)
                if isinstance(cond, _Nested):
                    flat.extend((_dotted(parts), c) for parts, c in cond)
                else:
                    out[key] = cond
        if not flat:
            return out
        keys = [k for k, _ in flat] + list(out)
        if len(set(keys)) == len(keys):
            out.update(flat)
            return out
        # The same dotted path twice (e.g. {"a": {"b": 1}, "a.b": {"$gt": 0}}): AND them.
        return {"$and": [{k: v} for k, v in out.items()] + [{k: v} for k, v in flat]}

    def field(self, path: list[str], value: Any, *, top: bool, depth: int) -> Any:
        """The value of a field key: an operator object, a nested-field object or a literal."""
        self._count(depth)
        is_id = top and path == ["_id"]
        if isinstance(value, dict) and any(k.startswith("$") for k in value):
            if not all(k.startswith("$") for k in value):
                raise BadRequest(
                    "An object in 'q' holds either operators or fields, not both.", slug="bad-query"
                )
            return {
                op: self.condition(op, operand, path=path if top else None, depth=depth + 1)
                for op, operand in value.items()
            }
        if is_id:
            return {"$eq": self._id_value(value)}
        if isinstance(value, dict):
            if not value:
                raise BadRequest('To match an empty object, write {"$eq": {}}.', slug="bad-query")
            if top and path[0].startswith("_"):
                raise BadRequest(
                    f"{path[0]} is a string: it has no fields to match.", slug="bad-query"
                )
            # {"a": {"b": 1}} is a condition on the nested field a.b. It is sent as the dotted
            # path "a.b": same meaning, and PouchDB Server fails on the nested form as soon
            # as some document has a: null.
            nested = _Nested()
            for key, operand in value.items():
                sub = _check_field_name(key, top=False, what="'q'")
                cond = self.field(path + sub, operand, top=False, depth=depth + 1)
                if isinstance(cond, _Nested):
                    nested.extend(cond)
                else:
                    nested.append((path + sub, cond))
            return nested
        # An implicit equality made explicit: same meaning in Mango, and PouchDB Server
        # then compares the value instead of walking it as a selector.
        return {"$eq": self.literal(value)}

    def condition(self, op: str, operand: Any, *, path: list[str] | None, depth: int) -> Any:
        self._count(depth)
        if op == "$not":
            # Mango reads {"f": {"$not": C}} as {"$not": {"f": C}}; PouchDB Server only
            # knows the latter.
            raise BadRequest(
                'Write $not around the field: {"$not": {"<field>": {...}}}.', slug="bad-query"
            )
        if op not in CONDITION_OPERATORS:
            raise BadRequest(f"Unsupported operator {op!r} in 'q'.", slug="bad-query")
        if path == ["_id"]:
            if op not in _ID_OPERATORS:
                raise BadRequest(
                    f"{op} cannot be used on '_id' (use $eq, $ne, $gt, $gte, $lt, $lte, $in, "
                    "$nin or $exists).",
                    slug="bad-query",
                )
            if op in _COMPARISONS:
                return self._id_value(operand)
            if op in ("$in", "$nin"):
                return [self._id_value(v) for v in self._array(op, operand)]
        if op in _COMPARISONS:
            return self.literal(operand)
        if op == "$exists":
            if not isinstance(operand, bool):
                raise BadRequest("$exists takes true or false.", slug="bad-query")
            return operand
        if op == "$type":
            if not isinstance(operand, str) or operand not in _TYPES:
                raise BadRequest(
                    "$type takes one of " + ", ".join(sorted(_TYPES)) + ".", slug="bad-query"
                )
            return operand
        if op in ("$in", "$nin", "$all"):
            return self.literal(self._array(op, operand))
        if op == "$size":
            if not _is_int(operand) or operand < 0:
                raise BadRequest("$size takes a non-negative integer.", slug="bad-query")
            return operand
        if op == "$mod":
            if (
                not isinstance(operand, list)
                or len(operand) != 2
                or not all(_is_int(v) for v in operand)
                or operand[0] == 0
                or not all(abs(v) < 2**53 for v in operand)
            ):
                raise BadRequest(
                    "$mod takes [divisor, remainder]: integers, the divisor not 0.",
                    slug="bad-query",
                )
            return operand
        if op == "$regex":
            return check_regex(operand)
        if op in ("$elemMatch", "$allMatch"):
            return self.selector(operand, top=False, depth=depth + 1)
        raise AssertionError(op)  # pragma: no cover - every operator is handled above

    def _array(self, op: str, operand: Any) -> list[Any]:
        if not isinstance(operand, list):
            raise BadRequest(f"{op} takes an array.", slug="bad-query")
        if len(operand) > MAX_ARRAY_OPERAND:
            raise BadRequest(f"{op} takes at most {MAX_ARRAY_OPERAND} values.", slug="bad-query")
        return operand

    def _id_value(self, value: Any) -> str:
        if not isinstance(value, str):
            raise BadRequest("Conditions on '_id' compare with strings.", slug="bad-query")
        if len(value) > 1024:
            raise BadRequest("An '_id' value in 'q' is too long.", slug="bad-query")
        # The app's id space is the collection's: "abc" is stored as "notes:abc".
        return f"{self.collection}:{value}"

    def literal(self, value: Any) -> Any:
        """A JSON value compared with documents. Null inside an array is refused: PouchDB
        Server fails on it in any selector (CouchDB takes it), and the API must answer
        alike on every server; match null with {"f": null} in an $or instead."""
        if _too_deep(value, MAX_NESTING):
            raise BadRequest(f"Values in 'q' nest at most {MAX_NESTING} levels.", slug="bad-query")
        if _dollar_key(value):
            raise BadRequest(
                "Objects compared in 'q' may not have keys starting with '$'.", slug="bad-query"
            )
        if _null_in_array(value, inside_array=False):
            raise BadRequest(
                'Arrays in \'q\' may not hold null; use {"$or": [{"<field>": null}, ...]}.',
                slug="bad-query",
            )
        return value


def _dollar_key(value: Any) -> bool:
    if isinstance(value, list):
        return any(_dollar_key(v) for v in value)
    if isinstance(value, dict):
        return any(k.startswith("$") or _dollar_key(v) for k, v in value.items())
    return False


def _null_in_array(value: Any, *, inside_array: bool) -> bool:
    if value is None:
        return inside_array
    if isinstance(value, list):
        return any(_null_in_array(v, inside_array=True) for v in value)
    if isinstance(value, dict):
        return any(_null_in_array(v, inside_array=False) for v in value.values())
    return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- regular expressions -----------------------------------------------------------------

_REGEX_ESCAPES = set("dDwWsSbBtnrf") | set("\\.^$|?*+()[]{}/-")
_MAXREPEAT = sre_c.MAXREPEAT
_REPEATS = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT)
_REFUSED_TOKENS = {
    sre_c.GROUPREF: "back-references",
    sre_c.GROUPREF_EXISTS: "conditionals",
    sre_c.ASSERT: "lookaround",
    sre_c.ASSERT_NOT: "lookaround",
    sre_c.POSSESSIVE_REPEAT: "possessive quantifiers",
    sre_c.ATOMIC_GROUP: "atomic groups",
}


def check_regex(pattern: object) -> str:
    """A ``$regex`` pattern in the portable, linear-time subset, or 400.

    Portable: the syntax PCRE (CouchDB) and JavaScript (PouchDB Server) read alike: no
    inline flags or named groups, escapes limited to ``\\d \\w \\s \\b`` (and their negations),
    ``\\t \\n \\r \\f`` and escaped punctuation. Linear: no back-references or lookaround; an
    unbounded quantifier (``*``, ``+``, ``{n,}``) only in a pattern anchored with ``^``, at
    most one; no variable quantifier or alternation inside any group that repeats (bounded
    or not); quantifiers and written alternatives multiply to at most 1000 ways.
    """
    if not isinstance(pattern, str):
        raise BadRequest("$regex takes a string.", slug="bad-regex")
    if len(pattern) > MAX_REGEX_CHARS:
        raise BadRequest(f"$regex patterns may be at most {MAX_REGEX_CHARS} characters.")
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt not in _REGEX_ESCAPES:
                raise BadRequest(
                    f"$regex: the escape '\\{nxt}' is not supported.", slug="bad-regex"
                )
            i += 2
            continue
        if ch == "(" and pattern[i + 1 : i + 2] == "?" and pattern[i + 2 : i + 3] != ":":
            raise BadRequest(
                "$regex: only '(?:' groups are supported (no flags, names or lookaround).",
                slug="bad-regex",
            )
        if ord(ch) < 0x20:
            raise BadRequest("$regex: control characters must be escaped.", slug="bad-regex")
        i += 1
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        raise BadRequest("$regex is not a valid regular expression.", slug="bad-regex") from None
    anchored = bool(parsed.data) and parsed.data[0] == (sre_c.AT, sre_c.AT_BEGINNING)
    budget = _RegexBudget(ways=_written_alternatives(pattern))
    budget.walk(parsed.data, repeated=False)
    if budget.unbounded and not anchored:
        raise BadRequest(
            "$regex: '*', '+' and '{n,}' need a pattern anchored with '^' (without it a "
            "pattern can take quadratic time).",
            slug="bad-regex",
        )
    if budget.unbounded > 1:
        raise BadRequest("$regex: at most one '*', '+' or '{n,}' per pattern.", slug="bad-regex")
    return pattern


def _written_alternatives(pattern: str) -> int:
    """The alternatives of ``pattern`` as written, multiplied over its groups; 400 for an
    alternation inside a group quantified with ``*``, ``+`` or ``{}``.

    Read from the text, not from ``sre_parse``: it folds ``a|[a-z]`` into one character set,
    which JavaScript does not (it tries both branches, and ``(?:a|[a-z]){0,30}y`` backtracks
    exponentially). A class may not open with ``]`` (``[]`` is a class of its own in
    JavaScript, not the start of one holding ``]``: the pattern would read differently).
    """
    groups = [1]  # alternatives counted per open group, outermost first
    nested_alt = [False]
    ways = 1
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "^" else 1
            if pattern[i : i + 1] == "]":
                raise BadRequest(
                    "$regex: write ']' first in a class as '\\]' (engines read it apart).",
                    slug="bad-regex",
                )
            continue
        elif ch == "(":
            groups.append(1)
            nested_alt.append(False)
        elif ch == ")" and len(groups) > 1:
            alternatives, inner = groups.pop(), nested_alt.pop()
            ways *= alternatives
            has_alt = alternatives > 1 or inner
            if has_alt and pattern[i + 1 : i + 2] in ("*", "+", "{"):
                raise BadRequest(
                    "$regex: no alternation inside a repeated group.", slug="bad-regex"
                )
            nested_alt[-1] = nested_alt[-1] or has_alt
        elif ch == "|":
            groups[-1] += 1
        i += 1
    ways *= groups[0]
    if ways > 1000:
        raise BadRequest("$regex: too many alternatives.", slug="bad-regex")
    return ways


@define
class _RegexBudget:
    unbounded: int = 0
    ways: int = 1

    def walk(self, items: Any, *, repeated: bool) -> None:
        """``repeated``: inside a group that may match more than once. What such a group
        repeats must match in exactly one way (no variable quantifier, no alternation):
        ``(?:x{1,2}){1,300}`` or ``(?:x|xx){0,30}`` backtrack through exponentially many
        splits of the text, however small the product of their quantifiers looks."""
        for op, av in items:
            if op in _REFUSED_TOKENS:
                raise BadRequest(
                    f"$regex: {_REFUSED_TOKENS[op]} are not supported.", slug="bad-regex"
                )
            if op in _REPEATS:
                low, high, sub = av
                if repeated and high != low:
                    raise BadRequest(
                        "$regex: no quantifier inside a repeated group.", slug="bad-regex"
                    )
                if high == _MAXREPEAT:
                    self.unbounded += 1
                else:
                    self.ways *= high - low + 1
                    if self.ways > 1000:
                        raise BadRequest("$regex: too many quantifiers.", slug="bad-regex")
                self.walk(sub, repeated=repeated or high > 1)
            elif op == sre_c.SUBPATTERN:
                self.walk(av[-1], repeated=repeated)
            elif op == sre_c.BRANCH:
                if repeated:
                    raise BadRequest(
                        "$regex: no alternation inside a repeated group.", slug="bad-regex"
                    )
                self.ways *= len(av[1])
                if self.ways > 1000:
                    raise BadRequest("$regex: too many alternatives.", slug="bad-regex")
                for branch in av[1]:
                    self.walk(branch, repeated=repeated)


# -- bookmarks ---------------------------------------------------------------------------


@define
class BookmarkCodec:
    """Opaque paging tokens: base64url JSON plus an HMAC bound to identity and query."""

    secret: bytes
    #: HMAC-SHA256 keyed with ``secret``, nothing fed yet: copied for each token (keying it
    #: again each time was most of the cost of a bookmark).
    _keyed: Any = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._keyed = hmac.new(self.secret, digestmod=hashlib.sha256)

    def _mac(self, idn: str, payload: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(idn.encode() + b"\n" + payload)
        return cast(bytes, mac.digest()[:18])

    def encode(self, idn: str, state: dict[str, Any]) -> str:
        payload = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(payload)}.{_b64(self._mac(idn, payload))}"

    def decode(self, idn: str, token: str) -> dict[str, Any]:
        bad = BadRequest(
            "'bookmark' is not one this server gave out for this query.", slug="bad-bookmark"
        )
        if not token or len(token) > MAX_BOOKMARK_CHARS or token.count(".") != 1:
            raise bad
        body, mac = token.split(".")
        try:
            payload = _unb64(body)
            given = _unb64(mac)
        except ValueError:
            raise bad from None
        if not hmac.compare_digest(given, self._mac(idn, payload)):
            raise bad
        state = json.loads(payload)
        if not isinstance(state, dict):
            raise bad
        return state


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse_json_param(raw: str, name: str) -> Any:
    try:
        return parse_json(raw.encode("utf-8"))
    except BadRequest as e:
        raise BadRequest(f"'{name}' is not valid JSON: {e.detail}", slug="bad-query") from None


def query_hash(selector: Any, sort: Sort | None) -> str:
    spec = [selector, list(sort.fields) if sort else None, bool(sort and sort.descending)]
    raw = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


# -- indexes -----------------------------------------------------------------------------


def parse_index_fields(body: dict[str, Any]) -> list[str]:
    unknown = set(body) - {"fields"}
    if unknown:
        raise BadRequest(f"Unknown index property: {sorted(unknown)[0]!r}.", slug="bad-index")
    fields = body.get("fields")
    if not isinstance(fields, list) or not 1 <= len(fields) <= MAX_INDEX_FIELDS:
        raise BadRequest(
            f"'fields' must be a list of 1 to {MAX_INDEX_FIELDS} field names.", slug="bad-index"
        )
    for name in fields:
        path = _check_field_name(name, top=True, what="the index")
        if path[0].startswith("_"):
            raise BadRequest("'_id' and '_rev' need no index.", slug="bad-index")
    if len(set(fields)) != len(fields):
        raise BadRequest("An index names each field once.", slug="bad-index")
    return cast(list[str], fields)


def index_name(fields: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
    return f"f{digest}"


# -- what a query sends -------------------------------------------------------------------


@frozen
class FindPlan:
    """The ``_find`` a query of a collection sends (besides ``limit`` and ``bookmark``)."""

    selector: dict[str, Any]
    sort: list[Any] | None
    use_index: list[str] | None

    def body(self, limit: int) -> dict[str, Any]:
        """The request body, as :meth:`CouchDatabase.find` sends it (benchmarks replay it)."""
        body: dict[str, Any] = {"selector": self.selector, "limit": limit}
        if self.sort is not None:
            body["sort"] = self.sort
        if self.use_index is not None:
            body["use_index"] = self.use_index
        return body


def plan_find(
    collection: str,
    selector: dict[str, Any] | None,
    sort: Sort | None,
    index: dict[str, Any] | None,
) -> FindPlan:
    """The ``_find`` for an already checked ``selector`` and ``sort`` of ``collection``;
    ``index`` is the declared index that serves ``sort`` (None for no sort or ``_id``)."""
    start, end = layout.collection_range(collection)
    clauses: list[dict[str, Any]] = [{layout.TAG: {"$eq": collection}}]
    if index is not None:
        # A JSON index holds only the docs that have every indexed field, so a sorted
        # query never returns the others; saying so in the selector makes that true
        # whichever index a server picks, and lets servers that match an index against
        # the selector's fields in order (PouchDB Server) pick this one.
        clauses += [{name: {"$exists": True}} for name in index["fields"]]
    if selector:
        clauses.append(selector)
    # Last, so the selector's own fields line up with the index's columns.
    clauses.append({"_id": {"$gt": start, "$lt": end}})
    use_index = None
    if index is not None:
        use_index = [layout.index_ddoc(collection, index["name"]), index["name"]]
    return FindPlan({"$and": clauses}, sort.mango(index is not None) if sort else None, use_index)


# -- the service -------------------------------------------------------------------------


@define
class Page:
    docs: list[dict[str, Any]]
    bookmark: str | None


@define
class DataService:
    """Documents of an identity's collections; every method takes already validated input."""

    couch: CouchServer
    bookmarks: BookmarkCodec
    #: Declared indexes per (database, collection), as last read. Indexes are only ever
    #: added, so an entry can only lack a newer one, and a miss reads them again.
    _indexes: dict[tuple[str, str], list[dict[str, Any]]] = field(factory=dict, init=False)
    #: The data database of the identities served lately (a CouchDatabase holds only the
    #: server and the name: made once, not per request).
    _dbs: dict[str, CouchDatabase] = field(factory=dict, init=False)

    def db(self, idn: str) -> CouchDatabase:
        db = self._dbs.get(idn)
        if db is None:
            if len(self._dbs) >= _DB_CACHE_SIZE:
                self._dbs.clear()
            db = self._dbs[idn] = self.couch.database(identity_db(idn, "data"))
        return db

    async def _ensure_db(self, idn: str) -> None:
        """Create the identity's data database if it is missing (identities made before the
        data API, or a database lost); never for an identity that no longer exists."""
        db = self.db(idn)
        if await db.exists():
            return
        try:
            identity = await self.couch.database(IDENTITIES_DB).get(idn)
        except CouchNotFound:
            identity = None
        if identity is None or identity.get("type") != "identity":
            raise NotFound("This identity no longer exists.", slug="no-identity")
        if await db.create():
            _log.info("Created the missing data database of {idn}", idn=idn)

    # A write puts the document; CouchNotFound then means the identity's database is
    # missing, and _write_again makes it and puts again. (The first put is awaited by the
    # caller itself: one coroutine less to resume on every write.)

    async def _write_again(self, idn: str, doc: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_db(idn)
        try:
            return await self.db(idn).put(doc)
        except CouchNotFound:
            raise ServiceUnavailable("The identity's database just went away; retry.") from None

    # -- documents -----------------------------------------------------------------------

    async def create(self, idn: str, collection: str, body: dict[str, Any]) -> dict[str, str]:
        doc_id = new_doc_id()
        stored = layout.to_storage(collection, doc_id, body)
        try:
            try:
                result = await (self._dbs.get(idn) or self.db(idn)).put(stored)
            except CouchNotFound:
                result = await self._write_again(idn, stored)
        except CouchConflict:  # pragma: no cover - 80 random bits collided within a millisecond
            raise Conflict("Try again.") from None
        return {"id": doc_id, "rev": result["rev"]}

    async def get(self, idn: str, collection: str, doc_id: str) -> dict[str, Any]:
        try:
            db = self._dbs.get(idn) or self.db(idn)  # (db's cache, read inline)
            stored = await db.get(layout.storage_id(collection, doc_id))
        except CouchNotFound:
            raise NotFound(f"No document {doc_id!r} in collection {collection!r}.") from None
        return layout.from_storage_in_place(stored, collection + ":")  # a fresh parse: ours

    async def put(
        self, idn: str, collection: str, doc_id: str, body: dict[str, Any], rev: str | None
    ) -> dict[str, str]:
        stored = layout.to_storage(collection, doc_id, body)
        stored.pop("_rev", None)
        if rev is not None:
            stored["_rev"] = rev
        try:
            try:
                result = await (self._dbs.get(idn) or self.db(idn)).put(stored)
            except CouchNotFound:
                result = await self._write_again(idn, stored)
        except CouchConflict:
            if rev is None:
                raise Conflict(
                    f"Document {doc_id!r} exists: send its current _rev (in the body or "
                    "If-Match) to update it.",
                    slug="conflict",
                ) from None
            raise Conflict(
                f"Revision {rev} is not the current revision of {doc_id!r} (it changed, or "
                "does not exist): fetch it again.",
                slug="conflict",
            ) from None
        return {"id": doc_id, "rev": result["rev"]}

    async def delete(self, idn: str, collection: str, doc_id: str, rev: str) -> dict[str, str]:
        db = self.db(idn)
        storage = layout.storage_id(collection, doc_id)
        missing = NotFound(f"No document {doc_id!r} in collection {collection!r}.")
        stale = Conflict(
            f"Revision {rev} is not the current revision of {doc_id!r}: fetch it again.",
            slug="conflict",
        )
        # Servers accept deleting a deleted document again (a new tombstone): look first,
        # without fetching the body, so a deleted or missing document is 404.
        try:
            rows = (await db.all_docs(keys=[storage])).get("rows", [])
        except CouchNotFound:
            raise missing from None
        value = rows[0].get("value") if rows and isinstance(rows[0], dict) else None
        if not isinstance(value, dict) or value.get("deleted"):
            raise missing
        if value.get("rev") != rev:
            raise stale
        try:
            result = await db.delete(storage, rev)
        except (CouchConflict, CouchNotFound):
            # Changed since we looked (CouchDB answers 409, PouchDB Server 404).
            raise stale from None
        return {"id": doc_id, "rev": result["rev"]}

    # -- listing and queries -------------------------------------------------------------

    async def list_page(
        self,
        idn: str,
        collection: str,
        *,
        limit: int,
        bookmark: str | None,
        fields: list[list[str]] | None,
    ) -> Page:
        """One page of the collection in id order: ``_all_docs`` over its key range."""
        start, end = layout.collection_range(collection)
        if bookmark is not None:
            state = self.bookmarks.decode(idn, bookmark)
            next_id = state.get("next")
            if state.get("c") != collection or state.get("m") != "list":
                raise BadRequest("'bookmark' belongs to another listing.", slug="bad-bookmark")
            start = layout.storage_id(collection, check_doc_id(next_id))
        try:
            result = await self.db(idn).all_docs(
                startkey=start, endkey=end, include_docs=True, limit=limit + 1
            )
        except CouchNotFound:
            return Page([], None)
        rows = [r for r in result.get("rows", []) if isinstance(r.get("doc"), dict)]
        next_bookmark = None
        if len(rows) > limit:
            split = layout.split_storage_id(str(rows[limit].get("id", "")))
            rows = rows[:limit]
            if split is not None:
                next_bookmark = self.bookmarks.encode(
                    idn, {"m": "list", "c": collection, "next": split[1]}
                )
        docs = _present(collection, [row["doc"] for row in rows], fields)
        return Page(docs, next_bookmark)

    async def query(
        self,
        idn: str,
        collection: str,
        *,
        selector: dict[str, Any] | None,
        sort: Sort | None,
        limit: int,
        bookmark: str | None,
        fields: list[list[str]] | None,
    ) -> Page:
        """One page of a Mango query confined to the collection."""
        qhash = query_hash(selector, sort)
        couch_bookmark: str | None = None
        if bookmark is not None:
            state = self.bookmarks.decode(idn, bookmark)
            if state.get("c") != collection or state.get("m") != "find" or state.get("q") != qhash:
                raise BadRequest("'bookmark' belongs to another query.", slug="bad-bookmark")
            couch_bookmark = state.get("b")
            if not isinstance(couch_bookmark, str):
                raise BadRequest("'bookmark' is not valid.", slug="bad-bookmark")
        index: dict[str, Any] | None = None
        if sort is not None and not sort.by_id:
            index = await self._index_for(idn, collection, sort)
        plan = plan_find(collection, selector, sort, index)
        try:
            result = await self.db(idn).find(
                plan.selector,
                sort=plan.sort,
                limit=limit,
                bookmark=couch_bookmark,
                use_index=plan.use_index,
            )
        except CouchNotFound:
            return Page([], None)
        except CouchBadRequest as e:
            if sort is not None and (e.error == "no_usable_index" or "sort" in e.reason.lower()):
                self._indexes.pop((identity_db(idn, "data"), collection), None)
                raise missing_index(collection, sort) from None
            _log.info("_find refused: {error} {reason}", error=e.error, reason=e.reason)
            raise BadRequest(
                "The database refused the query; simplify the selector (see docs/data.md).",
                slug="bad-query",
            ) from None
        next_bookmark = None
        if result.bookmark is not None:
            next_bookmark = self.bookmarks.encode(
                idn, {"m": "find", "c": collection, "q": qhash, "b": result.bookmark}
            )
        docs = _present(collection, [doc for doc in result.docs if isinstance(doc, dict)], fields)
        return Page(docs, next_bookmark)

    # -- indexes -------------------------------------------------------------------------

    async def list_indexes(self, idn: str, collection: str) -> list[dict[str, Any]]:
        # The client has no call listing indexes; the name is ours (identity_db), quoted.
        path = quote(identity_db(idn, "data"), safe="") + "/_index"
        try:
            result = await self.couch.request("GET", path)
        except CouchNotFound:
            return []
        prefix = f"_design/{layout.index_ddoc(collection, '')}"
        found: list[dict[str, Any]] = []
        for index in result.get("indexes", []):
            ddoc = index.get("ddoc")
            if not isinstance(ddoc, str) or not ddoc.startswith(prefix):
                continue
            columns = [
                next(iter(f)) if isinstance(f, dict) else f
                for f in index.get("def", {}).get("fields", [])
            ]
            if columns[:1] != [layout.TAG]:
                continue
            found.append({"name": ddoc[len(prefix) :], "fields": columns[1:]})
        found.sort(key=lambda i: (i["fields"], i["name"]))
        if len(self._indexes) > 4096:
            self._indexes.clear()
        self._indexes[(identity_db(idn, "data"), collection)] = found
        return found

    async def _index_for(self, idn: str, collection: str, sort: Sort) -> dict[str, Any]:
        """The declared index of ``collection`` that can sort by ``sort`` (its fields start
        with the sort's, the shortest such), or the 400 naming the one to declare."""
        key = (identity_db(idn, "data"), collection)

        def pick(indexes: list[dict[str, Any]]) -> dict[str, Any] | None:
            usable = [i for i in indexes if tuple(i["fields"][: len(sort.fields)]) == sort.fields]
            return min(usable, key=lambda i: len(i["fields"]), default=None)

        found = pick(self._indexes.get(key, []))
        if found is None:
            found = pick(await self.list_indexes(idn, collection))
        if found is None:
            raise missing_index(collection, sort)
        return found

    async def create_index(self, idn: str, collection: str, fields: list[str]) -> dict[str, Any]:
        name = index_name(fields)
        existing = await self.list_indexes(idn, collection)
        if any(i["name"] == name for i in existing):
            return {"name": name, "fields": fields, "result": "exists"}
        if len(existing) >= MAX_INDEXES_PER_COLLECTION:
            raise Problem(
                f"A collection may have at most {MAX_INDEXES_PER_COLLECTION} indexes.",
                status=409,
                slug="too-many-indexes",
                title="Too many indexes",
            )
        db = self.db(idn)
        await self._ensure_db(idn)
        result = await db.create_index(
            [layout.TAG, *fields], name=name, ddoc=layout.index_ddoc(collection, name)
        )
        # Known here from now on: a sorted query right after the declaration does not depend
        # on CouchDB's _index listing showing it yet (under load it once did not).
        key = (identity_db(idn, "data"), collection)
        known = [i for i in self._indexes.get(key, existing) if i["name"] != name]
        known.append({"name": name, "fields": fields})
        self._indexes[key] = sorted(known, key=lambda i: (i["fields"], i["name"]))
        outcome = "exists" if result.get("result") == "exists" else "created"
        return {"name": name, "fields": fields, "result": outcome}


def missing_index(collection: str, sort: Sort) -> BadRequest:
    fields = json.dumps(list(sort.fields))
    return BadRequest(
        f"No index of collection {collection!r} can sort by {fields}: declare one with "
        f'POST /data/{collection}/_index {{"fields": {fields}}}.',
        slug="no-usable-index",
        extra={"missingIndex": {"collection": collection, "fields": list(sort.fields)}},
    )


def _present(
    collection: str, stored: list[dict[str, Any]], fields: list[list[str]] | None
) -> list[dict[str, Any]]:
    """The app's view of documents just read from ``collection`` (made in place: the parsed
    answer is ours alone), projected to ``fields`` when given."""
    prefix = f"{collection}:"
    docs = [layout.from_storage_in_place(doc, prefix) for doc in stored]
    return docs if fields is None else [project(doc, fields) for doc in docs]
