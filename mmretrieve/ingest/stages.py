"""Ingestion as stages, as clip-retrieval's inference runs it: readers -> mapper (the encoder) -> writer.

- **Readers** decode in worker processes and turn every failure into a ``Skipped`` record:
  ``read_images`` (workers run the encoder's picklable image transform) and ``read_videos``, both over a
  ``TimeoutPool``: a decoder that fails, hangs, crashes or is killed costs its own file only, and a
  fresh worker takes its place. Both yield ``Decoded`` batches.
- The **mapper** (``EncodeStage``) turns a decoded batch into an ``Encoded`` one: item rows, vectors and
  the optional patch features (projected as the index stores them) and video frames.
- The **writer** (``WriteStage``) adds encoded batches to an ``IndexWriter``, records skips and counts
  what was added or updated.

``run_stages`` wires them for one write. Images and videos are two readers feeding one writer.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmretrieve.encoders.base import Encoder
from mmretrieve.encoders.video import encode_frames, pool_video
from mmretrieve.errors import BadImageError, UsageError
from mmretrieve.ingest.report import IngestReport
from mmretrieve.media.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, load_image, load_image_bytes
from mmretrieve.media.scan import SourceItem
from mmretrieve.media.video import decode_video
from mmretrieve.media.workers import TaskFailure, TimeoutPool
from mmretrieve.results import printable
from mmretrieve.runtime import default_workers, progress_disable
from mmretrieve.store.meta import Item, Skipped
from mmretrieve.store.sidestores import project_patches

log = logging.getLogger(__name__)


# ---- what flows between the stages ---------------------------------------------------------------
@dataclass
class Decoded:
    """A reader's output: decoded inputs (tensors for images, a frame dict per video) and the skips."""

    kind: str  # "image" | "video"
    items: list[SourceItem]
    tensors: list[torch.Tensor] = field(default_factory=list)  # images: (3, H, W) uint8 each
    sizes: list[tuple[int, int]] = field(default_factory=list)  # images: (width, height)
    videos: list[dict[str, Any]] = field(default_factory=list)  # videos: decode_video's dicts
    skipped: list[Skipped] = field(default_factory=list)
    unit_ends: list[Any] = field(default_factory=list)  # units whose last input is in this batch


@dataclass
class Encoded:
    """A mapper's output: rows to store with their vectors (and optional patches / frames)."""

    items: list[Item]
    vectors: np.ndarray
    patches: np.ndarray | None = None
    frames: list[tuple[np.ndarray, np.ndarray] | None] | None = None
    #: extra rows that are not counted as items of the collection (a video's per-frame entries)
    entries: Encoded | None = None


def duplicate_key(key: str) -> str:
    """The reason a sample whose key an earlier one has is skipped."""
    return f"duplicate key {key!r}: an earlier sample has it (that one is kept)"


def skipped_of(it: SourceItem, reason: str, transient: bool = False) -> Skipped:
    """The skip record of ``it``; ``transient``: its decoder failed, not the file (tried again by an add)."""
    return Skipped(it.key, it.uri, reason, it.size, it.mtime, transient)


# ---- readers --------------------------------------------------------------------------------------
#: seconds one image may take to decode and preprocess before its worker is killed (``image_timeout``)
DEFAULT_IMAGE_TIMEOUT = 30.0


class DecodeImage:
    """Decode and preprocess one image (the picklable task a decoder worker runs): a file's uri, or a
    ``(uri, bytes)`` pair for an image held in memory (a shard sample).

    Returns ``(uint8 array (3, H, W), width, height)``; a bad image raises ``BadImageError`` with its
    reason. Arrays, not tensors, go back to the parent: they travel by value through the pipe, so a
    result sent just before its worker dies is still readable."""

    def __init__(self, transform, formats=DEFAULT_FORMATS, max_pixels=DEFAULT_MAX_PIXELS) -> None:
        self.transform = transform
        self.formats = formats
        self.max_pixels = max_pixels
        #: the test hook as it is now: it travels with the task (a forkserver's worker inherits no globals)
        self.hook = _DECODE_HOOK

    def __call__(self, job):
        uri, data = job if isinstance(job, tuple) else (job, None)
        if self.hook is not None:
            self.hook(uri)
        try:
            draft = getattr(self.transform, "draft_size", None)
            if data is not None:
                im = load_image_bytes(data, name=uri, formats=self.formats, max_pixels=self.max_pixels, draft_size=draft)
            else:
                im = load_image(uri, formats=self.formats, max_pixels=self.max_pixels, draft_size=draft)
            w, h = im.size
            return self.transform(im).numpy(), w, h
        except BadImageError:
            raise
        except Exception as e:  # a bug in a decoder must not end the build either
            raise BadImageError(uri, f"unexpected error while decoding: {type(e).__name__}: {e}") from None


#: tests set this to make a decoder worker crash, hang or be killed on chosen files (a picklable function:
#: the task made while it is set carries it to the workers)
_DECODE_HOOK = None
#: what decoder workers import before their first task (once, in the forkserver): their first image is
#: not also their first import of torch and PIL
_PRELOAD = ("mmretrieve.ingest.stages",)


def _preload(transform) -> tuple[str, ...]:
    """The modules decoder workers import up front: the stages' and the transform's (its class's module)."""
    return (*_PRELOAD, type(transform).__module__)


class DecodeVideo:
    """Sample and preprocess one video's frames (the picklable task a decoder worker runs); carries the
    video decoder's test hook as it was when the task was made (``mmretrieve.media.video._DECODE_HOOK``)."""

    def __init__(self, transform, sampling: dict) -> None:
        from mmretrieve.media import video

        self.transform, self.sampling, self.hook = transform, sampling, video._DECODE_HOOK

    def __call__(self, path: str) -> dict[str, Any]:
        from mmretrieve.media import video

        video._DECODE_HOOK = self.hook
        return decode_video(path, transform=self.transform, sampling=self.sampling)


def _one_thread(*_: Any) -> None:
    torch.set_num_threads(1)


@dataclass(frozen=True)
class UnitEnd:
    """A marker in a stream of items: everything before it belongs to ``unit`` (one shard). The readers
    cut their batch there, so the write stage can publish a unit as soon as its last batch is written
    while the decoders go on with the next one."""

    unit: Any


class _Feed:
    """Turns a stream of items (``(item, reason)`` pairs known bad, ``UnitEnd`` markers) into decoder jobs,
    keeping each job's item until its result is back, and the skips and unit ends in stream order."""

    def __init__(self, items: Iterable[SourceItem | tuple[SourceItem, str] | UnitEnd]) -> None:
        self.items = items
        self.pending: dict[int, SourceItem] = {}
        self.events: collections.deque = collections.deque()  # ("job", n) | ("skip", Skipped) | ("end", unit)
        self.n = 0

    def jobs(self) -> Iterator[str | tuple[str, bytes]]:
        for it in self.items:
            if isinstance(it, UnitEnd):
                self.events.append(("end", it.unit))
                continue
            if isinstance(it, tuple):
                self.events.append(("skip", skipped_of(*it)))
                log.warning("skipped %s: %s", printable(it[0].uri), printable(it[1]))
                continue
            self.pending[self.n] = it
            self.events.append(("job", self.n))
            self.n += 1
            yield it.uri if it.data is None else (it.uri, it.data)

    def batches(self, results: Iterable[tuple[int, Any]], batch_size: int) -> Iterator[Decoded]:
        """Results in job order (``(tensor, (w, h))`` or ``TaskFailure``) -> batches of ``batch_size``
        inputs, cut at each unit end; the skips go with the batch they came in the stream with."""
        out = Decoded("image", [])
        for i, res in results:
            while True:  # what came in the stream before job i
                kind, val = self.events.popleft()
                if kind == "job":
                    break
                if kind == "skip":
                    out.skipped.append(val)
                else:
                    out.unit_ends.append(val)
                    yield out
                    out = Decoded("image", [])
            it = self.pending.pop(i)
            if isinstance(res, TaskFailure):
                out.skipped.append(skipped_of(it, res.reason, res.transient))
                log.warning("skipped %s: %s", printable(it.uri), printable(res.reason))
            else:
                tensor, size = res
                out.items.append(it)
                out.tensors.append(tensor)
                out.sizes.append(size)
            if len(out.items) + len(out.skipped) >= batch_size:
                yield out
                out = Decoded("image", [])
        for kind, val in self.events:  # the stream is read to its end: what came after the last job
            if kind == "skip":
                out.skipped.append(val)
            elif kind == "end":
                out.unit_ends.append(val)
                yield out
                out = Decoded("image", [])
        self.events.clear()
        if out.items or out.skipped:
            yield out


def read_images(items: Iterable[SourceItem | tuple[SourceItem, str] | UnitEnd], transform, *, batch_size: int,
                workers: int | None = None, timeout: float | None = None) -> Iterator[Decoded]:
    """Decode images in worker processes (a ``TimeoutPool``), ``batch_size`` inputs per ``Decoded``.

    ``items`` may be a stream (a shard's samples, image bytes in ``data``; ``UnitEnd`` markers between
    shards): it is read as the workers need it, by one pool for the whole stream. A decoder that fails,
    crashes, is killed (e.g. out of memory) or takes longer than ``timeout`` seconds costs its own input
    only, reported with the reason; a fresh worker takes over."""
    n = default_workers() if workers is None else max(1, workers)
    depth = max(4, min(256, 4 * batch_size // n))  # keeps the workers decoding while a batch is encoded
    task = DecodeImage(transform)
    limit = DEFAULT_IMAGE_TIMEOUT if timeout is None else float(timeout)
    feed = _Feed(items)

    def results(pool) -> Iterator[tuple[int, Any]]:
        for i, res in pool.imap(task, feed.jobs()):
            yield i, res if isinstance(res, TaskFailure) else (torch.from_numpy(res[0]), (res[1], res[2]))

    with TimeoutPool(workers=n, timeout=limit, init=_one_thread, depth=depth, preload=_preload(transform)) as pool:
        yield from feed.batches(results(pool), batch_size)


def read_images_on_device(items: Iterable[SourceItem | tuple[SourceItem, str] | UnitEnd], encoder: Encoder, *,
                          batch_size: int) -> Iterator[Decoded]:
    """Decode batches of images on the encoder's device (``--decode gpu``): JPEGs in one batched
    ``decode_jpeg`` call there, the rest on the CPU with the safe loader, then the encoder's resize /
    crop as tensor operations on the device, so its input never goes back through the CPU. Runs in
    this process (CUDA does not survive a fork); reading the bytes is the only per-file CPU work."""
    from mmretrieve.encoders.device_transforms import device_transform
    from mmretrieve.media.gpu_decode import decode_batch

    tf = device_transform(encoder)
    if tf is None:
        raise UsageError(f"encoder {encoder.name!r} has a preprocessing without a device equivalent; use --decode cpu")
    feed = _Feed(items)

    def results() -> Iterator[tuple[int, Any]]:
        jobs = feed.jobs()
        while True:
            chunk = [j for _, j in zip(range(batch_size), jobs)]
            if not chunk:
                return
            first = feed.n - len(chunk)
            got: dict[int, Any] = {}
            idx, datas = [], []
            for j, job in enumerate(chunk):
                it = feed.pending[first + j]
                data, reason = (job[1], None) if isinstance(job, tuple) else _read_file(it)
                if data is None:
                    got[first + j] = TaskFailure(reason)
                else:
                    idx.append(first + j)
                    datas.append(data)
            res = decode_batch(datas, [feed.pending[i].uri for i in idx], device=encoder.device)
            for j, reason in res.failed:
                got[idx[j]] = TaskFailure(reason)
            if res.images:
                for j, t, size in zip(res.index, tf(res.images), res.sizes):
                    got[idx[j]] = (t, size)
            for i in range(first, first + len(chunk)):
                yield i, got[i]

    yield from feed.batches(results(), batch_size)


#: a file larger than this is not read into memory for device decoding (no photo is this large)
MAX_DEVICE_DECODE_BYTES = 256 << 20


def _read_file(it: SourceItem) -> tuple[bytes | None, str | None]:
    """A file's bytes for device decoding, or (None, the reason it is skipped)."""
    try:
        size = os.path.getsize(it.uri)
        if size > MAX_DEVICE_DECODE_BYTES:
            raise OSError(f"{size} bytes is over the {MAX_DEVICE_DECODE_BYTES} a photo may take")
        with open(it.uri, "rb") as fh:
            return fh.read(), None
    except OSError as e:
        return None, "file not found" if isinstance(e, FileNotFoundError) else f"cannot read file: {e.strerror or e}"


def read_videos(items: Sequence[SourceItem], transform, sampling: dict, *, workers: int | None = None) -> Iterator[Decoded]:
    """Sample and preprocess video frames in worker processes with a per-file timeout; one video per batch."""
    fn = DecodeVideo(transform, sampling)
    n = default_workers() if workers is None else max(1, workers)
    with TimeoutPool(workers=n, timeout=float(sampling["timeout"]), init=_one_thread,
                     preload=_preload(transform)) as pool:
        for i, res in pool.imap(fn, [v.uri for v in items]):
            src = items[i]
            if isinstance(res, TaskFailure):
                log.warning("skipped %s: %s", printable(src.uri), printable(res.reason))
                yield Decoded("video", [], skipped=[skipped_of(src, res.reason, res.transient)])
            else:
                yield Decoded("video", [src], videos=[res])


# ---- mapper ---------------------------------------------------------------------------------------
class EncodeStage:
    """Decoded batches -> encoded rows, the way this index stores them (patch grid and projection,
    video sampling and pooling, per-frame entries)."""

    def __init__(self, encoder: Encoder, *, patch_cfg: dict | None = None, projection: np.ndarray | None = None,
                 video_cfg: dict | None = None, batch_size: int | None = None) -> None:
        self.encoder = encoder
        self.patch_cfg = patch_cfg
        self.grid = int(patch_cfg["grid"]) if patch_cfg else None
        self.projection = projection
        self.video_cfg = video_cfg or {}
        self.batch_size = batch_size or encoder.batch_size

    def __call__(self, batch: Decoded) -> Encoded | None:
        if not batch.items:
            return None
        return self.images(batch) if batch.kind == "image" else self.video(batch.items[0], batch.videos[0])

    def images(self, batch: Decoded) -> Encoded:
        with_patches = self.patch_cfg is not None
        out = self.encoder.encode_image_tensors(torch.stack(batch.tensors), patches=with_patches, patch_grid=self.grid)
        emb, pat = out if with_patches else (out, None)
        if pat is not None:
            pat = project_patches(pat, self.projection)
        items = [_item(it, w, h) for it, (w, h) in zip(batch.items, batch.sizes)]
        return Encoded(items, emb, pat)

    def video(self, src: SourceItem, res: dict[str, Any]) -> Encoded:
        with_patches = self.patch_cfg is not None
        out = encode_frames(self.encoder, res["frames"], self.batch_size, patches=with_patches, patch_grid=self.grid)
        emb, pat = out if with_patches else (out, None)
        ts = res["timestamps"]
        item = Item(id=-1, key=src.key, uri=src.uri, kind="video", size=src.size, mtime=src.mtime, caption=src.caption,
                    width=res["width"], height=res["height"],
                    extra={**src.extra, "duration": res["duration"], "fps": res["fps"], "frames": len(ts)})
        fpat = project_patches(pat, self.projection) if pat is not None else None
        vpat = fpat[len(fpat) // 2][None] if fpat is not None else None  # the middle frame stands for the video in EMD
        enc = Encoded([item], pool_video(emb, self.video_cfg.get("pooling", "mean"))[None], vpat, frames=[(emb, ts)])
        if self.video_cfg.get("frame_entries"):
            fitems = [Item(id=-1, key=f"{src.key}#t={float(t):.3f}", uri=src.uri, kind="frame", size=src.size,
                           mtime=src.mtime, extra={"video": src.key, "timestamp": float(t)}) for t in ts]
            enc.entries = Encoded(fitems, emb, fpat)
        return enc


def _item(it: SourceItem, w: int, h: int) -> Item:
    return Item(id=-1, key=it.key, uri=it.uri, kind=it.kind, size=it.size, mtime=it.mtime, caption=it.caption,
                width=w, height=h, extra=dict(it.extra))


# ---- writer ---------------------------------------------------------------------------------------
class WriteStage:
    """Adds encoded batches to an ``IndexWriter`` and keeps the report's counts.

    ``seen`` (the Ray engine's shards, where keys come from the samples; the local engine does this in
    its stream, ``ingest.build.first_of_each_key``): the keys met so far; a key met again is skipped and
    reported (the first sample keeps it) instead of replacing the first one."""

    def __init__(self, writer, report: IngestReport, *, on_bad_vectors: str = "error",
                 seen: set[str] | None = None, existing: set[str] | None = None) -> None:
        self.writer = writer
        self.report = report
        self.on_bad_vectors = on_bad_vectors
        #: the keys indexed before this write (given by a build that writes unit after unit: read once)
        self.existing = set(writer.meta.fingerprints()) if existing is None else existing
        self.seen = seen

    def _first_of_each_key(self, enc: Encoded) -> Encoded:
        keep, dups = [], []
        for j, it in enumerate(enc.items):
            if it.key in self.seen:
                dups.append(Skipped(it.uri, it.uri, duplicate_key(it.key), it.size, it.mtime))
                log.warning("skipped %s: duplicate key %s", printable(it.uri), printable(it.key))
            else:
                self.seen.add(it.key)
                keep.append(j)
        if not dups:
            return enc
        self.skip(dups)
        return Encoded([enc.items[j] for j in keep], enc.vectors[keep],
                       enc.patches[keep] if enc.patches is not None else None,
                       frames=[enc.frames[j] for j in keep] if enc.frames is not None else None)

    def skip(self, skipped: Sequence[Skipped]) -> None:
        if self.seen is not None:  # a broken sample claims its key too, unless an earlier one has it
            out = []
            for s in skipped:
                if s.key in self.seen and s.key != s.uri:
                    s = Skipped(s.uri, s.uri, duplicate_key(s.key), s.size, s.mtime)
                self.seen.add(s.key)
                out.append(s)
            skipped = out
        if skipped:
            self.writer.record_skipped(skipped)
            self.report.skipped.extend(skipped)

    def write(self, enc: Encoded) -> None:
        if self.seen is not None and enc.entries is None:
            enc = self._first_of_each_key(enc)
            if not enc.items:
                return
        videos = [it.key for it in enc.items if it.kind == "video" and it.key in self.existing]
        if videos:  # a changed video: its old per-frame entries go, the new ones come with it
            old = self.writer.meta.frame_item_ids(videos)
            if old:
                self.writer.remove(old)
        stored = self.writer.add(enc.items, enc.vectors, enc.patches, frames=enc.frames, on_bad_vectors=self.on_bad_vectors)
        for it in stored:
            if it.key in self.existing:
                self.report.updated += 1
            else:
                self.report.added += 1
        if stored and enc.entries is not None:
            e = enc.entries
            self.writer.add(e.items, e.vectors, e.patches, on_bad_vectors=self.on_bad_vectors)


# ---- one write ------------------------------------------------------------------------------------
def run_stages(writer, items: Iterable[SourceItem | tuple[SourceItem, str]], encoder: Encoder, report: IngestReport, *,
               batch_size: int | None = None, workers: int | None = None, on_bad_vectors: str = "error",
               image_timeout: float | None = None, decode: str = "cpu", bar=None,
               on_unit_end: Callable[[Any], None] | None = None, existing: set[str] | None = None) -> None:
    """Decode, encode and add ``items`` to ``writer``, recording skips in ``report``.

    ``items``: a list (videos go through their own reader), or a stream of images read as the decoders
    need it (shards' samples, a ``UnitEnd`` after each shard: ``on_unit_end(unit)`` is called once all
    of the unit is written); ``(item, reason)`` pairs are inputs already known bad. ``existing``: the
    keys indexed before (read from the index when not given). ``decode``:
    ``cpu`` (decoder processes) or ``gpu`` (batches decoded and resized on the encoder's device).
    ``image_timeout``: seconds per image before its decoder is killed (default 30). ``bar``: a progress
    bar to advance (one is made otherwise). Time spent per stage accumulates in ``report.stages``."""
    if isinstance(items, (list, tuple)):
        if not items:
            return
        videos = [it for it in items if not isinstance(it, tuple) and it.kind == "video"]
        images = [it for it in items if isinstance(it, tuple) or it.kind != "video"]
        total = len(items)
    else:
        videos, images, total = [], items, None
    mapper = EncodeStage(encoder, patch_cfg=writer.patch_cfg, projection=writer.patch_projection(),
                         video_cfg=writer.video_cfg, batch_size=batch_size)
    sink = WriteStage(writer, report, on_bad_vectors=on_bad_vectors, existing=existing)
    readers = []
    if videos:
        readers.append(lambda: read_videos(videos, encoder.image_transform, writer.video_cfg, workers=workers))
    if images is not None and (total is None or images):
        if decode == "gpu":
            readers.append(lambda: read_images_on_device(images, encoder, batch_size=mapper.batch_size))
        else:
            readers.append(lambda: read_images(images, encoder.image_transform, batch_size=mapper.batch_size,
                                               workers=workers, timeout=image_timeout))
    own = bar is None
    if own:
        bar = tqdm(total=total, desc="encoding", unit="item", disable=progress_disable(), leave=False)
    clock = report.stages
    try:
        for reader in readers:
            batches = iter(reader())
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                t1 = time.perf_counter()
                clock["decode_wait"] = clock.get("decode_wait", 0.0) + (t1 - t0)
                if batch is None:
                    break
                sink.skip(batch.skipped)
                enc = mapper(batch)
                t2 = time.perf_counter()
                if enc is not None:
                    sink.write(enc)
                clock["encode"] = clock.get("encode", 0.0) + (t2 - t1)
                clock["write"] = clock.get("write", 0.0) + (time.perf_counter() - t2)
                bar.update(len(batch.items) + len(batch.skipped))
                for unit in batch.unit_ends:
                    if on_unit_end is not None:
                        on_unit_end(unit)
    finally:
        if own:
            bar.close()


__all__ = ["Decoded", "Encoded", "UnitEnd", "DecodeImage", "read_images", "read_images_on_device", "read_videos", "EncodeStage", "WriteStage", "run_stages"]
