"""Indexing videos: sample frames in worker processes (with a per-file timeout), encode every frame,
store the per-frame embeddings (fp16 side-store, with timestamps) and one video-level vector in FAISS
(the normalised mean of the frames by default). Optionally every frame also becomes its own FAISS entry
(kind ``frame``) for moment search."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmretrieve.index.meta import Item, Skipped
from mmretrieve.media.scan import SourceItem
from mmretrieve.media.workers import TaskFailure, TimeoutPool

log = logging.getLogger(__name__)

VIDEO_DEFAULTS: dict[str, Any] = {
    "num_frames": 8,  # uniform: the centres of N equal segments
    "fps": None,  # or a fixed rate (frames per second), thinned to max_frames
    "max_frames": 32,
    "pooling": "mean",  # video vector: mean of the frame embeddings, or the middle frame
    "frame_entries": False,  # also index every frame as its own item (moment search)
    "timeout": 60.0,  # seconds per file before the decoder is killed
}
POOLINGS = ("mean", "middle")


def resolve_video_config(cfg: dict | None) -> dict[str, Any]:
    out = {**VIDEO_DEFAULTS, **{k: v for k, v in (cfg or {}).items() if v is not None or k == "fps"}}
    unknown = set(out) - set(VIDEO_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown video option(s) {sorted(unknown)}; known: {sorted(VIDEO_DEFAULTS)}")
    if out["pooling"] not in POOLINGS:
        raise ValueError(f"video pooling must be one of {', '.join(POOLINGS)}, got {out['pooling']!r}")
    if out["fps"] is None and int(out["num_frames"]) < 1:
        raise ValueError("num_frames must be >= 1")
    return out


def pool_video(frames: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """Video-level vector from (T, D) unit frame embeddings."""
    v = frames[len(frames) // 2] if pooling == "middle" else frames.mean(0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


#: tests set this to a callable(path) to make a worker hang or crash on a chosen file
_DECODE_HOOK = None


def decode_video(path: str, *, transform, sampling: dict) -> dict[str, Any]:
    """Worker-side: sample frames and apply the encoder's image transform (uint8 tensors)."""
    from mmretrieve.media.video import sample_frames

    if _DECODE_HOOK is not None:
        _DECODE_HOOK(path)
    sf = sample_frames(path, num_frames=sampling.get("num_frames"), fps=sampling.get("fps"),
                       max_frames=int(sampling.get("max_frames", 32)), min_side=getattr(transform, "draft_size", None))
    x = torch.stack([transform(im) for im in sf.images])
    return {
        "frames": x.numpy(),
        "timestamps": np.asarray(sf.timestamps, dtype=np.float32),
        "width": sf.info.width,
        "height": sf.info.height,
        "duration": sf.info.duration,
        "fps": sf.info.fps,
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


def decode_many(paths: Sequence[str], encoder, cfg: dict, workers: int | None = None):
    """Yield ``(index, result dict | TaskFailure)`` for every path, decoded in worker processes."""
    from mmretrieve.ingest import default_workers

    fn = functools.partial(decode_video, transform=encoder.image_transform, sampling=cfg)
    n = default_workers() if workers is None else max(1, workers)
    with TimeoutPool(workers=n, timeout=float(cfg["timeout"]), init=_worker_init) as pool:
        yield from pool.imap(fn, list(paths))


def encode_frames(encoder, frames: np.ndarray, batch_size: int, patches: bool = False, patch_grid=None):
    """Encode (T, 3, H, W) uint8 frames in batches; returns (T, D) [and (T, P, Dp) patches]."""
    embs, pats = [], []
    for s in range(0, len(frames), batch_size):
        out = encoder.encode_image_tensors(torch.from_numpy(frames[s : s + batch_size]), patches=patches, patch_grid=patch_grid)
        if patches:
            embs.append(out[0])
            pats.append(out[1])
        else:
            embs.append(out)
    return (np.concatenate(embs), np.concatenate(pats)) if patches else np.concatenate(embs)


def ingest_videos(writer, videos: Sequence[SourceItem], encoder, report, *, batch_size=None, workers=None,
                  on_bad_vectors: str = "error") -> None:
    cfg = writer.video_cfg
    bs = batch_size or encoder.batch_size
    pcfg = writer.patch_cfg
    proj = None
    if pcfg is not None:
        from mmretrieve.ingest import _patch_projection

        proj = _patch_projection(writer)
    existing = writer.meta.fingerprints()
    bar = tqdm(total=len(videos), desc="videos", unit="video", disable=_progress(), leave=False)
    try:
        for i, res in decode_many([v.uri for v in videos], encoder, cfg, workers):
            src = videos[i]
            bar.update(1)
            if isinstance(res, TaskFailure):
                sk = Skipped(src.key, src.uri, res.reason, src.size, src.mtime)
                writer.record_skipped([sk])
                report.skipped.append(sk)
                log.warning("skipped %s: %s", src.uri, res.reason)
                continue
            out = encode_frames(encoder, res["frames"], bs, patches=pcfg is not None,
                                patch_grid=int(pcfg["grid"]) if pcfg else None)
            emb, pat = out if pcfg is not None else (out, None)
            ts = res["timestamps"]
            vec = pool_video(emb, cfg["pooling"])
            item = Item(id=-1, key=src.key, uri=src.uri, kind="video", size=src.size, mtime=src.mtime,
                        caption=src.caption, width=res["width"], height=res["height"],
                        extra={**src.extra, "duration": res["duration"], "fps": res["fps"], "frames": len(ts)})
            vpat = None
            if pat is not None:
                vpat = pat[len(pat) // 2][None]  # the middle frame's patches stand for the video in EMD
                if proj is not None:
                    vpat = vpat @ proj
                    vpat /= np.maximum(np.linalg.norm(vpat, axis=-1, keepdims=True), 1e-12)
            if src.key in existing:
                old = writer.meta.frame_item_ids([src.key])
                if old:
                    writer.remove(old)
            stored = writer.add([item], vec[None], vpat, frames=[(emb, ts)], on_bad_vectors=on_bad_vectors)
            if not stored:
                continue
            if src.key in existing:
                report.updated += 1
            else:
                report.added += 1
            if cfg["frame_entries"]:
                fitems = [
                    Item(id=-1, key=f"{src.key}#t={float(t):.3f}", uri=src.uri, kind="frame", size=src.size,
                         mtime=src.mtime, extra={"video": src.key, "timestamp": float(t)})
                    for t in ts
                ]
                fpat = None
                if pat is not None:
                    fpat = pat if proj is None else pat @ proj
                    fpat = fpat / np.maximum(np.linalg.norm(fpat, axis=-1, keepdims=True), 1e-12)
                writer.add(fitems, emb, fpat, on_bad_vectors=on_bad_vectors)
    finally:
        bar.close()


def _progress():
    from mmretrieve.ingest import progress_enabled

    return progress_enabled()
