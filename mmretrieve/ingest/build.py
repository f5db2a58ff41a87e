"""The write front doors: ``build_index``, ``add_to_index``, ``remove_from_index``.

Each one checks what it can before any model loads (the source exists, the index exists or not, the
encoder matches the index), then runs the ingest stages into one ``IndexWriter`` and publishes one new
version (or nothing, on any error, and in strict mode on any skipped input).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmretrieve.encoders import DEFAULT_ENCODER, create_encoder
from mmretrieve.errors import DeviceError, IndexExistsError, InputError, SkippedInputsError, UsageError
from mmretrieve.ingest.options import BuildOptions
from mmretrieve.ingest.ray_engine import check_engine
from mmretrieve.ingest.report import IngestReport
from mmretrieve.ingest.stages import UnitEnd, duplicate_key, run_stages, skipped_of
from mmretrieve.media.scan import ScanResult, SourceItem
from mmretrieve.media.shards import split_member_uri
from mmretrieve.media.sources import BuildSource, Unit, open_source
from mmretrieve.runtime import progress_disable
from mmretrieve.store import IndexWriter, read_manifest, resolve_index_path, resolve_item
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
    overwrite: bool = False,
    resume: bool | None = None,
    options: BuildOptions | None = None,
    **kw: Any,
) -> IngestReport:
    """Index every image and video of ``source``: a folder (recursively), a CSV/JSONL manifest, webdataset
    tar shards (a file, a folder of them, a brace pattern ``shards/{00000..00123}.tar``) or parquet files.

    ``encoder``: a name (``embedded``, ``open_clip:ViT-B-32@laion2b_s34b_b79k``, a preset) or an
    ``Encoder``. How the index is made and the build runs is a ``BuildOptions`` (``options``), or its
    fields as keywords (``patches=True``, ``video={"num_frames": 16}``, ``batch_size=64``, ``engine="ray"``,
    ...; see ``BuildOptions``); an unknown keyword is refused with the list of valid ones.

    Progress is committed per shard (or per ``unit_items`` files of a folder or manifest, default
    1024), so a build killed at any point and run again skips what is committed and ends with the same
    items and vectors as an uninterrupted one. ``resume`` (default: when the index exists and was being
    built from the same source) continues such a build; ``resume=False`` refuses an existing index
    (``overwrite`` starts again). ``strict`` publishes all or nothing, so a strict build is not
    resumable.
    """
    from mmretrieve.media.video import resolve_video_config

    t0 = time.perf_counter()
    opts = BuildOptions.of(options, where="build_index", **kw)
    path = resolve_index_path(name_or_path, index_dir)
    check_engine(opts.engine)
    prev = None if overwrite or not (path / MANIFEST).is_file() else read_manifest(path)
    state = _resumable(prev, path, resume) if prev is not None else None  # refused before the source is read
    src = open_source(source)  # a wrong source is reported before any model is loaded
    shape = {"factory": opts.factory, "video": resolve_video_config(opts.video), "vector_dtype": opts.vector_dtype}
    if state is not None:
        _check_resume(path, state, src, shape, bool(opts.patches))
        if state.get("complete") and isinstance(encoder, str) and encoder == prev["encoder"].get("name"):
            return _up_to_date(src, path, opts.engine, prev, t0)  # nothing to do: no model is loaded
    enc = _encoder(encoder)
    shape["patches"] = patch_config(enc, opts.patches)
    report = _report(src, path, opts.engine)
    if state is not None:
        check_encoder_compat(prev["encoder"], enc.info.to_dict(), path)
        _check_same_options(path, state.get("options") or {}, shape)
        if state.get("complete"):
            return _up_to_date(src, path, opts.engine, prev, t0)
        writer = IndexWriter(path, encoder_info=enc.info.to_dict(), retain=opts.retain)
    else:
        writer, state = _new_build(path, src, enc, shape, overwrite=overwrite, retain=opts.retain)
    run = _Run(writer, enc, report, opts, state=state)
    run.execute(src, select=prev is not None, t0=t0)
    return report


def add_to_index(
    name_or_path: str | os.PathLike,
    source: str | os.PathLike,
    *,
    encoder=None,
    index_dir: str | os.PathLike | None = None,
    prune: bool = True,
    include_removed: bool = False,
    options: BuildOptions | None = None,
    **kw: Any,
) -> IngestReport:
    """Encode only the new or changed files of ``source`` and publish them (per unit, as a build does: an
    interrupted add run again encodes only what was not committed). How it runs: ``BuildOptions`` or its
    run fields as keywords (the index keeps its own factory, patches, video and dtype).

    ``prune`` (a folder source): items indexed from this folder whose file is gone are removed and
    listed in ``report.pruned``; ``prune=False`` keeps them. (Items of other sources, and items a
    manifest named by an explicit id, are never pruned by a folder.)

    Files ``index rm`` removed are not added back while they are unchanged: they are listed in
    ``report.not_readded``; ``include_removed=True`` adds them (and forgets that they were removed)."""
    run_fields = tuple(n for n in BuildOptions.names() if n not in BuildOptions.INDEX_SHAPE)
    opts = BuildOptions.of(options, where="add_to_index (the index keeps its own factory, patches, video and dtype)",
                           allowed=run_fields, **kw)
    path = resolve_index_path(name_or_path, index_dir)
    manifest = read_manifest(path)  # a missing index is reported before any model loads
    t0 = time.perf_counter()
    check_engine(opts.engine)
    src = open_source(source)
    enc = _encoder(manifest["encoder"]["name"] if encoder is None else encoder)
    check_encoder_compat(manifest["encoder"], enc.info.to_dict(), path)
    report = _report(src, path, opts.engine)
    folder = Path(source).expanduser()
    root = folder.resolve() if prune and src.kind == "folder" else None
    writer = IndexWriter(path, encoder_info=enc.info.to_dict())
    run = _Run(writer, enc, report, opts, state=None)
    run.removed = {} if include_removed else writer.meta.removed_fingerprints()
    run.execute(src, select=True, t0=t0, prune=(root, {it.key for it in src.scan.items}) if root else None)
    return report


def _report(src: BuildSource, path: Path, engine: str) -> IngestReport:
    scan = src.scan
    if scan is None:  # shards: counted as they are read
        return IngestReport(index_path=str(path), engine=engine)
    return IngestReport(scanned=scan.count, ignored=scan.ignored, index_path=str(path), aliases=list(scan.aliases),
                        engine=engine)


def _resumable(prev: dict, path: Path, resume: bool | None) -> dict:
    """The build state of an existing index that ``index build`` may continue, or the reason it may not."""
    state = prev.get("build")
    if resume is False or not state:
        why = "" if resume is False else " (it was not made by a resumable build)"
        raise IndexExistsError(f"index {path} already exists{why}; use `mmretrieve index add` to update it or "
                               "--overwrite to rebuild")
    return dict(state)


def _check_resume(path: Path, state: dict, src: BuildSource, options: dict, patches: bool) -> None:
    """The same source and the same options as the build being continued (checked before any model
    loads: the patch configuration, which needs the encoder, only for being asked or not)."""
    if state.get("identity") != src.identity:
        raise IndexExistsError(f"index {path} already exists and was built from {state.get('source')}, not {src.display}; "
                               "use `mmretrieve index add` to add this source or --overwrite to rebuild")
    _check_same_options(path, state.get("options") or {}, options)
    before = bool((state.get("options") or {}).get("patches"))
    if "patches" in (state.get("options") or {}) and before != patches:
        raise UsageError(f"index {path} is being built {'with' if before else 'without'} patch features, this command "
                         f"asks {'for them' if patches else 'for none'}: run the same command to resume, or --overwrite "
                         "to start again")


def _new_build(path: Path, src: BuildSource, enc, options: dict, *, overwrite: bool, retain) -> tuple[IndexWriter, dict]:
    """The writer of a new index and the build state its manifests will carry."""
    writer = IndexWriter(path, encoder_info=enc.info.to_dict(), factory=options["factory"], patches=options["patches"],
                         video=options["video"], create=True, overwrite=overwrite, vector_dtype=options["vector_dtype"],
                         retain=retain)
    state = {"source": src.display, "identity": src.identity, "kind": src.kind, "units_done": 0, "complete": False,
             "options": json.loads(json.dumps(options))}
    return writer, state


def _up_to_date(src: BuildSource, path: Path, engine: str, prev: dict, t0: float) -> IngestReport:
    report = _report(src, path, engine)
    report.up_to_date, report.version = True, prev["version"]
    report.seconds = time.perf_counter() - t0
    return report


def _check_same_options(path: Path, before: dict, now: dict) -> None:
    now = json.loads(json.dumps(now))
    for k, v in now.items():
        if k in before and before[k] != v:
            raise UsageError(f"index {path} is being built with {k}={json.dumps(before[k])}, this command asks for "
                             f"{json.dumps(v)}: run the same command to resume, or --overwrite to start again")


def _decode_for(encoder, decode: str) -> str:
    """``auto`` decodes on the GPU when the encoder runs on CUDA and its preprocessing has a device
    equivalent; ``gpu`` without CUDA is refused."""
    from mmretrieve.encoders.device_transforms import device_transform

    on_cuda = str(getattr(encoder, "device", "cpu")).startswith("cuda")
    if decode == "gpu" and not on_cuda:
        raise DeviceError("--decode gpu needs the encoder on a CUDA device (this one runs on "
                          f"{getattr(encoder, 'device', 'cpu')}); use --decode cpu")
    if decode == "auto":
        return "gpu" if on_cuda and device_transform(encoder) is not None else "cpu"
    return decode


def scan_skips(scan: ScanResult) -> list[Skipped]:
    """The scan's entries that cannot be indexed, as skip records: files not found, then the rest with reasons."""
    return [skipped_of(it, "file not found") for it in scan.missing] + [skipped_of(it, why) for it, why in scan.skipped]


class _Run:
    """One build or add: the units of a source through the stages into one writer, a version published
    after each unit (none in strict mode until the end), and the final commit."""

    def __init__(self, writer: IndexWriter, encoder, report: IngestReport, opts: BuildOptions, *,
                 state: dict | None) -> None:
        self.writer, self.encoder, self.report = writer, encoder, report
        self.opts = replace(opts, decode=_decode_for(encoder, opts.decode))
        self.state = state
        self._fingerprints: tuple[dict, dict] | None = None
        #: an add: key -> (size, mtime) of the files ``index rm`` removed, which it does not bring back
        self.removed: dict | None = None
        self._seen: set[str] | None = None
        self._existing: set[str] | None = None

    def execute(self, src: BuildSource, *, select: bool, t0: float, prune: tuple[Path, set[str]] | None = None) -> None:
        writer, report = self.writer, self.report
        try:
            units = self._units(src, select)
            self._run_units(src, units)
            if self.opts.strict and report.skipped:
                raise SkippedInputsError(report)
            # an indexed item whose file is now broken or gone no longer stands for what is on disk
            stale = [(writer.meta.item_by_key(s.key), s) for s in report.skipped]
            stale_ids = [it.id for it, s in stale if it is not None and _same_place(it.uri, s.uri)]
            if stale_ids:
                report.stale_removed = _remove_items(writer, stale_ids)
            if prune is not None:
                report.pruned = _prune(writer, *prune, skip=set(stale_ids))
            if self.state is not None:
                self.state["complete"] = True
                writer.set_build_state(self.state)
            t = time.perf_counter()
            manifest = writer.commit()
            report.stages["commit"] = report.stages.get("commit", 0.0) + time.perf_counter() - t
        except BaseException:
            writer.abort()
            raise
        report.version = manifest["version"]
        report.seconds = time.perf_counter() - t0

    def _units(self, src: BuildSource, select: bool) -> list[Unit]:
        writer, report = self.writer, self.report
        if src.scan is not None:
            skips = scan_skips(src.scan)
            writer.record_skipped(skips)
            report.skipped.extend(skips)
        if src.sharded:
            start = int(self.state.get("units_done", 0)) if self.state is not None and select else 0
            if start and self.state.get("digest") != src.digest(start):
                raise InputError(f"the first {start} shard(s) of {src.display} changed since they were committed; "
                                 "--overwrite rebuilds the index from scratch")
            report.units_resumed = start
            return src.units(start=start)
        todo = src.scan.items
        if select:
            todo = list(self.select(todo))
            if self.state is not None:
                report.units_resumed = int(self.state.get("units_done", 0))
        return src.units(todo, unit_items=self.opts.unit_items)

    def _run_units(self, src: BuildSource, units: list[Unit]) -> None:
        total = None if src.sharded else sum(u.size or 0 for u in units)
        desc = "encoding" if not src.sharded else f"{len(units)} shard(s)"
        with tqdm(total=total, desc=desc, unit="item", disable=progress_disable(), leave=False) as bar:
            if self.opts.engine == "ray":
                from mmretrieve.ingest.ray_engine import run_units

                select = None
                if src.sharded and self.state is None:  # an add: samples already indexed unchanged are not written
                    select = self.select
                run_units(self.writer, units, self.encoder, self.report, self.opts,
                          on_unit_done=lambda u, last: self.unit_done(u, src, last=last), local=self._run_local,
                          bar=bar, select=select,
                          seen=self._keys_met() if src.sharded else None)
                return
            if src.sharded:  # one stream through one decoder pool, a unit published as its last batch is written
                last = units[-1] if units else None

                def stream():
                    for unit in units:
                        yield from self.stream(unit)
                        yield UnitEnd(unit)

                self._seen = self._keys_met()
                self._run_local(stream(), bar, on_unit_end=lambda u: self.unit_done(u, src, last=u is last))
                return
            for i, unit in enumerate(units):
                self._run_local(self.stream(unit), bar)
                self.unit_done(unit, src, last=i == len(units) - 1)

    def stream(self, unit: Unit):
        """A unit's items: a batch of files as a list; a shard as a stream (only its new or changed samples
        when adding to an index)."""
        if unit.items is not None:
            return unit.items
        samples = first_of_each_key(unit.read(), self._seen) if self._seen is not None else unit.read()
        if self.state is None:  # an add: samples already indexed unchanged are not decoded again
            return self.select(samples)
        return samples

    def select(self, items: Iterable) -> Iterator:
        """The new or changed ``items`` (``changed_only`` against the index as this run found it)."""
        return changed_only(items, *self._index_state(), self.report, removed=self.removed)

    def _index_state(self) -> tuple[dict, dict]:
        """The index's item and skip fingerprints as this run found them, read once (before it writes)."""
        if self._fingerprints is None:
            self._fingerprints = (self.writer.meta.fingerprints(), self.writer.meta.skipped_fingerprints())
        return self._fingerprints

    def _keys_met(self) -> set[str]:
        """The keys a shard stream has met before its first sample: none for an add (its samples update
        the index's); for a build, those of the units committed before a resume, indexed or skipped."""
        if self.state is None:
            return set()
        prev = self.writer.prev
        if not int(self.state.get("units_done", 0)) or not prev:  # a new build (--overwrite too): none met yet
            return set()
        return set(self._index_state()[0]) | self.writer.meta.skipped_keys(until=float(prev["updated_at"]))

    def _run_local(self, items, bar, on_unit_end=None) -> None:
        """The local engine on some items (the Ray engine's videos go this way too)."""
        n_before = self.report.encoded + len(self.report.skipped) + self.report.unchanged
        if self._existing is None:  # read once per run, not once per unit of 1024 files
            self._existing = set(self._index_state()[0])
        o = self.opts
        run_stages(self.writer, items, self.encoder, self.report, batch_size=o.batch_size, workers=o.workers,
                   on_bad_vectors=o.on_bad_vectors, image_timeout=o.image_timeout, decode=o.decode, bar=bar,
                   on_unit_end=on_unit_end, existing=self._existing)
        if not isinstance(items, list):  # a shard: its samples are counted as they are read
            self.report.scanned += self.report.encoded + len(self.report.skipped) + self.report.unchanged - n_before

    def unit_done(self, unit: Unit, src: BuildSource | None = None, *, last: bool = False) -> None:
        """All of ``unit`` is written: publish it (unless it is the last, which the final commit publishes;
        in strict mode; or while a FAISS quantizer waits for the rows to train on)."""
        if self.state is not None:
            self.state["units_done"] = int(self.state.get("units_done", 0)) + 1 if unit.items is not None else unit.index + 1
            if unit.shard is not None and src is not None:
                self.state["digest"] = src.digest(unit.index + 1)
        if last or self.opts.strict or not self.writer.ready_to_checkpoint():
            return
        t = time.perf_counter()
        self.writer.checkpoint(self.state)
        self.report.units_committed += 1
        self.report.stages["commit"] = self.report.stages.get("commit", 0.0) + time.perf_counter() - t


def remove_from_index(
    name_or_path: str | os.PathLike, keys_or_ids: Sequence[int | str], *, index_dir: str | os.PathLike | None = None
) -> int:
    """Remove items by id, key, or file path; publishes a new version. Returns the number removed.

    The removal is remembered: ``add_to_index`` of their folder (or manifest) does not add these files
    back while they are unchanged, unless asked to (``include_removed``)."""
    path = resolve_index_path(name_or_path, index_dir)
    writer = IndexWriter(path)
    try:
        ids = [resolve_item(writer.meta, k, path) for k in keys_or_ids]
        items = writer.meta.items_by_ids(ids).values()
        n = _remove_items(writer, ids)
        writer.meta.record_removed(items)  # in the same transaction: an add of their folder leaves them out
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
    """Remove the items of folder ``root`` the scan no longer finds (keyed by their path, under ``root`` or
    reached through a symbolic link under it, not in ``found``) and forget the skip records of files that
    are gone; returns the removed items' paths."""
    prefix = str(root).rstrip(os.sep) + os.sep

    def under(uri: str) -> bool:
        return uri.startswith(prefix)

    gone = [it for it in writer.meta.iter_items() if it.kind != "frame" and it.key == it.uri
            and (under(it.uri) or under(str(it.extra.get("symlink") or ""))) and it.key not in found and it.id not in skip]
    if gone:
        _remove_items(writer, [it.id for it in gone])
    current = {s.key for s in writer.meta.skipped() if under(s.uri) and s.key not in found and not os.path.lexists(s.uri)}
    writer.meta.forget_skipped(sorted(current))
    return [it.uri for it in gone]


def select_changed(scan_items: Sequence[SourceItem], fingerprints: dict, skipped_fp: dict, report: IngestReport, *,
                   removed: dict | None = None) -> list[SourceItem]:
    """Only new or changed items: the file's size or mtime, its path, or its caption differ (a manifest
    may point a key at another file, or edit a caption). A file found bad (not an image, corrupt) is tried
    again only when it changed; one whose decoder crashed, was killed, hung or stopped answering (a
    transient skip) is tried again every time. ``removed``: files ``index rm`` removed (key -> size and
    mtime then), left out while unchanged and listed in ``report.not_readded``."""
    return list(changed_only(scan_items, fingerprints, skipped_fp, report, removed=removed))


def first_of_each_key(items: Iterable, seen: set[str]) -> Iterator:
    """A shard stream where a key met again (in ``seen``, which grows) becomes an ``(item, reason)`` skip
    named by its own uri, so it never stands for (or removes) the sample that has the key. Before the
    add's unchanged filter: whether the first sample changed does not decide which one keeps the key."""
    for it in items:
        item = it[0] if isinstance(it, tuple) else it
        if item.key in seen:  # broken or not, it is a repeat (the Ray engine, which decodes first, agrees)
            yield replace(item, key=str(item.uri), data=None), duplicate_key(item.key)
            continue
        seen.add(item.key)
        yield it


def _same_place(item_uri: str, skip_uri: str) -> bool:
    """Whether a skip is about the place an indexed item came from: its file (the key is the path), or
    a sample of the same shard (a sample elsewhere with the same key says nothing about this one)."""
    a, b = split_member_uri(item_uri), split_member_uri(skip_uri)
    if a is None and b is None:
        return True
    return a is not None and b is not None and a[0] == b[0]


def changed_only(items: Iterable, fingerprints: dict, skipped_fp: dict, report: IngestReport, *,
                 removed: dict | None = None) -> Iterator:
    """``select_changed`` over a stream (a shard's samples); ``(item, reason)`` pairs pass through."""
    for it in items:
        if isinstance(it, tuple):
            yield it
            continue
        fp = fingerprints.get(it.key)
        if fp is not None and fp[1] == it.size and fp[2] == it.mtime and fp[3] == it.uri and fp[4] == it.caption:
            report.unchanged += 1
            continue
        sk = skipped_fp.get(it.key)
        if fp is None and sk is not None and not sk[2] and sk[:2] == (it.size, it.mtime):
            report.unchanged += 1  # a file found bad stays skipped until it changes; a decoder's failure is retried
            continue
        if fp is None and removed and removed.get(it.key) == (it.size, it.mtime):
            report.not_readded.append(it.uri)  # ``index rm`` removed it; a changed file is new content
            continue
        yield it


__all__ = ["build_index", "add_to_index", "remove_from_index", "select_changed", "changed_only"]
