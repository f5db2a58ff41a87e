"""CIRCO, in its official layout: ``annotations/{val,test}.json``,
``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` and the images under
``COCO2017_unlabeled/unlabeled2017/``.

Protocol (``miccunifi/CIRCO`` ``src/evaluation.py``): mAP@k over all ground truths on a top-50 list of
unique ids, Recall@k on ``target_img_id``, semantic-aspect mAP@10 as a breakdown.
"""

from __future__ import annotations

from pathlib import Path

from mmretrieve.errors import DatasetError, SubmissionError
from mmretrieve.eval import datasets as D
from mmretrieve.eval import metrics as M
from mmretrieve.eval.submission import check_coverage, check_ids

CIRCO_TEXT_STYLES = ("relative", "shared")


def circo_text(relative_caption: str, shared_concept: str | None, style: str = "relative") -> str:
    """``relative``: the relative caption alone (SEARLE, LinCIR, CIReVL). ``shared``: "find a picture that
    also {shared concept}, but {relative caption}" (MegaPairs' advice, VectorSpaceLab/MegaPairs#15)."""
    if style == "relative":
        return relative_caption
    if style == "shared":
        return f"find a picture that also {shared_concept or ''}, but {relative_caption}".replace("  ", " ")
    raise DatasetError(f"unknown CIRCO text style {style!r}; expected one of {', '.join(CIRCO_TEXT_STYLES)}")


@D.register
class CIRCO(D.Benchmark):
    name = "circo"
    help = "CIRCO: mAP@5/10/25/50 and Recall@k"
    cli_options = {
        "text_style": {"flags": ["--text-style"], "default": "relative", "choices": list(CIRCO_TEXT_STYLES),
                       "help": "relative caption only (SEARLE/LinCIR/CIReVL) or with the shared concept"},
    }

    def load(self, root: Path, split: str = "val", *, text_style: str = "relative", allow_missing: bool = False,
             check_images: bool = True) -> D.CIRDataset:
        info = D.read_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
        img_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
        try:
            gallery = {str(int(im["id"])): str(img_dir / im["file_name"]) for im in info["images"]}
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{root}: unexpected image_info_unlabeled2017.json structure ({e})") from None
        ann_file = root / "annotations" / f"{split}.json"
        queries = [self._query(ann_file, i, a, text_style) for i, a in enumerate(D.read_json(ann_file))]
        ds = D.CIRDataset("circo", split, root, {None: gallery}, queries, remove_reference=False,
                        missing_images=D.check_missing(gallery, check_images), known_ids={None: set(gallery)},
                        config={"text_style": text_style})
        return D.finish(ds, allow_missing)

    @staticmethod
    def _query(ann_file: Path, i: int, a: dict, text_style: str) -> D.CIRQuery:
        try:
            gts = [str(int(x)) for x in a.get("gt_img_ids", [])]
            target = str(int(a["target_img_id"])) if a.get("target_img_id") is not None else None
            if target is not None and gts and gts[0] != target:
                raise DatasetError(f"{ann_file}: entry {i}: target_img_id is not gt_img_ids[0]")
            return D.CIRQuery(
                qid=str(int(a["id"])), reference=str(int(a["reference_img_id"])),
                texts=[circo_text(a["relative_caption"], a.get("shared_concept"), text_style)],
                target=target, gts=gts or ([target] if target else []), aspects=list(a.get("semantic_aspects", [])),
                info={"relative_caption": a["relative_caption"], "shared_concept": a.get("shared_concept")},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"{ann_file}: entry {i} lacks or mangles {e}") from None

    def metrics(self, rankings, queries):
        return M.circo_metrics(rankings, queries)

    def submission_files(self, ds, full):
        return {"circo.json": {qid: [int(x) for x in r[:D.TOP]] for qid, r in full.items()}}

    official_queries = {"test": 800, "val": 220}

    def check_submission(self, path, data, ds, split):
        """The test server's format: ``{"<query id>": [50 unique int image ids]}`` covering every query."""
        lo = D.TOP if ds is None else min(D.TOP, len(ds.galleries[None]))
        got = check_ids(path, data, count=(lo, D.TOP), what="an image id (an integer)",
                        pattern=lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0)
        against = check_coverage(path, got, ds, self.official_queries.get(split), split)
        if ds is not None:
            known = ds.known_ids[None]
            for qid, lst in got.items():
                bad = next((x for x in lst if str(x) not in known), None)
                if bad is not None:
                    raise SubmissionError(f"{path}: query {qid}: image id {bad} is not in the COCO unlabeled gallery")
        return {"file": str(path), "metric": "map", "queries": len(got), "ids_per_query": D.TOP, "checked_against": against}

    def score_files(self, ds, path, data, subset_path):
        from mmretrieve.eval.submission import validate_lists

        rec = validate_lists(path, data, ds, min_len=min(D.TOP, len(ds.galleries[None])), cast=int)
        return M.circo_metrics(rec, ds.queries)
