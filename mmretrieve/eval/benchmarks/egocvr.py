"""EgoCVR (composed video retrieval), in its official layout: ``annotation/egocvr/egocvr_data.csv``,
``annotation/egocvr/egocvr_annotations_gallery.csv`` (the annotations plus ``global_idx`` / ``local_idx``,
row indices into ``egocvr_data.csv``) and the clips at ``<videos>/<video_uid>/<clip_name>.mp4``.

Protocol (``ExplainableML/EgoCVR`` ``egocvr_retrieval.py``): the full ranking over every clip is filtered
to the query's gallery (``global_idx`` or ``local_idx``); queries whose filtered gallery has fewer than 2
clips are skipped; a hit is any target clip in the top k; global R@1/5/10, local R@1/2/3. Rerankers
re-score each protocol's own shortlist, as EgoCVR's two-stage baseline does.
"""

from __future__ import annotations

import csv
import logging
from ast import literal_eval
from pathlib import Path
from typing import Any

from mmretrieve.errors import DatasetError, SubmissionError
from mmretrieve.eval import metrics as M
from mmretrieve.eval.datasets import TOP, Benchmark, CIRDataset, CIRQuery, check_missing, finish, register

log = logging.getLogger(__name__)

EGOCVR_TEXTS = {"tfcvr": "modified_captions", "instruction": "instruction", "gt": "target_clip_narration"}
PROTOCOLS = ("global", "local")
VIDEO_DIRS = ("clips", "clips_nooverlap_fullscale", "data/clips_nooverlap_fullscale")


def _clip_video_uid(clip: str) -> str:
    return clip.split("_")[0]


@register
class EgoCVR(Benchmark):
    name = "egocvr"
    help = "EgoCVR: global R@1/5/10 and local R@1/2/3 (composed video retrieval)"
    needs_full_ranking = True  # each query's gallery is a filter over the full ranking
    default_split = "test"
    video = {"num_frames": 15}  # EgoCVR's baselines sample 15 frames per clip
    cli_options = {
        "text": {"flags": ["--text"], "default": "tfcvr", "choices": list(EGOCVR_TEXTS),
                 "help": "query text: the modified captions (TF-CVR, default), the instruction, or the target narration"},
        "videos": {"flags": ["--videos"], "default": None, "help": "clip folder (<videos>/<video_uid>/<clip>.mp4)"},
        "frames": {"flags": ["--frames"], "type": int, "default": 15, "help": "frames sampled per clip (EgoCVR: 15)",
                   "run": "video"},
    }

    def load(self, root: Path, split: str = "test", *, text: str = "tfcvr", videos=None, allow_missing: bool = False,
             check_images: bool = True) -> CIRDataset:
        """``videos`` defaults to the first of ``clips``, ``clips_nooverlap_fullscale``,
        ``data/clips_nooverlap_fullscale`` under the root. Without the gallery file the galleries are
        derived (global: every other clip; local: the other clips of the same video), which is not the
        official split and is reported as such. ``text``: ``tfcvr`` (the modified captions, default),
        ``instruction`` or ``gt`` (the target narration, an oracle). EgoCVR has one evaluation split
        (``val`` reads it too)."""
        if text not in EGOCVR_TEXTS:
            raise DatasetError(f"unknown EgoCVR text {text!r}; expected one of {', '.join(EGOCVR_TEXTS)}")
        split = "test" if split == "val" else split
        ann_dir = root / "annotation" / "egocvr"
        data_csv = ann_dir / "egocvr_data.csv"
        if not data_csv.is_file():
            raise DatasetError(f"missing file {data_csv} (is --root the EgoCVR checkout?)")
        with open(data_csv, newline="", encoding="utf-8") as fh:
            clips = [r["clip_name"] for r in csv.DictReader(fh)]
        gal_csv = ann_dir / "egocvr_annotations_gallery.csv"
        derived = not gal_csv.is_file()
        ann_csv = ann_dir / "egocvr_annotations.csv" if derived else gal_csv
        if not ann_csv.is_file():
            raise DatasetError(f"missing file {ann_csv}")
        if derived:
            log.warning("%s not found: deriving galleries (not the official EgoCVR split)", gal_csv)
        vdir = Path(videos).expanduser().resolve() if videos else next(
            (root / d for d in VIDEO_DIRS if (root / d).is_dir()), root / "clips")
        gallery = {c: str(vdir / _clip_video_uid(c) / f"{c}.mp4") for c in clips}
        queries = self._queries(ann_csv, clips, text, derived)
        ds = CIRDataset("egocvr", split, root, {None: gallery}, queries, remove_reference=False,
                        missing_images=check_missing(gallery, check_images), known_ids={None: set(gallery)},
                        config={"text": text, "galleries": "derived" if derived else "official", "videos": str(vdir)})
        return finish(ds, allow_missing)

    @staticmethod
    def _queries(ann_csv: Path, clips: list[str], text: str, derived: bool) -> list[CIRQuery]:
        by_video: dict[str, list[str]] = {}
        for c in clips:
            by_video.setdefault(_clip_video_uid(c), []).append(c)
        queries = []
        with open(ann_csv, newline="", encoding="utf-8") as fh:
            for i, r in enumerate(csv.DictReader(fh)):
                try:
                    ref = r["video_clip_id"]
                    targets = [str(t) for t in literal_eval(r["target_clip_ids"])]
                    txt = (r[EGOCVR_TEXTS[text]] or "").strip()
                    if derived:
                        glob = [c for c in clips if c != ref]
                        local = [c for c in by_video.get(_clip_video_uid(ref), []) if c != ref]
                    else:
                        glob = [clips[int(j)] for j in literal_eval(r["global_idx"])]
                        local = [clips[int(j)] for j in literal_eval(r["local_idx"])]
                except (KeyError, ValueError, SyntaxError, IndexError) as e:
                    raise DatasetError(f"{ann_csv}: row {i + 2}: {type(e).__name__}: {e}") from None
                queries.append(CIRQuery(
                    qid=str(i), reference=ref, texts=[txt or r.get("instruction", "")],
                    target=targets[0] if targets else None, gts=targets,
                    info={"instruction": r.get("instruction"), "global_gallery": glob, "local_gallery": local},
                ))
        return queries

    def run_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Command-line options -> (loader options, evaluation options): ``frames`` sets the video sampling."""
        load = {k: v for k, v in options.items() if k != "frames"}
        return load, ({"video": {"num_frames": int(options["frames"])}} if options.get("frames") else {})

    def metrics(self, rankings, queries):
        return M.egocvr_metrics(rankings, queries)

    def scored_ranking(self, ds, q, ranking):
        g = set(q.info.get("global_gallery") or [])
        return [x for x in M.protocol_ranking(ranking, "global") if x in g]

    def shortlists(self, q, keys):
        for proto in PROTOCOLS:
            gset = set(q.info.get(f"{proto}_gallery") or [])
            yield proto, [k in gset for k in keys]

    def submission_files(self, ds, full):
        by_q = {q.qid: q for q in ds.queries}
        out = {}
        for qid, r in full.items():
            q = by_q[qid]
            out[qid] = {p: [x for x in M.protocol_ranking(r, p) if x in set(q.info.get(f"{p}_gallery") or [])][:TOP]
                        for p in PROTOCOLS}
        return {"egocvr.json": out}

    def score_files(self, ds, path, data, subset_path):
        by_q = {q.qid: q for q in ds.queries}
        unknown = [k for k in data if k not in by_q]
        if unknown:
            raise SubmissionError(f"{path}: unknown query id {unknown[0]!r}")
        out = {}
        for proto, ks in M.EGOCVR_KS.items():
            hits: dict[int, list[float]] = {k: [] for k in ks}
            for q in ds.queries:
                lst = self._protocol_list(path, data, q, proto)
                if len(lst) < M.EGOCVR_MIN_GALLERY:
                    continue
                for k in ks:
                    hits[k].append(1.0 if set(q.gts) & set(lst[:k]) else 0.0)
            for k in ks:
                out[f"{proto}/recall@{k}"] = M.pct(hits[k])
            out[f"{proto}/queries"] = float(len(hits[ks[0]]))
        return out

    @staticmethod
    def _protocol_list(path, data, q, proto) -> list:
        entry = data.get(q.qid)
        lst = entry.get(proto) if isinstance(entry, dict) else None
        if not isinstance(lst, list):
            raise SubmissionError(f"{path}: query {q.qid} has no {proto} ranking")
        if len(set(lst)) != len(lst):
            raise SubmissionError(f"{path}: query {q.qid}: duplicate ids in the {proto} ranking")
        stray = [x for x in lst if x not in set(q.info.get(f"{proto}_gallery") or [])]
        if stray:
            raise SubmissionError(f"{path}: query {q.qid}: {stray[0]!r} is not in its {proto} gallery")
        return lst
