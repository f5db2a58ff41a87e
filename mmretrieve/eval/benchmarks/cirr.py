"""CIRR (rc2), in its official layout (``git clone -b cirr_dataset``): ``captions/cap.rc2.{train,val,test1}.json``,
``image_splits/split.rc2.{split}.json`` (name -> "./dev/dev-244-0-img0.png"), images under the root.

Protocol (``Cuberick-Orion/CIRR``; SEARLE ``validate.py``): the gallery is every image of the split; the
reference image is deleted from the ranking; Recall@K (K = 1, 5, 10, 50) on ``target_hard``;
Recall_subset@K (K = 1, 2, 3) restricts the same ranking to the query's ``img_set.members``.
"""

from __future__ import annotations

from pathlib import Path

from mmretrieve.errors import DatasetError, SubmissionError
from mmretrieve.eval import datasets as D
from mmretrieve.eval import metrics as M


@D.register
class CIRR(D.Benchmark):
    name = "cirr"
    help = "CIRR: Recall@1/5/10/50 and Recall_subset@1/2/3"
    remove_reference = True
    needs_full_ranking = True  # the subset metric needs every member's position

    def load(self, root: Path, split: str = "val", *, allow_missing: bool = False, check_images: bool = True) -> D.CIRDataset:
        """``split``: val, test (= test1) or train."""
        fsplit = {"test": "test1"}.get(split, split)
        cap_file = root / "captions" / f"cap.rc2.{fsplit}.json"
        caps = D.read_json(cap_file)
        names = D.read_json(root / "image_splits" / f"split.rc2.{fsplit}.json")
        if not isinstance(caps, list) or not isinstance(names, dict):
            raise DatasetError(f"{root}: unexpected CIRR annotation structure (captions must be a list, splits a mapping)")
        gallery = {str(n): str(root / str(p)) for n, p in names.items()}
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
        ds = D.CIRDataset("cirr", split, root, {None: gallery}, queries, remove_reference=True,
                        missing_images=D.check_missing(gallery, check_images), known_ids={None: set(gallery)})
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

    def score_files(self, ds, path, data, subset_path):
        from mmretrieve.eval.submission import load_json, validate_lists

        if data.get("version") != "rc2" or data.get("metric") != "recall":
            raise SubmissionError(f"{path}: a CIRR recall file has \"version\": \"rc2\" and \"metric\": \"recall\"")
        rec = validate_lists(path, data, ds, min_len=min(D.TOP, len(ds.galleries[None]) - 1))
        by_q = {q.qid: q for q in ds.queries}
        out = {f"recall@{k}": M.pct(M.recall_at(M.remove_reference(rec[q.qid], q.reference), q.target, k) for q in ds.queries)
               for k in M.CIRR_KS}
        if subset_path is None:
            guess = path.with_name(path.name.replace("recall.json", "recall_subset.json"))
            subset_path = guess if guess != path and guess.is_file() else None
        if subset_path is None:
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
