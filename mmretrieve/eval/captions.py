"""Image-caption retrieval: text->image and image->text Recall@1/5/10 on a captioned image set.

Inputs: a CSV / JSONL with ``path`` and ``caption`` columns (paths relative to the file's folder; an
image may appear on several rows, one per caption), a Karpathy-style JSON (COCO / Flickr30k:
``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``) or a COCO captions file
(``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``), the latter two with
``images`` = the image folder.

Definitions (as in the Karpathy-split literature): t2i Recall@k is the share of captions whose image is
in the top k images; i2t Recall@k is the share of images with at least one of their captions in the top
k captions. A score tie with the ground truth is resolved in the ground truth's favour.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.eval.datasets import DatasetError

KS = (1, 5, 10)


@dataclass
class CaptionSet:
    name: str
    images: list[tuple[str, str]]  # (id, path)
    captions: list[tuple[str, int]]  # (text, image index)
    missing: list[str] = field(default_factory=list)


def load_captions(path: str | os.PathLike, *, images: str | os.PathLike | None = None, split: str = "test",
                  allow_missing: bool = False) -> CaptionSet:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    pairs: list[tuple[str, str, str]] = []  # (image id, image path, caption)
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        base = path.parent
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, r in enumerate(rows, 1):
            if not r.get("path") or not r.get("caption"):
                raise DatasetError(f"{path}: row {i} needs 'path' and 'caption'")
            p = Path(r["path"])
            full = str((p if p.is_absolute() else base / p).resolve())
            pairs.append((str(r.get("id") or r["path"]), full, str(r["caption"])))
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if images is None:
            raise DatasetError(f"{path}: a Karpathy or COCO JSON needs --images DIR (the image folder)")
        root = Path(images)
        if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO captions
            files = {im["id"]: im["file_name"] for im in data["images"]}
            for a in data["annotations"]:
                fn = files.get(a["image_id"])
                if fn is None:
                    raise DatasetError(f"{path}: annotation for unknown image_id {a['image_id']}")
                pairs.append((str(a["image_id"]), str(root / fn), a["caption"]))
        elif isinstance(data, dict) and "images" in data:  # Karpathy
            for im in data["images"]:
                if split and im.get("split") not in (split, None) and not (split == "train" and im.get("split") == "restval"):
                    continue
                rel = os.path.join(im.get("filepath", ""), im["filename"])
                for s in im.get("sentences", []):
                    pairs.append((str(im.get("imgid", im["filename"])), str(root / rel), s.get("raw") or " ".join(s["tokens"])))
        else:
            raise DatasetError(f"{path}: unrecognised JSON (expected a Karpathy 'images' list or COCO captions)")
    else:
        raise DatasetError(f"{path}: expected .csv, .tsv, .jsonl or .json")
    if not pairs:
        raise DatasetError(f"{path}: no captions (split {split!r})")
    index: dict[str, int] = {}
    imgs: list[tuple[str, str]] = []
    caps: list[tuple[str, int]] = []
    missing = []
    for iid, p, c in pairs:
        if iid not in index:
            if not os.path.isfile(p):
                missing.append(p)
                index[iid] = -1
                continue
            index[iid] = len(imgs)
            imgs.append((iid, p))
        if index[iid] >= 0:
            caps.append((c, index[iid]))
    if missing and not allow_missing:
        raise DatasetError(f"{path}: {len(missing)} image(s) missing, e.g. {missing[0]}; pass --allow-missing to skip them")
    return CaptionSet(path.stem, imgs, caps, missing)


def evaluate_captions(cs: CaptionSet, *, encoder="embedded", cache=None, batch_size=None, workers=None) -> dict[str, Any]:
    from mmretrieve.encoders import create_encoder
    from mmretrieve.eval.runner import cached_index

    t0 = time.perf_counter()
    enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    gallery = {iid: p for iid, p in cs.images}
    idx = cached_index(f"captions-{cs.name}", gallery, enc, cache=cache, batch_size=batch_size, workers=workers)
    key_to_id = {it.key: it.id for it in idx.meta.iter_items()}
    keep = [i for i, (iid, _) in enumerate(cs.images) if iid in key_to_id]
    if len(keep) < len(cs.images):
        raise DatasetError(f"{len(cs.images) - len(keep)} image(s) of {cs.name} could not be decoded (see the log)")
    I = idx.vectors([key_to_id[iid] for iid, _ in cs.images])
    idx.close()
    T = enc.encode_texts([c for c, _ in cs.captions])
    owner = np.array([j for _, j in cs.captions])
    S = T @ I.T  # (captions, images)
    true = S[np.arange(len(owner)), owner]
    t2i_rank = 1 + (S > true[:, None]).sum(1)
    i2t_rank = np.full(len(cs.images), np.iinfo(np.int64).max)
    St = S.T  # (images, captions)
    for j in range(len(cs.images)):
        own = np.flatnonzero(owner == j)
        if len(own):
            best = St[j, own].max()
            i2t_rank[j] = 1 + int((St[j] > best).sum())
    out = {f"t2i/recall@{k}": float(100.0 * np.mean(t2i_rank <= k)) for k in KS}
    out.update({f"i2t/recall@{k}": float(100.0 * np.mean(i2t_rank <= k)) for k in KS})
    return {
        "dataset": cs.name,
        "images": len(cs.images),
        "captions": len(cs.captions),
        "missing_images": len(cs.missing),
        "encoder": enc.name,
        "metrics": out,
        "seconds": round(time.perf_counter() - t0, 2),
        "per_caption": [{"caption": c, "image": cs.images[j][0], "rank": int(r)} for (c, j), r in zip(cs.captions, t2i_rank)],
    }
