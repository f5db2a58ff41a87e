"""Search filters: a small expression language over the items' metadata, parsed here and compiled to one
SQL condition over the ``items`` table (every value a bound parameter, never text of the statement).

Grammar (keywords case-insensitive)::

    expr      := or
    or        := and ("or" and)*
    and       := unary ("and" unary)*
    unary     := "not" unary | "(" expr ")" | predicate
    predicate := field ("=" | "!=" | "<" | "<=" | ">" | ">=") literal
               | field ["not"] "in" "(" literal ("," literal)* ")"
               | field ["not"] "contains" string
               | field "is" ["not"] "null"
               | map "within" "(" number number ("," number number)* ")"
    map       := "map" | "map.pca" | "map.umap" | "map.tsne"
    literal   := string | number | "true" | "false"
    field     := name ("." name)* | `any text`

Strings are quoted with ``'`` or ``"`` (a quote inside is doubled: ``'it''s'``); numbers are integers or
decimals (``-3``, ``2.5``, ``1e6``). A bare field name is a built-in column (``id``, ``key``, ``uri``, ``kind``,
``caption``, ``size``, ``mtime``, ``width``, ``height``, ``added_at``) or else a metadata field (the item's
``extra``: manifest / parquet / webdataset columns); ``a.b`` reads field ``b`` of metadata object ``a``; a
field in backticks is always a metadata field (`` `kind` ``, `` `my column` ``).

Semantics (the same in SQL and in ``evaluate``, the Python reference): a comparison with a missing or
null field is *unknown* (neither it nor its ``not`` matches; ``is null`` tests for it); a comparison of
values of different types (a number field with a string literal, a boolean with a number) is false;
numbers compare as numbers, strings by code point, booleans only with ``=`` / ``!=``; ``contains`` is a
case-insensitive substring test on string fields; ``in (a, b)`` is ``= a or = b``.

``map within (x1 y1, x2 y2, x3 y3, ...)``: the items whose point on the index's embeddings map
(``index.embmap``: PCA, or the method after ``map.``; coordinates in [-1, 1]) lies inside the polygon of 3
to ``MAX_VERTICES`` vertices, or on its boundary (even-odd rule: a self-crossing lasso keeps what it
encloses an odd number of times). A map is per index version, so the index resolves these predicates to
ids (``bind_maps``) before the SQL runs; an item the map does not hold (a sampled map) is not inside.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmretrieve.errors import FilterError

#: built-in fields -> their SQL expression over the items table
BUILTINS = {
    "id": '"id"', "key": '"key"', "uri": 'COALESCE("uri", "key")', "kind": '"kind"', "caption": '"caption"',
    "size": '"size"', "mtime": '"mtime"', "width": '"width"', "height": '"height"', "added_at": '"added_at"',
}
KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false", "contains"}
OPS = ("<=", ">=", "!=", "=", "<", ">")
MAX_LENGTH = 4096
#: the most vertices of a ``map within`` polygon (the page simplifies a lasso to fit)
MAX_VERTICES = 64
MAP_METHODS = ("pca", "umap", "tsne")

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|!=|=|<|>)
  | (?P<punct>[(),])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str  # num, name, kw, op, punct, str, field (backticks), end
    text: str
    value: Any
    pos: int  # 0-based character offset


def _quoted(text: str, i: int, quote: str) -> tuple[str, int]:
    """The quoted string starting at ``text[i]`` (a doubled quote is one quote) and the offset after it."""
    out, j = [], i + 1
    while True:
        k = text.find(quote, j)
        if k < 0:
            what = "field name" if quote == "`" else "string"
            raise FilterError(f"filter: unterminated {what} starting at position {i + 1}: {text[i:i + 20]!r}")
        out.append(text[j:k])
        if text.startswith(quote * 2, k):
            out.append(quote)
            j = k + 2
            continue
        return "".join(out), k + 1


def tokenize(text: str) -> list[Token]:
    if not isinstance(text, str):
        raise FilterError(f"filter: expected a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter: {len(text)} characters, more than the limit of {MAX_LENGTH}")
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c in "'\"`":
            s, j = _quoted(text, i, c)
            if c == "`" and (not s or '"' in s):
                raise FilterError(f"filter: field name at position {i + 1} is empty or holds a double quote")
            out.append(Token("field" if c == "`" else "str", text[i:j], s, i))
            i = j
            continue
        m = _TOKEN.match(text, i)
        if m is None:
            raise FilterError(f"filter: unexpected character {c!r} at position {i + 1}")
        kind, s = m.lastgroup, m.group()
        if kind == "num":
            v = float(s) if any(ch in s for ch in ".eE") else int(s)
            if isinstance(v, float) and not math.isfinite(v):
                raise FilterError(f"filter: number {s!r} at position {i + 1} is out of range")
            out.append(Token("num", s, v, i))
        elif kind == "name":
            low = s.lower()
            out.append(Token("kw", s, low, i) if low in KEYWORDS else Token("name", s, s, i))
        elif kind != "ws":
            out.append(Token(kind, s, s, i))
        i = m.end()
    out.append(Token("end", "", None, len(text)))
    return out


# ---- the syntax tree -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    path: tuple[str, ...]
    builtin: bool
    pos: int

    def __str__(self) -> str:
        if self.builtin:
            return self.path[0]
        if len(self.path) > 1:
            return ".".join(self.path)
        name = self.path[0]
        plain = re.fullmatch(r"[A-Za-z_]\w*", name) and name.lower() not in KEYWORDS and name not in BUILTINS
        return name if plain else "`" + name.replace("`", "``") + "`"


def _lit(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return repr(v)


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str
    value: Any

    def __str__(self) -> str:
        return f"({self.op} {self.field} {_lit(self.value)})"


@dataclass(frozen=True)
class Contains:
    field: Field
    text: str

    def __str__(self) -> str:
        return f"(contains {self.field} {_lit(self.text)})"


@dataclass(frozen=True)
class IsNull:
    field: Field

    def __str__(self) -> str:
        return f"(null {self.field})"


@dataclass(frozen=True)
class MapWithin:
    method: str
    polygon: tuple  # ((x, y), ...)

    def __str__(self) -> str:
        return f"(map {self.method} ({' '.join(f'({_lit(x)} {_lit(y)})' for x, y in self.polygon)}))"


@dataclass(frozen=True)
class IdSet:
    """A resolved ``MapWithin``: the sorted ids inside its polygon (``bind_maps``)."""
    ids: tuple

    def __str__(self) -> str:
        return f"(ids {len(self.ids)})"


@dataclass(frozen=True)
class Not:
    arg: Any

    def __str__(self) -> str:
        return f"(not {self.arg})"


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or
    args: tuple

    def __str__(self) -> str:
        return f"({self.op} {' '.join(map(str, self.args))})"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i = text, tokenize(text), 0

    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def fail(self, what: str, tok: Token | None = None) -> FilterError:
        tok = tok or self.tok
        found = "the end of the filter" if tok.kind == "end" else repr(tok.text)
        return FilterError(f"filter: expected {what} at position {tok.pos + 1}, found {found} (in {self.text!r})")

    def take(self, kind: str, value: Any = None) -> Token | None:
        t = self.tok
        if t.kind == kind and (value is None or t.value == value):
            self.i += 1
            return t
        return None

    def parse(self):
        if self.tok.kind == "end":
            raise FilterError("filter: empty (write a condition such as \"license = 'cc0'\")")
        e = self.expr()
        if self.tok.kind != "end":
            raise self.fail("'and', 'or' or the end")
        return e

    def expr(self):
        args = [self.conj()]
        while self.take("kw", "or"):
            args.append(self.conj())
        return args[0] if len(args) == 1 else BoolOp("or", tuple(args))

    def conj(self):
        args = [self.unary()]
        while self.take("kw", "and"):
            args.append(self.unary())
        return args[0] if len(args) == 1 else BoolOp("and", tuple(args))

    def unary(self):
        if self.take("kw", "not"):
            return Not(self.unary())
        if self.take("punct", "("):
            e = self.expr()
            if not self.take("punct", ")"):
                raise self.fail("')'")
            return e
        return self.predicate()

    def field(self) -> Field:
        t = self.tok
        if t.kind == "name":
            self.i += 1
            return Field((t.value,), True, t.pos) if t.value in BUILTINS else Field(tuple(t.value.split(".")), False, t.pos)
        if t.kind == "field":
            self.i += 1
            return Field((t.value,), False, t.pos)
        raise self.fail("a field name" + (" (a keyword: quote a field of that name in backticks)" if t.kind == "kw" else ""))

    def map_within(self) -> MapWithin | None:
        """``map within (x y, ...)`` at this token, else None (``map`` is otherwise a metadata field)."""
        t, nxt = self.tok, self.toks[min(self.i + 1, len(self.toks) - 1)]
        methods = {"map": "pca", **{f"map.{m}": m for m in MAP_METHODS}}
        if t.kind != "name" or t.value.lower() not in methods or nxt.kind != "name" or nxt.value.lower() != "within":
            return None
        self.i += 2
        if not self.take("punct", "("):
            raise self.fail("'(' after map within")
        points = [self.vertex()]
        while self.take("punct", ","):
            points.append(self.vertex())
            if len(points) > MAX_VERTICES:
                raise FilterError(f"filter: map within at position {t.pos + 1} has more than {MAX_VERTICES} vertices "
                                  "(simplify the polygon)")
        if not self.take("punct", ")"):
            raise self.fail("',' or ')' in the polygon (vertices are 'x y' pairs: 'map within (0 0, 1 0, 0 1)')")
        if len(points) < 3:
            raise FilterError(f"filter: map within at position {t.pos + 1} needs at least 3 vertices, got {len(points)}")
        return MapWithin(methods[t.value.lower()], tuple(points))

    def vertex(self) -> tuple[float, float]:
        xy = []
        for axis in "xy":
            t = self.tok
            if t.kind != "num":
                raise self.fail(f"a number (the {axis} of a vertex of the map polygon)")
            self.i += 1
            xy.append(float(t.value))
        return xy[0], xy[1]

    def predicate(self):
        m = self.map_within()
        if m is not None:
            return m
        f = self.field()
        t = self.tok
        if t.kind == "op":
            self.i += 1
            v = self.literal()
            if isinstance(v, bool) and t.value not in ("=", "!="):
                raise FilterError(f"filter: {f} {t.value} {_lit(v)} at position {t.pos + 1}: booleans compare with = and != only")
            return Compare(f, t.value, v)
        if self.take("kw", "is"):
            neg = self.take("kw", "not") is not None
            if not self.take("kw", "null"):
                raise self.fail("'null' after 'is'")
            return Not(IsNull(f)) if neg else IsNull(f)
        neg = self.take("kw", "not") is not None
        if self.take("kw", "in"):
            e = self.in_list(f)
        elif self.take("kw", "contains"):
            s = self.tok
            if s.kind != "str":
                raise self.fail(f"a quoted string after {f} contains")
            self.i += 1
            e = Contains(f, s.value)
        else:
            raise self.fail(f"an operator after field {f} (= != < <= > >= in, not in, contains, is null)")
        return Not(e) if neg else e

    def in_list(self, f: Field):
        if not self.take("punct", "("):
            raise self.fail(f"'(' after {f} in")
        values = [self.literal()]
        while self.take("punct", ","):
            values.append(self.literal())
        if not self.take("punct", ")"):
            raise self.fail("',' or ')' in the list")
        eqs = tuple(Compare(f, "=", v) for v in values)
        return eqs[0] if len(eqs) == 1 else BoolOp("or", eqs)

    def literal(self):
        t = self.tok
        if t.kind in ("str", "num"):
            self.i += 1
            return t.value
        if t.kind == "kw" and t.value in ("true", "false"):
            self.i += 1
            return t.value == "true"
        if t.kind == "kw" and t.value == "null":
            raise FilterError(f"filter: null at position {t.pos + 1} compares with nothing: write 'FIELD is null' "
                              "or 'FIELD is not null'")
        raise self.fail("a value (a quoted string, a number, true or false)")


def parse(text: str):
    """The syntax tree of a filter; ``str(tree)`` is its canonical form (an s-expression)."""
    return _Parser(text).parse()


def parse_order(text: str) -> tuple[Field, bool]:
    """A browse order (``Index.browse``): ``id``, ``added`` (the built-in ``added_at``) or a field as a filter
    names it (a bare name, ``a.b``, `` `any text` ``), then optionally ``asc`` or ``desc``: (field, descending)."""
    p = _Parser(str(text))
    if p.tok.kind == "name" and p.tok.value == "added":
        p.i += 1
        f = Field(("added_at",), True, 0)
    else:
        f = p.field()
    desc = False
    if p.tok.kind == "name" and p.tok.value.lower() in ("asc", "desc"):
        desc = p.take("name").value.lower() == "desc"
    if p.tok.kind != "end":
        raise p.fail("'asc', 'desc' or the end of the order")
    return f, desc


def order_sql(f: Field) -> tuple[str, list]:
    """(SQL, parameters) of a field's value as a browse orders by it: its number, else NULL (a missing
    field, a string, a boolean: such items come last in either direction)."""
    val, typ, fp = _operand(f)
    return f"(CASE WHEN {typ} IN ('integer','real') THEN {val} END)", [*fp, *fp]


# ---- SQL ---------------------------------------------------------------------------------------------
_SQL_TYPES = {"number": "('integer','real')", "string": "('text')", "bool": "('true','false')"}


def _kind(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "string" if isinstance(v, str) else "number"


def _operand(f: Field) -> tuple[str, str, list]:
    """(value SQL, type SQL, their parameters in order) of a field."""
    if f.builtin:
        col = BUILTINS[f.path[0]]
        return col, f"typeof({col})", []
    path = "$." + ".".join(f'"{p}"' for p in f.path)
    return "json_extract(extra, ?)", "json_type(extra, ?)", [path]


def to_sql(e) -> tuple[str, list]:
    """(condition, parameters) of a syntax tree: values and metadata paths are bound parameters."""
    if isinstance(e, BoolOp):
        parts = [to_sql(a) for a in e.args]
        return "(" + f" {e.op.upper()} ".join(p[0] for p in parts) + ")", [x for p in parts for x in p[1]]
    if isinstance(e, Not):
        s, p = to_sql(e.arg)
        return f"(NOT {s})", p
    if isinstance(e, IdSet):  # one parameter, a JSON array: no limit on the ids, no text of the statement
        return '("id" IN (SELECT value FROM json_each(?)))', ["[" + ",".join(map(str, e.ids)) + "]"]
    if isinstance(e, MapWithin):
        raise FilterError(f"filter: {e} needs the index's map: resolve it with bind_maps (Index.select does)")
    val, typ, fp = _operand(e.field)
    if isinstance(e, IsNull):
        return f"({val} IS NULL)", fp
    if isinstance(e, Contains):
        return (f"(CASE WHEN {val} IS NULL THEN NULL WHEN {typ} = 'text' THEN mm_contains({val}, ?) ELSE 0 END)",
                [*fp, *fp, *fp, e.text])
    v = int(e.value) if isinstance(e.value, bool) else e.value
    return (f"(CASE WHEN {val} IS NULL THEN NULL WHEN {typ} IN {_SQL_TYPES[_kind(e.value)]} THEN {val} {e.op} ? ELSE 0 END)",
            [*fp, *fp, *fp, v])


def bind_maps(e, inside):
    """The tree with every ``MapWithin`` replaced by the ``IdSet`` of ``inside(node)`` (its ids)."""
    if isinstance(e, BoolOp):
        return BoolOp(e.op, tuple(bind_maps(a, inside) for a in e.args))
    if isinstance(e, Not):
        return Not(bind_maps(e.arg, inside))
    if isinstance(e, MapWithin):
        return IdSet(tuple(int(i) for i in inside(e)))
    return e


def has_map(e) -> bool:
    """Whether a tree holds a ``map within`` predicate."""
    if isinstance(e, BoolOp):
        return any(has_map(a) for a in e.args)
    if isinstance(e, Not):
        return has_map(e.arg)
    return isinstance(e, MapWithin)


def points_in_polygon(xy, polygon) -> np.ndarray:
    """Whether each point of ``xy`` (n, 2) lies inside ``polygon`` ((x, y), ...) or on its boundary: the
    even-odd rule, vectorised over the points one edge at a time (points outside its bounding box first out)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, np.float64).reshape(-1, 2)
    out = np.zeros(len(xy), bool)
    lo, hi = poly.min(0), poly.max(0)
    near = np.flatnonzero((xy[:, 0] >= lo[0]) & (xy[:, 0] <= hi[0]) & (xy[:, 1] >= lo[1]) & (xy[:, 1] <= hi[1]))
    x, y = xy[near, 0], xy[near, 1]
    odd = np.zeros(len(near), bool)
    edge = np.zeros(len(near), bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, 0)):
        cross = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        odd ^= cross & (x < at)
        side = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        tol = 1e-12 * max(1.0, abs(x2 - x1) + abs(y2 - y1))
        edge |= (np.abs(side) <= tol) & (x >= min(x1, x2)) & (x <= max(x1, x2)) & (y >= min(y1, y2)) & (y <= max(y1, y2))
    out[near] = odd | edge
    return out


def sql_contains(haystack: Any, needle: Any) -> int:
    """``contains`` in SQL (registered on the connection): case-insensitive (Unicode case folding)."""
    return int(str(needle).casefold() in str(haystack).casefold())


# ---- Python evaluation (the reference) ---------------------------------------------------------------
def record_of(item) -> dict[str, Any]:
    """An item's fields as ``evaluate`` reads them: the built-ins, and its metadata under ``extra``."""
    rec = {n: getattr(item, n) for n in BUILTINS}
    rec["extra"] = item.extra or {}
    return rec


def _lookup(f: Field, rec: dict) -> Any:
    if f.builtin:
        return rec.get(f.path[0])
    v: Any = rec.get("extra") or {}
    for p in f.path:
        if not isinstance(v, dict):
            return None
        v = v.get(p)
    return v


_CMP = {"=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _vkind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "string" if isinstance(v, str) else "other"


def evaluate(e, rec: dict) -> bool | None:
    """True, False or None (unknown) for one record (``record_of``): SQL's three-valued logic."""
    if isinstance(e, BoolOp):
        vals = [evaluate(a, rec) for a in e.args]
        stop = e.op == "or"  # or: any True wins; and: any False wins
        if stop in vals:
            return stop
        return None if None in vals else not stop
    if isinstance(e, Not):
        v = evaluate(e.arg, rec)
        return None if v is None else not v
    if isinstance(e, IdSet):
        return rec.get("id") in set(e.ids)
    if isinstance(e, MapWithin):  # the record's point on that map under "map": {method: (x, y)}
        point = (rec.get("map") or {}).get(e.method)
        return point is not None and bool(points_in_polygon([point], e.polygon)[0])
    x = _lookup(e.field, rec)
    if isinstance(e, IsNull):
        return x is None
    if x is None:
        return None
    if isinstance(e, Contains):
        return isinstance(x, str) and e.text.casefold() in x.casefold()
    if _vkind(x) != _kind(e.value):
        return False
    return bool(_CMP[e.op](x, e.value))


__all__ = ["parse", "parse_order", "order_sql", "tokenize", "to_sql", "evaluate", "record_of", "sql_contains", "BUILTINS", "Field", "Compare",
           "Contains", "IsNull", "Not", "BoolOp", "MapWithin", "IdSet", "bind_maps", "has_map", "points_in_polygon",
           "MAX_VERTICES"]
