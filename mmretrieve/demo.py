"""``mmretrieve demo``: index the packaged sample photographs and run text, image and composed queries,
offline, on the embedded encoder; write an HTML contact sheet of the results."""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmretrieve.errors import MissingDependencyError
from mmretrieve.index import open_index
from mmretrieve.ingest import build_index
from mmretrieve.media.samples import sample_images, sample_videos, write_manifest
from mmretrieve.media.thumbs import thumbnail_data_uri
from mmretrieve.query import Query
from mmretrieve.results import SearchResults

log = logging.getLogger(__name__)


@dataclass
class DemoQuery:
    title: str
    text: str | None = None
    image: str | None = None  # a sample id
    video: str | None = None  # a sample video id
    fusion: str = "sum"
    options: dict | None = None
    pipeline: str | None = None


def demo_queries(preset: str = "demo") -> tuple[list[DemoQuery], int]:
    """The demo's queries and k, from ``configs/demo.yaml``."""
    from mmretrieve.config import load_config

    cfg = load_config(preset)
    return [DemoQuery(**q) for q in cfg["queries"]], int(cfg.get("k", 4))


def contact_sheet(rows: list[tuple[str, str | None, SearchResults]], path: Path, title: str) -> Path:
    """Self-contained HTML: each query (text and/or thumbnail) beside its results with scores."""
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        ".row{display:flex;gap:12px;align-items:flex-start;margin:18px 0;padding-bottom:12px;border-bottom:1px solid #ddd}"
        ".q{width:190px;flex:none}.q .k{font-size:12px;color:#777;text-transform:uppercase}"
        ".hit{width:164px;font-size:12px;text-align:center}.hit img,.q img{max-width:160px;max-height:160px;display:block;margin:auto}"
        ".s{color:#555}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for label, qimage, res in rows:
        q = res.query
        parts.append("<div class='row'><div class='q'>")
        parts.append(f"<div class='k'>{html.escape(label)}</div>")
        if qimage:
            parts.append(f"<img src='{thumbnail_data_uri(qimage)}' alt='query image'>")
        if q.get("text"):
            parts.append(f"<p><b>&ldquo;{html.escape(q['text'])}&rdquo;</b></p>")
        parts.append("</div>")
        for h in res.hits:
            moment = f" @ {h.extra['timestamp']:.1f}s" if "timestamp" in h.extra else ""
            parts.append(
                f"<div class='hit'><img src='{thumbnail_data_uri(h.uri)}' alt=''>"
                f"<div>#{h.rank} {html.escape(h.key)}{moment}</div><div class='s'>score {h.score:.3f}</div></div>"
            )
        parts.append("</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run_demo(
    out_dir: str | Path = "demo-output",
    *,
    index_dir: str | Path | None = None,
    encoder: str = "embedded",
    k: int | None = None,
    preset: str = "demo",
    print_fn=None,
) -> dict:
    """Build the demo index, run the demo queries, write ``contact_sheet.html``. Returns a summary."""
    print_fn = print_fn or log.info
    out = Path(out_dir)
    samples = sample_images()
    if len(samples) < 5:
        raise MissingDependencyError(
            "the demo indexes sample photographs shipped by scikit-image, scikit-learn and matplotlib; "
            "install them with `pip install 'mmretrieve[demo]'`"
        )
    videos = sample_videos()
    by_id = {s.id: s for s in samples + videos}
    queries, default_k = demo_queries(preset)
    k = k or default_k
    # the heavily compressed copy of a clip is kept out of the gallery: it is the demo's query video
    gallery = samples + [v for v in videos if v.id != "carphone_distorted"]
    manifest = write_manifest(gallery, out / "gallery.csv")
    t0 = time.perf_counter()
    report = build_index("demo", manifest, encoder=encoder, index_dir=index_dir, overwrite=True, patches=True,
                         video={"num_frames": 16})
    n_vid = sum(1 for v in gallery if v in videos)
    print_fn(f"indexed {report.added} sample photos and videos ({n_vid} videos) in {time.perf_counter() - t0:.1f}s "
             f"-> {report.index_path}")
    idx = open_index(report.index_path)
    rows = []
    results = []
    for dq in queries:
        if (dq.image and dq.image not in by_id) or (dq.video and dq.video not in by_id):
            continue
        img = by_id[dq.image].path if dq.image else None
        vid = by_id[dq.video].path if dq.video else None
        res = idx.search(Query(text=dq.text, image=img, video=vid, fusion=dq.fusion, options=dict(dq.options or {})),
                         k=k, pipeline=dq.pipeline)
        ref = dq.image or dq.video
        desc = " + ".join(x for x in [f"[{ref}]" if ref else None, f'"{dq.text}"' if dq.text else None] if x)
        if dq.pipeline:
            desc += f"  (re-ranked: {dq.pipeline})"
        print_fn(f"\n{dq.title}: {desc}")
        print_fn(res.table())
        rows.append((dq.title, img or vid, res))
        results.append({"title": dq.title, "query": res.query, "top": res.keys,
                        "moments": [h.extra.get("timestamp") for h in res]})
    sheet = contact_sheet(rows, out / "contact_sheet.html", "mmretrieve demo (embedded offline encoder)")
    print_fn(f"\ncontact sheet: {sheet.resolve()}")
    where = f" --index-dir {index_dir}" if index_dir else ""
    print_fn(f"browse it in a web page: mmretrieve serve demo{where}   then open http://127.0.0.1:8000/ "
             "(needs mmretrieve[serve]; `make demo` installs it)")
    return {"index": report.index_path, "contact_sheet": str(sheet.resolve()), "queries": results}
