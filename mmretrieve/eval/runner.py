"""The evaluation runner: every stage of a pipeline scored with the official metrics, side by side.

Gallery features are computed once and cached on disk as an mmretrieve index keyed by the encoder (its
identity, precision, device and local weight files) and the image list with each file's size and mtime
(``$MMRETRIEVE_CACHE/eval/<dataset>-<split>-<group>-<key>``): an image replaced in place, or another
checkpoint at the same path, is encoded again. Reference images reuse their
stored embeddings and patches; query texts are encoded in batches and the coarse stage is one batched
FAISS search, so evaluating cached features is a matter of seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmretrieve.encoders import Encoder, create_encoder
from mmretrieve.eval.datasets import TOP, CIRDataset, CIRQuery, protocol
from mmretrieve.query import EncodedQuery, Query
from mmretrieve.runtime import progress_disable
from mmretrieve.settings import cache_dir as default_cache_root

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    dataset: dict[str, Any]
    config: dict[str, Any]
    stages: list[str]
    metrics: dict[str, dict[str, float]] | None
    #: stage -> query id -> ranking (image ids), long enough for every metric of the dataset
    rankings: dict[str, dict[str, list[str]]]
    per_query: list[dict[str, Any]]
    timings_s: dict[str, float] = field(default_factory=dict)
    #: stage -> what its generations cost over the run (``generate.Cost``: prompts, cache hits, prompt and
    #: generated tokens, seconds, unread answers); generative stages only
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self, with_rankings: bool = False) -> dict[str, Any]:
        d = {
            "dataset": self.dataset,
            "config": self.config,
            "stages": self.stages,
            "metrics": self.metrics,
            "per_query": self.per_query,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }
        if self.cost:
            d["cost"] = self.cost
        if with_rankings:
            d["rankings"] = self.rankings
        return d

    def flat_metrics(self) -> dict[str, Any]:
        """What ``--json`` prints: one stage -> its metrics; several -> nested under stage names."""
        if self.metrics is None:
            return {}
        if len(self.stages) == 1:
            return self.metrics[self.stages[0]]
        return {s: self.metrics[s] for s in self.stages}


def cache_root() -> Path:
    return default_cache_root() / "eval"


def encoder_key(encoder: Encoder) -> dict[str, Any]:
    """What makes an encoder's features: its identity, precision, device, and its local weight files."""
    return {**encoder.info.to_dict(), "precision": encoder.precision, "device": str(getattr(encoder.device, "type", "")),
            "weights": encoder.weights_fingerprint()}


def file_identity(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, or None when it cannot be read: a file replaced in place changes it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


def cached_index(tag: str, gallery: dict[str, str], encoder: Encoder, *, patches: bool = False, batch_size=None,
                 workers=None, cache=None, video: dict | None = None):
    """Open (or build once) a cached index of ``gallery`` (image id -> path), keyed by the encoder and the
    images (paths, sizes and mtimes), under ``cache`` (default ``$MMRETRIEVE_CACHE/eval``). Images that
    could not be read are recorded in the index's skipped list (``idx.meta.skipped()``)."""
    from mmretrieve.index import open_index
    from mmretrieve.ingest import build_index

    files = sorted((i, p, file_identity(p)) for i, p in gallery.items())
    key = hashlib.sha256(
        json.dumps([encoder_key(encoder), files, bool(patches), video or {}], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    base = Path(cache) if cache else cache_root()
    path = base / f"{tag}-{key}"
    if (path / "manifest.json").is_file():
        try:
            return open_index(path, encoder=encoder, verify="fast")
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("rebuilding the cached gallery index %s (%s)", path, e)
    path.mkdir(parents=True, exist_ok=True)
    manifest = path.parent / f"{path.name}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "id"])
        for i, p in sorted(gallery.items()):
            w.writerow([p, i])
    log.info("encoding the %s gallery (%d images, once; cached in %s)", tag, len(gallery), path)
    build_index(path, manifest, encoder=encoder, overwrite=True, patches=patches, batch_size=batch_size,
                workers=workers, video=video)
    return open_index(path, encoder=encoder, verify="fast")


def cached_text_embeddings(encoder: Encoder, texts: list[str], cache=None) -> np.ndarray:
    """``encoder.encode_texts(texts)``, stored once per encoder and text list (re-runs with other fusions
    or rerankers then cost no text encoding)."""
    key = hashlib.sha256(json.dumps([encoder_key(encoder), texts], sort_keys=True, default=str).encode()).hexdigest()[:16]
    base = Path(cache) if cache else cache_root()
    path = base / f"texts-{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(texts), encoder.dim):
                return arr
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache file %s", path)
    arr = encoder.encode_texts(texts)
    base.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


def gallery_index(ds: CIRDataset, group, encoder: Encoder, *, patches: bool, batch_size=None, workers=None, cache=None,
                  video: dict | None = None):
    """The cached index of one gallery of a benchmark (FashionIQ has one per category)."""
    return cached_index(f"{ds.name}-{ds.split}-{group or 'all'}", ds.galleries[group], encoder, patches=patches,
                        batch_size=batch_size, workers=workers, cache=cache, video=video)


def _needs_patches(pipeline) -> bool:
    if pipeline is None:
        return False
    return any(getattr(st, "name", "") == "emd" and getattr(st, "patches", None) is None for st in pipeline.stages)


def _stage_labels(pipeline) -> list[str]:
    return ["coarse"] + (list(pipeline.labels) if pipeline is not None else [])


class CIREvaluator:
    """One benchmark split's evaluation, set up once (its protocol, its data, how galleries are indexed)
    and called on what is evaluated, as sentence-transformers' evaluators are::

        evaluator = CIREvaluator(load_dataset("cirr", root), cache=...)
        sum_run = evaluator("clip-vit-b32")
        emd_run = evaluator("clip-vit-b32", pipeline="emd", fusion="intersection")

    Each call runs the coarse stage (composed fusion ``fusion``; default: the pipeline's coarse fusion,
    else sum) and every reranker of ``pipeline``, and returns an ``EvalResult``. Where the protocol removes
    the reference image from the ranking (CIRR), it is left out of the coarse search itself, so that
    rerankers never spend a shortlist slot on it and score normalisations (e.g. the intersection
    fusion's min-max) do not see its self-similarity. Rerankers re-score each of the benchmark's
    shortlists (EgoCVR: the coarse ranking filtered to the query's global and to its local gallery, as
    EgoCVR's two-stage baseline does). ``video``: how gallery videos are sampled (default: the
    benchmark's, e.g. EgoCVR's 15 uniform frames). ``limit``: the first N queries only.

    ``where=`` (a call's): a metadata filter over the gallery index (``"key != 'dev-3-img0'"``,
    ``"width >= 256"``; the grammar of ``Index.search``'s ``where``): the coarse search, and so every
    reranker's shortlist, keeps to the gallery items that match. A query whose target (every one of its
    ground truths, for CIRCO) is filtered out stays in the metrics as a miss, so the metric is over the
    same queries as without the filter; such queries are counted (``dataset["queries_target_filtered"]``)
    and marked in ``per_query`` (``target_filtered``; ``gts_filtered`` lists a CIRCO query's filtered
    ground truths). Without a filter nothing changes: the official metrics over the full gallery.
    """

    def __init__(self, ds: CIRDataset, *, batch_size: int | None = None, workers: int | None = None,
                 cache: str | Path | None = None, limit: int | None = None, video: dict | None = None) -> None:
        self.dataset = ds
        self.benchmark = protocol(ds)
        self.video = video if video is not None else self.benchmark.video
        self.batch_size, self.workers, self.cache, self.limit = batch_size, workers, cache, limit

    def __call__(self, encoder: Encoder | str = "embedded", *, pipeline=None, fusion: str | None = None,
                 fusion_options: dict | None = None, where: str | None = None) -> EvalResult:
        from mmretrieve.query import coarse_strategy
        from mmretrieve.rerank.pipeline import as_pipeline
        from mmretrieve.store.filters import parse

        if where is not None:
            parse(where)  # a filter that does not parse is refused before any work

        t_start = time.perf_counter()
        ds = self.dataset
        enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
        pipe = as_pipeline(pipeline) if pipeline is not None else None
        fusion = fusion or (pipe.coarse_fusion if pipe is not None else None) or "sum"
        fusion_options = dict(fusion_options or {})
        strategy = coarse_strategy(fusion, fusion_options)  # unknown fusion or option: refused before any work
        queries = ds.queries[: self.limit or None]
        stages = _stage_labels(pipe)
        rankings: dict[str, dict[str, Any]] = {s: {} for s in stages}
        timings = {"gallery": 0.0, "queries": 0.0}
        t0 = time.perf_counter()  # one text embedding per distinct phrasing, shared by all groups (cached on disk)
        uniq = sorted({t for q in queries for t in q.texts})
        text_vec = dict(zip(uniq, cached_text_embeddings(enc, uniq, self.cache))) if uniq else {}
        timings["text_encoding"] = time.perf_counter() - t0
        costs: dict = {}
        notes: dict[str, dict] = {}
        by_group: dict = {}
        for q in queries:
            by_group.setdefault(q.group, []).append(q)
        for group, qs in by_group.items():
            t0 = time.perf_counter()
            idx = gallery_index(ds, group, enc, patches=_needs_patches(pipe), batch_size=self.batch_size,
                                workers=self.workers, cache=self.cache, video=self.video)
            timings["gallery"] += time.perf_counter() - t0
            kept = ds.drop_unusable({s.key: s.reason for s in idx.meta.skipped()}, group, qs)  # unreadable: fail or drop
            if len(kept) < len(qs):
                dropped = {q.qid for q in qs} - {q.qid for q in kept}
                queries, qs = [q for q in queries if q.qid not in dropped], kept
            t0 = time.perf_counter()
            _rank_group(ds, self.benchmark, idx, qs, text_vec, strategy, pipe, rankings, costs, notes, where=where)
            timings["queries"] += time.perf_counter() - t0
            idx.close()
        config = {"encoder": enc.info.to_dict(), "fusion": fusion, "fusion_options": fusion_options,
                  "pipeline": pipe.config() if pipe is not None else None, "limit": self.limit}
        if where is not None:
            config["where"] = where
        res = self._result(queries, stages, rankings, config, timings, t_start, notes)
        if where is not None:
            res.dataset["queries_target_filtered"] = sum(bool(notes.get(q.qid, {}).get("target_filtered")) for q in queries)
        res.cost = {s: c.to_dict() for s, c in costs.items()}
        return res

    def _result(self, queries, stages, rankings, config, timings, t_start, notes=None) -> EvalResult:
        sub = self.dataset.with_queries(queries)
        metrics = {s: self.benchmark.metrics(rankings[s], sub.queries) for s in stages} if sub.has_targets else None
        per_query = [{**_diagnostics(sub, self.benchmark, q, rankings, stages), **(notes or {}).get(q.qid, {})}
                     for q in queries]
        timings["total"] = time.perf_counter() - t_start
        summary = sub.summary()
        summary["queries_evaluated"] = len(queries)
        return EvalResult(summary, config, stages, metrics, rankings, per_query, timings)


def evaluate(ds: CIRDataset, *, encoder: Encoder | str = "embedded", pipeline=None, fusion: str | None = None,
             fusion_options: dict | None = None, batch_size: int | None = None, workers: int | None = None,
             cache: str | Path | None = None, limit: int | None = None, video: dict | None = None,
             where: str | None = None) -> EvalResult:
    """One run of ``CIREvaluator(ds, ...)(encoder, pipeline=..., fusion=..., where=...)`` (see there)."""
    return CIREvaluator(ds, batch_size=batch_size, workers=workers, cache=cache, limit=limit, video=video)(
        encoder, pipeline=pipeline, fusion=fusion, fusion_options=fusion_options, where=where)


def query_sides(ds: CIRDataset, idx, group, qs, text_vec, strategy):
    """Per query: its encoded sides, its ``EncodedQuery`` and its reference's id."""
    from mmretrieve.media.scan import media_kind

    id_of = {it.key: it.id for it in idx.meta.iter_items()}
    ref_ids = [id_of.get(q.reference) for q in qs]
    have = [i for i in ref_ids if i is not None]
    stored = dict(zip(have, idx.vectors(have))) if have and idx.exact_vectors() else {}
    vecs, qobjs = [], []
    for q, rid in zip(qs, ref_ids):
        t = np.mean([text_vec[x] for x in q.texts], axis=0)
        t = (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)
        ref_path = ds.galleries[group].get(q.reference)
        is_video = ref_path is not None and media_kind(ref_path) == "video"
        if rid is not None and rid in stored:
            img = stored[rid]
        elif is_video:
            img = idx.encode_video(ref_path)
        else:
            img = idx.encoder.encode_images([ref_path])[0]
        vecs.append({"image": img, "text": t})
        qo = Query(text=q.texts, image=None if is_video else ref_path, video=ref_path if is_video else None,
                   fusion=strategy.name, options=strategy.options, image_id=rid)
        qobjs.append(EncodedQuery(qo, {"image": img, "text": t}))
    return vecs, qobjs, ref_ids


def _rank_group(ds: CIRDataset, bench, idx, qs, text_vec, strategy, pipe, rankings, costs=None, notes=None,
                where=None) -> None:
    """Coarse rankings for one gallery's queries (one batched search for vector fusions), then every
    stage of ``pipe`` over each of the benchmark's shortlists. A pipeline's ``describe`` stage first
    writes each query's target description (cached: a re-run or a resumed run generates none again).
    ``where``: a filter; the coarse search keeps to the matching gallery items (see ``CIREvaluator``)."""
    costs = {} if costs is None else costs
    notes = {} if notes is None else notes
    group = qs[0].group if qs else None
    keys = {it.id: it.key for it in idx.meta.iter_items()}
    n = len(idx)
    if where is not None:
        where = idx.select(where)
        n = where.count
        _note_filtered_targets(where, keys, qs, notes)
    need = n if bench.needs_full_ranking else min(n, TOP + 1)
    k1 = max(1, min(n, pipe.shortlist_size(need) if pipe is not None else need))
    vecs, qobjs, ref_ids = query_sides(ds, idx, group, qs, text_vec, strategy)
    if pipe is not None and pipe.describer is not None:
        qobjs = _describe(pipe.describer, idx, qs, qobjs, costs, notes)
    excl = ref_ids if bench.remove_reference else None
    coarse = coarse_batch(idx, qobjs, k1, exclude=excl, where=where)
    bar = tqdm(total=len(qs), desc=f"{ds.name} {group or ''}".strip(), unit="q", disable=progress_disable(), leave=False)
    for q, qo, (ids, scores) in zip(qs, qobjs, coarse):
        rankings["coarse"][q.qid] = [keys[int(i)] for i in ids]
        if pipe is not None:
            ranked_keys = [keys[int(i)] for i in ids]
            per_list: dict[str, dict] = {}
            for proto, mask in bench.shortlists(q, ranked_keys):
                m = np.asarray(mask, dtype=bool)
                for r in pipe.rerank(idx.view, qo, ids[m], scores[m]):
                    per_list.setdefault(r.label, {})[proto] = [keys[int(i)] for i in r.ids]
                    _note_stage(r, q.qid, costs, notes)
            for label, lists in per_list.items():
                rankings[label][q.qid] = lists[None] if None in lists else lists
        bar.update(1)
    bar.close()


def _note_filtered_targets(sel, keys: dict[int, str], qs, notes: dict) -> None:
    """Mark the queries whose target (every ground truth) the filter leaves out of the gallery."""
    ids = np.fromiter(keys, np.int64, len(keys))
    out = {keys[int(i)] for i in ids[~sel.allowed(ids)]}
    for q in qs:
        targets = [q.target] if q.target is not None else list(q.gts)
        gone = [t for t in targets if t in out]
        if not gone:
            continue
        note = notes.setdefault(q.qid, {})
        if len(gone) == len(targets):
            note["target_filtered"] = True
        if q.target is None:
            note["gts_filtered"] = gone


#: queries described per generation call in an evaluation (each call's answers are cached as they come)
DESCRIBE_CHUNK = 16


def _describe(describer, idx, qs, qobjs, costs, notes) -> list[EncodedQuery]:
    """Every query's description (``DESCRIBE_CHUNK`` at a time, with a progress bar), applied."""
    from mmretrieve.rerank.generate import Cost

    out = []
    bar = tqdm(total=len(qs), desc="describe", unit="q", disable=progress_disable(), leave=False)
    for s in range(0, len(qs), DESCRIBE_CHUNK):
        chunk = qobjs[s : s + DESCRIBE_CHUNK]
        texts, cost = describer.describe(chunk)
        costs.setdefault("describe", Cost()).add(cost)
        for q, d, t in zip(qs[s : s + DESCRIBE_CHUNK], describer.apply_many(idx.encoder, chunk, texts), texts):
            out.append(d)
            notes.setdefault(q.qid, {})["description"] = d.description
            if t is None:
                notes[q.qid]["description_unread"] = True
        bar.update(len(chunk))
    bar.close()
    return out


def _note_stage(r, qid: str, costs: dict, notes: dict) -> None:
    """A generative stage's cost (summed per stage) and what it said about the query (per query)."""
    from mmretrieve.rerank.generate import Cost

    if not r.info:
        return
    if "cost" in r.info:
        costs.setdefault(r.label, Cost()).add(Cost.from_dict(r.info["cost"]))
    kept = {k: v for k, v in r.info.items() if k != "cost"}
    if kept:
        notes.setdefault(qid, {}).setdefault("stage_info", {}).setdefault(r.label, []).append(kept)


def coarse_batch(idx, qobjs: list[EncodedQuery], k: int, exclude: list[int | None] | None = None, where=None):
    """Coarse rankings for many queries: one batched FAISS search for vector fusions. ``exclude``: one
    id per query (or None) to leave out of that query's ranking (CIRR's reference image). ``where``: a
    filter (a ``Selection``): only matching gallery items are ranked."""
    from mmretrieve.index.batch import search_rows_excluding
    from mmretrieve.index.search import coarse

    if not qobjs:
        return []
    exclude = exclude or [None] * len(qobjs)
    plans = [q.plan(k) for q in qobjs]
    if not all(p.single for p in plans):  # list-level strategies (intersection) search per query
        return [coarse(idx, p, exclude=None if x is None else [x], where=where) for p, x in zip(plans, exclude)]
    Q = np.stack([p.queries[0] for p in plans]).astype(np.float32)
    out = []
    for s in range(0, len(Q), 1024):
        out += search_rows_excluding(idx, Q[s : s + 1024], k, exclude[s : s + 1024], where=where)
    return out


def _diagnostics(ds: CIRDataset, bench, q: CIRQuery, rankings, stages) -> dict[str, Any]:
    d: dict[str, Any] = {"qid": q.qid, "reference": q.reference, "texts": q.texts}
    if q.group:
        d["group"] = q.group
    if q.aspects:
        d["aspects"] = q.aspects
    if q.target is not None:
        d["target"] = q.target
        d["ranks"] = {s: bench.target_rank(ds, q, rankings[s][q.qid]) for s in stages}
    d["top5"] = {s: bench.top(ds, q, rankings[s][q.qid], 5) for s in stages}
    return d


def evaluate_fusions(ds: CIRDataset, fusions: list[str], **kw) -> EvalResult:
    """``evaluate`` once per composed fusion (e.g. ``["sum", "intersection"]``) and put the runs side by
    side: stage names become ``<fusion>/<stage>``. Gallery and text features are shared (cached)."""
    run_kw = {k: kw.pop(k) for k in ("encoder", "pipeline", "fusion_options", "where") if k in kw}
    evaluator = CIREvaluator(ds, **kw)  # built once, called once per fusion
    if len(fusions) == 1:
        return evaluator(fusion=fusions[0], **run_kw)
    runs = [(f, evaluator(fusion=f, **run_kw)) for f in fusions]
    first = runs[0][1]
    stages = [f"{f}/{s}" for f, r in runs for s in r.stages]
    rankings = {f"{f}/{s}": r.rankings[s] for f, r in runs for s in r.stages}
    metrics = None if first.metrics is None else {f"{f}/{s}": r.metrics[s] for f, r in runs for s in r.stages}
    per_query = []
    for j, q in enumerate(first.per_query):
        d = {k: v for k, v in q.items() if k not in ("ranks", "top5")}
        if "ranks" in q:
            d["ranks"] = {f"{f}/{s}": r.per_query[j]["ranks"][s] for f, r in runs for s in r.stages}
        d["top5"] = {f"{f}/{s}": r.per_query[j]["top5"][s] for f, r in runs for s in r.stages}
        per_query.append(d)
    config = {**first.config, "fusion": ",".join(fusions), "fusions": {f: r.config for f, r in runs}}
    timings = {f"{f}/{k}": v for f, r in runs for k, v in r.timings_s.items()}
    timings["total"] = sum(r.timings_s.get("total", 0.0) for _, r in runs)
    return EvalResult(first.dataset, config, stages, metrics, rankings, per_query, timings)
