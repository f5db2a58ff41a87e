"""``mmretrieve bench ingest``: build throughput side by side in one run, as ratios.

- the encoder's own forward on the images already decoded (the ceiling), and decoding alone;
- the local engine on the same images as a folder, as webdataset shards and as parquet files;
- ``--ray``: the Ray engine with 1 and 2 encoder actors in Ray's local mode, and on a 2-node cluster
  simulated on this machine; Ray's fixed start-up (``ray.init``, actors loading the model) apart from
  the steady rate, and each as a ratio to the local engine (scaling efficiency);
- ``--resume``: a shard build killed with SIGKILL once half its shards are committed, then resumed: the
  resumed run's time over a full build's (target <= 0.60), with identical items asserted;
- with CUDA: decoding on the CPU vs on the GPU (nvJPEG + tensor resize) for JPEG shards, each as
  pipeline / encoder throughput (target >= 0.5). Without CUDA this part says it was not measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mmretrieve.errors import IngestError, MissingDependencyError

HELP = "build images/s by input kind and engine vs the encoder's own throughput; resume; GPU decoding"


def add_arguments(p) -> None:
    p.add_argument("--encoder", default="embedded", help="encoder spec (default: embedded)")
    p.add_argument("-n", "--images", type=int, default=192, help="images to ingest (sample photos, repeated)")
    p.add_argument("--batch-size", type=int, default=None, help="encoder batch (default: the encoder's)")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: the ingest default)")
    p.add_argument("--per-shard", type=int, default=16, help="samples per webdataset shard / parquet file (default 16)")
    p.add_argument("--inputs", default="folder,webdataset,parquet", help="input kinds to time (default: all three)")
    p.add_argument("--ray", action="store_true", help="also time the Ray engine (1 and 2 actors, a 2-node cluster)")
    p.add_argument("--resume", action="store_true", help="also kill a build at 50%% and time its resumption")
    p.add_argument("--jpeg", action="store_true", help="re-encode every image as JPEG (what GPU decoding takes)")


def _copy_samples(dst: Path, n: int, jpeg: bool = False) -> list[Path]:
    from PIL import Image

    from mmretrieve.media.samples import opencv_doc_images, sample_images

    samples = sample_images() + opencv_doc_images()
    if not samples:
        raise MissingDependencyError("no sample images found: install scikit-image / scikit-learn / matplotlib (the demo extra)")
    dst.mkdir()
    for i in range(n):
        s = samples[i % len(samples)]
        if jpeg:
            Image.open(s.path).convert("RGB").save(dst / f"{i:05d}.jpg", quality=90)
        else:
            shutil.copyfile(s.path, dst / f"{i:05d}{Path(s.path).suffix}")
    return sorted(dst.iterdir())


def _sources(tmp: Path, files: list[Path], kinds: list[str], per_shard: int) -> dict[str, Path]:
    from mmretrieve.testing.shards import write_parquet, write_webdataset

    out = {}
    if "folder" in kinds:
        out["folder"] = files[0].parent
    if "webdataset" in kinds:
        write_webdataset(files, tmp / "wds", per_shard=per_shard)
        out["webdataset"] = tmp / "wds"
    if "parquet" in kinds:
        write_parquet(files, tmp / "pq", per_file=per_shard)
        out["parquet"] = tmp / "pq"
    return out


def _build(path: Path, source: Path, enc, n: int, **kw):
    from mmretrieve.ingest import build_index

    t = time.perf_counter()
    report = build_index(path, source, encoder=enc, **kw)
    sec = time.perf_counter() - t
    if report.added != n:
        raise IngestError(f"benchmark build of {source} indexed {report.added} of {n} images")
    return sec, report


def _index_state(path: Path):
    from mmretrieve.index import open_index

    idx = open_index(path)
    items = sorted(idx.meta.iter_items(), key=lambda it: it.key)
    vecs = idx.vectors([it.id for it in items])
    rows = [(it.key, it.id, it.uri) for it in items]
    idx.close()
    return rows, vecs


def _encoder_rate(enc, files: list[Path], bs: int) -> tuple[float, float]:
    """(images/s of decoding + preprocessing in this process, images/s of the encoder's forward)."""
    import torch

    from mmretrieve.bench.common import median_time
    from mmretrieve.media.images import load_image

    draft = getattr(enc.image_transform, "draft_size", None)
    t = time.perf_counter()
    tensors = [enc.image_transform(load_image(f, draft_size=draft)) for f in files]
    decode_s = time.perf_counter() - t
    batches = [torch.stack(tensors[i : i + bs]) for i in range(0, len(files), bs)]
    enc.encode_image_tensors(batches[0])  # warm-up
    enc_s = median_time(lambda: [enc.encode_image_tensors(b) for b in batches], repeat=2, warmup=0)
    return len(files) / decode_s, len(files) / enc_s


def _ray_runs(tmp: Path, source: Path, enc, n: int, bs: int, local_ips: float) -> list[dict]:
    """The Ray engine: local mode with 1 and 2 actors, then a 2-node cluster on this machine."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from mmretrieve.ingest.ray_engine import loopback_only

    rtmp = tempfile.mkdtemp(prefix="mmr-ray-", dir="/tmp")
    os.makedirs(os.path.join(rtmp, "ray"), exist_ok=True)
    cpus = os.cpu_count() or 2
    rows = []

    def one(label: str, actors: int, init_s: float) -> None:
        sec, rep = _build(tmp / f"ray-{label}-{actors}", source, enc, n, batch_size=bs, engine="ray", ray_actors=actors)
        first = rep.stages.get("ray_first_batch", 0.0)
        steady = n / max(sec - first, 1e-9)
        rows.append({"engine": f"ray {label}", "actors": actors, "nodes": rep.ray.get("nodes"),
                     "work_nodes": rep.ray.get("work_nodes"), "init_s": round(init_s, 2),
                     "first_batch_s": round(first, 2), "seconds": round(sec, 2), "images_per_s": round(n / sec, 1),
                     "steady_images_per_s": round(steady, 1), "over_local": round(n / sec / local_ips, 3),
                     "steady_over_local": round(steady / local_ips, 3)})

    with loopback_only(True):  # every socket on 127.0.0.1, wherever Ray was imported first
        try:
            t = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=rtmp)
            init_s = time.perf_counter() - t
            for actors in (1, 2):
                one("local", actors, init_s)
            ray.shutdown()
            t = time.perf_counter()
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": max(1, cpus // 2), "temp_dir": rtmp,
                                                                    "include_dashboard": False})
            try:
                cluster.add_node(num_cpus=max(1, cpus - cpus // 2))
                ray.init(address=cluster.address, _temp_dir=rtmp, log_to_driver=False)
                one("2-node", 2, time.perf_counter() - t)
            finally:
                ray.shutdown()
                cluster.shutdown()
        finally:
            if ray.is_initialized():
                ray.shutdown()
            shutil.rmtree(rtmp, ignore_errors=True)
    return rows


def _resume(tmp: Path, source: Path, enc, n: int, bs: int, full_s: float, encoder_spec: str) -> dict:
    """Kill a CLI build (SIGKILL) once half its shards are committed, resume it here, compare."""
    from mmretrieve.ingest import build_index

    shards = len(list(source.glob("*.tar")))
    path = tmp / "resume"
    cmd = [sys.executable, "-m", "mmretrieve", "index", "build", str(path), str(source), "--encoder", encoder_spec,
           "--batch-size", str(bs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, done = time.monotonic() + 3600, 0
    while time.monotonic() < deadline and proc.poll() is None:
        m = path / "manifest.json"
        if m.is_file():
            try:
                done = json.loads(m.read_text())["build"]["units_done"]
            except (ValueError, KeyError):
                done = 0
            if done >= shards // 2:
                break
        time.sleep(0.01)
    if proc.poll() is not None:
        raise IngestError(f"the build to kill ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]!r}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t = time.perf_counter()
    report = build_index(path, source, encoder=enc, batch_size=bs)
    resumed_s = time.perf_counter() - t
    got, want = _index_state(path), _index_state(tmp / "local-webdataset")
    if got[0] != want[0]:
        raise IngestError("the resumed build's items differ from the uninterrupted build's")
    diff = float(abs(got[1] - want[1]).max()) if len(got[1]) else 0.0
    tol = 1e-5 if getattr(enc, "precision", "fp32") == "fp32" else 2e-2
    if diff > tol:
        raise IngestError(f"the resumed build's vectors differ from the uninterrupted build's by {diff:.2e} (> {tol})")
    ratio = resumed_s / full_s
    return {"shards": shards, "killed_after_units": done, "units_resumed": report.units_resumed,
            "full_s": round(full_s, 2), "resumed_s": round(resumed_s, 2), "resumed_over_full": round(ratio, 3),
            "target": "<= 0.60", "met": ratio <= 0.60, "same_items": True, "max_vector_diff": diff}


def _gpu_decode(tmp: Path, enc, n: int, bs: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"measured": False, "why": "no CUDA device on this machine: the GPU-decoding figure is not measured"}
    files = sorted((tmp / "jpeg").glob("*.jpg")) if (tmp / "jpeg").is_dir() else _copy_samples(tmp / "jpeg", n, jpeg=True)
    from mmretrieve.testing.shards import write_webdataset

    write_webdataset(files, tmp / "jpeg-wds", per_shard=max(64, bs))
    _, enc_ips = _encoder_rate(enc, files, bs)
    out = {"measured": True, "encoder_images_per_s": round(enc_ips, 1)}
    for decode in ("cpu", "gpu"):
        sec, _ = _build(tmp / f"gpu-{decode}", tmp / "jpeg-wds", enc, n, batch_size=bs, decode=decode)
        out[f"{decode}_decode_images_per_s"] = round(n / sec, 1)
        out[f"{decode}_decode_over_encoder"] = round(n / sec / enc_ips, 3)
    out["target"] = ">= 0.5 of the encoder, >= 1,500 samples/s (clip-retrieval on one RTX 3080)"
    return out


def run(args) -> dict:
    import torch

    from mmretrieve.encoders import create_encoder
    from mmretrieve.runtime import default_workers

    enc = create_encoder(args.encoder)
    n = int(args.images)
    workers = default_workers() if args.workers is None else args.workers
    bs = args.batch_size or enc.batch_size
    kinds = [k.strip() for k in str(args.inputs).split(",") if k.strip()]
    if args.resume and "webdataset" not in kinds:
        kinds.append("webdataset")
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-ingest-"))
    try:
        files = _copy_samples(tmp / "images", n, jpeg=args.jpeg)
        total_bytes = sum(f.stat().st_size for f in files)
        dec_ips, enc_ips = _encoder_rate(enc, files, bs)
        sources = _sources(tmp, files, kinds, int(args.per_shard))
        local = {}
        for kind, src in sources.items():
            runs = [_build(tmp / f"local-{kind}" if r == 0 else tmp / f"local-{kind}-{r}", src, enc, n, batch_size=bs,
                           workers=workers)[0] for r in range(2)]
            local[kind] = min(runs)
        base = "webdataset" if "webdataset" in local else next(iter(local))
        res = {
            "benchmark": "ingest", "encoder": enc.name, "precision": enc.precision, "images": n,
            "mean_file_kb": round(total_bytes / n / 1024, 1), "batch_size": bs, "decoder_workers": workers,
            "torch_threads": torch.get_num_threads(), "per_shard": int(args.per_shard),
            "decode_only_images_per_s_1proc": round(dec_ips, 1), "encoder_images_per_s": round(enc_ips, 1),
            "local": {k: {"seconds": round(v, 2), "images_per_s": round(n / v, 1), "over_encoder": round(n / v / enc_ips, 3)}
                      for k, v in local.items()},
        }
        if args.ray:
            res["ray"] = _ray_runs(tmp, sources[base], enc, n, bs, n / local[base])
            res["ray_baseline"] = base
        if args.resume:
            res["resume"] = _resume(tmp, sources["webdataset"], enc, n, bs, local["webdataset"], args.encoder)
        res["gpu_decode"] = _gpu_decode(tmp, enc, n, bs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def render(r: dict) -> list[str]:
    out = [
        f"ingest benchmark: {r['images']} images ({r['mean_file_kb']} KB mean), encoder {r['encoder']} [{r['precision']}], "
        f"batch {r['batch_size']}, {r['decoder_workers']} decoder worker(s), {r['torch_threads']} torch thread(s), "
        f"{r['per_shard']} samples per shard",
        f"  decode+preprocess only (1 process) {r['decode_only_images_per_s_1proc']:8.1f} img/s",
        f"  encoder forward on decoded images  {r['encoder_images_per_s']:8.1f} img/s",
    ]
    for kind, v in r["local"].items():
        out.append(f"  local engine, {kind:11s}        {v['images_per_s']:8.1f} img/s   pipeline / encoder {v['over_encoder']:.3f}")
    for row in r.get("ray", []):
        out.append(f"  {row['engine']:10s} {row['actors']} actor(s), {row['work_nodes']}/{row['nodes']} node(s) working: "
                   f"{row['images_per_s']:6.1f} img/s ({row['over_local']:.3f} of local), steady {row['steady_images_per_s']:6.1f} "
                   f"img/s ({row['steady_over_local']:.3f}); start-up: ray {row['init_s']:.1f} s, first batch {row['first_batch_s']:.1f} s")
    if "resume" in r:
        v = r["resume"]
        out.append(f"  resume: killed after {v['killed_after_units']}/{v['shards']} shards; resumed in {v['resumed_s']:.2f} s vs "
                   f"{v['full_s']:.2f} s full = {v['resumed_over_full']:.3f} (target {v['target']}: "
                   f"{'met' if v['met'] else 'NOT met'}), same items, max vector diff {v['max_vector_diff']:.1e}")
    g = r.get("gpu_decode", {})
    if g.get("measured"):
        out.append(f"  GPU: encoder {g['encoder_images_per_s']:.1f} img/s; CPU decode {g['cpu_decode_images_per_s']:.1f} img/s "
                   f"({g['cpu_decode_over_encoder']:.3f}), GPU decode {g['gpu_decode_images_per_s']:.1f} img/s "
                   f"({g['gpu_decode_over_encoder']:.3f}); target {g['target']}")
    elif g:
        out.append(f"  GPU decoding: {g['why']}")
    return out
