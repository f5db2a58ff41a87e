"""Importing embeddings computed elsewhere (another machine, another tool) into an index.

Sources (``read_embeddings``):

- **clip-retrieval's output folder**: ``img_emb/img_emb_{i}.npy`` with ``metadata/metadata_{i}.parquet``
  (columns ``image_path`` and optionally ``caption``; the row order matches the embeddings). Keys are the
  image paths.
- a **.npy** of vectors (n, d) with its keys in a text file (one per line): ``--keys FILE``, or
  ``<stem>.keys.txt`` beside it; optionally ``--metadata FILE.parquet``, one row per vector in the same
  order (a different row count is refused), whose ``key`` / ``id`` / ``image_path`` column gives the keys
  when there is no keys file.
- a **.parquet** with a key column (``key``, ``id`` or ``image_path``) and a vector column
  (``embedding``, ``vector`` or ``emb``: a list of floats per row), optionally ``uri`` / ``image_path``
  and ``caption``.

Every other column of a parquet (the metadata parquet of a .npy, a clip-retrieval metadata file) becomes
item metadata, typed, that filters, ``--show`` and facets read (``ingest.columns`` says how values and
names are carried; ``columns`` / ``exclude_columns`` choose). Parquet is read ``IMPORT_CHUNK`` rows at a
time, so an import holds one chunk whatever the file's size.

Vectors are checked: the index's dimension, finite, non-zero, and L2-normalised (an inner-product index
ranks by the dot product, so unnormalised vectors would rank by their length); ``normalize=True``
normalises them instead of refusing, and ``on_bad_vectors="drop"`` drops and reports bad rows.

>>> import mmretrieve as mr
>>> mr.import_embeddings("laion-sample", "/data/clip-retrieval-out", encoder="open_clip:ViT-B-32@laion2b_s34b_b79k")  # doctest: +SKIP
>>> mr.add_vectors("mine", vectors, keys=["a", "b"], encoder="my-model")                                        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmretrieve.errors import (
    BadVectorsError,
    InputError,
    MissingDependencyError,
    SourceNotFoundError,
    UsageError,
)
from mmretrieve.ingest.columns import ColumnSelection, plan_columns
from mmretrieve.ingest.report import IngestReport
from mmretrieve.store import DEFAULT_FACTORY, IndexWriter, Item, Skipped, read_manifest, resolve_index_path
from mmretrieve.store.layout import MANIFEST

log = logging.getLogger(__name__)

KEY_COLUMNS = ("key", "id", "image_path")
VECTOR_COLUMNS = ("embedding", "vector", "emb")
NORM_TOLERANCE = 1e-3


@dataclass
class EmbeddingBatch:
    keys: list[str]
    vectors: np.ndarray
    uris: list[str]
    captions: list[str | None]
    source: str
    #: each row's metadata (``Item.extra``; None: none), and item fields filled from columns (width, height)
    extras: list[dict] | None = None
    fields: dict[str, list] = field(default_factory=dict)


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _shard_number(p: Path) -> int:
    m = re.search(r"(\d+)$", p.stem)
    return int(m.group(1)) if m else -1


class NpyRows:
    """The rows of a 2-D ``.npy``, read from the file slice by slice (``rows[s:e]``): an import of a
    10M-row file holds the chunk it adds, not the pages of a whole memory map."""

    def __init__(self, path: Path) -> None:
        from mmretrieve.errors import IndexCorruptedError
        from mmretrieve.store.io import npy_header

        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                shape, self.dtype, self.offset = npy_header(fh, self.path)
        except IndexCorruptedError as e:
            raise InputError(str(e)) from None
        if len(shape) != 2 or self.dtype.kind != "f":
            raise InputError(f"{self.path}: expected a 2-D float array of vectors, got shape {shape} ({self.dtype})")
        if self.offset + shape[0] * shape[1] * self.dtype.itemsize > self.path.stat().st_size:
            raise InputError(f"{self.path}: truncated (its header promises {shape[0]} rows)")
        self.shape, self.ndim = shape, 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, step = sl.indices(self.shape[0])
        if step != 1:
            raise UsageError("NpyRows reads contiguous row ranges")
        row = self.shape[1] * self.dtype.itemsize
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * row)
            out = np.fromfile(fh, dtype=self.dtype, count=max(0, stop - start) * self.shape[1])
        return out.reshape(-1, self.shape[1]).astype(np.float32, copy=False)


def _open_parquet(path: Path):
    try:
        return _parquet().ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path}: not a readable parquet file ({e})") from None


def _vector_column(col, path: Path, name: str) -> np.ndarray:
    """A list column of vectors as an (n, d) float32 array: flattened in one piece when every row is a
    list of d numbers, else row by row (which says what is wrong)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and len(col) \
            and col.null_count == 0 and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        lens = pc.min_max(pc.list_value_length(col))
        lo, hi = lens["min"].as_py(), lens["max"].as_py()
        flat = col.flatten()
        if lo == hi and flat.null_count == 0 and len(flat) == lo * len(col):
            return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), lo)
    try:
        return np.asarray(col.to_pylist(), dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: column {name!r} is not a list of equal-length float vectors ({e})") from None


def _parquet_rows(path: Path, pf, *, kcol: str | None, vcol: str | None = None, vectors=None,
                  keys: list[str] | None = None, selection: ColumnSelection | None = None,
                  source: str | None = None) -> Iterator[EmbeddingBatch]:
    """The batches of parquet ``pf``, read ``IMPORT_CHUNK`` rows at a time: keys from column ``kcol`` (or
    ``keys``), vectors from column ``vcol`` (or the aligned rows of ``vectors``), the uri and caption
    columns, and every other column as metadata (``ingest.columns``)."""
    cols = pf.schema_arrow.names
    ucol = "uri" if "uri" in cols else ("image_path" if "image_path" in cols else None)
    ccol = "caption" if "caption" in cols else None
    plan = plan_columns(pf.schema_arrow, {kcol, vcol, ucol, ccol} - {None}, selection, str(path))
    read = list(dict.fromkeys(c for c in (kcol, vcol, ucol, ccol, *plan.sources) if c)) or cols[:1]
    s = 0
    for rb in pf.iter_batches(batch_size=IMPORT_CHUNK, columns=read):
        e = s + rb.num_rows
        names = [str(k) for k in rb.column(kcol).to_pylist()] if kcol else keys[s:e]
        vecs = _vector_column(rb.column(vcol), path, vcol) if vcol else vectors[s:e]
        uris = [str(u) for u in rb.column(ucol).to_pylist()] if ucol else list(names)
        caps = [None if c is None else str(c) for c in rb.column(ccol).to_pylist()] if ccol else [None] * len(names)
        extras, fields = plan.values(rb)
        yield EmbeddingBatch(names, vecs, uris, caps, source or str(path), extras if plan.carried else None, fields)
        s = e


def _clip_retrieval(root: Path, selection: ColumnSelection | None) -> Iterator[EmbeddingBatch]:
    embs = sorted((root / "img_emb").glob("img_emb_*.npy"), key=_shard_number)
    if not embs:
        raise InputError(f"{root}: no img_emb/img_emb_*.npy (expected clip-retrieval's output folder)")
    for e in embs:
        meta = root / "metadata" / f"metadata_{_shard_number(e)}.parquet"
        if not meta.is_file():
            raise InputError(f"{e}: its metadata file {meta} is missing")
        vecs = NpyRows(e)
        pf = _open_parquet(meta)
        if "image_path" not in pf.schema_arrow.names:
            raise InputError(f"{meta}: no image_path column (found: {', '.join(pf.schema_arrow.names)})")
        if pf.metadata.num_rows != len(vecs):
            raise InputError(f"{meta}: {pf.metadata.num_rows} rows but {e} holds {len(vecs)} embeddings")
        yield from _parquet_rows(meta, pf, kcol="image_path", vectors=vecs, selection=selection, source=str(e))


def _npy(path: Path, keys: str | os.PathLike | None, metadata: str | os.PathLike | None,
         selection: ColumnSelection | None) -> Iterator[EmbeddingBatch]:
    vecs = NpyRows(path)
    kpath = Path(keys) if keys else path.with_suffix(".keys.txt")
    pf, kcol, names = None, None, None
    if metadata is not None:
        mpath = Path(metadata).expanduser()
        if not mpath.is_file():
            raise SourceNotFoundError(f"metadata file not found: {mpath}")
        if mpath.suffix.lower() != ".parquet":
            raise InputError(f"{mpath}: the metadata of a .npy is read from a .parquet (one row per vector)")
        pf = _open_parquet(mpath)
        if pf.metadata.num_rows != len(vecs):
            raise InputError(f"{mpath}: {pf.metadata.num_rows} rows but {path} holds {len(vecs)} vectors: the "
                             "metadata needs one row per vector, in the same order")
        if not kpath.is_file():
            kcol = next((c for c in KEY_COLUMNS if c in pf.schema_arrow.names), None)
    if kcol is None:
        if not kpath.is_file():
            raise InputError(f"{path}: its keys are missing: give --keys FILE (one key per line), put them in {kpath}"
                             f" or in a {'/'.join(KEY_COLUMNS)} column of --metadata")
        with open(kpath, encoding="utf-8") as fh:
            names = [line.rstrip("\n") for line in fh if line.strip()]
        if len(names) != len(vecs):
            raise InputError(f"{kpath}: {len(names)} keys but {path} holds {len(vecs)} vectors")
    if pf is None:
        yield EmbeddingBatch(names, vecs, names, [None] * len(names), str(path))  # read chunk by chunk
    else:
        yield from _parquet_rows(Path(metadata), pf, kcol=kcol, vectors=vecs, keys=names, selection=selection,
                                 source=str(path))


def _parquet_file(path: Path, selection: ColumnSelection | None) -> Iterator[EmbeddingBatch]:
    pf = _open_parquet(path)
    cols = pf.schema_arrow.names
    kcol = next((c for c in KEY_COLUMNS if c in cols), None)
    vcol = next((c for c in VECTOR_COLUMNS if c in cols), None)
    if kcol is None or vcol is None:
        raise InputError(f"{path}: needs a key column ({'/'.join(KEY_COLUMNS)}) and a vector column "
                         f"({'/'.join(VECTOR_COLUMNS)}); found {', '.join(cols)}")
    yield from _parquet_rows(path, pf, kcol=kcol, vcol=vcol, selection=selection)


def read_embeddings(source: str | os.PathLike, *, keys: str | os.PathLike | None = None,
                    metadata: str | os.PathLike | None = None, columns: Sequence[str] | None = None,
                    exclude_columns: Sequence[str] | None = None) -> Iterator[EmbeddingBatch]:
    """Batches of (keys, vectors, uris, captions, metadata) from ``source`` (see the module docstring).
    ``metadata``: a .parquet aligned row by row with a .npy; ``columns`` / ``exclude_columns``: which
    metadata columns to carry (default all)."""
    src = Path(source).expanduser()
    if not src.exists():
        raise SourceNotFoundError(f"embeddings not found: {src}")
    selection = ColumnSelection.of(columns, exclude_columns)
    if metadata is not None and (src.is_dir() or src.suffix.lower() != ".npy"):
        raise UsageError("--metadata is for a .npy source (a parquet or clip-retrieval folder carries its own columns)")
    if src.is_dir():
        yield from _clip_retrieval(src, selection)
    elif src.suffix.lower() == ".npy":
        yield from _npy(src, keys, metadata, selection)
    elif src.suffix.lower() == ".parquet":
        yield from _parquet_file(src, selection)
    else:
        raise InputError(f"{src}: expected clip-retrieval's output folder, a .npy (with keys) or a .parquet")


def check_vectors(vectors: np.ndarray, dim: int, names: Sequence[str], *, normalize: bool, on_bad_vectors: str,
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """(vectors to store, boolean mask of the rows kept): shape, finiteness, non-zero and unit norms."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != dim:
        raise BadVectorsError(f"{where}: expected vectors of shape (n, {dim}), got {tuple(v.shape)}")
    norms = np.linalg.norm(v, axis=1)
    bad = ~np.isfinite(v).all(1) | ~np.isfinite(norms) | (norms < 1e-6)
    if bad.any() and on_bad_vectors != "drop":
        i = int(np.flatnonzero(bad)[0])
        raise BadVectorsError(f"{where}: {int(bad.sum())} vector(s) are NaN, infinite or zero, e.g. {names[i]!r}; "
                              "pass on_bad_vectors='drop' (--on-bad-vectors drop) to skip them")
    off = ~bad & (np.abs(norms - 1) > NORM_TOLERANCE)
    if off.any():
        if not normalize:
            lo, hi = float(norms[off].min()), float(norms[off].max())
            raise BadVectorsError(f"{where}: {int(off.sum())} vector(s) are not L2-normalised (norms {lo:.3g} .. {hi:.3g}); "
                                  "pass normalize=True (--normalize) to normalise them")
        v = v.copy()
        v[off] /= norms[off, None]
    return v, ~bad


def _encoder_info(encoder, dim: int) -> dict:
    if isinstance(encoder, dict):
        return {**encoder, "dim": int(encoder.get("dim", dim))}
    if hasattr(encoder, "info"):
        return encoder.info.to_dict()
    if not encoder:
        raise UsageError("importing vectors into a new index needs the encoder that made them (--encoder NAME), so "
                         "queries are encoded in the same space")
    # the model is not loaded here: the index records its name and dim, and queries check those two
    return {"name": str(encoder), "dim": int(dim), "modalities": ["image", "text"], "normalize": True, "metric": "ip",
            "imported": True}


def import_embeddings(name_or_path, source, *, encoder=None, index_dir=None, keys=None, metadata=None, columns=None,
                      exclude_columns=None, normalize: bool = False,
                      on_bad_vectors: str = "error", factory: str = DEFAULT_FACTORY, vector_dtype: str = "float32",
                      batches: Sequence[EmbeddingBatch] | None = None, **writer_options) -> IngestReport:
    """Import precomputed embeddings into a new index (``encoder`` names the model that made them) or
    append them to an existing one (as ``index add`` appends: existing keys are replaced). One version is
    published for the whole import. ``writer_options`` go to the ``IndexWriter`` (``segment_rows``,
    ``auto_compact``, ``retain``). ``metadata`` / ``columns`` / ``exclude_columns``: see ``read_embeddings``."""
    t0 = time.perf_counter()
    path = resolve_index_path(name_or_path, index_dir)
    it = iter(batches) if batches is not None else read_embeddings(source, keys=keys, metadata=metadata, columns=columns,
                                                                               exclude_columns=exclude_columns)
    first = next(it, None)
    if first is None:
        raise InputError(f"{source}: no embeddings")
    exists = (path / MANIFEST).is_file()
    if exists:
        built = read_manifest(path)["encoder"]
        if encoder is not None and str(getattr(encoder, "name", encoder)) != built["name"]:
            raise UsageError(f"index {path} holds vectors of {built['name']!r}, not {getattr(encoder, 'name', encoder)!r}")
        writer = IndexWriter(path, **writer_options)
    else:
        writer = IndexWriter(path, encoder_info=_encoder_info(encoder, first.vectors.shape[1]), factory=factory,
                             vector_dtype=vector_dtype, create=True, **writer_options)
    report = IngestReport(index_path=str(path))
    try:
        for batch in [first, *it]:
            _add_batch(writer, batch, report, normalize=normalize, on_bad_vectors=on_bad_vectors)
        manifest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    report.version = manifest["version"] if manifest else None
    report.seconds = time.perf_counter() - t0
    return report


#: rows checked and added at a time: a 10M-row .npy is read from the file chunk by chunk (``NpyRows``), so
#: an import holds one chunk (and the open segment) whatever the source's size
IMPORT_CHUNK = 50_000


def _add_batch(writer: IndexWriter, batch: EmbeddingBatch, report: IngestReport, *, normalize, on_bad_vectors) -> None:
    dim = writer.dim
    if batch.vectors.ndim != 2 or batch.vectors.shape[1] != dim:
        raise BadVectorsError(f"{batch.source}: expected vectors of shape (n, {dim}), got {tuple(batch.vectors.shape)}")
    # the source is noted once in the database, not on every row (it was ~40 bytes of each row)
    writer.meta.write("INSERT OR REPLACE INTO info(k, v) VALUES(?, ?)", (f"imported:{batch.source}", str(time.time())))
    for s in range(0, len(batch.keys), IMPORT_CHUNK):
        e = min(len(batch.keys), s + IMPORT_CHUNK)
        keys = batch.keys[s:e]
        report.scanned += len(keys)
        vecs, keep = check_vectors(batch.vectors[s:e], dim, keys, normalize=normalize, on_bad_vectors=on_bad_vectors,
                                   where=batch.source)
        bad = [Skipped(k, u, "bad embedding (NaN, inf or zero norm)") for k, u, ok in zip(keys, batch.uris[s:e], keep) if not ok]
        if bad:
            writer.record_skipped(bad)
            report.skipped.extend(bad)
        rows = np.flatnonzero(keep)
        existing = set(writer.meta.items_by_keys([keys[i] for i in rows]))
        extras, widths, heights = batch.extras, batch.fields.get("width"), batch.fields.get("height")
        items = [Item(id=-1, key=keys[i], uri=batch.uris[s + i], kind="image", caption=batch.captions[s + i],
                      extra=extras[s + i] if extras else {}, width=widths[s + i] if widths else None,
                      height=heights[s + i] if heights else None) for i in rows]
        stored = writer.add(items, vecs if len(rows) == len(keys) else vecs[rows])
        n_upd = sum(1 for st in stored if st.key in existing)
        report.updated += n_upd
        report.added += len(stored) - n_upd


def add_vectors(name_or_path, vectors: np.ndarray, keys: Sequence[str], *, uris: Sequence[str] | None = None,
                captions: Sequence[str | None] | None = None, encoder=None, index_dir=None, normalize: bool = False,
                on_bad_vectors: str = "error", factory: str = DEFAULT_FACTORY, vector_dtype: str = "float32") -> IngestReport:
    """Add vectors under ``keys`` (a new index needs ``encoder``: a name, an ``Encoder`` or its info dict)."""
    keys = [str(k) for k in keys]
    batch = EmbeddingBatch(keys, np.asarray(vectors, dtype=np.float32), [str(u) for u in (uris or keys)],
                           list(captions or [None] * len(keys)), "add_vectors")
    if len(batch.uris) != len(keys) or len(batch.captions) != len(keys) or len(batch.vectors) != len(keys):
        raise UsageError(f"{len(keys)} keys, {len(batch.vectors)} vectors, {len(batch.uris)} uris and "
                         f"{len(batch.captions)} captions: give one of each per row")
    return import_embeddings(name_or_path, None, encoder=encoder, index_dir=index_dir, normalize=normalize,
                             on_bad_vectors=on_bad_vectors, factory=factory, vector_dtype=vector_dtype, batches=[batch])


__all__ = ["import_embeddings", "add_vectors", "read_embeddings", "check_vectors", "EmbeddingBatch"]
