"""FashionIQ, in its official layout: ``captions/cap.{dress,shirt,toptee}.{split}.json``,
``image_splits/split.{cat}.{split}.json``, ``images/<asin>.jpg`` (or ``.png`` in some mirrors).

Protocol (SEARLE / LinCIR ``validate.py``): the gallery is the category's split; the reference is *not*
removed; R@10 and R@50 per category, ``average`` the mean of the categories.
"""

from __future__ import annotations

from pathlib import Path

from mmretrieve.errors import DatasetError
from mmretrieve.eval import datasets as D
from mmretrieve.eval import metrics as M

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


@D.register
class FashionIQ(D.Benchmark):
    name = "fashioniq"
    help = "FashionIQ: R@10/R@50 per category and average"
    cli_options = {
        "categories": {"flags": ["--categories"], "default": "dress,shirt,toptee",
                       "help": "comma-separated categories (default: all three)"},
        "caption_style": {"flags": ["--caption-style"], "default": "searle", "choices": list(FIQ_CAPTION_STYLES),
                          "help": "how the two captions are joined (default: SEARLE/LinCIR, both orders averaged)"},
    }

    def load(self, root: Path, split: str = "val", *, categories=FIQ_CATEGORIES, caption_style: str = "searle",
             allow_missing: bool = False, check_images: bool = True) -> D.CIRDataset:
        if isinstance(categories, str):
            categories = [c.strip() for c in categories.split(",") if c.strip()]
        bad = [c for c in categories if c not in FIQ_CATEGORIES]
        if bad:
            raise DatasetError(f"unknown FashionIQ categories {bad}; expected a subset of {', '.join(FIQ_CATEGORIES)}")
        fashioniq_texts("a", "b", caption_style)  # validate early
        galleries, known, queries, missing = {}, {}, [], []
        for cat in categories:
            asins = D.read_json(root / "image_splits" / f"split.{cat}.{split}.json")
            cap_file = root / "captions" / f"cap.{cat}.{split}.json"
            caps = D.read_json(cap_file)
            gal = {}
            for a in asins:
                a = str(a)
                jpg, png = root / "images" / f"{a}.jpg", root / "images" / f"{a}.png"
                gal[a] = str(png if (not jpg.is_file() and png.is_file()) else jpg)
            galleries[cat], known[cat] = gal, set(gal)
            missing += D.check_missing(gal, check_images)
            for i, c in enumerate(caps):
                try:
                    c1, c2 = c["captions"][0], c["captions"][1]
                    queries.append(D.CIRQuery(
                        qid=f"{cat}/{i}", reference=str(c["candidate"]), texts=fashioniq_texts(c1, c2, caption_style),
                        target=str(c["target"]) if c.get("target") is not None else None, group=cat,
                        info={"captions": [c1, c2]},
                    ))
                except (KeyError, IndexError, TypeError) as e:
                    raise DatasetError(f"{cap_file}: entry {i} lacks {e}") from None
        ds = D.CIRDataset("fashioniq", split, root, galleries, queries, remove_reference=False, missing_images=missing,
                        known_ids=known, config={"caption_style": caption_style, "categories": list(categories)})
        return D.finish(ds, allow_missing)

    def metrics(self, rankings, queries):
        return M.fashioniq_metrics(rankings, queries)

    def score_files(self, ds, path, data, subset_path):
        from mmretrieve.eval.submission import validate_lists

        rec = validate_lists(path, data, ds, min_len=min(D.TOP, min(len(g) for g in ds.galleries.values())))
        return M.fashioniq_metrics(rec, ds.queries)
