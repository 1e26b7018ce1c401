"""Check what the device reads against its declared format before any work: the JSON Schema that
``runtime/formats.py`` derives from the typed declarations, then the rules between values (``formats.RULES``).

No third-party package: this reads the subset of JSON Schema the declarations produce ($ref, type,
properties, required, additionalProperties, patternProperties, propertyNames, items, prefixItems,
min/maxItems, enum, const, minimum, maximum, exclusiveMinimum, exclusiveMaximum, pattern, anyOf,
allOf, not, contentSchema). The C++ runner checks the same schemas (device_train/native/schema.cpp,
from the generated schemas.h) and rules, so both refuse the same documents.

``problem(kind, doc)`` is the first problem as one sentence naming the key and what it may be (None when
the document is fine); ``check`` raises it as the caller's typed error. ``load_json`` reads a document
as the runner does: no duplicate keys, no NaN/Infinity, nesting bounded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

from blockskip.runtime import formats
from blockskip.runtime.errors import BlockSkipError

__all__ = ["DocumentError", "check", "load_json", "parse_json", "problem"]

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_A = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "boolean": "true or false",
    "null": "null",
    "integer": "an integer",
    "number": "a number",
}


Schema = dict[str, Any]  # a JSON Schema node (``true`` and ``false`` are nodes too)
Parts = tuple[str | int, ...]  # the keys and indices leading to a value
JsonPath = Sequence[str | int]  # a rule's path: keys, indices and "*"


class DocumentError(Exception):
    """A document does not have its declared form (the message names the key)."""


@cache
def _schema(kind: str) -> Schema:
    return formats.schema(kind)


def _path(parts: Parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the document"


def _got(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _matches(pattern: str, text: str) -> bool:
    """JSON Schema's (ECMAScript's) search: ``$`` matches only at the very end (Python's also before a
    final newline)."""
    m = re.search(pattern, text)
    return m is not None and (not pattern.endswith("$") or m.end() == len(text))


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def _fmt(v: Any) -> str:
    return json.dumps(v)


def _describe(s: Schema, defs: dict[str, Schema]) -> str:
    """What a value of schema ``s`` may be, in words."""
    if "$ref" in s and len(s) == 1:
        return _describe(defs[s["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in s:
        return _fmt(s["const"])
    if "enum" in s:
        return "one of " + ", ".join(_fmt(v) for v in s["enum"])
    if "anyOf" in s:
        return " or ".join(_describe(p, defs) for p in s["anyOf"])
    t = s.get("type")
    if "$ref" in s:
        t = t or defs[s["$ref"].rsplit("/", 1)[1]].get("type")
    types = t if isinstance(t, list) else [t] if t else []
    words = " or ".join(_A[x] for x in types) or "a value"
    bounds = []
    for key, op in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in s:
            bounds.append(f"{op} {_fmt(s[key])}")
    if "minItems" in s or "maxItems" in s:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        bounds.append(
            f"of {lo} items"
            if lo == hi
            else f"of at least {lo}" + (f" and at most {hi}" if hi else "") + " items"
        )
    if "pattern" in s:
        bounds.append(f"matching {s['pattern']}")
    if "items" in s and types == ["array"]:
        words = f"an array of {_plural(_describe(s['items'], defs))}"
    return words + (" " + " and ".join(bounds) if bounds else "")


def _plural(words: str) -> str:
    for one, many in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
        ("an object", "objects"),
        ("an array", "arrays"),
    ):
        if words.startswith(one):
            return many + words[len(one) :]
    return words


class _Checker:
    def __init__(self, schema: Schema):
        self.defs: dict[str, Schema] = schema.get("$defs", {})

    def fail(self, parts: Parts, s: Schema, value: Any) -> str:
        return f"{_path(parts)} must be {_describe(s, self.defs)} (got {_got(value)})"

    def check(self, s: Schema | bool, value: Any, parts: Parts) -> str | None:  # noqa: C901 (one branch per keyword)
        if s is True or s == {}:
            return None
        if s is False:
            return f"{_path(parts)} is not allowed"
        if "$ref" in s:
            err = self.check(self.defs[s["$ref"].rsplit("/", 1)[1]], value, parts)
            if err:
                return err
        if isinstance(value, float) and not math.isfinite(value):
            return f"{_path(parts)} must be a finite number (got {value})"
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not any(_is_type(value, t) for t in types):
                return self.fail(parts, s, value)
        if "const" in s and not _same(value, s["const"]):
            return self.fail(parts, s, value)
        if "enum" in s and not any(_same(value, v) for v in s["enum"]):
            return self.fail(parts, s, value)
        if _is_type(value, "number"):
            if (
                ("minimum" in s and value < s["minimum"])
                or ("maximum" in s and value > s["maximum"])
                or ("exclusiveMinimum" in s and value <= s["exclusiveMinimum"])
                or ("exclusiveMaximum" in s and value >= s["exclusiveMaximum"])
            ):
                return self.fail(parts, s, value)
        if isinstance(value, str):
            if "pattern" in s and not _matches(s["pattern"], value):
                return self.fail(parts, s, value)
            if "contentSchema" in s:
                try:
                    inner = parse_json(value)
                except DocumentError as e:
                    return f"{_path(parts)} is not a JSON document ({e})"
                err = self.check(s["contentSchema"], inner, parts)
                if err:
                    return err
        if isinstance(value, list):
            if len(value) < s.get("minItems", 0) or ("maxItems" in s and len(value) > s["maxItems"]):
                return self.fail(parts, s, value)
            prefix = s.get("prefixItems", [])
            for i, (sub, v) in enumerate(zip(prefix, value)):
                if err := self.check(sub, v, (*parts, i)):
                    return err
            if "items" in s:
                for i in range(len(prefix), len(value)):
                    if err := self.check(s["items"], value[i], (*parts, i)):
                        return err
        if isinstance(value, dict):
            if err := self._object(s, value, parts):
                return err
        for sub in s.get("allOf", ()):
            if err := self.check(sub, value, parts):
                return err
        if "anyOf" in s:
            errs = [self.check(sub, value, parts) for sub in s["anyOf"]]
            if all(errs):
                # a value of the right type that breaks its own alternative: say that one's problem
                typed = [e for sub, e in zip(s["anyOf"], errs) if self._type_fits(sub, value)]
                return typed[0] if len(typed) == 1 else self.fail(parts, s, value)
        if "not" in s and self.check(s["not"], value, parts) is None:
            return f"{_path(parts)} is not allowed here (got {_got(value)})"
        return None

    def _type_fits(self, s: Schema, value: Any) -> bool:
        if "$ref" in s:
            s = {**self.defs[s["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in s.items() if k != "$ref"}}
        t = s.get("type")
        return t is None or any(_is_type(value, x) for x in (t if isinstance(t, list) else [t]))

    def _object(self, s: Schema, value: dict[str, Any], parts: Parts) -> str | None:
        for key in s.get("required", ()):
            if key not in value:
                return f"{_path((*parts, key))} is missing"
        props, pats = s.get("properties", {}), s.get("patternProperties", {})
        names = s.get("propertyNames")
        extra = s.get("additionalProperties", True)
        for key, v in value.items():
            if names is not None and (err := self.check(names, key, (*parts, key))):
                return f"{_path((*parts, key))}: the key {_got(key)} is not a valid name ({err})"
            matched = False
            if key in props:
                matched = True
                if err := self.check(props[key], v, (*parts, key)):
                    return err
            for pat, sub in pats.items():
                if _matches(pat, key):
                    matched = True
                    if err := self.check(sub, v, (*parts, key)):
                        return err
            if not matched:
                if extra is False:
                    return f"{_path((*parts, key))} is not a key {_path(parts)} may have"
                if isinstance(extra, dict) and (err := self.check(extra, v, (*parts, key))):
                    return err
        return None


def _same(a: Any, b: Any) -> bool:
    """JSON equality (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) in (int, float, str, type(None)) and type(b) in (int, float, str, type(None))


# --- rules between values ------------------------------------------------------------------------

_MISSING = object()


def _select(doc: Any, path: JsonPath) -> list[tuple[Parts, Any]]:
    """(concrete path, value) for every match of ``path`` ("*": every element or value)."""
    out: list[tuple[Parts, Any]] = [((), doc)]
    for seg in path:
        nxt: list[tuple[Parts, Any]] = []
        for parts, v in out:
            if seg == "*":
                if isinstance(v, list):
                    nxt += [((*parts, i), x) for i, x in enumerate(v)]
                elif isinstance(v, dict):
                    nxt += [((*parts, k), x) for k, x in v.items()]
            elif isinstance(seg, int):
                if isinstance(v, list) and 0 <= seg < len(v):
                    nxt.append(((*parts, seg), v[seg]))
            elif isinstance(v, dict) and seg in v:
                nxt.append(((*parts, seg), v[seg]))
        out = nxt
    return out


def _number(v: Any) -> bool:
    return _is_type(v, "number")


def _rule(check: str, a: JsonPath, b: JsonPath, doc: Any) -> str | None:  # noqa: C901
    target = _select(doc, b)
    if not target:
        return None
    ((bp, bv),) = target
    bn = _path(bp)
    for ap, av in _select(doc, a):
        an = _path(ap)
        if check in ("lt", "le") and _number(av) and _number(bv):
            if not (av < bv if check == "lt" else av <= bv):
                return f"{an} ({_got(av)}) must be {'<' if check == 'lt' else '<='} {bn} ({_got(bv)})"
        elif check == "eq" and not _same(av, bv):
            return f"{an} ({_got(av)}) must equal {bn} ({_got(bv)})"
        elif check == "multiple_of" and _is_type(av, "integer") and _is_type(bv, "integer") and bv > 0:
            if av % bv:
                return f"{an} ({av}) must be a multiple of {bn} ({bv})"
        elif check == "index_into" and isinstance(bv, list):
            if not (_is_type(av, "integer") and 0 <= av < len(bv)):
                return f"{an} ({_got(av)}) must index {bn}: an integer from 0 to {len(bv) - 1}"
        elif check == "key_in" and isinstance(bv, dict):
            if av is not None and (not isinstance(av, str) or av not in bv):
                return f"{an} ({_got(av)}) is not a key of {bn}"
        elif check == "same_length" and isinstance(av, list) and isinstance(bv, list):
            if len(av) != len(bv):
                return f"{an} has {len(av)} items but {bn} has {len(bv)}: they must have as many"
        elif check == "keys_index" and isinstance(av, dict) and isinstance(bv, list):
            for key in av:
                if not (key.isdigit() and int(key) < len(bv)):
                    return f"{an} has the key {_got(key)}, which does not index {bn} (0 to {len(bv) - 1})"
    return None


def _depth(doc: Any) -> int:
    deepest, todo = 0, [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= formats.MAX_JSON_DEPTH:
                todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def problem(kind: str, doc: Any) -> str | None:
    """The first way ``doc`` breaks ``kind``'s schema or rules, as a sentence naming the key; None if none."""
    if _depth(doc) > formats.MAX_JSON_DEPTH:
        return f"nested deeper than {formats.MAX_JSON_DEPTH} levels"
    s = _schema(kind)
    if err := _Checker(s).check(s, doc, ()):
        return err
    for check_, a, b in formats.RULES.get(kind, ()):
        if err := _rule(check_, a, b, doc):
            return err
    return None


def check(kind: str, doc: Any, what: str, error: type[BlockSkipError], advice: str) -> None:
    """Raise ``error("<what>: <problem>; <advice>")`` if ``doc`` breaks ``kind``'s declared form."""
    err = problem(kind, doc)
    if err:
        raise error(f"{what}: {err}; {advice}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DocumentError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise DocumentError(f"{name} is not a JSON number")


def parse_json(text: str | bytes) -> Any:
    """A JSON document as the runner reads it; DocumentError when it is not one."""
    if isinstance(text, bytes) and text.startswith(b"\xef\xbb\xbf"):
        raise DocumentError("it starts with a byte-order mark (JSON is UTF-8 without one)")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise DocumentError(f"nested deeper than {formats.MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DocumentError(str(e)) from e


def load_json(path: str | Path, error: type[BlockSkipError], advice: str) -> Any:
    """Read the JSON document at ``path``; ``error`` names the file when it is not JSON or unreadable."""
    try:
        return parse_json(Path(path).read_bytes())
    except DocumentError as e:
        raise error(f"{path} is not valid JSON ({e}): it is corrupt; {advice}") from e
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}); {advice}") from e
