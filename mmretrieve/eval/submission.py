"""Official ranking / submission files: write them from any run, read and validate them, score them
without any model (``mmretrieve eval score``). Each benchmark defines its own files
(``Benchmark.submission_files`` / ``score_files``):

- CIRR: ``{"version": "rc2", "metric": "recall", "<pairid>": [top-50 ids]}`` and a separate
  ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [top-3 ids]}`` (ids without ``.png``).
- CIRCO: ``{"<query id>": [top-50 int ids]}`` covering every query.
- FashionIQ has no test server; runs write ``{"<category>/<index>": [top-50 ids]}`` so they can be re-scored.
- EgoCVR: ``{"<query>": {"global": [...], "local": [...]}}``, each filtered to the protocol's gallery.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmretrieve.errors import DatasetError, SubmissionError
from mmretrieve.eval.datasets import TOP, CIRDataset


def submission_files(ds: CIRDataset, full: dict[str, Any]) -> dict[str, dict]:
    """file name -> JSON content, from full (or long enough) rankings keyed by query id."""
    return ds.benchmark.submission_files(ds, full)


def write_submission(ds: CIRDataset, full: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in submission_files(ds, full).items():
        p = out_dir / f"{prefix}{name}"
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(content, fh, sort_keys=True)
        paths.append(p)
    return paths


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise SubmissionError(f"rankings file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: invalid JSON ({getattr(e, 'msg', e)})") from None


def validate_lists(path: Path, data: dict, ds: CIRDataset, *, min_len: int, cast=str) -> dict[str, list[str]]:
    """Query id -> ranked ids, checked: every query once, known ids only, no duplicates, long enough."""
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
        known = ds.known_ids.get(by_q[qid].group, known_all) if ds.known_ids else None
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
    data = load_json(rankings_path)
    if not isinstance(data, dict):
        raise SubmissionError(f"{rankings_path}: expected a JSON object of query id -> ranked ids")
    return ds.benchmark.score_files(ds, rankings_path, data, Path(subset_path) if subset_path else None)


__all__ = ["SubmissionError", "submission_files", "write_submission", "score_files", "validate_lists", "load_json", "TOP"]
