"""Loaders that read the composed-retrieval benchmarks' official layouts unchanged.

- **CIRR** (``git clone -b cirr_dataset``): ``captions/cap.rc2.{train,val,test1}.json``,
  ``image_splits/split.rc2.{split}.json`` (name -> "./dev/dev-244-0-img0.png"), images under the root.
- **FashionIQ**: ``captions/cap.{dress,shirt,toptee}.{split}.json``, ``image_splits/split.{cat}.{split}.json``,
  ``images/<asin>.jpg`` (or ``.png`` in some mirrors).
- **CIRCO**: ``annotations/{val,test}.json``, ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json``
  and the images under ``COCO2017_unlabeled/unlabeled2017/``.

Missing images are counted and reported; without ``allow_missing`` they are an error that says how
many and which, with ``allow_missing`` the queries that need them are dropped (and counted).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmretrieve.eval import metrics as M
from mmretrieve.registry import Registry

log = logging.getLogger(__name__)

DATASETS: Registry[Callable[..., Any]] = Registry("dataset")


class DatasetError(ValueError):
    pass


@dataclass
class CIRQuery:
    qid: str
    reference: str
    texts: list[str]
    target: str | None = None
    gts: list[str] = field(default_factory=list)
    subset: list[str] = field(default_factory=list)
    group: str | None = None
    aspects: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CIRDataset:
    name: str
    split: str
    root: Path
    #: gallery per group (FashionIQ category; ``None`` for single-gallery benchmarks): image id -> path
    galleries: dict[str | None, dict[str, str]]
    queries: list[CIRQuery]
    remove_reference: bool
    config: dict[str, Any] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    dropped_queries: int = 0
    #: every image id the split knows (incl. missing files): rankings may only contain these
    known_ids: dict[str | None, set[str]] = field(default_factory=dict)

    @property
    def has_targets(self) -> bool:
        return bool(self.queries) and all(q.target is not None for q in self.queries)

    @property
    def needs_full_ranking(self) -> bool:
        """CIRR's Recall_subset needs the position of every subset member; EgoCVR filters the full
        ranking to each query's gallery."""
        return self.name in ("cirr", "egocvr")

    def metrics(self, rankings: dict[str, list[str]]) -> dict[str, float]:
        if self.name == "cirr":
            return M.cirr_metrics(rankings, self.queries)
        if self.name == "fashioniq":
            return M.fashioniq_metrics(rankings, self.queries)
        if self.name == "circo":
            return M.circo_metrics(rankings, self.queries)
        if self.name == "egocvr":
            return M.egocvr_metrics(rankings, self.queries)
        raise DatasetError(f"no metric for dataset {self.name!r}")

    def target_rank(self, q: CIRQuery, ranking: list[str]) -> int | None:
        """The 1-based rank of the (first) ground truth in a ranking, after the protocol's reference removal."""
        if self.name == "egocvr":
            ranking = M.protocol_ranking(ranking, "global")
        r = M.remove_reference(ranking, q.reference) if self.remove_reference else ranking
        if self.name == "egocvr":  # rank within the query's (global) gallery, as the protocol filters
            g = set(q.info.get("global_gallery") or [])
            r = [x for x in r if x in g]
        return M.first_rank(r, q.gts or ([q.target] if q.target else []))

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "split": self.split,
            "root": str(self.root),
            "queries": len(self.queries),
            "gallery": {str(g): len(v) for g, v in self.galleries.items()},
            "missing_images": len(self.missing_images),
            "dropped_queries": self.dropped_queries,
            **self.config,
        }


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"missing file {path} (is --root the dataset's top folder?)")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _check_missing(name: str, gallery: dict[str, str], check_images: bool) -> list[str]:
    if not check_images:
        return []
    return sorted(i for i, p in gallery.items() if not os.path.isfile(p))


def _finish(ds: CIRDataset, allow_missing: bool) -> CIRDataset:
    """Drop missing images (and the queries that need them) or refuse, naming the problem."""
    missing = set(ds.missing_images)
    if not missing:
        return ds
    ex = ", ".join(sorted(missing)[:5])
    if not allow_missing:
        raise DatasetError(
            f"{ds.name} {ds.split}: {len(missing)} image file(s) are missing under {ds.root} (e.g. {ex}); "
            "pass --allow-missing to evaluate on the images that exist (queries that need a missing image are dropped)"
        )
    for g in ds.galleries:
        ds.galleries[g] = {i: p for i, p in ds.galleries[g].items() if i not in missing}
    keep = []
    for q in ds.queries:
        if q.reference in missing or (q.target is not None and q.target in missing):
            ds.dropped_queries += 1
        else:
            keep.append(q)
    ds.queries = keep
    log.warning("%s %s: %d missing image(s) (e.g. %s); %d quer%s dropped", ds.name, ds.split, len(missing), ex,
                ds.dropped_queries, "y" if ds.dropped_queries == 1 else "ies")
    return ds


# ---- CIRR ---------------------------------------------------------------------------------------------
@DATASETS.register("cirr")
def load_cirr(root: str | os.PathLike, split: str = "val", *, allow_missing: bool = False, check_images: bool = True) -> CIRDataset:
    """CIRR rc2. ``split``: val, test (= test1) or train."""
    root = Path(root)
    fsplit = {"test": "test1"}.get(split, split)
    caps = _read_json(root / "captions" / f"cap.rc2.{fsplit}.json")
    names = _read_json(root / "image_splits" / f"split.rc2.{fsplit}.json")
    if not isinstance(caps, list) or not isinstance(names, dict):
        raise DatasetError(f"{root}: unexpected CIRR annotation structure (captions must be a list, splits a mapping)")
    gallery = {str(n): str(root / str(p)) for n, p in names.items()}
    queries = []
    for i, c in enumerate(caps):
        try:
            q = CIRQuery(
                qid=str(c["pairid"]),
                reference=str(c["reference"]),
                texts=[str(c["caption"])],
                target=str(c["target_hard"]) if c.get("target_hard") is not None else None,
                subset=[str(m) for m in c["img_set"]["members"]],
                info={"caption": c["caption"]},
            )
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{root / 'captions' / f'cap.rc2.{fsplit}.json'}: entry {i} lacks {e}") from None
        queries.append(q)
    ds = CIRDataset("cirr", split, root, {None: gallery}, queries, remove_reference=True,
                    missing_images=_check_missing("cirr", gallery, check_images), known_ids={None: set(gallery)})
    return _finish(ds, allow_missing)


# ---- FashionIQ ------------------------------------------------------------------------------------------
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
FIQ_CAPTION_STYLES = ("searle", "pic2word", "covr")


def fashioniq_texts(c1: str, c2: str, style: str = "searle") -> list[str]:
    """How a FashionIQ query's two captions become query text(s).

    - ``searle`` (default; SEARLE and LinCIR): ``"{c1} and {c2}"`` and the reversed order, each stripped
      of ``'.?, '``; their normalised embeddings are averaged. (SEARLE wraps them in "a photo of $ that
      ..." for its pseudo-token; a plain dual encoder has no pseudo-token, so the joined captions are used.)
    - ``pic2word``: ``"{c2} and {c1}"``.
    - ``covr``: ``"{c1} and {c2}"``.
    """
    a, b = c1.strip(".?, "), c2.strip(".?, ")
    if style == "searle":
        return [f"{a} and {b}", f"{b} and {a}"]
    if style == "pic2word":
        return [f"{c2} and {c1}"]
    if style == "covr":
        return [f"{c1} and {c2}"]
    raise DatasetError(f"unknown FashionIQ caption style {style!r}; expected one of {', '.join(FIQ_CAPTION_STYLES)}")


@DATASETS.register("fashioniq")
def load_fashioniq(
    root: str | os.PathLike,
    split: str = "val",
    *,
    categories: tuple[str, ...] | list[str] | str = FIQ_CATEGORIES,
    caption_style: str = "searle",
    allow_missing: bool = False,
    check_images: bool = True,
) -> CIRDataset:
    root = Path(root)
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    bad = [c for c in categories if c not in FIQ_CATEGORIES]
    if bad:
        raise DatasetError(f"unknown FashionIQ categories {bad}; expected a subset of {', '.join(FIQ_CATEGORIES)}")
    fashioniq_texts("a", "b", caption_style)  # validate early
    galleries, known, queries, missing = {}, {}, [], []
    for cat in categories:
        asins = _read_json(root / "image_splits" / f"split.{cat}.{split}.json")
        caps = _read_json(root / "captions" / f"cap.{cat}.{split}.json")
        gal = {}
        for a in asins:
            a = str(a)
            jpg, png = root / "images" / f"{a}.jpg", root / "images" / f"{a}.png"
            gal[a] = str(png if (not jpg.is_file() and png.is_file()) else jpg)
        galleries[cat], known[cat] = gal, set(gal)
        missing += _check_missing("fashioniq", gal, check_images)
        for i, c in enumerate(caps):
            try:
                c1, c2 = c["captions"][0], c["captions"][1]
                queries.append(
                    CIRQuery(
                        qid=f"{cat}/{i}", reference=str(c["candidate"]), texts=fashioniq_texts(c1, c2, caption_style),
                        target=str(c["target"]) if c.get("target") is not None else None, group=cat,
                        info={"captions": [c1, c2]},
                    )
                )
            except (KeyError, IndexError, TypeError) as e:
                raise DatasetError(f"{root / 'captions' / f'cap.{cat}.{split}.json'}: entry {i} lacks {e}") from None
    ds = CIRDataset("fashioniq", split, root, galleries, queries, remove_reference=False, missing_images=missing,
                    known_ids=known, config={"caption_style": caption_style, "categories": list(categories)})
    return _finish(ds, allow_missing)


# ---- CIRCO ----------------------------------------------------------------------------------------------
CIRCO_TEXT_STYLES = ("relative", "shared")


def circo_text(relative_caption: str, shared_concept: str | None, style: str = "relative") -> str:
    """``relative``: the relative caption alone (SEARLE, LinCIR, CIReVL). ``shared``: "find a picture that
    also {shared concept}, but {relative caption}" (MegaPairs' advice, VectorSpaceLab/MegaPairs#15)."""
    if style == "relative":
        return relative_caption
    if style == "shared":
        return f"find a picture that also {shared_concept or ''}, but {relative_caption}".replace("  ", " ")
    raise DatasetError(f"unknown CIRCO text style {style!r}; expected one of {', '.join(CIRCO_TEXT_STYLES)}")


@DATASETS.register("circo")
def load_circo(
    root: str | os.PathLike,
    split: str = "val",
    *,
    text_style: str = "relative",
    allow_missing: bool = False,
    check_images: bool = True,
) -> CIRDataset:
    root = Path(root)
    info = _read_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    img_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    try:
        gallery = {str(int(im["id"])): str(img_dir / im["file_name"]) for im in info["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{root}: unexpected image_info_unlabeled2017.json structure ({e})") from None
    ann = _read_json(root / "annotations" / f"{split}.json")
    queries = []
    for i, a in enumerate(ann):
        try:
            gts = [str(int(x)) for x in a.get("gt_img_ids", [])]
            target = str(int(a["target_img_id"])) if a.get("target_img_id") is not None else None
            if target is not None and gts and gts[0] != target:
                raise DatasetError(f"{root / 'annotations' / f'{split}.json'}: entry {i}: target_img_id is not gt_img_ids[0]")
            queries.append(
                CIRQuery(
                    qid=str(int(a["id"])), reference=str(int(a["reference_img_id"])),
                    texts=[circo_text(a["relative_caption"], a.get("shared_concept"), text_style)],
                    target=target, gts=gts or ([target] if target else []), aspects=list(a.get("semantic_aspects", [])),
                    info={"relative_caption": a["relative_caption"], "shared_concept": a.get("shared_concept")},
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{root / 'annotations' / f'{split}.json'}: entry {i} lacks or mangles {e}") from None
    ds = CIRDataset("circo", split, root, {None: gallery}, queries, remove_reference=False,
                    missing_images=_check_missing("circo", gallery, check_images), known_ids={None: set(gallery)},
                    config={"text_style": text_style})
    return _finish(ds, allow_missing)


# ---- EgoCVR ---------------------------------------------------------------------------------------------
EGOCVR_TEXTS = {"tfcvr": "modified_captions", "instruction": "instruction", "gt": "target_clip_narration"}


def _clip_video_uid(clip: str) -> str:
    return clip.split("_")[0]


@DATASETS.register("egocvr")
def load_egocvr(
    root: str | os.PathLike,
    split: str = "test",
    *,
    text: str = "tfcvr",
    videos: str | os.PathLike | None = None,
    allow_missing: bool = False,
    check_images: bool = True,
) -> CIRDataset:
    """EgoCVR: ``annotation/egocvr/egocvr_annotations_gallery.csv`` (the annotations plus ``global_idx`` /
    ``local_idx``, row indices into ``egocvr_data.csv``), ``annotation/egocvr/egocvr_data.csv`` and the
    clips at ``<videos>/<video_uid>/<clip_name>.mp4`` (``videos`` defaults to the first of ``clips``,
    ``clips_nooverlap_fullscale``, ``data/clips_nooverlap_fullscale`` under the root). Without the gallery
    file the galleries are derived (global: every other clip; local: the other clips of the same video),
    which is not the official split and is reported as such. ``text``: ``tfcvr`` (the modified captions,
    default), ``instruction`` or ``gt`` (the target narration, an oracle)."""
    import csv
    from ast import literal_eval

    root = Path(root)
    if text not in EGOCVR_TEXTS:
        raise DatasetError(f"unknown EgoCVR text {text!r}; expected one of {', '.join(EGOCVR_TEXTS)}")
    ann_dir = root / "annotation" / "egocvr"
    data_csv = ann_dir / "egocvr_data.csv"
    if not data_csv.is_file():
        raise DatasetError(f"missing file {data_csv} (is --root the EgoCVR checkout?)")
    with open(data_csv, newline="", encoding="utf-8") as fh:
        clips = [r["clip_name"] for r in csv.DictReader(fh)]
    gal_csv = ann_dir / "egocvr_annotations_gallery.csv"
    derived = not gal_csv.is_file()
    ann_csv = ann_dir / "egocvr_annotations.csv" if derived else gal_csv
    if not ann_csv.is_file():
        raise DatasetError(f"missing file {ann_csv}")
    if derived:
        log.warning("%s not found: deriving galleries (not the official EgoCVR split)", gal_csv)
    vdir = Path(videos) if videos else next(
        (root / d for d in ("clips", "clips_nooverlap_fullscale", "data/clips_nooverlap_fullscale") if (root / d).is_dir()),
        root / "clips",
    )
    gallery = {c: str(vdir / _clip_video_uid(c) / f"{c}.mp4") for c in clips}
    by_video: dict[str, list[str]] = {}
    for c in clips:
        by_video.setdefault(_clip_video_uid(c), []).append(c)
    queries = []
    with open(ann_csv, newline="", encoding="utf-8") as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            try:
                ref = r["video_clip_id"]
                targets = [str(t) for t in literal_eval(r["target_clip_ids"])]
                txt = (r[EGOCVR_TEXTS[text]] or "").strip()
                if derived:
                    glob = [c for c in clips if c != ref]
                    local = [c for c in by_video.get(_clip_video_uid(ref), []) if c != ref]
                else:
                    glob = [clips[int(j)] for j in literal_eval(r["global_idx"])]
                    local = [clips[int(j)] for j in literal_eval(r["local_idx"])]
            except (KeyError, ValueError, SyntaxError, IndexError) as e:
                raise DatasetError(f"{ann_csv}: row {i + 2}: {type(e).__name__}: {e}") from None
            queries.append(CIRQuery(
                qid=str(i), reference=ref, texts=[txt or r.get("instruction", "")], target=targets[0] if targets else None,
                gts=targets, info={"instruction": r.get("instruction"), "global_gallery": glob, "local_gallery": local},
            ))
    ds = CIRDataset("egocvr", split, root, {None: gallery}, queries, remove_reference=False,
                    missing_images=_check_missing("egocvr", gallery, check_images), known_ids={None: set(gallery)},
                    config={"text": text, "galleries": "derived" if derived else "official", "videos": str(vdir)})
    return _finish(ds, allow_missing)


def load_dataset(name: str, root: str | os.PathLike, split: str = "val", **kw: Any) -> CIRDataset:
    return DATASETS.create(name, root=root, split=split, **kw)
