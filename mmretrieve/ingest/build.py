"""The write front doors: ``build_index``, ``add_to_index``, ``remove_from_index``.

Each one checks what it can before any model loads (the source exists, the index exists or not, the
encoder matches the index), then runs the ingest stages into one ``IndexWriter`` and publishes one new
version (or nothing, on any error, and in strict mode on any skipped input).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from mmretrieve.encoders import DEFAULT_ENCODER, create_encoder
from mmretrieve.errors import IndexExistsError, SkippedInputsError
from mmretrieve.ingest.report import IngestReport
from mmretrieve.ingest.stages import run_stages, skipped_of
from mmretrieve.media.scan import ScanResult, SourceItem, scan_source
from mmretrieve.store import DEFAULT_FACTORY, IndexWriter, read_manifest, resolve_index_path, resolve_item
from mmretrieve.store.layout import MANIFEST, check_encoder_compat
from mmretrieve.store.meta import Skipped
from mmretrieve.store.sidestores import patch_config

log = logging.getLogger(__name__)

def _encoder(encoder):
    return create_encoder(encoder) if isinstance(encoder, str) else encoder


def build_index(
    name_or_path: str | os.PathLike,
    source: str | os.PathLike,
    *,
    encoder=DEFAULT_ENCODER,
    index_dir: str | os.PathLike | None = None,
    factory: str = DEFAULT_FACTORY,
    patches: bool | dict = False,
    video: dict | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    on_bad_vectors: str = "error",
    strict: bool = False,
    vector_dtype: str = "float32",
    retain: int | None = None,
    image_timeout: float | None = None,
) -> IngestReport:
    """Index every image and video of ``source`` (a folder, recursively, or a CSV/JSONL manifest).

    ``encoder``: a name (``embedded``, ``open_clip:ViT-B-32@laion2b_s34b_b79k``, a preset) or an
    ``Encoder``. ``patches``: ``True`` stores the encoder's native patch grid (fp16) for the EMD reranker,
    or a dict ``{"grid": 4, "dim": 256}`` to pool the grid / project the features to fewer dimensions.
    ``video``: frame sampling and storage of videos, e.g. ``{"num_frames": 16}``, ``{"fps": 1,
    "max_frames": 64}``, ``{"frame_entries": True}`` (see ``mmretrieve.media.video.VIDEO_DEFAULTS``).
    ``vector_dtype``: ``float16`` halves a Flat index's memory and bandwidth (scores within 1e-3).
    ``retain``: how many versions the index keeps (default 2: the live one and the previous).
    ``image_timeout``: seconds one image may take to decode before its worker is killed (default 30); a
    decoder that fails, crashes, is killed or hangs costs only its own file, reported with the reason.
    """
    from mmretrieve.media.video import resolve_video_config

    t0 = time.perf_counter()
    path = resolve_index_path(name_or_path, index_dir)
    if (path / MANIFEST).is_file() and not overwrite:  # before any model loads
        raise IndexExistsError(f"index {path} already exists; use `mmretrieve index add` to update it or --overwrite to rebuild")
    scan = scan_source(source)  # a wrong source is reported before any model is loaded
    vcfg = resolve_video_config(video)
    enc = _encoder(encoder)
    pcfg = patch_config(enc, patches)
    report = IngestReport(scanned=scan.count, ignored=scan.ignored, index_path=str(path), aliases=list(scan.aliases))
    writer = IndexWriter(path, encoder_info=enc.info.to_dict(), factory=factory, patches=pcfg, video=vcfg, create=True,
                         overwrite=overwrite, vector_dtype=vector_dtype, retain=retain)
    _ingest_and_commit(writer, lambda: scan.items, scan_skips(scan), enc, report, batch_size=batch_size, workers=workers,
                       on_bad_vectors=on_bad_vectors, strict=strict, t0=t0, image_timeout=image_timeout)
    return report


def add_to_index(
    name_or_path: str | os.PathLike,
    source: str | os.PathLike,
    *,
    encoder=None,
    index_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    on_bad_vectors: str = "error",
    strict: bool = False,
    image_timeout: float | None = None,
    prune: bool = True,
) -> IngestReport:
    """Encode only the new or changed files of ``source`` and publish a new version.

    ``prune`` (a folder source): items indexed from this folder whose file is gone are removed and
    listed in ``report.pruned``; ``prune=False`` keeps them. (Items of other sources, and items a
    manifest named by an explicit id, are never pruned by a folder.)"""
    path = resolve_index_path(name_or_path, index_dir)
    manifest = read_manifest(path)  # a missing index is reported before any model loads
    t0 = time.perf_counter()
    scan = scan_source(source)
    enc = _encoder(manifest["encoder"]["name"] if encoder is None else encoder)
    check_encoder_compat(manifest["encoder"], enc.info.to_dict(), path)
    report = IngestReport(scanned=scan.count, ignored=scan.ignored, index_path=str(path), aliases=list(scan.aliases))
    src = Path(source).expanduser()
    root = src.resolve() if prune and src.is_dir() else None
    writer = IndexWriter(path, encoder_info=enc.info.to_dict())
    _ingest_and_commit(
        writer, lambda: select_changed(scan.items, writer.meta.fingerprints(), writer.meta.skipped_fingerprints(), report),
        scan_skips(scan), enc, report, batch_size=batch_size, workers=workers, on_bad_vectors=on_bad_vectors, strict=strict,
        t0=t0, image_timeout=image_timeout, prune=(root, {it.key for it in scan.items}) if root else None,
    )
    return report


def scan_skips(scan: ScanResult) -> list[Skipped]:
    """The scan's entries that cannot be indexed, as skip records: files not found, then the rest with reasons."""
    return [skipped_of(it, "file not found") for it in scan.missing] + [skipped_of(it, why) for it, why in scan.skipped]


def _ingest_and_commit(writer: IndexWriter, todo, skips: list[Skipped], enc, report: IngestReport, *, batch_size, workers,
                       on_bad_vectors, strict: bool, t0: float, image_timeout: float | None = None,
                       prune: tuple[Path, set[str]] | None = None) -> None:
    """The shared tail of build and add: record the scan's skips, ingest, prune (``(folder, keys found)``),
    publish (or abort on any error, and in strict mode on any skipped input)."""
    try:
        items = todo()
        writer.record_skipped(skips)
        report.skipped.extend(skips)
        run_stages(writer, items, enc, report, batch_size=batch_size, workers=workers, on_bad_vectors=on_bad_vectors,
                   image_timeout=image_timeout)
        if strict and report.skipped:
            raise SkippedInputsError(report)
        # an indexed item whose file is now broken or gone no longer stands for what is on disk
        stale = [writer.meta.item_by_key(s.key) for s in report.skipped]
        stale_ids = [it.id for it in stale if it is not None]
        if stale_ids:
            report.stale_removed = _remove_items(writer, stale_ids)
        if prune is not None:
            report.pruned = _prune(writer, *prune, skip=set(stale_ids))
        manifest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    report.version = manifest["version"]
    report.seconds = time.perf_counter() - t0


def remove_from_index(
    name_or_path: str | os.PathLike, keys_or_ids: Sequence[int | str], *, index_dir: str | os.PathLike | None = None
) -> int:
    """Remove items by id, key, or file path; publishes a new version. Returns the number removed."""
    path = resolve_index_path(name_or_path, index_dir)
    writer = IndexWriter(path)
    try:
        ids = [resolve_item(writer.meta, k, path) for k in keys_or_ids]
        n = _remove_items(writer, ids)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return n


def _remove_items(writer: IndexWriter, ids: list[int]) -> int:
    """Remove items (a video takes its frame entries along); returns how many of ``ids`` were removed."""
    videos = [it.key for it in writer.meta.items_by_ids(ids).values() if it.kind == "video"]
    frame_ids = [i for i in writer.meta.frame_item_ids(videos) if i not in set(ids)]
    return writer.remove(ids + frame_ids) - len(frame_ids)


def _prune(writer: IndexWriter, root: Path, found: set[str], *, skip: set[int]) -> list[str]:
    """Remove the items of folder ``root`` whose file is gone (keyed by their path, under ``root``, not in
    ``found``) and forget the skip records of files that are gone; returns the removed items' paths."""
    prefix = str(root).rstrip(os.sep) + os.sep

    def under(uri: str) -> bool:
        return uri.startswith(prefix)

    gone = [it for it in writer.meta.iter_items() if it.kind != "frame" and it.key == it.uri and under(it.uri)
            and it.key not in found and it.id not in skip]
    if gone:
        _remove_items(writer, [it.id for it in gone])
    current = {s.key for s in writer.meta.skipped() if under(s.uri) and s.key not in found and not os.path.lexists(s.uri)}
    writer.meta.forget_skipped(sorted(current))
    return [it.uri for it in gone]


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


__all__ = ["build_index", "add_to_index", "remove_from_index", "select_changed"]
