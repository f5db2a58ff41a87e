"""Benchmarks as classes: each one loads its official layout unchanged and knows its own protocol.
A ``CIRDataset`` is data only (queries, galleries); the protocol is the ``Benchmark``, which an
evaluator builds once (``protocol(ds)``): the two never call each other.

A ``Benchmark`` (``cirr``, ``fashioniq``, ``circo``, ``egocvr``; ``BENCHMARKS`` lists them) loads a split
into a ``CIRDataset`` (queries + galleries) and owns everything that differs between benchmarks: its
metrics, whether the reference image is removed from rankings, how long a ranking must be, the target's
rank in a ranking, the shortlists its rerankers re-score, and its official submission files and their
scoring. The runner, the reports and the command line call these hooks instead of switching on names.

Missing images are counted and reported; without ``allow_missing`` they are an error that says how
many and which, with ``allow_missing`` the queries that need them are dropped (and counted).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmretrieve.errors import DatasetError
from mmretrieve.eval import metrics as M
from mmretrieve.registry import Registry

log = logging.getLogger(__name__)

#: submission / ranking files keep this many ids per query
TOP = 50


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
    #: evaluate without missing or unreadable images (dropping the queries that need them) instead of failing
    allow_missing: bool = False
    #: ids of the queries dropped because a gallery image could not be read (counted once in dropped_queries)
    unreadable_dropped: set[str] = field(default_factory=set)

    @property
    def has_targets(self) -> bool:
        return bool(self.queries) and all(q.target is not None for q in self.queries)

    def with_queries(self, queries: list[CIRQuery]) -> CIRDataset:
        """The same split restricted to ``queries`` (e.g. ``--limit``)."""
        return CIRDataset(self.name, self.split, self.root, self.galleries, queries, self.remove_reference, self.config,
                          self.missing_images, self.dropped_queries, self.known_ids, self.allow_missing,
                          self.unreadable_dropped)

    def drop_unusable(self, bad: dict[str, str], group=None, queries: list[CIRQuery] | None = None) -> list[CIRQuery]:
        """Gallery images of ``group`` that exist but cannot be read (id -> reason): an error naming how
        many and which, or (``allow_missing``) the queries that need them are dropped and counted; returns
        the queries kept (of ``queries``, default all)."""
        queries = self.queries if queries is None else queries
        if not bad:
            return queries
        ex = "; ".join(f"{i}: {r}" for i, r in sorted(bad.items())[:5])
        where = f"{self.name} {self.split}" + (f" ({group})" if group else "")
        if not self.allow_missing:
            raise DatasetError(f"{where}: {len(bad)} gallery image(s) could not be read ({ex}"
                               f"{'; ...' if len(bad) > 5 else ''}); pass --allow-missing to evaluate without them "
                               "(queries that need them are dropped)")
        keep = [q for q in queries if q.reference not in bad and (q.target is None or q.target not in bad)]
        new = {q.qid for q in queries} - {q.qid for q in keep} - self.unreadable_dropped
        self.unreadable_dropped |= new
        self.dropped_queries += len(new)  # once, however many fusions evaluate the split
        self.missing_images = sorted(set(self.missing_images) | set(bad))
        log.warning("%s: %d unreadable gallery image(s) (%s); %d quer%s dropped", where, len(bad), ex,
                    len(queries) - len(keep), "y" if len(queries) - len(keep) == 1 else "ies")
        if not keep:
            raise DatasetError(f"{where}: no query is left once the unreadable images are dropped: nothing to evaluate")
        return keep

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


class Benchmark:
    """One composed-retrieval benchmark's protocol. Subclasses register under their ``name``."""

    name: ClassVar[str] = ""
    #: the reference image is deleted from every ranking before scoring (CIRR)
    remove_reference: ClassVar[bool] = False
    #: metrics read positions beyond the top 50 (CIRR's subsets, EgoCVR's per-query galleries)
    needs_full_ranking: ClassVar[bool] = False
    default_split: ClassVar[str] = "val"
    #: how gallery videos are sampled (None: images only)
    video: ClassVar[dict | None] = None
    #: extra loader options as argparse specs (the command line adds them to ``eval <name>``)
    cli_options: ClassVar[dict[str, dict[str, Any]]] = {}
    help: ClassVar[str] = ""

    def load(self, root: str | os.PathLike, split: str, **kw: Any) -> CIRDataset:
        raise NotImplementedError

    def metrics(self, rankings, queries) -> dict[str, float]:
        raise NotImplementedError

    def scored_ranking(self, ds: CIRDataset, q: CIRQuery, ranking) -> list[str]:
        """The ranking as the metric reads it (after the protocol's reference removal / gallery filter)."""
        return M.remove_reference(ranking, q.reference) if self.remove_reference else list(ranking)

    def target_rank(self, ds: CIRDataset, q: CIRQuery, ranking) -> int | None:
        """The 1-based rank of the (first) ground truth in a ranking, as the protocol counts it."""
        return M.first_rank(self.scored_ranking(ds, q, ranking), q.gts or ([q.target] if q.target else []))

    def top(self, ds: CIRDataset, q: CIRQuery, ranking, n: int) -> list[str]:
        return self.scored_ranking(ds, q, ranking)[:n]

    def run_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Command-line options -> (loader options, evaluation options). All go to the loader by default."""
        return dict(options), {}

    def shortlists(self, q: CIRQuery, keys: Sequence[str]) -> Iterator[tuple[str | None, list[bool]]]:
        """Which coarse candidates each of the query's rankings re-ranks: ``(protocol, mask)`` pairs, one
        ``(None, all)`` for benchmarks with a single ranking per query."""
        yield None, [True] * len(keys)

    def submission_files(self, ds: CIRDataset, full: dict[str, Any]) -> dict[str, dict]:
        """file name -> JSON content, from full (or long enough) rankings keyed by query id."""
        return {f"{self.name}.json": {qid: r[:TOP] for qid, r in full.items()}}

    def score_files(self, ds: CIRDataset, path: Path, data: dict, subset_path: Path | None) -> dict[str, float]:
        raise NotImplementedError

    #: query count of each split as the official files have it (``eval check`` without ``--root``)
    official_queries: ClassVar[dict[str, int]] = {}

    def check_submission(self, path: Path, data: Any, ds: CIRDataset | None, split: str) -> dict[str, Any]:
        """Check a submission file's format without ground truth (``eval check``): raise ``SubmissionError``
        naming the file, query and id at fault, or return what was checked. ``ds`` (the split's
        annotations, without images) adds the checks of query and image ids against the split."""
        from mmretrieve.errors import SubmissionError

        raise SubmissionError(f"{self.name} has no official submission format to check")


BENCHMARKS: Registry[Benchmark] = Registry("dataset")
#: the registry under its former name
DATASETS = BENCHMARKS


def register(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS.register(cls.name, doc=cls.help)(cls)
    return cls


def protocol(ds: CIRDataset) -> Benchmark:
    """The benchmark protocol of a loaded split (by its name). A dataset is data only: it never builds
    its benchmark; an evaluator builds it once (``mmretrieve.eval.runner.CIREvaluator``)."""
    import mmretrieve.eval.benchmarks  # noqa: F401 - registers the built-in benchmarks

    return BENCHMARKS.create(ds.name)


def load_dataset(name: str, root: str | os.PathLike, split: str | None = None, **kw: Any) -> CIRDataset:
    """Load ``split`` (default: the benchmark's evaluation split) of benchmark ``name`` from ``root``.
    ``root`` is resolved to an absolute path, so gallery paths do not depend on the working folder."""
    import mmretrieve.eval.benchmarks  # noqa: F401 - registers the built-in benchmarks

    bench = BENCHMARKS.create(name)
    root = Path(root).expanduser().resolve()
    return bench.load(root, split or bench.default_split, **kw)


# ---- helpers for loaders ------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"missing file {path} (is --root the dataset's top folder?)")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None


def check_missing(gallery: dict[str, str], check_images: bool) -> list[str]:
    if not check_images:
        return []
    return sorted(i for i, p in gallery.items() if not os.path.isfile(p))


def finish(ds: CIRDataset, allow_missing: bool) -> CIRDataset:
    """Drop missing images (and the queries that need them) or refuse, naming the problem. A split whose
    every gallery image is missing, or with no query left, is refused even with ``allow_missing``:
    evaluating it would only score zero."""
    ds.allow_missing = bool(allow_missing)
    missing = set(ds.missing_images)
    if not missing:
        return ds
    total = sum(len(g) for g in ds.galleries.values())
    if total and len(missing) >= total:
        raise DatasetError(f"{ds.name} {ds.split}: none of the {total} gallery images exists under {ds.root} "
                           f"(e.g. {next(iter(next(iter(ds.galleries.values())).values()), '?')}); is --root the dataset's "
                           "top folder, in its official layout?")
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
    if not keep:
        raise DatasetError(f"{ds.name} {ds.split}: every query needs a missing image (e.g. {ex}): nothing to evaluate")
    log.warning("%s %s: %d missing image(s) (e.g. %s); %d quer%s dropped", ds.name, ds.split, len(missing), ex,
                ds.dropped_queries, "y" if ds.dropped_queries == 1 else "ies")
    return ds


__all__ = ["CIRQuery", "CIRDataset", "Benchmark", "BENCHMARKS", "DATASETS", "DatasetError", "load_dataset", "TOP"]
