"""``mmretrieve bench threads``: query latency and ingest throughput with one torch thread vs all cores, on an
idle machine and with one core kept busy by another process (a fair model of a shared machine). The thread
defaults (``runtime.default_threads``) were chosen from this table."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP = "query latency and ingest images/s with 1 thread vs all cores, idle and with one core busy"

QUERIES = ("a photo of a cat", "a red motorcycle", "a cup of coffee on a saucer", "the moon", "an astronaut in a suit",
           "a rocket on the launch pad", "grass", "a pile of coins", "a horse", "a flower with orange petals",
           "a brick wall", "gravel", "a camera man", "a chinese pagoda", "the hubble telescope")


def add_arguments(p) -> None:
    p.add_argument("--encoder", default="embedded", help="encoder spec (default: embedded)")
    p.add_argument("-n", "--images", type=int, default=160, help="images per ingest run (sample photos, repeated)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration (default 3)")


def _busy_core() -> subprocess.Popen:
    """Another process spinning on one core for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _query_ms(idx, enc, images: list[Path]) -> tuple[float, float]:
    """Median ms of an in-process text search (encode + search + hydrate) and of encoding one query image."""
    text = []
    for q in QUERIES:
        t = time.perf_counter()
        idx.search(text=q, k=10)
        text.append((time.perf_counter() - t) * 1000)
    image = []
    for f in images:
        t = time.perf_counter()
        enc.encode_images([f])
        image.append((time.perf_counter() - t) * 1000)
    return statistics.median(text), statistics.median(image)


def _measure(enc, idx, folder: Path, tmp: Path, threads: int) -> dict[str, float]:
    from mmretrieve.ingest import build_index
    from mmretrieve.runtime import set_threads

    set_threads(threads)
    idx.search(text="warm-up", k=1)
    text_ms, image_ms = _query_ms(idx, enc, sorted(folder.iterdir())[:10])
    t = time.perf_counter()
    report = build_index(tmp / f"idx-{time.monotonic_ns()}", folder, encoder=enc)
    ingest = report.added / (time.perf_counter() - t)
    return {"text_query_ms": text_ms, "image_encode_ms": image_ms, "ingest_images_per_s": ingest}


def run(args) -> dict:
    from mmretrieve.bench.ingest import _copy_samples
    from mmretrieve.encoders import create_encoder
    from mmretrieve.index import open_index
    from mmretrieve.ingest import build_index
    from mmretrieve.runtime import set_threads
    from mmretrieve.settings import available_cores

    enc = create_encoder(args.encoder)
    cores = available_cores()
    configs = sorted({1, cores})
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-threads-"))
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        folder = tmp / "images"
        _copy_samples(folder, int(args.images))
        build_index(tmp / "query-index", folder, encoder=enc)
        idx = open_index(tmp / "query-index", encoder=enc)
        for load in ("idle", "one core busy"):
            busy = _busy_core() if load != "idle" else None
            try:
                for _ in range(int(args.rounds)):  # alternate, so drifts of a shared machine hit both alike
                    for th in configs:
                        rows.setdefault((load, th), []).append(_measure(enc, idx, folder, tmp, th))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
        idx.close()
    finally:
        set_threads(None)
        shutil.rmtree(tmp, ignore_errors=True)
    table = [{"load": load, "threads": th, **{k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}}
             for (load, th), runs in rows.items()]
    return {"benchmark": "threads", "encoder": enc.name, "precision": enc.precision, "cores": cores,
            "images": int(args.images), "rounds": int(args.rounds), "table": table}


def render(r: dict) -> list[str]:
    out = [f"threads benchmark: encoder {r['encoder']} [{r['precision']}], {r['cores']} cores, {r['images']} images "
           f"per ingest, median of {r['rounds']} alternating rounds",
           f"  {'load':<14} {'threads':>7} {'text query ms':>14} {'image encode ms':>16} {'ingest img/s':>13}"]
    for row in r["table"]:
        out.append(f"  {row['load']:<14} {row['threads']:>7} {row['text_query_ms']:>14.1f} {row['image_encode_ms']:>16.1f} "
                   f"{row['ingest_images_per_s']:>13.1f}")
    return out
