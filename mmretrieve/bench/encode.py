"""``mmretrieve bench encode``: encoder throughput per precision, and how far each stays from fp32."""

from __future__ import annotations

import numpy as np

from mmretrieve.errors import MissingDependencyError

HELP = "encoder throughput per precision, and how far each stays from fp32 (cosine)"


def add_arguments(p) -> None:
    p.add_argument("--encoder", default="open_clip:ViT-B-32@random",
                   help="encoder spec (default: ViT-B/32 with random weights: same cost as the real one, no download)")
    p.add_argument("-n", "--images", type=int, default=128, help="images per timed pass (sample photos, repeated)")
    p.add_argument("--texts", type=int, default=256, help="texts per timed pass")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--precisions", default=None, help="comma-separated (default: fp32,bf16 on CPU; fp32,bf16,fp16 on GPU)")


def _one_precision(args, prec: str, dev, bs: int, samples, texts, ref) -> dict:
    """Throughput of one precision; cosine to the fp32 reference ``ref`` = (images, texts) when given."""
    import torch

    from mmretrieve.bench.common import median_time
    from mmretrieve.encoders import create_encoder
    from mmretrieve.media.images import load_image

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    enc = create_encoder(args.encoder, device=str(dev), precision=prec, batch_size=bs, cache=False)
    tensors = [enc.image_transform(load_image(s.path)) for s in samples]
    x = torch.stack([tensors[i % len(tensors)] for i in range(args.images)])
    batches = [x[i : i + bs] for i in range(0, len(x), bs)]

    def images():
        out = [enc.encode_image_tensors(b) for b in batches]
        sync()
        return np.concatenate([o if isinstance(o, np.ndarray) else o[0] for o in out])

    def run_texts():
        out = enc.encode_texts(texts, batch_size=bs)
        sync()
        return out

    img, txt = images(), run_texts()  # warm-up (and the embeddings compared below)
    row = {"precision": prec, "images_per_s": round(len(x) / median_time(images, repeat=3, warmup=0), 1),
           "texts_per_s": round(len(texts) / median_time(run_texts, repeat=3, warmup=0), 1),
           "_img": img, "_txt": txt}
    if ref is not None:
        row["min_cosine_to_fp32_images"] = round(float((img * ref[0]).sum(1).min()), 5)
        row["min_cosine_to_fp32_texts"] = round(float((txt * ref[1]).sum(1).min()), 5)
    if hasattr(enc, "trim_text_context") and ref is None:
        enc.trim_text_context = False
        row["texts_per_s_full_context"] = round(len(texts) / median_time(run_texts, repeat=3, warmup=1), 1)
        enc.trim_text_context = True
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args) -> dict:
    import torch

    from mmretrieve.media.samples import sample_images
    from mmretrieve.runtime import resolve_device, resolve_precision

    dev = resolve_device(args.device)
    precisions = (args.precisions or ("fp32,bf16,fp16" if dev.type == "cuda" else "fp32,bf16")).split(",")
    bs = args.batch_size or (256 if dev.type == "cuda" else 32)
    samples = sample_images()
    if not samples:
        raise MissingDependencyError("no sample images found: install scikit-image / scikit-learn / matplotlib (the demo extra)")
    texts = [samples[i % len(samples)].caption + f" (variant {i})" for i in range(args.texts)]
    rows, ref = [], None
    for prec in precisions:
        row = _one_precision(args, prec, dev, bs, samples, texts, ref)
        if prec == "fp32":
            ref = (row["_img"], row["_txt"])
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    for r in rows:
        r["images_speedup"] = round(r["images_per_s"] / rows[0]["images_per_s"], 2)
    return {
        "benchmark": "encode", "encoder": args.encoder,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "batch_size": bs, "images": args.images, "texts": args.texts,
        "auto_precision": resolve_precision("auto", dev), "results": rows,
        "target": "images within cosine 0.999 of fp32",
    }


def render(res: dict) -> list[str]:
    out = [f"encode benchmark: {res['encoder']} on {res['device']}, batch {res['batch_size']}, {res['images']} images, "
           f"{res['texts']} texts, {res['torch_threads']} torch thread(s); auto precision here: {res['auto_precision']}"]
    for r in res["results"]:
        cos = (f"cosine to fp32 >= {r['min_cosine_to_fp32_images']:.5f} (images), {r['min_cosine_to_fp32_texts']:.5f} (texts)"
               if "min_cosine_to_fp32_images" in r else "")
        full = f" [full 77-token context: {r['texts_per_s_full_context']:.0f}/s]" if "texts_per_s_full_context" in r else ""
        out.append(f"  {r['precision']:>5}: {r['images_per_s']:9.1f} img/s (x{r['images_speedup']:.2f}), "
                   f"{r['texts_per_s']:9.1f} texts/s{full}  {cos}")
    return out
