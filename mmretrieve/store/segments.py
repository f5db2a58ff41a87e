"""Segments: one write's batch of rows, immutable once written (see ``layout`` for the files).

``SegmentBuilder`` buffers a segment's rows in memory and writes its files through the hashing writer
into a temp folder that is renamed into ``segments/`` (a crash leaves a folder no manifest lists, which
the next writer collects). ``SegmentFiles`` opens a written segment for reading: arrays memory-mapped,
headers and sizes checked against the manifest entry (``check="fast"``), or every byte against its
sha256 (``check="full"``).

Kinds: ``flat`` (raw fp32 / fp16 vectors, scanned with BLAS) and ``faiss`` (any other factory: the
segment's own FAISS index, cloned from the index's trained template, holding external ids).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import IndexCorruptedError, UsageError
from mmretrieve.store import io
from mmretrieve.store.layout import SEGMENTS, crash_point, segment_dir


def is_flat_factory(factory: str) -> bool:
    return factory.strip().lower() == "flat"


def _faiss():
    import faiss

    return faiss


def metric_type(metric: str):
    faiss = _faiss()
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    if metric == "l2":
        return faiss.METRIC_L2
    raise UsageError(f"unknown metric {metric!r} (expected 'ip' or 'l2')")


def new_template(dim: int, factory: str, metric: str = "ip"):
    """The empty FAISS index of a non-Flat factory (trained later when it needs training)."""
    faiss = _faiss()
    factory = factory.strip()
    if factory.upper().startswith("IDMAP"):
        raise UsageError("give the factory without IDMap: mmretrieve keeps the ids itself")
    try:
        index = faiss.index_factory(int(dim), factory, metric_type(metric))
    except RuntimeError as e:
        raise UsageError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    fast_scan = [n for n in ("IndexFastScan", "IndexIVFFastScan") if hasattr(faiss, n)]
    if any(isinstance(index, getattr(faiss, n)) for n in fast_scan):
        # packed 4-bit codes in blocks of 32: the segments' stacked lists and read-back assume one code per entry
        raise UsageError(f"FAISS factory {factory!r} is a fast-scan index (4-bit PQ codes packed in blocks), which "
                         "mmretrieve's segments do not support; use 8-bit PQ codes (e.g. "
                         f"{factory.replace('x4fsr', '').replace('x4fs', '').replace('fsr', '').replace('fs', '')!r})")
    if isinstance(index, faiss.IndexPreTransform):
        # the segments' IVF lists, graphs' storage and stored codes are searched and read back directly, in
        # the input space: a transform in front (PCA, OPQ, random rotation) would give them other vectors
        raise UsageError(f"FAISS factory {factory!r} starts with a vector transform ({factory.split(',')[0]}), "
                         "which mmretrieve's segments do not support; give the index part alone (e.g. "
                         f"{','.join(factory.split(',')[1:]) or 'IVF1024,PQ32'!r})")
    return index


def is_ivf(index) -> bool:
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def train_template(template, vectors: np.ndarray, factory: str):
    if template.is_trained:
        return template
    try:
        template.train(np.ascontiguousarray(vectors, dtype=np.float32))
    except RuntimeError as e:
        raise UsageError(
            f"FAISS factory {factory!r} could not be trained on {len(vectors)} vectors: {str(e).strip().splitlines()[-1]}. "
            "Use fewer clusters / a smaller PQ, or 'Flat' for small collections") from None
    return template


def min_train_rows(template) -> int:
    """Rows a template wants before it is trained: FAISS's 39 per centroid (IVF lists, or PQ's 2**nbits
    codes); 0 when it needs no training."""
    if template.is_trained:
        return 0
    faiss = _faiss()
    try:
        return 39 * int(faiss.extract_index_ivf(template).nlist)
    except RuntimeError:
        pq = getattr(faiss.downcast_index(template), "pq", None)
        return 39 * (1 << int(pq.nbits)) if pq is not None else 39 * 256


def segment_index(template, vectors: np.ndarray, ids: np.ndarray):
    """A segment's FAISS index: a clone of the trained template holding ``vectors`` under ``ids``. IVF
    keeps ids natively (no direct map: its lists are memory-mapped when read, and a vector is read back
    through ``SegmentFiles.locate``); others go in an IDMap2."""
    faiss = _faiss()
    idx = faiss.clone_index(template)
    if is_ivf(idx):
        faiss.extract_index_ivf(idx).set_direct_map_type(faiss.DirectMap.NoMap)
        idx.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        return idx
    idx = faiss.IndexIDMap2(idx)
    if len(vectors):
        idx.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return idx


class SegmentBuilder:
    """The rows of one new segment, buffered until ``write``."""

    def __init__(self, sid: str, dim: int, *, kind: str = "flat", dtype: str = "float32",
                 patch_shape: tuple[int, int] | None = None, template=None) -> None:
        self.sid, self.dim, self.kind, self.dtype = sid, int(dim), kind, dtype
        self.patch_shape = patch_shape
        # FAISS segments take their rows as they come (a clone of the trained template): the rows are not
        # held a second time as float32 until the segment is written
        self._index = segment_index(template, np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)) \
            if kind != "flat" and template is not None else None
        self._ids: list[np.ndarray] = []
        self._vecs: list[np.ndarray] = []
        self._patches: list[np.ndarray] = []
        self._frames: list[np.ndarray] = []
        self._ts: list[np.ndarray] = []
        self.rows = 0
        self.frame_rows = 0
        self.nbytes = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray, patches: np.ndarray | None = None) -> int:
        """Buffer rows; returns the first row number they got."""
        first = self.rows
        self._ids.append(np.asarray(ids, dtype=np.int64))
        if self._index is not None:
            if len(ids):
                self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
        else:
            self._vecs.append(np.asarray(vectors, dtype=np.float32))
        if self.patch_shape is not None:
            if patches is None:
                raise UsageError("this index stores patch features: every added row needs its patches")
            self._patches.append(np.asarray(patches, dtype=np.float16))
        self.rows += len(ids)
        self.nbytes += len(ids) * self.dim * 4 + (self._patches[-1].nbytes if self._patches else 0)
        return first

    def add_frames(self, emb: np.ndarray, ts: np.ndarray) -> int:
        """Buffer one video's frames; returns their first frame row."""
        first = self.frame_rows
        self._frames.append(np.asarray(emb, dtype=np.float16))
        self._ts.append(np.asarray(ts, dtype=np.float32))
        self.frame_rows += len(emb)
        self.nbytes += self._frames[-1].nbytes
        return first

    def vectors(self) -> np.ndarray:
        return np.concatenate(self._vecs) if self._vecs else np.zeros((0, self.dim), np.float32)

    def write(self, root: Path, *, template=None) -> dict[str, Any]:
        """Write the segment's files and move them into ``segments/<sid>``; returns its manifest entry."""
        tmp = root / SEGMENTS / f".{self.sid}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            crash_point("before-index-write")
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            files = {"ids.npy": io.write_npy(tmp / "ids.npy", ids)}
            if self.kind == "flat":
                files["vectors.npy"] = io.write_npy(tmp / "vectors.npy", self.vectors().astype(self.dtype, copy=False))
            else:
                index = self._index if self._index is not None else segment_index(template, self.vectors(), ids)
                files["index.faiss"] = io.write_faiss(tmp / "index.faiss", index)
            if self.patch_shape is not None:
                pat = np.concatenate(self._patches) if self._patches else np.zeros((0, *self.patch_shape), np.float16)
                files["patches.npy"] = io.write_npy(tmp / "patches.npy", pat)
            if self._frames:
                files["frames.npy"] = io.write_npy(tmp / "frames.npy", np.concatenate(self._frames))
                files["frames_ts.npy"] = io.write_npy(tmp / "frames_ts.npy", np.concatenate(self._ts))
            crash_point("after-index-write")
            io.fsync_dir(tmp)
            crash_point("before-version-rename")
            os.rename(tmp, segment_dir(root, self.sid))
            io.fsync_dir(root / SEGMENTS)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"id": self.sid, "kind": self.kind, "dtype": self.dtype if self.kind == "flat" else None,
                "rows": self.rows, "frames": self.frame_rows, "deleted": 0, "deletions": None, "files": files}


def write_deletions(root: Path, sid: str, version: str, rows: np.ndarray) -> tuple[str, dict]:
    """A segment's deletion file for ``version`` (sorted rows): (file name, its size + sha256)."""
    name = f"del-{version}.npy"
    return name, io.write_npy(segment_dir(root, sid) / name, np.asarray(rows, dtype=np.int64))


# ---- reading --------------------------------------------------------------------------------------
def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        with open(path, "rb") as fh:
            return io.npy_header(fh, path)
    except OSError as e:
        raise IndexCorruptedError(f"{path}: unreadable ({e.strerror or e})") from None


def read_deletions(root: Path, entry: dict[str, Any]) -> np.ndarray:
    """The rows a version deletes from a segment (its deletion file, read whole and checked against the
    sha256 the manifest recorded: a damaged one would bring deleted rows back or point outside the
    segment)."""
    name = entry.get("deletions")
    if not name:
        return np.zeros(0, np.int64)
    path = segment_dir(Path(root), entry["id"]) / name
    rows = io.load_npy(path, entry.get("deletions_file"))
    n = int(entry["rows"])
    if rows.dtype != np.int64 or rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)) or (
            len(rows) > 1 and (np.diff(rows) <= 0).any()):
        raise IndexCorruptedError(f"{path}: not a sorted list of rows of a segment of {n} rows "
                                  f"({rows.dtype}, shape {rows.shape})")
    return rows


class SegmentFiles:
    """A written segment opened for reading (arrays memory-mapped on first use)."""

    def __init__(self, root: Path, entry: dict[str, Any], *, check: str = "fast") -> None:
        self.root, self.entry = Path(root), entry
        self.sid, self.kind, self.rows = entry["id"], entry["kind"], int(entry["rows"])
        self.dir = segment_dir(self.root, self.sid)
        if check != "none":
            self.check(full=check == "full")
        self._cache: dict[str, Any] = {}

    def files(self) -> dict[str, dict]:
        out = dict(self.entry["files"])
        if self.entry.get("deletions"):
            out[self.entry["deletions"]] = self.entry["deletions_file"]
        return out

    def check(self, *, full: bool = False) -> None:
        """Sizes and npy headers against the manifest entry; with ``full``, every byte's sha256."""
        for name, info in self.files().items():
            p = self.dir / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                raise IndexCorruptedError(f"{p}: missing (listed in the manifest)") from None
            if size != info["bytes"]:
                raise IndexCorruptedError(f"{p}: size {size} bytes, manifest says {info['bytes']} (truncated or replaced?)")
            if name.endswith(".npy"):
                shape, dtype, offset = _npy_header(p)
                if offset + int(np.prod(shape)) * dtype.itemsize != size:
                    raise IndexCorruptedError(f"{p}: {size} bytes, its header promises {offset + int(np.prod(shape)) * dtype.itemsize} "
                                              "(truncated?)")
                want = self.entry.get("frames") if name.startswith("frames") else (None if name.startswith("del-") else self.rows)
                if want is not None and (not shape or shape[0] != want):
                    raise IndexCorruptedError(f"{p}: {shape[0] if shape else 0} rows, manifest says {want}")
            if full and io.sha256_file(p) != info["sha256"]:
                raise IndexCorruptedError(f"{p}: sha256 does not match the manifest (file corrupted or modified)")

    def array(self, name: str, *, mmap: bool = True) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            arr = io.load_npy(self.dir / name, self.files().get(name), mmap=mmap)
            self._cache[name] = arr
        return arr

    @property
    def ids(self) -> np.ndarray:
        return self.array("ids.npy")

    @property
    def deleted(self) -> np.ndarray:
        arr = self._cache.get("deleted")
        if arr is None:
            arr = self._cache["deleted"] = read_deletions(self.root, self.entry)
        return arr

    def faiss_index(self, *, fresh: bool = False):
        """The segment's FAISS index, read once. IVF inverted lists are memory-mapped
        (``IO_FLAG_MMAP``: FAISS maps them as ``OnDiskInvertedLists`` over the file), so opening reads the
        header and quantizer only, and a search pages in the lists it probes. ``fresh``: another reading,
        not cached (with mapped lists it costs no copy)."""
        idx = None if fresh else self._cache.get("index.faiss")
        if idx is None:
            faiss = _faiss()
            try:
                idx = faiss.read_index(str(self.dir / "index.faiss"), faiss.IO_FLAG_MMAP)
            except RuntimeError as e:
                raise IndexCorruptedError(f"{self.dir / 'index.faiss'}: FAISS cannot read it "
                                          f"({str(e).strip().splitlines()[-1]})") from None
            if is_ivf(idx):
                inv = faiss.downcast_InvertedLists(faiss.extract_index_ivf(idx).invlists)
                if hasattr(inv, "prefetch_nthread"):
                    inv.prefetch_nthread = 0  # else every search starts 32 prefetch threads: 0.07 -> 0.36 ms measured
            if not fresh:
                self._cache["index.faiss"] = idx
        return idx

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IVF segments: the (list, offset) of each of ``ids`` in the inverted lists (the lists' ids are read
        once, on first use, into a sorted table: 16 bytes per row)."""
        table = self._cache.get("locations")
        if table is None:
            faiss = _faiss()
            ivf = faiss.extract_index_ivf(self.faiss_index())
            inv, found, lists, offs = ivf.invlists, [], [], []
            for lno in range(int(ivf.nlist)):
                n = inv.list_size(lno)
                if n:
                    found.append(faiss.rev_swig_ptr(inv.get_ids(lno), n).copy())
                    lists.append(np.full(n, lno, np.int64))
                    offs.append(np.arange(n, dtype=np.int64))
            all_ids = np.concatenate(found) if found else np.zeros(0, np.int64)
            order = np.argsort(all_ids, kind="stable")
            table = self._cache["locations"] = (all_ids[order], np.concatenate(lists)[order] if lists else all_ids,
                                                np.concatenate(offs)[order] if offs else all_ids)
        sorted_ids, lists, offs = table
        pos = np.searchsorted(sorted_ids, ids)
        if len(ids) and ((pos >= len(sorted_ids)).any() or (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] != ids).any()):
            raise IndexCorruptedError(f"{self.dir / 'index.faiss'}: ids listed in ids.npy are missing from its lists")
        return lists[pos], offs[pos]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (float32; FAISS segments reconstruct them by id)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.kind == "flat":
            return np.asarray(self.array("vectors.npy")[rows], dtype=np.float32)
        faiss = _faiss()
        idx = self.faiss_index()
        out = np.zeros((len(rows), int(idx.d)), np.float32)
        ids = np.asarray(self.ids[rows], np.int64)
        ivf = faiss.extract_index_ivf(idx) if is_ivf(idx) else None
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap and int(ivf.d) != int(idx.d):
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # behind a transform: FAISS maps it back
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            lists, offs = self.locate(ids)
            for j in range(len(rows)):
                ivf.reconstruct_from_offset(int(lists[j]), int(offs[j]), faiss.swig_ptr(out[j]))
            return out
        for j, i in enumerate(ids):
            out[j] = idx.reconstruct(int(i))
        return out

    def exact(self) -> bool:
        """Whether ``vectors`` returns the stored embeddings exactly (Flat fp32, HNSW-Flat)."""
        if self.kind == "flat":
            return self.entry.get("dtype", "float32") == "float32"
        faiss = _faiss()
        inner = faiss.downcast_index(self.faiss_index().index) if hasattr(self.faiss_index(), "id_map") else self.faiss_index()
        return isinstance(inner, faiss.IndexFlat) or (
            hasattr(inner, "hnsw") and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat))


__all__ = ["SegmentBuilder", "SegmentFiles", "write_deletions", "read_deletions", "new_template", "train_template", "segment_index",
           "is_flat_factory", "is_ivf", "metric_type"]
