"""Training data of the yes/no verifier: composed-retrieval triplets, mined negatives, balanced examples.

A triplet is (reference image, modification text, target image). It comes from a benchmark's training
split, read by the evaluation's own loaders (``cirr``: ``captions/cap.rc2.train.json``; ``fashioniq``:
``captions/cap.{cat}.train.json``), or from a JSONL file of one object per line::

    {"reference": "imgs/a.jpg", "text": "make it red", "target": "imgs/b.jpg", "negatives": ["imgs/c.jpg"]}

(paths relative to the JSONL file's folder, or the keys of the items of ``--index NAME``). The images are
indexed once with the evaluation's cached gallery index (or ``--index NAME`` is used as it is) and each
triplet's hard negatives are the top-ranked non-targets of that index's own coarse stage for the
query (reference excluded): the candidates the verifier will actually be shown. Each triplet gives one
positive (the target, answer "Yes") and its negatives (answer "No"); ``balance`` makes yes:no even:
``repeat`` shows the positive once per negative, ``weight`` weights its loss by the number of
negatives, ``none`` leaves them as they are.

Bad data is skipped and reported, never a crash: a missing or unreadable image, an empty text, a target
that is not in the index. Every skipped triplet is listed (with why) in the run record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import DatasetError, UsageError
from mmretrieve.eval.datasets import CIRDataset, CIRQuery

log = logging.getLogger(__name__)

SOURCES = ("cirr", "fashioniq", "jsonl")
BALANCE = ("repeat", "weight", "none")


@dataclass
class Example:
    """One yes/no question: the query (reference image + text) and one candidate, with its answer."""

    qid: str
    reference: str  # image path
    text: str
    candidate: str  # image path
    candidate_key: str
    label: int  # 1: yes (the target), 0: no
    weight: float = 1.0


@dataclass
class ValQuery:
    """A held-out query with the coarse shortlist its rerank metrics are computed on."""

    qid: str
    reference: str
    text: str
    target: str
    shortlist: list[str]  # keys, coarse order (reference excluded)
    paths: list[str]


@dataclass
class TrainData:
    train: list[Example]
    val: list[Example]
    val_queries: list[ValQuery]
    skipped: list[dict[str, str]] = field(default_factory=list)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---- sources -------------------------------------------------------------------------------------------
def load_source(data: str, *, root=None, file=None, split: str = "train", categories=None,
                index=None) -> tuple[CIRDataset, list[dict[str, str]], dict[str, Any]]:
    """The triplets as a ``CIRDataset`` (queries + galleries), the lines skipped while reading, and the
    sha256 of the input files. ``index``: an open index whose item keys (or files) name the images."""
    if data not in SOURCES:
        raise UsageError(f"--data must be one of {', '.join(SOURCES)}, got {data!r}")
    if data == "jsonl":
        if not file:
            raise UsageError("--data jsonl needs --file FILE.jsonl")
        return _load_jsonl(Path(file), index)
    if not root:
        raise UsageError(f"--data {data} needs --root (the dataset's top folder)")
    from mmretrieve.eval.datasets import load_dataset

    kw: dict[str, Any] = {"check_images": False}  # missing files are skipped per triplet, below
    if categories and data == "fashioniq":
        kw["categories"] = categories
    ds = load_dataset(data, root, split, **kw)
    fsplit = {"test": "test1"}.get(split, split)
    files = sorted(p for p in Path(ds.root).rglob("*.json") if f".{fsplit}.json" in p.name)
    prints = {"annotations": {str(p.relative_to(ds.root)): sha256_file(p) for p in files}}
    if index is not None:
        _use_index_keys(ds, index)
    return ds, [], prints


def _index_gallery(index) -> tuple[dict[str, str], dict[str, str]]:
    """(key -> file, file -> key) of an open index's items."""
    by_key = {str(it.key): str(it.uri) for it in index.meta.iter_items()}
    return by_key, {os.path.realpath(u): k for k, u in by_key.items()}


def _use_index_keys(ds: CIRDataset, index) -> None:
    by_key, _ = _index_gallery(index)
    for g in list(ds.galleries):
        ds.galleries[g] = {**ds.galleries[g], **{k: v for k, v in by_key.items() if k in ds.galleries[g]}}


def _resolve(value: str, base: Path, by_key: dict[str, str] | None, by_file: dict[str, str] | None) -> tuple[str, str]:
    """(key, path) of a JSONL image reference: an index key, else a file (relative to the JSONL's folder)."""
    if by_key is not None and value in by_key:
        return value, by_key[value]
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if by_file is not None:
        key = by_file.get(os.path.realpath(p))
        if key is not None:
            return key, by_key[key]
    return value, str(p)


def _load_jsonl(path: Path, index) -> tuple[CIRDataset, list[dict[str, str]], dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"training file not found: {path}")
    by_key, by_file = _index_gallery(index) if index is not None else (None, None)
    base = path.resolve().parent
    gallery: dict[str, str] = {}
    queries: list[CIRQuery] = []
    skipped: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            qid = f"line{n}"
            try:
                row = json.loads(line)
                ref, tgt, text = (str(row["reference"]), str(row["target"]), row.get("text"))
                negs = [str(x) for x in (row.get("negatives") or [])]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                skipped.append({"qid": qid, "reason": f"unreadable line ({type(e).__name__}: {e})"})
                continue
            resolved = [_resolve(v, base, by_key, by_file) for v in [ref, tgt, *negs]]
            gallery.update(dict(resolved))
            queries.append(CIRQuery(qid=qid, reference=resolved[0][0], texts=[str(text or "")], target=resolved[1][0],
                                    info={"negatives": [k for k, _ in resolved[2:]]}))
    if index is not None:
        gallery = {**gallery, **by_key}
    ds = CIRDataset("jsonl", "train", base, {None: gallery}, queries, remove_reference=True, known_ids={None: set(gallery)})
    return ds, skipped, {"annotations": {path.name: sha256_file(path)}}


# ---- checks and mining ------------------------------------------------------------------------------------
def check_triplets(ds: CIRDataset, group, queries: list[CIRQuery], in_index: set[str]) -> tuple[list[CIRQuery], list[dict]]:
    """The usable triplets of one gallery and the skipped ones (with why)."""
    gal = ds.galleries[group]
    keep, skipped = [], []
    for q in queries:
        reason = None
        if not q.texts or not all(str(t).strip() for t in q.texts):
            reason = "empty text"
        elif q.target is None:
            reason = "no target"
        elif q.reference not in gal or not os.path.isfile(gal[q.reference]):
            reason = f"missing reference image {q.reference} ({gal.get(q.reference, 'not in the gallery')})"
        elif q.target not in gal or not os.path.isfile(gal[q.target]):
            reason = f"missing target image {q.target} ({gal.get(q.target, 'not in the gallery')})"
        elif q.reference not in in_index:
            reason = f"reference image {q.reference} is not in the index (unreadable?)"
        elif q.target not in in_index:
            reason = f"target {q.target} is not in the index"
        if reason:
            skipped.append({"qid": q.qid, "reason": reason})
        else:
            keep.append(q)
    return keep, skipped


def mine(ds: CIRDataset, group, idx, queries: list[CIRQuery], k: int, cache=None) -> dict[str, list[str]]:
    """Each query's coarse ranking (top ``k`` keys, the reference excluded) from the index's own coarse
    stage: the evaluation's, with the sum fusion of the reference image and the text."""
    from mmretrieve.eval.runner import cached_text_embeddings, coarse_batch, query_sides
    from mmretrieve.query import coarse_strategy

    if not queries:
        return {}
    uniq = sorted({t for q in queries for t in q.texts})
    text_vec = dict(zip(uniq, cached_text_embeddings(idx.encoder, uniq, cache)))
    _, qobjs, ref_ids = query_sides(ds, idx, group, queries, text_vec, coarse_strategy("sum"))
    keys = {it.id: str(it.key) for it in idx.meta.iter_items()}
    ranked = coarse_batch(idx, qobjs, min(k, len(idx)), exclude=ref_ids)
    return {q.qid: [keys[int(i)] for i in ids] for q, (ids, _) in zip(queries, ranked)}


def open_gallery_index(ds: CIRDataset, group, encoder, cache=None):
    """The evaluation's cached index of one gallery (existing files only: the missing ones are skipped)."""
    from mmretrieve.eval.runner import cached_index

    gal = {k: p for k, p in ds.galleries[group].items() if os.path.isfile(p)}
    if not gal:
        raise DatasetError(f"{ds.name} {ds.split}: none of the gallery images exists (e.g. "
                           f"{next(iter(ds.galleries[group].values()), '?')})")
    return cached_index(f"train-{ds.name}-{ds.split}-{group or 'all'}", gal, encoder, patches=False, cache=cache)


# ---- examples ----------------------------------------------------------------------------------------------
def negatives_for(q: CIRQuery, ranked: list[str], gallery_keys: list[str], n_hard: int, n_random: int,
                  rng: np.random.Generator) -> list[str]:
    """The query's own negatives (JSONL ``negatives``), then its ``n_hard`` top-ranked non-targets, then
    ``n_random`` random other images of the gallery (never the target or the reference)."""
    banned = {q.target, q.reference}
    out = [k for k in q.info.get("negatives", []) if k not in banned]
    out += [k for k in ranked if k not in banned and k not in out][:n_hard]
    if n_random:
        pool = [k for k in gallery_keys if k not in banned and k not in out]
        pick = rng.choice(len(pool), size=min(n_random, len(pool)), replace=False) if pool else []
        out += [pool[int(i)] for i in sorted(pick)]
    return list(dict.fromkeys(out))


def examples_for(q: CIRQuery, negs: list[str], gal: dict[str, str], balance: str) -> list[Example]:
    text = q.texts[0] if q.texts else ""
    ref, n = gal[q.reference], max(1, len(negs))
    pos = Example(q.qid, ref, text, gal[q.target], q.target, 1, float(n) if balance == "weight" else 1.0)
    out = [pos] * (n if balance == "repeat" else 1)
    return out + [Example(q.qid, ref, text, gal[k], k, 0) for k in negs if k in gal]


def build_data(data: str, *, root=None, file=None, split="train", categories=None, index=None, encoder="embedded",
               cache=None, negatives: int = 3, random_negatives: int = 0, balance: str = "repeat",
               val_queries: int = 50, val_k: int = 10, seed: int = 0) -> TrainData:
    """Training and held-out examples of a source (see the module's docstring). ``index``: an open index
    to use instead of indexing the images; ``val_queries`` triplets (chosen by ``seed``) are held out."""
    if balance not in BALANCE:
        raise UsageError(f"--balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    if negatives < 0 or random_negatives < 0 or val_queries < 0 or val_k < 1:
        raise UsageError("--negatives, --random-negatives and --val-queries must be >= 0, --val-k >= 1")
    ds, skipped, prints = load_source(data, root=root, file=file, split=split, categories=categories, index=index)
    enc = None
    if index is None:
        from mmretrieve.encoders import create_encoder

        enc = create_encoder(encoder) if isinstance(encoder, str) else encoder
    rng = np.random.default_rng(seed)
    by_group: dict = {}
    for q in ds.queries:
        by_group.setdefault(q.group, []).append(q)
    kept: list[tuple[Any, CIRQuery, list[str]]] = []
    keys_of: dict = {}
    for group, qs in by_group.items():
        idx = index if index is not None else open_gallery_index(ds, group, enc, cache)
        in_index = {str(it.key) for it in idx.meta.iter_items()}
        good, bad = check_triplets(ds, group, qs, in_index)
        skipped += bad
        ranked = mine(ds, group, idx, good, max(negatives + 2, val_k + 1), cache)
        keys_of[group] = (sorted(in_index), in_index)
        kept += [(group, q, ranked[q.qid]) for q in good]
        if index is None:
            idx.close()
    if not kept:
        raise DatasetError(f"no usable training triplet in {file or root} ({len(skipped)} skipped, e.g. "
                           f"{skipped[0]['reason'] if skipped else 'none read'})")
    order = rng.permutation(len(kept))
    n_val = min(val_queries, max(0, len(kept) - 1))
    val_set = {int(i) for i in order[:n_val]}
    out = TrainData([], [], [], skipped, prints)
    for i, (group, q, ranked) in enumerate(kept):
        gal, (keys, keyset) = ds.galleries[group], keys_of[group]
        negs = [k for k in negatives_for(q, ranked, keys, negatives, random_negatives, rng) if k in keyset]
        if i in val_set:
            out.val += examples_for(q, negs, gal, "none")
            short = [k for k in ranked if k != q.reference][:val_k]
            out.val_queries.append(ValQuery(q.qid, gal[q.reference], q.texts[0], q.target, short, [gal[k] for k in short]))
        else:
            out.train += examples_for(q, negs, gal, balance)
    out.counts = {"triplets_read": len(ds.queries) + sum(1 for s in skipped if s["reason"].startswith("unreadable")),
                  "triplets_used": len(kept), "triplets_skipped": len(skipped), "val_queries": len(out.val_queries),
                  "train_examples": len(out.train), "train_yes": sum(e.label for e in out.train),
                  "val_examples": len(out.val)}
    out.fingerprints["triplets"] = sha256_json([(q.qid, q.reference, q.texts, q.target) for _, q, _ in kept])
    out.fingerprints["images"] = sha256_json(sorted({(e.candidate_key, _identity(e.candidate)) for e in out.train + out.val}))
    if skipped:
        log.warning("%d triplet(s) skipped (e.g. %s: %s); all are listed in run.json", len(skipped), skipped[0]["qid"],
                    skipped[0]["reason"])
    return out


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
