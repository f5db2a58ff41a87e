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
from mmretrieve.eval.datasets import TOP, CIRDataset, protocol


def submission_files(ds: CIRDataset, full: dict[str, Any]) -> dict[str, dict]:
    """file name -> JSON content, from full (or long enough) rankings keyed by query id."""
    return protocol(ds).submission_files(ds, full)


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
        raise DatasetError(f"{ds.name} {ds.split} has no ground truth here: score it on the official server "
                           f"(`mmretrieve eval check {ds.name} --split {ds.split} --rankings FILE` checks its format first)")
    rankings_path = Path(rankings_path)
    data = load_json(rankings_path)
    if not isinstance(data, dict):
        raise SubmissionError(f"{rankings_path}: expected a JSON object of query id -> ranked ids")
    return protocol(ds).score_files(ds, rankings_path, data, Path(subset_path) if subset_path else None)


def check_ids(path: Path, data: Any, *, count: tuple[int, int], pattern, what: str, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """Query id (digits) -> a list of ``count[0]`` to ``count[1]`` unique ids, each accepted by
    ``pattern``; anything else is a ``SubmissionError`` naming the file, the query and the id."""
    if not isinstance(data, dict):
        raise SubmissionError(f"{path}: expected a JSON object of query id -> ranked ids, got {type(data).__name__}")
    out = {}
    for qid, lst in data.items():
        if qid in skip:
            continue
        if not str(qid).isdigit():
            raise SubmissionError(f"{path}: key {qid!r} is not a query id (a number)")
        if not isinstance(lst, list):
            raise SubmissionError(f"{path}: query {qid}: expected a list of ids, got {type(lst).__name__}")
        lo, hi = count
        if not lo <= len(lst) <= hi:
            want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
            raise SubmissionError(f"{path}: query {qid}: {len(lst)} ids, {want} expected")
        for x in lst:
            if not pattern(x):
                raise SubmissionError(f"{path}: query {qid}: {x!r} is not {what}")
        if len({str(x) for x in lst}) != len(lst):
            dup = next(x for x in lst if lst.count(x) > 1)
            raise SubmissionError(f"{path}: query {qid}: id {dup!r} appears more than once (predictions must be unique)")
        out[str(qid)] = lst
    return out


def check_coverage(path: Path, got: dict, ds: CIRDataset | None, expected: int | None, split: str) -> str:
    """Every query of the split once: against the split's annotations when given, else its official count."""
    if ds is not None:
        want = {q.qid for q in ds.queries}
        missing, unknown = sorted(want - set(got)), sorted(set(got) - want)
        if unknown:
            raise SubmissionError(f"{path}: unknown query id {unknown[0]!r} (not in {ds.name} {ds.split})")
        if missing:
            raise SubmissionError(f"{path}: {len(missing)} query id(s) of {ds.name} {ds.split} have no ranking, e.g. {missing[0]!r}")
        return "the split's annotations"
    if expected is not None and len(got) != expected:
        raise SubmissionError(f"{path}: {len(got)} queries; the official {split} split has {expected:,}")
    return "the official query count" if expected is not None else "the format only (give --root for the query ids)"


def check_submission(dataset: str, rankings: str | Path, *, root: str | Path | None = None, split: str | None = None,
                     subset: str | Path | None = None) -> list[dict[str, Any]]:
    """Check submission files' format without ground truth (``mmretrieve eval check``): keys, counts and id
    formats; with ``root``, the query and image ids against the split's annotations too. Returns one
    summary per file checked (CIRR: the recall file and its subset file, found beside it by default)."""
    from mmretrieve.eval.datasets import BENCHMARKS, load_dataset

    bench = BENCHMARKS.create(dataset)
    split = split or "test"
    ds = load_dataset(dataset, root, split, check_images=False) if root is not None else None
    main = Path(rankings)
    data = load_json(main)
    out = [bench.check_submission(main, data, ds, split)]
    if subset is None and hasattr(bench, "find_subset_file") and out[0]["metric"] == "recall":
        subset = bench.find_subset_file(main)
    if subset is not None:
        out.append(bench.check_submission(Path(subset), load_json(Path(subset)), ds, split))
    return out


__all__ = ["check_submission", "check_ids", "check_coverage", "SubmissionError", "submission_files", "write_submission", "score_files", "validate_lists", "load_json", "TOP"]
