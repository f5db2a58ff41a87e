"""Compaction: merge segments, dropping deleted rows (``mmretrieve index compact``; automatic after writes).

**Tiered policy.** A segment's tier is ``floor(log10(live rows))``. When a tier holds ``MERGE_FACTOR``
(10) segments, they are merged into one (which lands a tier up). A row is therefore rewritten at most
once per tier: at most ``ceil(log10 N) + 1`` times over its life at N rows (6 at a million, counting the
first write), and at most 9 segments stay per tier, so a search fans out over at most ``9 * (tiers)``
segments. A segment with half or more of its rows deleted is rewritten on its own (its live rows
only; dropped when none is left). HNSW indexes merge ``GRAPH_MERGE_FACTOR`` (4) segments of a tier at
once: each graph costs a search of its own, so they are merged sooner (a row is then rebuilt at most
twice per tier: 4 x 4 segments of a tier exceed the tier).

A merge streams the live rows of its segments into a new segment (vectors, ids, patches, frames; FAISS
segments by ``merge_from`` for IVF, rebuilt from their stored vectors otherwise) and copies their
metadata rows with the new positions, so ids, keys and results stay exactly as they were.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from mmretrieve.store import io
from mmretrieve.store.draft import Draft
from mmretrieve.store.layout import SEGMENTS, crash_point, segment_dir
from mmretrieve.store.meta import Item, MetaDB
from mmretrieve.store.segments import SegmentFiles, is_flat_factory, is_ivf, segment_index

MERGE_FACTOR = 10
GRAPH_MERGE_FACTOR = 4
DELETED_SHARE = 0.5
CHUNK = 65_536


def tier(entry: dict) -> int:
    return int(math.floor(math.log10(max(int(entry["rows"]) - int(entry["deleted"]), 1))))


def plan(segments: list[dict], factor: int = MERGE_FACTOR) -> list[list[dict]]:
    """The merges the tiered policy asks for now (each a list of segment entries)."""
    groups, used = [], set()
    for e in segments:
        if int(e["rows"]) and int(e["deleted"]) / int(e["rows"]) >= DELETED_SHARE:
            groups.append([e])
            used.add(e["id"])
    by_tier: dict[int, list[dict]] = defaultdict(list)
    for e in segments:
        if e["id"] not in used:
            by_tier[tier(e)].append(e)
    for t in sorted(by_tier):
        segs = by_tier[t]
        while len(segs) >= factor:
            groups.append(segs[:factor])
            segs = segs[factor:]
    return groups


def merge_factor(factory: str | None) -> int:
    """Segments of one tier merged at once: ``MERGE_FACTOR``, but ``GRAPH_MERGE_FACTOR`` for HNSW, whose
    graphs cannot be searched as one (each costs a search of its own: 10 graphs of 20k measured 14x one
    graph of their 200k rows) while IVF segments can (``index.ivf``)."""
    f = (factory or "").upper()
    return GRAPH_MERGE_FACTOR if "HNSW" in f and "IVF" not in f else MERGE_FACTOR


def pick(segments: list[dict], *, everything: bool = False, factory: str | None = None) -> list[list[dict]]:
    """The merges to run now: the tiered policy's (``plan``), or with ``everything`` one of all segments
    (when there is more than one, or any deleted row to drop)."""
    if everything and (len(segments) > 1 or any(int(e["deleted"]) for e in segments)):
        return [list(segments)]
    return plan(segments, merge_factor(factory))


def merge_into(draft: Draft, root: Path, meta: MetaDB, group: list[dict], *, version: str,
               template=None) -> dict | None:
    """Merge ``group`` into a new segment that takes its place in ``draft``; returns the new entry (None
    when no row of the group was live: the group is dropped)."""
    entry = merge_segments(root, meta, group, draft.segment_id(), version=version, manifest=draft.manifest,
                           template=template)
    draft.replace(group, entry)
    return entry


def write_amplification_bound(n_rows: int) -> int:
    """How many times, at most, the policy writes a row of an index of ``n_rows`` rows (the first write included)."""
    return int(math.ceil(math.log10(max(n_rows, 10)))) + 1


def _live(seg: SegmentFiles) -> np.ndarray:
    return np.setdiff1d(np.arange(seg.rows, dtype=np.int64), seg.deleted, assume_unique=True)


def merge_segments(root: Path, meta: MetaDB, group: list[dict], sid: str, *, version: str, manifest: dict,
                   template=None) -> dict | None:
    """Write the live rows of ``group`` as segment ``sid`` and insert their metadata rows (noted as
    written by ``version``) in ``meta``'s open transaction; returns the new segment's manifest entry (None
    when no row is live: nothing is written). ``manifest``: the index's fields (factory, vector dtype,
    patches); ``template``: its FAISS template (non-Flat factories). The caller puts the entry into its
    next version. The folder's rename is the last step: a failure leaves none at ``segments/<sid>``
    (and nothing in ``meta`` committed)."""
    root = Path(root)
    segs = [SegmentFiles(root, e, check="none") for e in group]
    lives = [_live(s) for s in segs]
    total = int(sum(len(x) for x in lives))
    if not total:
        return None
    records, frame_rows = _remap_rows(meta, segs, lives, sid)
    tmp = root / SEGMENTS / f".{sid}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        crash_point("before-index-write")
        files = {"ids.npy": io.write_npy(tmp / "ids.npy", np.concatenate([s.ids[r] for s, r in zip(segs, lives)]))}
        if is_flat_factory(manifest["factory"]):
            files["vectors.npy"] = _stream(tmp / "vectors.npy", segs, lives, "vectors.npy", manifest["vector_dtype"])
        else:
            files["index.faiss"] = io.write_faiss(tmp / "index.faiss", _merged_faiss(template, segs, lives))
        if manifest.get("patches") and all((s.dir / "patches.npy").exists() for s in segs):
            files["patches.npy"] = _stream(tmp / "patches.npy", segs, lives, "patches.npy", "float16")
        if frame_rows:
            files.update(_frames(tmp, segs, records, frame_rows))
        crash_point("after-index-write")
        io.fsync_dir(tmp)
        meta.note_segment(sid, version)
        meta.insert_items([it for it, _ in records])
        crash_point("before-version-rename")
        os.rename(tmp, segment_dir(root, sid))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"id": sid, "kind": group[0]["kind"], "dtype": group[0].get("dtype"), "rows": total, "frames": frame_rows,
            "deleted": 0, "deletions": None, "files": files}


def _remap_rows(meta: MetaDB, segs, lives, sid) -> tuple[list[tuple[Item, tuple[str, int]]], int]:
    """The merged segment's metadata rows (new row and frame positions) with where each one's frames were."""
    out, row, frame_rows = [], 0, 0
    for s, live in zip(segs, lives):
        keep = set(live.tolist())
        for r in meta.rows_of(s.sid):
            if r[2] not in keep:
                continue
            it = Item.from_row(r[:-1])
            src = (s.sid, it.frame_start)
            it = replace(it, segment=sid, row=row)
            if it.frame_count:
                it.frame_start, frame_rows = frame_rows, frame_rows + int(it.frame_count)
            out.append((it, src))
            row += 1
    return out, frame_rows


def _stream(path, segs, lives, name: str, dtype: str) -> dict:
    first = segs[0].array(name)
    out = io.NpyStream(path, dtype, (int(sum(len(x) for x in lives)), *first.shape[1:]))
    try:
        for s, live in zip(segs, lives):
            arr = s.array(name)
            for c in range(0, len(live), CHUNK):
                out.write(np.asarray(arr[live[c : c + CHUNK]], dtype=dtype))
        return out.close()
    except BaseException:
        out.abort()
        raise


def _frames(tmp, segs, records, frame_rows) -> dict:
    by_sid = {s.sid: s for s in segs}
    dim = segs[0].array("frames.npy").shape[1] if (segs[0].dir / "frames.npy").exists() else None
    if dim is None:
        dim = next(by_sid[src[0]].array("frames.npy").shape[1] for it, src in records if it.frame_count)
    emb = io.NpyStream(tmp / "frames.npy", "float16", (frame_rows, dim))
    ts = io.NpyStream(tmp / "frames_ts.npy", "float32", (frame_rows,))
    try:
        for it, (old_sid, old_start) in records:
            if it.frame_count:
                s = by_sid[old_sid]
                sl = slice(int(old_start), int(old_start) + int(it.frame_count))
                emb.write(s.array("frames.npy")[sl])
                ts.write(s.array("frames_ts.npy")[sl])
        return {"frames.npy": emb.close(), "frames_ts.npy": ts.close()}
    except BaseException:
        emb.abort()
        ts.abort()
        raise


def _merged_faiss(template, segs, lives):
    """IVF: the segments' live codes copied list by list into a clone of the template (their lists are
    memory-mapped, so the merge reads each list once and holds one list at a time); others rebuilt from
    the stored vectors (HNSW graphs cannot be merged)."""
    import faiss

    if is_ivf(template):
        out = faiss.clone_index(template)
        ivf = faiss.extract_index_ivf(out)
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        total = 0
        for s in segs:
            src = faiss.extract_index_ivf(s.faiss_index())
            dead = np.sort(np.asarray(s.ids[s.deleted], np.int64))  # what ``lives`` leaves out (``_live``)
            cs = int(src.code_size)
            for lno in range(int(src.nlist)):
                n = src.invlists.list_size(lno)
                if not n:
                    continue
                ids = faiss.rev_swig_ptr(src.invlists.get_ids(lno), n)
                codes = faiss.rev_swig_ptr(src.invlists.get_codes(lno), n * cs).reshape(n, cs)
                if len(dead):  # binary search in the (sorted) deleted ids: a list at a time
                    pos = np.minimum(np.searchsorted(dead, ids), len(dead) - 1)
                    mask = dead[pos] != ids
                else:
                    mask = np.ones(n, bool)
                if mask.any():
                    ids_l, codes_l = np.ascontiguousarray(ids[mask]), np.ascontiguousarray(codes[mask])
                    ivf.invlists.add_entries(lno, len(ids_l), faiss.swig_ptr(ids_l), faiss.swig_ptr(codes_l))
                    total += len(ids_l)
        ivf.ntotal = total
        out.ntotal = total
        return out
    ids = np.concatenate([s.ids[r] for s, r in zip(segs, lives)])
    vecs = np.concatenate([s.vectors(r) for s, r in zip(segs, lives)])
    return segment_index(template, vecs, ids)


__all__ = ["plan", "pick", "merge_factor", "GRAPH_MERGE_FACTOR", "merge_into", "merge_segments", "tier", "write_amplification_bound", "MERGE_FACTOR", "DELETED_SHARE"]
