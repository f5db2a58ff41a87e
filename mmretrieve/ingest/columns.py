"""The metadata columns an ``index import`` carries from a parquet file into the items' ``extra``.

Every column of the parquet other than the ones the import reads itself (the key, the vector, the uri and
the caption) becomes a metadata field of the item of its row, unless ``columns`` / ``exclude`` say
otherwise. Values keep their type: integers and floats are numbers, strings strings, booleans booleans;
dates and timestamps become ISO text, decimals floats; lists and structs of those become JSON arrays and
objects (``a.b`` reads field ``b`` of struct column ``a`` in a filter). A null (and a NaN or infinite
float) is no value: the item has no such field, and ``field is null`` matches it. Columns of any other
type (binary, maps ...) are left out, each with a logged note.

Names: a column named like a built-in field (``id``, ``key``, ``uri``, ``kind``, ``caption``, ``size``,
``mtime``, ``added_at``, ``score``, ``rank``) or like a field mmretrieve writes itself (``video``,
``timestamp``, ``duration``, ``fps``, ``frames``, ``symlink``) is carried as ``meta_<name>`` (a logged
note says so), since a bare name in a filter means the built-in. Integer ``width`` and ``height`` columns
fill the items' built-in width and height. A name with a double quote, a backslash (stored escaped in the
JSON, which SQLite's JSON paths match as written) or a control character cannot be addressed by a filter:
refused, naming the column. Other names (spaces, dots, unicode, backticks) are kept as they are: a filter reads them in backticks
(`` `aesthetic score` > 5 ``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from mmretrieve.errors import InputError
from mmretrieve.store.filters import BUILTINS

log = logging.getLogger(__name__)

#: names a column may not keep (a bare field name in a filter, or a result, means these)
SHADOWED = frozenset(BUILTINS) | {"score", "rank"}
#: ``Item.extra`` names mmretrieve writes itself (as ``media.scan.RESERVED_COLUMNS``)
RESERVED = frozenset({"video", "timestamp", "duration", "fps", "frames", "symlink"})
#: integer columns that fill the item's own fields rather than its metadata
ITEM_FIELDS = ("width", "height")
RENAME_PREFIX = "meta_"


def split_names(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (the CLI's ``--columns`` / ``--exclude-columns``); None stays None."""
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


@dataclass(frozen=True)
class ColumnSelection:
    """Which metadata columns to carry: ``columns`` (only these) or ``exclude`` (all but these)."""

    columns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, columns=None, exclude=None) -> ColumnSelection:
        return cls(tuple(columns) if columns is not None else None, tuple(exclude or ()))


def _kind(t) -> str | None:
    """How values of arrow type ``t`` are carried: "plain", "float", "text" (cast to string), "decimal",
    "nested" (lists / structs of carried types), "dict" (dictionary-encoded) or None (left out)."""
    import pyarrow as pa

    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return "plain"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return "text"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_dictionary(t):
        return "dict" if _kind(t.value_type) in ("plain", "float") else None
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "nested" if _kind(t.value_type) in ("plain", "float", "nested") else None
    if pa.types.is_struct(t):
        ok = all(_kind(t.field(i).type) in ("plain", "float", "nested") for i in range(t.num_fields))
        return "nested" if ok and t.num_fields else None
    return None


def _clean(v: Any) -> Any:
    """A nested value with its NaN / infinite floats as null and its struct fields that are null left out."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: c for k, c in ((k, _clean(x)) for k, x in v.items()) if c is not None}
    return v


@dataclass
class ColumnPlan:
    """(source column, stored name, how) of each carried column, and the item fields filled from columns."""

    carried: list[tuple[str, str, str]] = field(default_factory=list)
    item_fields: dict[str, str] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return [c for c, _, _ in self.carried] + list(self.item_fields.values())

    def values(self, batch) -> tuple[list[dict], dict[str, list]]:
        """(each row's metadata, {item field: values}) of an arrow record batch holding ``sources``."""
        import pyarrow as pa

        n = batch.num_rows
        extras: list[dict] = [{} for _ in range(n)]
        for col, name, how in self.carried:
            arr = batch.column(col)
            if how == "text":
                arr = arr.cast(pa.string())
            elif how == "decimal":
                arr = arr.cast(pa.float64())
            elif how == "dict":
                arr = arr.dictionary_decode()
            for ex, v in zip(extras, arr.to_pylist()):
                if v is None or (isinstance(v, float) and not math.isfinite(v)):
                    continue
                ex[name] = _clean(v) if how == "nested" else v
        fields = {f: batch.column(c).to_pylist() for f, c in self.item_fields.items()}
        return extras, fields


def _check_name(name: str, where: str) -> None:
    if not name.strip() or '"' in name or "\\" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InputError(f"{where}: column {name!r} cannot be a metadata field (a filter cannot name a field with a "
                         "double quote, a backslash or a control character, or an empty one); rename it, or leave it out with "
                         "--exclude-columns")


def plan_columns(schema, used, selection: ColumnSelection | None, where: str) -> ColumnPlan:
    """What to carry of the columns of arrow ``schema`` not in ``used`` (see the module's doc)."""
    import pyarrow as pa

    sel = selection or ColumnSelection()
    names = [n for n in schema.names if n not in used]
    for asked in [*(sel.columns or ()), *sel.exclude]:
        if asked not in schema.names:
            raise InputError(f"{where}: no column {asked!r} (its columns: {', '.join(schema.names)})")
    if sel.columns is not None:
        names = [n for n in names if n in sel.columns]
    names = [n for n in names if n not in sel.exclude]
    plan = ColumnPlan()
    for n in names:
        t = schema.field(n).type
        if n in ITEM_FIELDS and pa.types.is_integer(t):
            plan.item_fields[n] = n
            continue
        how = _kind(t)
        if how is None:
            log.info("%s: column %r (%s) is not carried: only numbers, text, booleans, dates and lists / structs "
                     "of those become metadata", where, n, t)
            continue
        _check_name(n, where)
        stored = n
        if n in SHADOWED or n in RESERVED or n in ITEM_FIELDS:
            stored = RENAME_PREFIX + n
            if stored in schema.names:
                raise InputError(f"{where}: column {n!r} would be carried as {stored!r}, which is another column; "
                                 "leave one out with --exclude-columns")
            log.info("%s: column %r is carried as metadata field %r (%r names a built-in field)", where, n, stored, n)
        plan.carried.append((n, stored, how))
    return plan


__all__ = ["ColumnSelection", "ColumnPlan", "plan_columns", "split_names"]
