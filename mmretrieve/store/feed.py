"""Added rows on their way into segments (a write session's buffer).

``check_batch`` checks an added batch (shapes, bad vectors, duplicate keys). ``RowFeed`` buffers the
rows in the open segment (``SegmentBuilder``), written and replaced by a new one each ``rows`` rows (or
``nbytes`` bytes). A non-Flat factory clones every segment from one trained, empty FAISS index (the
template, ``template.faiss``): while it is untrained, rows wait until there are enough to train it on
(``ready``) or until the session publishes (``finish``); the template is trained once, on that sample,
and every later segment is added with it (FAISS's sharded-build recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmretrieve.errors import BadVectorsError, IndexCorruptedError, UsageError
from mmretrieve.store import io
from mmretrieve.store.layout import TEMPLATE
from mmretrieve.store.meta import Item, MetaDB, Skipped
from mmretrieve.store.segments import (
    SegmentBuilder,
    is_flat_factory,
    min_train_rows,
    new_template,
    train_template,
)

log = logging.getLogger(__name__)

#: a new segment is started once the buffered one holds this many rows or bytes
SEGMENT_ROWS = 200_000
SEGMENT_BYTES = 512 << 20


def check_batch(items: list[Item], vectors, patches, frames, *, dim: int, has_patches: bool, on_bad_vectors: str,
                skip: Callable[[list[Skipped]], None]):
    """The batch as float32 rows of ``dim``; NaN/inf/zero-norm rows raise, or (``on_bad_vectors="drop"``)
    are dropped and passed to ``skip``. Returns ``(items, vectors, patches, frames)``."""
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise BadVectorsError(f"expected vectors of shape (n, {dim}), got {vectors.shape}")
    if len(items) != len(vectors):
        raise BadVectorsError(f"{len(items)} items but {len(vectors)} vectors")
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~np.isfinite(vectors).all(axis=1) | ~np.isfinite(norms) | (norms < 1e-6)
    if bad.any():
        idx = np.flatnonzero(bad)
        if on_bad_vectors != "drop":
            raise BadVectorsError(f"{len(idx)} embedding(s) are NaN, infinite or zero, e.g. for {items[idx[0]].uri}; "
                                  "pass on_bad_vectors='drop' to skip them")
        skip([Skipped(items[i].key, items[i].uri, "bad embedding (NaN, inf or zero norm)", items[i].size,
                      items[i].mtime) for i in idx])
        keep = np.flatnonzero(~bad)
        items, vectors = [items[i] for i in keep], vectors[keep]
        patches = patches[keep] if patches is not None else None
        frames = [frames[i] for i in keep] if frames is not None else None
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UsageError(f"duplicate key {dup!r} in one add")
    if patches is not None and not has_patches:
        raise UsageError("this index has no patch store; build it with patches enabled")
    return items, vectors, patches, frames


def train_sample_rows(template) -> int:
    """Rows an untrained template is trained on: FAISS's own cap (k-means subsamples to 256 points per
    centroid, for the IVF lists and for PQ's codes alike), and never fewer than it wants (``min_train_rows``)."""
    return max(min_train_rows(template), (min_train_rows(template) // 39) * 256)


def _sample(chunks: list[np.ndarray], n: int) -> np.ndarray:
    """At most ``n`` rows spread evenly over ``chunks`` (all of them when they hold fewer), copied once."""
    total = sum(len(c) for c in chunks)
    if total <= n:
        return np.concatenate(chunks)
    want = np.linspace(0, total - 1, n).astype(np.int64)
    out, start = [], 0
    for c in chunks:
        sel = want[(want >= start) & (want < start + len(c))] - start
        out.append(np.asarray(c[sel], np.float32))
        start += len(c)
    return np.concatenate(out)


class RowFeed:
    """Rows on their way into segments. ``manifest``: the draft's fields (the template's file is noted in
    its ``files``); ``open_segment()``: a new segment's id, noted by the session."""

    def __init__(self, root: Path, manifest: dict, meta: MetaDB, open_segment: Callable[[], str], *,
                 rows: int = SEGMENT_ROWS, nbytes: int = SEGMENT_BYTES) -> None:
        self.root, self.manifest, self.meta, self._open_segment = Path(root), manifest, meta, open_segment
        self.rows, self.nbytes = int(rows), int(nbytes)
        self.written: list[dict] = []  # entries of the segments written since the last ``finish``
        self._template = None
        self._builder: SegmentBuilder | None = None
        self._pending: list[tuple[list[Item], np.ndarray, np.ndarray | None, list | None]] = []

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def flat(self) -> bool:
        return is_flat_factory(self.manifest["factory"])

    def template(self):
        """The trained empty FAISS index every segment is cloned from (read from ``template.faiss``)."""
        if self._template is None:
            import faiss

            p = self.root / TEMPLATE
            if TEMPLATE in self.manifest["files"] and p.exists():
                data = io.read_checked(p, self.manifest["files"][TEMPLATE])
                try:
                    self._template = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
                except RuntimeError as e:
                    raise IndexCorruptedError(f"{p}: FAISS cannot read it ({str(e).strip().splitlines()[-1]})") from None
            else:
                self._template = new_template(self.dim, self.manifest["factory"], self.manifest["metric"])
        return self._template

    def ready(self) -> bool:
        """Whether publishing now keeps the index's quality: an untrained template waits for the rows
        FAISS wants to train it (``min_train_rows``)."""
        if self.flat or not self._pending:
            return True
        return sum(len(v) for _, v, _, _ in self._pending) >= min_train_rows(self.template())

    def put(self, items: list[Item], vectors: np.ndarray, patches, frames) -> None:
        """Buffer rows (each item gets its segment and row), or hold them for an untrained template."""
        if self.flat or self.template().is_trained:
            self._buffer(items, vectors, patches, frames)
        else:  # an untrained IVF/PQ template trains on the first rows, once there are enough to sample
            self._pending.append((items, vectors, patches, frames))
            if sum(len(v) for _, v, _, _ in self._pending) >= train_sample_rows(self.template()):
                self._train_pending()  # the rows then go on to segments: memory stays bounded

    def finish(self) -> list[dict]:
        """Train the template on the held rows, write the open segment; returns the entries of the
        segments written since the last ``finish``."""
        self._train_pending()
        self._flush()
        out, self.written = self.written, []
        return out

    def _train_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        vecs = _sample([v for _, v, _, _ in pending], train_sample_rows(self.template()))
        log.info("training FAISS index %s on %d vectors", self.manifest["factory"], len(vecs))
        train_template(self.template(), vecs, self.manifest["factory"])
        p = self.root / TEMPLATE
        tmp = p.with_name(p.name + ".new")
        self.manifest["files"][TEMPLATE] = io.write_faiss(tmp, self.template())
        tmp.replace(p)
        for items, v, pat, fr in pending:
            self._buffer(items, v, pat, fr)

    def _buffer(self, items: list[Item], vectors: np.ndarray, patches, frames) -> None:
        """Put rows into the open segment, starting a new one each ``rows`` rows (or ``nbytes`` bytes)."""
        s = 0
        while s < len(items):
            b = self._builder_for()
            e = min(len(items), s + self.rows - b.rows)
            self._buffer_into(b, items[s:e], vectors[s:e], patches[s:e] if patches is not None else None,
                              frames[s:e] if frames is not None else None)
            s = e

    def _buffer_into(self, b: SegmentBuilder, items: Sequence[Item], vectors, patches, frames) -> None:
        first = b.add(np.array([it.id for it in items], dtype=np.int64), vectors, patches)
        for j, (it, fr) in enumerate(zip(items, frames or [None] * len(items))):
            it.segment, it.row = b.sid, first + j
            if fr is not None:
                emb, ts = np.asarray(fr[0], dtype=np.float32), np.asarray(fr[1])
                if emb.ndim != 2 or emb.shape[1] != self.dim or len(ts) != len(emb):
                    raise BadVectorsError(f"frames of {it.uri}: expected ({len(ts)}, {self.dim}) embeddings, got {emb.shape}")
                it.frame_start, it.frame_count = b.add_frames(emb, ts), len(emb)
        self.meta.insert_items(items)
        if b.rows >= self.rows or b.nbytes >= self.nbytes:
            self._flush()

    def _builder_for(self) -> SegmentBuilder:
        if self._builder is None:
            pc = self.manifest.get("patches")
            self._builder = SegmentBuilder(self._open_segment(), self.dim, kind="flat" if self.flat else "faiss",
                                           dtype=self.manifest["vector_dtype"], template=None if self.flat else self.template(),
                                           patch_shape=(int(pc["grid"]) ** 2, int(pc["dim"])) if pc else None)
        return self._builder

    def _flush(self) -> None:
        b, self._builder = self._builder, None
        if b is None or not b.rows:
            return
        self.written.append(b.write(self.root, template=None if self.flat else self.template()))


__all__ = ["RowFeed", "check_batch", "train_sample_rows", "SEGMENT_ROWS", "SEGMENT_BYTES"]
