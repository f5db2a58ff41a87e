"""Small benchmark fixtures in each official layout, built from the packaged photos with hand-written
composed queries (the captions describe real differences between real images)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# (reference, modification text, target): reference and target are sample ids
CIRR_QUERIES = [
    ("motorcycle_left", "the same red motorcycle seen from a slightly different angle", "motorcycle_right"),
    ("chelsea", "replace the cat with a cup of coffee", "coffee"),
    ("rocket", "a rocket on the launch pad", "rocket"),  # target equals the reference: never retrievable
    ("coffee", "a tabby cat instead of the drink", "chelsea"),
    ("china", "a single orange flower instead of the pagoda", "flower"),
    ("astronaut", "the rocket on its launch pad instead of the astronaut", "rocket"),
    ("brick", "gravel instead of bricks", "gravel"),
    ("coins", "a motorcycle instead of the coins", "motorcycle_left"),
]


def _save_png(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").save(dst)


def make_cirr(root: Path, samples) -> dict:
    """CIRR rc2 layout: captions/, image_splits/, dev/ and test1/ images. Returns {sample id: image name}."""
    by_id = {s.id: s for s in samples}
    names = {}
    split = {}
    for i, s in enumerate(samples):
        name = f"dev-{i}-{s.id.replace('_', '')}-img0"
        names[s.id] = name
        _save_png(s.path, root / "dev" / f"{name}.png")
        split[name] = f"./dev/{name}.png"
    (root / "image_splits").mkdir(parents=True)
    (root / "captions").mkdir(parents=True)
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps(split))
    others = [s.id for s in samples]
    caps = []
    for j, (ref, text, tgt) in enumerate(CIRR_QUERIES):
        fillers = [o for o in others if o not in (ref, tgt)][j : j + 4]
        members = [names[ref], names[tgt]] + [names[f] for f in fillers]
        members = list(dict.fromkeys(members))
        while len(members) < 6:
            members.append(names[[o for o in others if names[o] not in members][0]])
        caps.append({
            "pairid": 1000 + j, "reference": names[ref], "target_hard": names[tgt], "target_soft": {names[tgt]: 1.0},
            "caption": text, "img_set": {"id": j, "members": members, "reference_rank": 0, "target_rank": 1},
        })
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    # a test1 split: no targets
    test_split = {n: p.replace("./dev/", "./test1/") for n, p in split.items()}
    for s in samples:
        _save_png(by_id[s.id].path, root / "test1" / f"{names[s.id]}.png")
    (root / "image_splits" / "split.rc2.test1.json").write_text(json.dumps(test_split))
    test_caps = [{k: v for k, v in c.items() if k not in ("target_hard", "target_soft")} for c in caps[:4]]
    for c in test_caps:
        c["img_set"] = {k: v for k, v in c["img_set"].items() if k != "target_rank"}
    (root / "captions" / "cap.rc2.test1.json").write_text(json.dumps(test_caps))
    return names


FIQ = {
    # category -> (gallery sample ids, [(candidate, [caption1, caption2], target)])
    "dress": (
        ["chelsea", "coffee", "flower", "rocket", "china", "astronaut", "horse", "present"],
        [("chelsea", ["is a cup of coffee", "has a saucer and a spoon."], "coffee"),
         ("china", ["is an orange flower", "has petals"], "flower"),
         ("astronaut", ["shows the rocket", "is on a launch pad?"], "rocket")],
    ),
    "toptee": (
        ["motorcycle_left", "motorcycle_right", "brick", "gravel", "grass", "coins"],
        [("brick", ["is gravel", "is grey and rough"], "gravel"),
         ("coins", ["is a red motorcycle", "is parked in a garage"], "motorcycle_left")],
    ),
}


def make_fashioniq(root: Path, samples) -> None:
    by_id = {s.id: s for s in samples}
    (root / "images").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions").mkdir()
    for cat, (gallery, queries) in FIQ.items():
        for k, sid in enumerate(gallery):
            ext = "png" if k % 4 == 3 else "jpg"  # some mirrors ship .png
            Image.open(by_id[sid].path).convert("RGB").save(root / "images" / f"{sid.upper()}.{ext}")
        (root / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps([s.upper() for s in gallery]))
        caps = [{"candidate": c.upper(), "target": t.upper(), "captions": cc} for c, cc, t in queries]
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(caps))
    (root / "image_splits" / "split.shirt.val.json").write_text("[]")
    (root / "captions" / "cap.shirt.val.json").write_text("[]")


CIRCO_QUERIES = [
    # reference, relative caption, shared concept, ground truths (first = target), aspects
    ("motorcycle_left", "is seen from another side", "a red motorcycle", ["motorcycle_right", "motorcycle_left"], ["viewpoint"]),
    ("chelsea", "is a drink instead of an animal", "something on a table", ["coffee"], ["compare_change"]),
    ("brick", "shows loose stones or plants instead", "a grey texture", ["gravel", "grass", "coins"], ["addition", "cardinality"]),
    ("astronaut", "shows the launch pad with the rocket", "space flight", ["rocket", "hubble"], ["spatial_relations_background"]),
]


def make_circo(root: Path, samples) -> dict[str, int]:
    """CIRCO layout with integer COCO-style ids. Returns {sample id: image id}."""
    ids = {s.id: 100 + i for i, s in enumerate(samples)}
    img_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    img_dir.mkdir(parents=True)
    (root / "COCO2017_unlabeled" / "annotations").mkdir()
    images = []
    for s in samples:
        fn = f"{ids[s.id]:012d}.jpg"
        Image.open(s.path).convert("RGB").save(img_dir / fn)
        images.append({"id": ids[s.id], "file_name": fn})
    (root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps({"images": images}))
    (root / "annotations").mkdir()
    val = []
    for j, (ref, rel, shared, gts, aspects) in enumerate(CIRCO_QUERIES):
        val.append({"reference_img_id": ids[ref], "target_img_id": ids[gts[0]], "relative_caption": rel,
                    "shared_concept": shared, "gt_img_ids": [ids[g] for g in gts], "id": j, "semantic_aspects": aspects})
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    test = [{k: v for k, v in q.items() if k in ("reference_img_id", "relative_caption", "shared_concept", "id")} for q in val]
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return ids
