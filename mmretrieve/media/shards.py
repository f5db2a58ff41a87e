"""Sharded collections: webdataset tar shards and parquet files, streamed (never unpacked to disk).

- **webdataset** (what img2dataset writes, how LAION, DataComp and CC3M are distributed): a tar per
  shard, each sample's files named ``<key>.<ext>``: the image (``jpg``, ``png``, ``webp``, ...), an
  optional caption (``txt``) and metadata (``json``: its ``caption`` and ``key`` are used when present,
  the rest is kept as the item's extra). Shards are local paths or brace patterns
  (``shards/{00000..00123}.tar``, ``{a,b}.tar``), or a folder of ``.tar`` files.
- **parquet**: image bytes (a ``binary`` column ``image`` / ``jpg`` / ``bytes``, or Hugging Face's
  ``{"bytes", "path"}`` struct) or image paths (``image_path`` / ``path``, relative to the file), a
  caption (``caption`` / ``text``) and a key (``key`` / ``id``; else ``<file stem>/<row>``); other
  columns go to the item's extra.

A sample becomes a ``SourceItem`` whose ``data`` holds the image bytes and whose ``uri`` is
``<shard>#<key>``. A member that cannot be read, a sample without an image and a shard cut short
(a truncated tar) are reported, never fatal: ``ShardProblem`` records go to the ingest report.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmretrieve.errors import InputError, MissingDependencyError, SourceNotFoundError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
#: a member larger than this is refused (a sample, not a file system)
MAX_MEMBER_BYTES = 256 << 20
#: the members of a webdataset sample that are read: the image, its caption and metadata
_READ_EXTS = frozenset(IMAGE_EXTS) | {"txt", "json"}
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "bytes", "img")
PARQUET_PATH_COLUMNS = ("image_path", "path", "file", "filename")


@dataclass
class ShardSample:
    """One sample of a shard: its key, the image bytes (or a path), caption and metadata."""

    key: str
    uri: str
    data: bytes | None = None
    path: str | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardProblem:
    """Something in a shard that could not be used (the rest of the shard still is)."""

    key: str
    uri: str
    reason: str


#: names a brace pattern may expand to (``{0..999999999}`` is a typo, not a collection)
MAX_PATTERN_NAMES = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}.tar`` -> a00.tar a01.tar a02.tar (zero padding kept); ``{x,y}`` alternatives;
    several (and nested) groups multiply, up to ``MAX_PATTERN_NAMES`` names (refused past it, before
    the work grows: every step of the expansion ends in at least one name)."""
    out: list[str] = []
    _expand(pattern, pattern, out)
    return out


def _too_many(pattern: str, n: int | None = None) -> InputError:
    many = f"{n} shards, over" if n is not None else "more shards than"
    return InputError(f"{pattern}: the pattern names {many} the {MAX_PATTERN_NAMES} a source may have")


def _group(pattern: str) -> tuple[int, int, list[int]] | None:
    """(start, end, top-level comma positions) of the first outermost ``{...}``, or None."""
    start = pattern.find("{")
    while start != -1:
        depth, commas = 0, []
        for j in range(start, len(pattern)):
            c = pattern[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return start, j, commas
            elif c == "," and depth == 1:
                commas.append(j)
        start = pattern.find("{", start + 1)  # unclosed: a literal brace
    return None


def _expand(whole: str, pattern: str, out: list[str]) -> None:
    g = _group(pattern)
    if g is None:
        out.append(pattern)
        if len(out) > MAX_PATTERN_NAMES:
            raise _too_many(whole)
        return
    i, j, commas = g
    head, body, tail = pattern[:i], pattern[i + 1 : j], pattern[j + 1 :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        if abs(hi - lo) + 1 > MAX_PATTERN_NAMES:
            raise _too_many(whole, abs(hi - lo) + 1)
        step = 1 if hi >= lo else -1
        options = (str(k).zfill(width) for k in range(lo, hi + step, step))
    else:
        cuts = [i, *commas, j]
        options = (pattern[cuts[k] + 1 : cuts[k + 1]] for k in range(len(cuts) - 1))
    for opt in options:
        _expand(whole, head + opt + tail, out)


def resolve_shards(source: str | os.PathLike) -> list[Path]:
    """The shard files a source names: one file, a brace / glob pattern, or a folder of ``.tar`` files
    (webdataset; img2dataset's metadata ``.parquet`` beside them are not shards) or of ``.parquet`` files."""
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.tar")) or sorted(p.glob("*.parquet"))
        if not files:
            raise InputError(f"{p}: no .tar or .parquet shards in this folder")
        return [f.resolve() for f in files]
    names = [n for part in expand_braces(os.path.expanduser(s)) for n in (sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])]
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise SourceNotFoundError(f"{len(missing)} shard(s) of {s} not found, e.g. {missing[0]}")
    if not names:
        raise SourceNotFoundError(f"no shards match {s}")
    return [Path(n).resolve() for n in names]


def is_shard_source(source: str | os.PathLike) -> bool:
    """A brace pattern, a ``.tar`` / ``.parquet`` file, or a folder whose top level holds shards and no
    media files (a folder of images stays a folder even with a stray tar in it)."""
    from mmretrieve.media.scan import media_kind

    s = str(source)
    p = Path(s).expanduser()
    if not p.exists():  # a pattern (a folder named `photos[2024]` is still a folder)
        return "{" in s and "}" in s or any(c in s for c in "*?[")
    if p.is_file():
        return p.name.lower().endswith((".tar", ".parquet", ".tar.gz", ".tgz"))
    if not p.is_dir():
        return False
    try:
        names = [e.name for e in os.scandir(p) if not e.name.startswith(".")]
    except OSError:
        return False
    return any(n.lower().endswith((".tar", ".parquet")) for n in names) and not any(media_kind(n) for n in names)


# ---- webdataset -------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name; the rest the extension."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _sample(shard: Path, key: str, parts: dict[str, tuple[str, bytes]]) -> ShardSample | ShardProblem:
    """One webdataset sample from its files (``ext -> (member name, bytes)``)."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        return ShardProblem(key, f"{shard}#{key}", f"no image in the sample (files: {', '.join(sorted(parts)) or 'none'})")
    member, img = parts[ext]
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"][1].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            meta = {}
    caption = meta.pop("caption", None)
    if "txt" in parts:
        caption = parts["txt"][1].decode("utf-8", "replace").strip() or caption
    name = str(meta.pop("key", None) or key)
    extra = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k not in _DROPPED_META}
    return ShardSample(name, member_uri(shard, member), data=img, caption=str(caption) if caption else None, extra=extra)


#: img2dataset's bookkeeping fields, and the columns the index reserves for videos and frames
_DROPPED_META = frozenset({"status", "error_message", "video", "timestamp", "duration", "fps", "frames"})


def member_uri(shard: Path, member: str) -> str:
    """How an item inside a shard is named: ``<shard path>#<member>`` (``load_image`` reads it back)."""
    return f"{shard}#{member}"


_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"), (b"\xfd7zXZ", "xz", "unxz"))


def compression_of(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(format, the command that unpacks it)`` for a gzip / bzip2 / xz file (whatever its name), else None."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next(((name, cmd) for magic, name, cmd in _COMPRESSED if head.startswith(magic)), None)


def compressed_shard_reason(shard: Path, comp: tuple[str, str]) -> str:
    return (f"{shard} is {comp[0]}-compressed: its members could not be read back (thumbnails, media, rerankers) "
            f"without decompressing the shard from its start on every read; unpack it ({comp[1]} -c {shard.name} > "
            f"{shard.name.split('.')[0]}.tar) and build from the plain .tar")


def iter_webdataset(shard: Path) -> Iterator[ShardSample | ShardProblem]:
    """Samples of a tar shard, read as a stream; a shard cut short ends with a ``ShardProblem``. A
    sample with a member too large to read is skipped whole (the reason names the member). A compressed
    tar is refused whole (one ``ShardProblem`` naming the fix): its members could only be read back by
    decompressing from the start, a cost of O(shard) per thumbnail."""
    try:
        comp = compression_of(shard)
    except OSError as e:
        yield ShardProblem("", str(shard), f"cannot read the tar: {e}")
        return
    if comp is not None:
        yield ShardProblem("", str(shard), compressed_shard_reason(shard, comp))
        return
    cur, parts, n, too_large = None, {}, 0, None

    def done() -> ShardSample | ShardProblem:
        return too_large if too_large is not None else _sample(shard, cur, parts)

    try:
        with tarfile.open(shard, mode="r|") as tf:
            for m in tf:
                if not m.isfile():  # directories, links (never followed), devices
                    continue
                key, ext = _split_name(m.name)
                if key != cur and cur is not None:
                    yield done()
                    n += 1
                    parts, too_large = {}, None
                cur = key
                if ext not in _READ_EXTS:  # embeddings, audio, ...: not read (a stream skips their bytes)
                    continue
                held = m.size + sum(len(d) for _, d in parts.values())
                if held > MAX_MEMBER_BYTES:
                    too_large = ShardProblem(key, f"{shard}#{m.name}", f"member {m.name} is {m.size} bytes (a sample may hold "
                                             f"{MAX_MEMBER_BYTES} in its image, caption and metadata)")
                    continue
                parts[ext] = (m.name, tf.extractfile(m).read())
        if cur is not None:
            yield done()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if cur is not None:  # the sample being read (the ones before it are whole and were yielded)
            yield ShardProblem(cur, f"{shard}#{cur}", f"cut short: the tar ends inside this sample ({e})")
        yield ShardProblem("", str(shard), f"truncated or corrupt tar after {n} sample(s): {e}")


# ---- parquet -------------------------------------------------------------------------------------------
def iter_parquet(path: Path, batch_rows: int = 1024) -> Iterator[ShardSample | ShardProblem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("parquet inputs need pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for broken files
        yield ShardProblem("", str(path), f"not a readable parquet file: {e}")
        return
    cols = pf.schema_arrow.names
    icol = next((c for c in PARQUET_IMAGE_COLUMNS if c in cols), None)
    pcol = next((c for c in PARQUET_PATH_COLUMNS if c in cols), None)
    if icol is None and pcol is None:
        raise InputError(f"{path}: no image column ({', '.join(PARQUET_IMAGE_COLUMNS)}) and no path column "
                         f"({', '.join(PARQUET_PATH_COLUMNS)}); found {', '.join(cols)}")
    kcol = next((c for c in ("key", "id") if c in cols), None)
    ccol = next((c for c in ("caption", "text") if c in cols), None)
    start = 0
    for g in range(pf.num_row_groups):  # row groups are independent: a damaged one costs its rows only
        n, row = pf.metadata.row_group(g).num_rows, start
        refused = _oversized_group(path, pf, g, start, icol)
        if refused is not None:
            yield refused
            start += n
            continue
        rows = 1 if _group_image_bytes(pf, g, icol) > MAX_MEMBER_BYTES else batch_rows  # a big cell: alone
        try:
            for batch in pf.iter_batches(batch_size=rows, row_groups=[g]):
                batch, over = _drop_oversized(batch, icol)
                for i, rec in enumerate(batch.to_pylist()):
                    if i in over:
                        key = str(rec[kcol]) if kcol and rec.get(kcol) is not None else f"{path.stem}/{row}"
                        yield ShardProblem(key, f"{path}#{row}", f"the image is {over[i]} bytes (over {MAX_MEMBER_BYTES})")
                    else:
                        yield _parquet_sample(path, row, rec, icol, pcol, kcol, ccol)
                    row += 1
        except Exception as e:  # a corrupt page, a column pyarrow cannot read
            where = f"{path}#rows {row}-{start + n - 1}"
            yield ShardProblem(where, where, f"corrupt parquet data in rows {row}-{start + n - 1}: {type(e).__name__}: {e}")
        start += n


#: a parquet row group whose image column holds more than this (uncompressed, by its metadata) is not read:
#: Arrow decodes a page whole, so a group's image column is what a read may hold in memory at once
MAX_GROUP_IMAGE_BYTES = 2 * MAX_MEMBER_BYTES


def _group_image_bytes(pf, g: int, icol: str | None) -> int:
    """The uncompressed size of row group ``g``'s image column, from the column chunks' metadata (no data read)."""
    if icol is None:
        return 0
    rg = pf.metadata.row_group(g)
    return sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
               if rg.column(j).path_in_schema.split(".")[0] == icol)


def _oversized_group(path: Path, pf, g: int, start: int, icol: str | None) -> ShardProblem | None:
    size = _group_image_bytes(pf, g, icol)
    if size <= MAX_GROUP_IMAGE_BYTES:
        return None
    n = pf.metadata.row_group(g).num_rows
    where = f"{path}#rows {start}-{start + n - 1}"
    return ShardProblem(where, where, f"row group {g} holds {size} bytes of images (uncompressed), over the "
                        f"{MAX_GROUP_IMAGE_BYTES} one read may hold (a sample may take {MAX_MEMBER_BYTES}); not read. "
                        "Write the file with smaller row groups (pyarrow: write_table(..., row_group_size=N)) to index them")


def _drop_oversized(batch, icol: str | None):
    """``(batch, {row in batch: bytes})``: cells of the image column over ``MAX_MEMBER_BYTES`` are measured
    in Arrow and replaced by nulls before the rows become Python objects (no copy of a huge cell)."""
    if icol is None:
        return batch, {}
    import pyarrow as pa
    import pyarrow.compute as pc

    col = batch.column(icol)
    data = col.field("bytes") if pa.types.is_struct(col.type) else col
    if not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type)):
        return batch, {}
    sizes = pc.binary_length(data).to_pylist()
    over = {i: sz for i, sz in enumerate(sizes) if sz is not None and sz > MAX_MEMBER_BYTES}
    if not over:
        return batch, {}
    keep = pa.array([i not in over for i in range(len(sizes))])
    nulls = pa.nulls(len(sizes), type=col.type)
    return batch.set_column(batch.schema.get_field_index(icol), icol, pc.if_else(keep, col, nulls)), over


def _parquet_sample(path: Path, row: int, rec: dict, icol, pcol, kcol, ccol) -> ShardSample | ShardProblem:
    key = str(rec[kcol]) if kcol and rec.get(kcol) is not None else f"{path.stem}/{row}"
    uri = f"{path}#{row}"
    data = rec.get(icol) if icol else None
    if isinstance(data, dict):  # Hugging Face datasets: {"bytes": ..., "path": ...}
        data = data.get("bytes") or None
    img_path = rec.get(pcol) if pcol else None
    if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        return ShardProblem(key, uri, f"column {icol!r} holds {type(data).__name__}, not image bytes")
    if img_path is not None and not isinstance(img_path, str):
        return ShardProblem(key, uri, f"column {pcol!r} holds {type(img_path).__name__}, not a path")
    if data is not None and len(data) > MAX_MEMBER_BYTES:
        return ShardProblem(key, uri, f"the image is {len(data)} bytes (over {MAX_MEMBER_BYTES})")
    if data is None and not img_path:
        return ShardProblem(key, uri, "no image bytes and no image path in this row")
    if data is None:
        img_path = str(Path(img_path) if Path(img_path).is_absolute() else path.parent / img_path)
    used = {icol, pcol, kcol, ccol}
    extra = {k: v for k, v in rec.items() if k not in used and k not in _DROPPED_META and isinstance(v, (str, int, float, bool))}
    cap = rec.get(ccol) if ccol else None
    return ShardSample(key, img_path if data is None else uri, data=bytes(data) if data is not None else None,
                       path=img_path if data is None else None, caption=str(cap) if cap else None, extra=extra)


# ---- reading one member back (search results, rerankers, thumbnails) -----------------------------------
_MEMBER_URI = re.compile(r"(.*?\.(?:tar|tar\.gz|tgz|parquet))#(.+)\Z", re.IGNORECASE | re.DOTALL)


def split_member_uri(uri: str) -> tuple[Path, str] | None:
    """``(shard, member)`` for a shard member's uri, or None for anything else (a plain file included)."""
    m = _MEMBER_URI.match(str(uri))  # the first `.tar#`: a member's own name may hold a '#'
    if m is None:
        return None
    return Path(m.group(1)), m.group(2)


@functools.lru_cache(maxsize=16)
def _tar_members(path: str, size: int, mtime: float) -> dict[str, tuple[int, int]]:
    """A plain tar's member name -> (data offset, size), read once from its headers (no data read). A tar
    cut short keeps the members before the cut (the build indexed those); a member whose data runs past
    the end of the file is left out."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, EOFError, OSError):
                    break  # the cut: what came before stays readable
                if m is None:
                    break
                if m.isfile() and m.offset_data + m.size <= size:
                    out.setdefault(m.name, (m.offset_data, m.size))  # a name added twice: the first, as built
    except tarfile.ReadError:
        pass  # not even a first header: no members
    return out


def member_location(shard: Path, member: str, st: os.stat_result) -> tuple[int, int]:
    """(offset, size) of a plain tar's member, from its cached header index; raises ``FileNotFoundError``
    naming what is missing, and for a compressed tar (never streamed: O(shard) per read)."""
    comp = compression_of(shard)
    if comp is not None:
        raise FileNotFoundError(compressed_shard_reason(shard, comp))
    loc = _tar_members(str(shard), st.st_size, st.st_mtime).get(member)
    if loc is None:
        raise FileNotFoundError(f"{shard} has no member {member!r}")
    if loc[1] > MAX_MEMBER_BYTES:
        raise FileNotFoundError(f"{shard}: member {member!r} is {loc[1]} bytes, over the {MAX_MEMBER_BYTES} a sample may take")
    return loc


def read_member(uri: str) -> bytes:
    """The bytes of a shard member named by ``member_uri`` (a tar member, or a parquet row's image); plain
    tars are read at the member's offset (headers indexed once per shard). Raises ``FileNotFoundError``
    naming what is missing. The service reads through ``media.readback`` instead, which also checks the
    item's fingerprint and never follows a symlink."""
    parts = split_member_uri(uri)
    if parts is None:
        raise FileNotFoundError(f"{uri}: not a shard member")
    shard, member = parts
    if shard.suffix.lower() == ".parquet":
        return _parquet_member(shard, member)
    with open(shard, "rb") as fh:
        return read_tar_member(fh, shard, member)


def read_tar_member(fh, shard: Path, member: str) -> bytes:
    """A member's bytes read from an open tar file at its indexed offset."""
    offset, size = member_location(shard, member, os.fstat(fh.fileno()))
    data = os.pread(fh.fileno(), size, offset)
    if len(data) != size:
        raise FileNotFoundError(f"{shard}: member {member!r} is cut short")
    return data


def _parquet_member(path: Path, member: str, source=None) -> bytes:
    """Row ``member``'s image bytes of a parquet file (``source``: an open file of it, else ``path``)."""
    import pyarrow.parquet as pq

    try:
        row = int(member)
    except ValueError:
        raise FileNotFoundError(f"{path}: {member!r} is not a row number") from None
    try:
        pf = pq.ParquetFile(source if source is not None else path)
    except Exception as e:  # pyarrow's own error types for a damaged file
        raise FileNotFoundError(f"{path}: not a readable parquet file ({e})") from None
    icol = next((c for c in PARQUET_IMAGE_COLUMNS if c in pf.schema_arrow.names), None)
    if icol is None or not 0 <= row < pf.metadata.num_rows:
        raise FileNotFoundError(f"{path} has no image in row {row}")
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < start + n:
            value = pf.read_row_group(g, columns=[icol]).column(0)[row - start].as_py()
            value = value.get("bytes") if isinstance(value, dict) else value
            if not value:
                raise FileNotFoundError(f"{path} has no image bytes in row {row}")
            return bytes(value)
        start += n
    raise FileNotFoundError(f"{path} has no row {row}")


def iter_shard(shard: Path) -> Iterator[ShardSample | ShardProblem]:
    if shard.suffix.lower() == ".parquet":
        yield from iter_parquet(shard)
    else:
        yield from iter_webdataset(shard)


__all__ = ["ShardSample", "ShardProblem", "member_uri", "split_member_uri", "read_member", "expand_braces", "resolve_shards", "is_shard_source", "iter_webdataset",
           "iter_parquet", "iter_shard"]
