"""``mmretrieve bench ingest``: end-to-end images/s of the whole build (decode in workers + encode +
write) vs. the encoder's own forward throughput on the same images already decoded. Target >= 0.85."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from mmretrieve.errors import IngestError, MissingDependencyError

HELP = "end-to-end build images/s vs. the encoder's own forward throughput on the same images"


def add_arguments(p) -> None:
    p.add_argument("--encoder", default="embedded", help="encoder spec (default: embedded)")
    p.add_argument("-n", "--images", type=int, default=192, help="images to ingest (sample photos, repeated)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: the encoder's)")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: the ingest default)")


def _copy_samples(dst: Path, n: int) -> list[Path]:
    from mmretrieve.media.samples import opencv_doc_images, sample_images

    samples = sample_images() + opencv_doc_images()
    if not samples:
        raise MissingDependencyError("no sample images found: install scikit-image / scikit-learn / matplotlib (the demo extra)")
    dst.mkdir()
    for i in range(n):
        s = samples[i % len(samples)]
        shutil.copyfile(s.path, dst / f"{i:05d}{Path(s.path).suffix}")
    return sorted(dst.iterdir())


def run(args) -> dict:
    import torch

    from mmretrieve.bench.common import median_time
    from mmretrieve.encoders import create_encoder
    from mmretrieve.ingest import build_index
    from mmretrieve.media.images import load_image
    from mmretrieve.runtime import default_workers

    enc = create_encoder(args.encoder)
    n = int(args.images)
    workers = default_workers() if args.workers is None else args.workers
    bs = args.batch_size or enc.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-ingest-"))
    try:
        files = _copy_samples(tmp / "images", n)
        total_bytes = sum(f.stat().st_size for f in files)
        t = time.perf_counter()  # 1) decode + preprocess only, in this process (for context)
        tensors = [enc.image_transform(load_image(f)) for f in files]
        decode_s = time.perf_counter() - t
        batches = [torch.stack(tensors[i : i + bs]) for i in range(0, n, bs)]  # 2) the encoder alone
        enc.encode_image_tensors(batches[0])  # warm-up
        enc_s = median_time(lambda: [enc.encode_image_tensors(b) for b in batches], repeat=2, warmup=0)
        pipe_runs = []  # 3) the whole pipeline: scan, decode in workers, encode, write a new index version
        for r in range(2):
            t = time.perf_counter()
            report = build_index(tmp / f"idx{r}", tmp / "images", encoder=enc, batch_size=bs, workers=workers)
            pipe_runs.append(time.perf_counter() - t)
            if report.added != n:
                raise IngestError(f"benchmark build indexed {report.added} of {n} images")
        pipe_s = min(pipe_runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    enc_ips, pipe_ips, dec_ips = n / enc_s, n / pipe_s, n / decode_s
    return {
        "benchmark": "ingest", "encoder": enc.name, "precision": enc.precision, "images": n,
        "mean_file_kb": round(total_bytes / n / 1024, 1), "batch_size": bs, "decoder_workers": workers,
        "torch_threads": torch.get_num_threads(), "decode_only_images_per_s_1proc": round(dec_ips, 1),
        "encoder_images_per_s": round(enc_ips, 1), "pipeline_images_per_s": round(pipe_ips, 1),
        "pipeline_over_encoder": round(pipe_ips / enc_ips, 3), "target": ">= 0.85",
    }


def render(r: dict) -> list[str]:
    return [
        f"ingest benchmark: {r['images']} images ({r['mean_file_kb']} KB mean), encoder {r['encoder']} [{r['precision']}], "
        f"batch {r['batch_size']}, {r['decoder_workers']} decoder worker(s), {r['torch_threads']} torch thread(s)",
        f"  decode+preprocess only (1 process) {r['decode_only_images_per_s_1proc']:8.1f} img/s",
        f"  encoder forward on decoded images  {r['encoder_images_per_s']:8.1f} img/s",
        f"  whole build pipeline               {r['pipeline_images_per_s']:8.1f} img/s",
        f"  pipeline / encoder                 {r['pipeline_over_encoder']:8.3f}   (target {r['target']})",
    ]
