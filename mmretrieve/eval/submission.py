"""Official ranking / submission files: write them from any run, read and validate them, score them
without any model (``mmretrieve eval score``).

- CIRR: ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 ids]}`` and a separate
  ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 ids]}`` (ids without ``.png``).
- CIRCO: ``{"<query id>": [top-50 int ids]}`` covering every query.
- FashionIQ has no test server; runs write ``{"<category>/<index>": [top-50 ids]}`` so they can be re-scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmretrieve.eval import metrics as M
from mmretrieve.eval.datasets import CIRDataset, DatasetError

TOP = 50


class SubmissionError(ValueError):
    pass


def cirr_files(rankings: dict[str, list[str]], subset_rankings: dict[str, list[str]]) -> tuple[dict, dict]:
    main = {"version": "rc2", "metric": "recall", **{q: r[:TOP] for q, r in rankings.items()}}
    sub = {"version": "rc2", "metric": "recall_subset", **{q: r[:3] for q, r in subset_rankings.items()}}
    return main, sub


def submission_files(ds: CIRDataset, full: dict[str, list[str]]) -> dict[str, dict]:
    """file name -> JSON content, from full (or long enough) rankings keyed by query id."""
    if ds.name == "cirr":
        by_q = {q.qid: q for q in ds.queries}
        rec = {qid: M.remove_reference(r, by_q[qid].reference) for qid, r in full.items()}
        sub = {qid: [x for x in rec[qid] if x in set(by_q[qid].subset)] for qid in rec}
        main, subset = cirr_files(rec, sub)
        return {"recall.json": main, "recall_subset.json": subset}
    if ds.name == "circo":
        return {"circo.json": {qid: [int(x) for x in r[:TOP]] for qid, r in full.items()}}
    if ds.name == "egocvr":  # the rankings filtered to each protocol's gallery (what the metrics read)
        by_q = {q.qid: q for q in ds.queries}
        out = {}
        for qid, r in full.items():
            q = by_q[qid]
            out[qid] = {p: [x for x in M.protocol_ranking(r, p) if x in set(q.info.get(f"{p}_gallery") or [])][:TOP]
                        for p in ("global", "local")}
        return {"egocvr.json": out}
    return {f"{ds.name}.json": {qid: r[:TOP] for qid, r in full.items()}}


def write_submission(ds: CIRDataset, full: dict[str, list[str]], out_dir: Path, prefix: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in submission_files(ds, full).items():
        p = out_dir / f"{prefix}{name}"
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(content, fh, sort_keys=True)
        paths.append(p)
    return paths


def _load(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise SubmissionError(f"rankings file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _validate_lists(path: Path, data: dict, ds: CIRDataset, *, min_len: int, cast=str) -> dict[str, list[str]]:
    by_q = {q.qid: q for q in ds.queries}
    known_all = set().union(*ds.known_ids.values()) if ds.known_ids else None
    out = {}
    for qid, lst in data.items():
        if qid in ("version", "metric"):
            continue
        if qid not in by_q:
            raise SubmissionError(f"{path}: unknown query id {qid!r} (not in {ds.name} {ds.split})")
        if not isinstance(lst, list):
            raise SubmissionError(f"{path}: query {qid}: expected a list of ids, got {type(lst).__name__}")
        ids = []
        for x in lst:
            try:
                ids.append(str(cast(x)))
            except (TypeError, ValueError):
                raise SubmissionError(f"{path}: query {qid}: {x!r} is not a valid {ds.name} image id") from None
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise SubmissionError(f"{path}: query {qid}: id {dup!r} appears more than once (predictions must be unique)")
        q = by_q[qid]
        known = ds.known_ids.get(q.group, known_all) if ds.known_ids else None
        if known is not None:
            unknown = [x for x in ids if x not in known]
            if unknown:
                raise SubmissionError(f"{path}: query {qid}: unknown image id {unknown[0]!r} (not in the {ds.name} {ds.split} gallery)")
        if len(ids) < min_len:
            raise SubmissionError(f"{path}: query {qid}: {len(ids)} ids, at least {min_len} are needed")
        out[qid] = ids
    missing = [q.qid for q in ds.queries if q.qid not in out]
    if missing:
        raise SubmissionError(f"{path}: {len(missing)} query id(s) have no ranking, e.g. {missing[0]!r}")
    return out


def score_files(ds: CIRDataset, rankings_path: str | Path, subset_path: str | Path | None = None) -> dict[str, float]:
    """Metrics (percent) of saved rankings in the official format, with the official definitions."""
    if not ds.has_targets:
        raise DatasetError(f"{ds.name} {ds.split} has no ground truth here: score it on the official server")
    rankings_path = Path(rankings_path)
    data = _load(rankings_path)
    if not isinstance(data, dict):
        raise SubmissionError(f"{rankings_path}: expected a JSON object of query id -> ranked ids")
    if ds.name == "cirr":
        if data.get("version") != "rc2" or data.get("metric") != "recall":
            raise SubmissionError(f"{rankings_path}: a CIRR recall file has \"version\": \"rc2\" and \"metric\": \"recall\"")
        rec = _validate_lists(rankings_path, data, ds, min_len=min(TOP, len(ds.galleries[None]) - 1))
        by_q = {q.qid: q for q in ds.queries}
        out = {}
        for k in M.CIRR_KS:
            out[f"recall@{k}"] = M._pct(M.recall_at(M.remove_reference(rec[q.qid], q.reference), q.target, k) for q in ds.queries)
        if subset_path is None:
            guess = rankings_path.with_name(rankings_path.name.replace("recall.json", "recall_subset.json"))
            subset_path = guess if guess != rankings_path and guess.is_file() else None
        if subset_path is not None:
            sdata = _load(Path(subset_path))
            if sdata.get("metric") != "recall_subset":
                raise SubmissionError(f"{subset_path}: a CIRR subset file has \"metric\": \"recall_subset\"")
            sub = _validate_lists(Path(subset_path), sdata, ds, min_len=3)
            for qid, lst in sub.items():
                stray = [x for x in lst if x not in set(by_q[qid].subset)]
                if stray:
                    raise SubmissionError(f"{subset_path}: query {qid}: {stray[0]!r} is not a member of its image set")
            for k in M.CIRR_SUBSET_KS:  # the reference is no candidate here either (as in the recall file)
                out[f"recall_subset@{k}"] = M._pct(
                    M.recall_at(M.remove_reference(sub[q.qid], q.reference), q.target, k) for q in ds.queries
                )
        return out
    if ds.name == "circo":
        rec = _validate_lists(rankings_path, data, ds, min_len=min(TOP, len(ds.galleries[None])), cast=int)
        return M.circo_metrics(rec, ds.queries)
    if ds.name == "egocvr":
        by_q = {q.qid: q for q in ds.queries}
        unknown = [k for k in data if k not in by_q]
        if unknown:
            raise SubmissionError(f"{rankings_path}: unknown query id {unknown[0]!r}")
        out = {}
        for proto, ks in M.EGOCVR_KS.items():
            hits = {k: [] for k in ks}
            for q in ds.queries:
                lst = (data.get(q.qid) or {}).get(proto)
                if lst is None:
                    raise SubmissionError(f"{rankings_path}: query {q.qid} has no {proto} ranking")
                if len(set(lst)) != len(lst):
                    raise SubmissionError(f"{rankings_path}: query {q.qid}: duplicate ids in the {proto} ranking")
                stray = [x for x in lst if x not in set(q.info.get(f"{proto}_gallery") or [])]
                if stray:
                    raise SubmissionError(f"{rankings_path}: query {q.qid}: {stray[0]!r} is not in its {proto} gallery")
                if len(lst) < M.EGOCVR_MIN_GALLERY:
                    continue
                for k in ks:
                    hits[k].append(1.0 if set(q.gts) & set(lst[:k]) else 0.0)
            for k in ks:
                out[f"{proto}/recall@{k}"] = M._pct(hits[k])
            out[f"{proto}/queries"] = float(len(hits[ks[0]]))
        return out
    if ds.name == "fashioniq":
        rec = _validate_lists(rankings_path, data, ds, min_len=min(TOP, min(len(g) for g in ds.galleries.values())))
        return M.fashioniq_metrics(rec, ds.queries)
    raise SubmissionError(f"no scorer for {ds.name}")
