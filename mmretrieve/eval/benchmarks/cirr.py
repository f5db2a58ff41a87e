"""CIRR (rc2), in its official layout (``git clone -b cirr_dataset``): ``captions/cap.rc2.{train,val,test1}.json``,
``image_splits/split.rc2.{split}.json`` (name -> "./dev/dev-244-0-img0.png"), images under the root. Also
accepted: the CIRR repository's own layout, with the images under ``img_raw/`` beside ``captions/``, and
SEARLE's (``ROOT/cirr/captions``, ``ROOT/cirr/image_splits``, images in ``ROOT/dev``, ``ROOT/test1``).

Protocol (``Cuberick-Orion/CIRR``; SEARLE ``validate.py``): the gallery is every image of the split; the
reference image is deleted from the ranking; Recall@K (K = 1, 5, 10, 50) on ``target_hard``;
Recall_subset@K (K = 1, 2, 3) restricts the same ranking to the query's ``img_set.members``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from mmretrieve.errors import DatasetError, SubmissionError
from mmretrieve.eval import datasets as D
from mmretrieve.eval import metrics as M
from mmretrieve.eval.submission import check_coverage, check_ids

log = logging.getLogger(__name__)


def _layouts(fsplit: str) -> str:
    return (f"ROOT/captions/cap.rc2.{fsplit}.json and ROOT/image_splits/split.rc2.{fsplit}.json (git clone -b "
            "cirr_dataset) with the images in ROOT/dev, ROOT/test1, ROOT/train or in ROOT/img_raw/ (the CIRR repository's "
            "layout); or SEARLE's: ROOT/cirr/captions, ROOT/cirr/image_splits and the images in ROOT/dev, ROOT/test1")


def annotation_dir(root: Path, fsplit: str) -> Path:
    """The folder holding ``captions/`` and ``image_splits/``: the root, or SEARLE's ``root/cirr``."""
    for d in (root, root / "cirr"):
        if (d / "captions" / f"cap.rc2.{fsplit}.json").is_file():
            return d
    raise DatasetError(f"{root}: no CIRR annotations for split {fsplit!r}; expected one of these layouts: {_layouts(fsplit)}")


def image_base(root: Path, ann: Path, rel_paths: list[str], probe: int = 8) -> Path:
    """The folder the split's image paths ("./dev/...png") are relative to: the one where most of the
    first ``probe`` images exist, among the root, ``img_raw/`` and the annotation folder."""
    bases = list(dict.fromkeys([root, root / "img_raw", ann, ann / "img_raw"]))
    sample = rel_paths[:probe]
    found = [sum((b / p).is_file() for p in sample) for b in bases]
    return bases[max(range(len(bases)), key=lambda i: found[i])] if any(found) else root


def _subset_names(path: Path) -> list[str]:
    names = [path.name.replace("recall.json", "recall_subset.json"), "recall_subset.json", f"{path.stem}_subset.json",
             f"subset_{path.name}", "subset_*.json", "*recall_subset*.json"]
    return [n for n in dict.fromkeys(names) if n != path.name]


def _is_subset_file(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("metric") == "recall_subset"


def _cirr_id(split_prefix: str):
    pattern = re.compile(rf"^{split_prefix}-\d+-\d+-img[01]$")
    return lambda x: isinstance(x, str) and bool(pattern.match(x))


@D.register
class CIRR(D.Benchmark):
    name = "cirr"
    help = "CIRR: Recall@1/5/10/50 and Recall_subset@1/2/3"
    remove_reference = True
    needs_full_ranking = True  # the subset metric needs every member's position

    def load(self, root: Path, split: str = "val", *, allow_missing: bool = False, check_images: bool = True) -> D.CIRDataset:
        """``split``: val, test (= test1) or train."""
        fsplit = {"test": "test1"}.get(split, split)
        ann = annotation_dir(root, fsplit)
        cap_file = ann / "captions" / f"cap.rc2.{fsplit}.json"
        caps = D.read_json(cap_file)
        names = D.read_json(ann / "image_splits" / f"split.rc2.{fsplit}.json")
        if not isinstance(caps, list) or not isinstance(names, dict):
            raise DatasetError(f"{root}: unexpected CIRR annotation structure (captions must be a list, splits a mapping)")
        base = image_base(root, ann, [str(p) for p in names.values()])
        gallery = {str(n): str(base / str(p)) for n, p in names.items()}
        queries = []
        for i, c in enumerate(caps):
            try:
                queries.append(D.CIRQuery(
                    qid=str(c["pairid"]), reference=str(c["reference"]), texts=[str(c["caption"])],
                    target=str(c["target_hard"]) if c.get("target_hard") is not None else None,
                    subset=[str(m) for m in c["img_set"]["members"]], info={"caption": c["caption"]},
                ))
            except (KeyError, TypeError) as e:
                raise DatasetError(f"{cap_file}: entry {i} lacks {e}") from None
        missing = D.check_missing(gallery, check_images)
        if gallery and len(missing) == len(gallery):
            raise DatasetError(f"{root}: none of the {len(gallery)} CIRR {fsplit} images was found (e.g. "
                               f"{next(iter(names.values()))}); expected one of these layouts: {_layouts(fsplit)}")
        ds = D.CIRDataset("cirr", split, root, {None: gallery}, queries, remove_reference=True,
                        missing_images=missing, known_ids={None: set(gallery)})
        return D.finish(ds, allow_missing)

    def metrics(self, rankings, queries):
        return M.cirr_metrics(rankings, queries)

    def submission_files(self, ds, full):
        by_q = {q.qid: q for q in ds.queries}
        rec = {qid: M.remove_reference(r, by_q[qid].reference) for qid, r in full.items()}
        sub = {qid: [x for x in rec[qid] if x in set(by_q[qid].subset)] for qid in rec}
        main = {"version": "rc2", "metric": "recall", **{q: r[:D.TOP] for q, r in rec.items()}}
        subset = {"version": "rc2", "metric": "recall_subset", **{q: r[:3] for q, r in sub.items()}}
        return {"recall.json": main, "recall_subset.json": subset}

    official_queries = {"test": 4148, "test1": 4148, "val": 4181}

    @staticmethod
    def find_subset_file(path: Path) -> Path | None:
        """The recall_subset file beside a recall file: ``recall_subset.json``, the recall file's name with
        ``recall`` -> ``recall_subset`` (CIRR's demo files), ``<stem>_subset.json`` or ``subset_*.json``."""
        for name in _subset_names(path):
            for p in sorted(path.parent.glob(name)):
                if p != path and _is_subset_file(p):
                    return p
        return None

    def check_submission(self, path, data, ds, split):
        """The test server's format: ``{"version": "rc2", "metric": "recall" | "recall_subset", "<pairid>":
        [50 | 3 image names of the split, no .png, unique]}`` covering every query (at most 5 MB)."""
        fsplit = {"test": "test1", "val": "dev"}.get(split, split)
        if not isinstance(data, dict) or data.get("version") != "rc2" or data.get("metric") not in ("recall", "recall_subset"):
            raise SubmissionError(f'{path}: a CIRR submission has "version": "rc2" and "metric": "recall" or "recall_subset"')
        metric = data["metric"]
        n = D.TOP if metric == "recall" else 3
        what = f"a CIRR {fsplit} image name (like {fsplit}-147-1-img1, without .png)"
        pattern = _cirr_id(fsplit) if ds is None else (lambda x: isinstance(x, str))  # with ds: its names, below
        lo = n if ds is None else min(n, len(ds.galleries[None]) - 1)  # a small split cannot fill 50
        got = check_ids(path, data, count=(lo, n), pattern=pattern, what=what, skip=("version", "metric"))
        against = check_coverage(path, got, ds, self.official_queries.get(split), split)
        if ds is not None:
            by_q = {q.qid: q for q in ds.queries}
            known = ds.known_ids[None]
            for qid, lst in got.items():
                members = set(by_q[qid].subset)
                bad = next((x for x in lst if x not in known or (metric == "recall_subset" and x not in members)), None)
                if bad is not None:
                    where = "its image set" if bad in known else f"the {ds.split} split"
                    raise SubmissionError(f"{path}: query {qid}: {bad!r} is not in {where}")
        size = path.stat().st_size
        if size > 5 * 1024 * 1024:
            raise SubmissionError(f"{path}: {size / 2**20:.1f} MB; the CIRR server takes at most 5 MB")
        return {"file": str(path), "metric": metric, "queries": len(got), "ids_per_query": n, "checked_against": against}

    def score_files(self, ds, path, data, subset_path):
        from mmretrieve.eval.submission import load_json, validate_lists

        if data.get("version") != "rc2" or data.get("metric") != "recall":
            raise SubmissionError(f"{path}: a CIRR recall file has \"version\": \"rc2\" and \"metric\": \"recall\"")
        rec = validate_lists(path, data, ds, min_len=min(D.TOP, len(ds.galleries[None]) - 1))
        by_q = {q.qid: q for q in ds.queries}
        out = {f"recall@{k}": M.pct(M.recall_at(M.remove_reference(rec[q.qid], q.reference), q.target, k) for q in ds.queries)
               for k in M.CIRR_KS}
        if subset_path is None:
            subset_path = self.find_subset_file(path)
        if subset_path is None:
            log.warning("%s: subset metrics not computed: no recall_subset file beside it (looked for %s); "
                        "give one with --subset-rankings", path, ", ".join(_subset_names(path)))
            return out
        sdata = load_json(subset_path)
        if not isinstance(sdata, dict) or sdata.get("metric") != "recall_subset":
            raise SubmissionError(f"{subset_path}: a CIRR subset file has \"metric\": \"recall_subset\"")
        sub = validate_lists(subset_path, sdata, ds, min_len=3)
        for qid, lst in sub.items():
            stray = [x for x in lst if x not in set(by_q[qid].subset)]
            if stray:
                raise SubmissionError(f"{subset_path}: query {qid}: {stray[0]!r} is not a member of its image set")
        for k in M.CIRR_SUBSET_KS:  # the reference is no candidate here either (as in the recall file)
            out[f"recall_subset@{k}"] = M.pct(
                M.recall_at(M.remove_reference(sub[q.qid], q.reference), q.target, k) for q in ds.queries
            )
        return out
