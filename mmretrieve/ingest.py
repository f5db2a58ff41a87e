"""Ingestion as stages: reader (decode in worker processes; errors become records) -> encoder -> writer.

Decoding and preprocessing run in ``torch.utils.data.DataLoader`` worker processes, overlapped with
encoding in the main process; a broken input becomes a ``Skipped`` record with its reason and never
stops the build.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmretrieve.encoders.base import Encoder
from mmretrieve.index.meta import Item, Skipped
from mmretrieve.media.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, BadImageError, load_image
from mmretrieve.media.scan import SourceItem

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Decoder processes: one per spare core, at least one (measured on 2 cores: 1 worker + 1 torch thread
    keeps the encoder busy; see ``mmretrieve bench ingest``)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, n - 1))


def progress_enabled() -> bool | None:
    """Progress bars follow the log level: hidden above INFO, auto (tty only) otherwise."""
    return None if logging.getLogger("mmretrieve").getEffectiveLevel() <= logging.INFO else True


@dataclass
class Decoded:
    item: SourceItem
    width: int
    height: int


@dataclass
class IngestReport:
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    #: items that were indexed but whose file is now broken or gone: removed, so search no longer returns them
    stale_removed: int = 0
    ignored: int = 0
    seconds: float = 0.0
    index_path: str | None = None
    version: str | None = None

    @property
    def encoded(self) -> int:
        return self.added + self.updated

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged", f"{len(self.skipped)} skipped"]
        if self.stale_removed:
            parts.append(f"{self.stale_removed} indexed item(s) removed (file now broken or missing)")
        if self.ignored:
            parts.append(f"{self.ignored} non-media files ignored")
        s = f"{self.scanned} scanned: " + ", ".join(parts) + f" in {self.seconds:.1f}s"
        if self.encoded:
            s += f" ({self.items_per_s:.1f} items/s)"
        return s

    def to_dict(self) -> dict:
        return {
            "index": self.index_path,
            "version": self.version,
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "ignored": self.ignored,
            "stale_removed": self.stale_removed,
            "skipped": [{"key": s.key, "uri": s.uri, "reason": s.reason} for s in self.skipped],
            "seconds": round(self.seconds, 3),
        }


class ImageReader(torch.utils.data.Dataset):
    """Decodes and preprocesses one item per call; failures are returned, not raised."""

    def __init__(self, items: Sequence[SourceItem], transform, formats=DEFAULT_FORMATS, max_pixels=DEFAULT_MAX_PIXELS):
        self.items = list(items)
        self.transform = transform
        self.formats = formats
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        try:
            im = load_image(it.uri, formats=self.formats, max_pixels=self.max_pixels,
                            draft_size=getattr(self.transform, "draft_size", None))
            w, h = im.size
            return i, self.transform(im), None, w, h
        except BadImageError as e:
            return i, None, e.reason, 0, 0
        except Exception as e:  # a bug in a decoder must not end the build either
            return i, None, f"unexpected error while decoding: {type(e).__name__}: {e}", 0, 0


def _collate(batch):
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def iter_encoded(
    items: Sequence[SourceItem],
    encoder: Encoder,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    patches: bool = False,
    patch_grid: int | None = None,
    desc: str = "encoding",
) -> Iterator[tuple[list[Decoded], np.ndarray, np.ndarray | None, list[Skipped]]]:
    """Decode in workers, encode in batches. Yields ``(decoded, embeddings, patches_or_None, skipped)``."""
    bs = batch_size or encoder.batch_size
    workers = default_workers() if workers is None else workers
    ds = ImageReader(items, encoder.image_transform)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=bs,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        multiprocessing_context="fork" if workers and hasattr(os, "fork") else None,
    )
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=progress_enabled(), leave=False)
    try:
        for batch in loader:
            good, tensors, bad = [], [], []
            for i, tensor, reason, w, h in batch:
                it = ds.items[i]
                if tensor is None:
                    bad.append(Skipped(it.key, it.uri, reason, it.size, it.mtime))
                    log.warning("skipped %s: %s", it.uri, reason)
                else:
                    good.append(Decoded(it, w, h))
                    tensors.append(tensor)
            emb = pat = None
            if tensors:
                out = encoder.encode_image_tensors(torch.stack(tensors), patches=patches, patch_grid=patch_grid)
                emb, pat = out if patches else (out, None)
            else:
                emb = np.zeros((0, encoder.dim), np.float32)
            bar.update(len(batch))
            yield good, emb, pat, bad
    finally:
        bar.close()


def to_item(d: Decoded) -> Item:
    it = d.item
    return Item(
        id=-1, key=it.key, uri=it.uri, kind=it.kind, size=it.size, mtime=it.mtime, caption=it.caption,
        width=d.width, height=d.height, extra=dict(it.extra),
    )


def ingest(
    writer,
    items: Sequence[SourceItem],
    encoder: Encoder,
    report: IngestReport,
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    on_bad_vectors: str = "error",
) -> None:
    """Encode ``items`` and add them to ``writer`` (an ``IndexWriter``), recording skips in ``report``.
    Images are decoded by a DataLoader's workers; videos by a ``TimeoutPool`` (see ``video_ingest``)."""
    videos = [it for it in items if it.kind == "video"]
    items = [it for it in items if it.kind != "video"]
    if videos:
        from mmretrieve.media.video_ingest import ingest_videos

        ingest_videos(writer, videos, encoder, report, batch_size=batch_size, workers=workers, on_bad_vectors=on_bad_vectors)
    if not items:
        return
    pcfg = writer.patch_cfg
    with_patches = pcfg is not None
    proj = None
    if with_patches:
        proj = _patch_projection(writer)
        n_p = int(pcfg["grid"]) ** 2
        writer.begin_patch_segment(len(items), n_p, int(pcfg["dim"]))
    existing = writer.meta.fingerprints()
    for decoded, emb, pat, bad in iter_encoded(
        items, encoder, batch_size=batch_size, workers=workers, patches=with_patches,
        patch_grid=int(pcfg["grid"]) if with_patches else None,
    ):
        if bad:
            writer.record_skipped(bad)
            report.skipped.extend(bad)
        if not decoded:
            continue
        if proj is not None and pat is not None:
            pat = pat @ proj
            pat /= np.maximum(np.linalg.norm(pat, axis=-1, keepdims=True), 1e-12)
        stored = writer.add([to_item(d) for d in decoded], emb, pat, on_bad_vectors=on_bad_vectors)
        for it in stored:
            if it.key in existing:
                report.updated += 1
            else:
                report.added += 1


def _patch_projection(writer) -> np.ndarray | None:
    """Optional fixed random orthogonal projection of patch features to ``patches.dim`` (stored with the index)."""
    pcfg = writer.patch_cfg
    if not pcfg.get("projection"):
        return None
    fname = pcfg["projection"]
    path = Path(writer.tmpdir) / fname
    if path.exists():
        return np.load(path, allow_pickle=False)
    src, dst = int(pcfg["native_dim"]), int(pcfg["dim"])
    rng = np.random.default_rng(int(pcfg.get("seed", 0)))
    q, _ = np.linalg.qr(rng.standard_normal((src, dst)))
    proj = q.astype(np.float32)
    with open(path, "wb") as fh:
        np.save(fh, proj, allow_pickle=False)
    return proj


def select_changed(scan_items: Sequence[SourceItem], fingerprints: dict, skipped_fp: dict, report: IngestReport) -> list[SourceItem]:
    """Only new or changed items: the file's size or mtime, its path, or its caption differ (a manifest
    may point a key at another file, or edit a caption); previously broken files retry only when changed."""
    todo = []
    for it in scan_items:
        fp = fingerprints.get(it.key)
        if fp is not None and fp[1] == it.size and fp[2] == it.mtime and fp[3] == it.uri and fp[4] == it.caption:
            report.unchanged += 1
            continue
        sk = skipped_fp.get(it.key)
        if fp is None and sk is not None and sk == (it.size, it.mtime):
            report.unchanged += 1
            continue
        todo.append(it)
    return todo


__all__ = ["IngestReport", "ImageReader", "iter_encoded", "ingest", "select_changed", "default_workers"]
