"""Evaluation reports that give feedback, not just a leaderboard.

A report folder holds ``report.json`` (metrics per stage, resolved config, per-query diagnostics),
``report.md`` (the same as tables: metrics side by side, what each reranker fixed and broke, the
breakdowns), ``recall_at_k.png`` (Recall@k per stage), ``gallery.html`` (the worst and the most improved
queries with thumbnails), ``config.json`` and ``rankings/<stage>/`` with the official ranking files.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.eval.datasets import CIRDataset
from mmretrieve.eval.runner import EvalResult
from mmretrieve.eval.submission import write_submission
from mmretrieve.media.thumbs import thumbnail_data_uri

log = logging.getLogger(__name__)


def changes(result: EvalResult, k: int = 1) -> dict[str, dict[str, int]]:
    """For each stage after the first: how many queries it *fixed* (target not in the previous stage's top
    ``k``, in its own) and *broke* (the reverse). With several fusions side by side (``sum/coarse``,
    ``sum/emd``, ``intersection/coarse`` ...) each stage is compared with the previous one of its run."""
    out = {}
    pairs = [(p, c) for p, c in zip(result.stages, result.stages[1:]) if p.rpartition("/")[0] == c.rpartition("/")[0]]
    for prev, cur in pairs:
        fixed = broke = 0
        for q in result.per_query:
            r = q.get("ranks")
            if not r:
                continue
            a, b = r.get(prev), r.get(cur)
            was, now = a is not None and a <= k, b is not None and b <= k
            fixed += int(now and not was)
            broke += int(was and not now)
        out[cur] = {"fixed": fixed, "broke": broke}
    return out


def write_report(result: EvalResult, ds: CIRDataset, out_dir: str | Path, *, gallery_size: int = 12) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranking_files = {}
    for stage in result.stages:
        paths = write_submission(ds, result.rankings[stage], out / "rankings" / stage.replace("/", "-"))
        ranking_files[stage] = [str(p.relative_to(out)) for p in paths]
    report = result.to_dict()
    report["ranking_files"] = ranking_files
    report["changes"] = {f"@{k}": changes(result, k) for k in (1, 5, 10)} if result.metrics else None
    with open(out / "report.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(out / "config.json", "w", encoding="utf-8") as fh:
        json.dump({"dataset": result.dataset, **result.config}, fh, indent=2, default=str)
    described = [q for q in result.per_query if "description" in q]
    if described:  # what the describe stage wrote for each query, next to the report
        with open(out / "descriptions.jsonl", "w", encoding="utf-8") as fh:
            for q in described:
                fh.write(json.dumps({k: q.get(k) for k in ("qid", "reference", "texts", "description", "target")},
                                    ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(result, report), encoding="utf-8")
    if result.metrics:
        plot_recall(result, out / "recall_at_k.png")
        gallery_html(result, ds, out / "gallery.html", n=gallery_size)
    return out


def markdown(result: EvalResult, report: dict[str, Any]) -> str:
    d = result.dataset
    lines = [f"# {d['dataset']} {d['split']}: evaluation report", ""]
    lines.append(f"- queries evaluated: {d.get('queries_evaluated', d['queries'])}; gallery: {d['gallery']}")
    if d.get("missing_images") or d.get("dropped_queries"):
        lines.append(f"- missing images: {d['missing_images']}; queries dropped: {d['dropped_queries']}")
    enc = result.config["encoder"]
    lines.append(f"- encoder: `{enc['name']}` (dim {enc['dim']}); fusion: `{result.config['fusion']}`")
    if result.config.get("pipeline"):
        for st in result.config["pipeline"]["stages"]:
            opts = ", ".join(f"{k}={v}" for k, v in st.items() if k != "name" and v is not None)
            lines.append(f"- stage `{st['name']}`: {opts}")
    lines.append(f"- time: {result.timings_s.get('total', 0):.1f} s (gallery {result.timings_s.get('gallery', 0):.1f} s)")
    lines.append("")
    if result.cost:
        lines += ["## Generation cost", "", "| stage | prompts | cached | prompt tokens | generated tokens | seconds | unread |",
                  "|---|---|---|---|---|---|---|"]
        for s, c in result.cost.items():
            lines.append(f"| {s} | {c['prompts']} | {c['cache_hits']} | {c['prompt_tokens']} | {c['generated_tokens']} | "
                         f"{c['seconds']:.2f} | {c['unparsed']} |")
        lines += ["", "Descriptions written by the describe stage: `descriptions.jsonl` (one per query).", ""] \
            if "describe" in result.cost else [""]
    if result.metrics:
        main = [k for k in result.metrics[result.stages[0]] if not k.startswith("aspect/")]
        lines.append("## Metrics (%)")
        lines.append("")
        lines.append("| stage | " + " | ".join(main) + " |")
        lines.append("|---|" + "---|" * len(main))
        for s in result.stages:
            lines.append(f"| {s} | " + " | ".join(f"{result.metrics[s][k]:.2f}" for k in main) + " |")
        lines.append("")
        if len(result.stages) > 1 and report.get("changes"):
            lines.append("## What each reranker changed")
            lines.append("")
            lines.append("| stage | fixed@1 | broke@1 | fixed@5 | broke@5 | fixed@10 | broke@10 |")
            lines.append("|---|---|---|---|---|---|---|")
            for s in report["changes"]["@1"]:
                c = [report["changes"][f"@{k}"][s] for k in (1, 5, 10)]
                lines.append(f"| {s} | " + " | ".join(f"{x['fixed']} | {x['broke']}" for x in c) + " |")
            lines.append("")
        aspects = sorted({k for k in result.metrics[result.stages[0]] if k.startswith("aspect/")})
        if aspects:
            lines.append("## mAP@10 by semantic aspect (%)")
            lines.append("")
            lines.append("| aspect | " + " | ".join(result.stages) + " |")
            lines.append("|---|" + "---|" * len(result.stages))
            for a in aspects:
                lines.append(f"| {a.split('/')[1]} | " + " | ".join(f"{result.metrics[s][a]:.2f}" for s in result.stages) + " |")
            lines.append("")
        lines.append("Files: `report.json` (per-query ranks at every stage), `gallery.html`, `recall_at_k.png`, "
                     "`rankings/<stage>/` (official format; re-score with `mmretrieve eval score`).")
    else:
        lines.append("No ground truth in this split: the official submission files are under `rankings/<stage>/`.")
    return "\n".join(lines) + "\n"


def recall_curve(result: EvalResult, stage: str, kmax: int = 50) -> np.ndarray:
    ranks = [q["ranks"][stage] for q in result.per_query if q.get("ranks")]
    r = np.array([x if x is not None else 10**9 for x in ranks])
    return np.array([100.0 * float(np.mean(r <= k)) for k in range(1, kmax + 1)])


def plot_recall(result: EvalResult, path: Path, kmax: int = 50) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install 'mmretrieve[eval]')", path.name)
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ks = np.arange(1, kmax + 1)
    for s in result.stages:
        ax.plot(ks, recall_curve(result, s, kmax), label=s)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k (%) of the first ground truth")
    ax.set_title(f"{result.dataset['dataset']} {result.dataset['split']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def gallery_html(result: EvalResult, ds: CIRDataset, path: Path, n: int = 12) -> Path:
    """The ``n`` worst queries (final stage) and the ``n`` most improved by the rerankers, with thumbnails."""
    first, last = result.stages[0], result.stages[-1]
    rows = [q for q in result.per_query if q.get("ranks")]
    big = 10**9

    def rank(q, s):
        r = q["ranks"][s]
        return big if r is None else r

    if "/" in last:  # several fusions side by side: compare within the last run
        prefix = last.rpartition("/")[0] + "/"
        first = next(s for s in result.stages if s.startswith(prefix))
    worst = sorted(rows, key=lambda q: -rank(q, last))[:n]
    improved = sorted(rows, key=lambda q: rank(q, last) - rank(q, first))[:n] if len(result.stages) > 1 else []
    improved = [q for q in improved if rank(q, last) < rank(q, first)]
    paths = {}
    for gal in ds.galleries.values():
        paths.update(gal)

    def img(i: str, label: str) -> str:
        return (f"<figure><img src='{thumbnail_data_uri(paths.get(i), 120)}' alt=''>"
                f"<figcaption>{html.escape(label)}</figcaption></figure>")

    def row(q) -> str:
        ranks = ", ".join(f"{s}: {q['ranks'][s] if q['ranks'][s] is not None else '&gt;list'}" for s in result.stages)
        cells = [img(q["reference"], "reference"), f"<div class='t'>{html.escape(' / '.join(q['texts']))}<br><small>{ranks}</small></div>",
                 img(q["target"], "target")]
        cells += [img(x, f"#{j + 1}" + (" ✓" if x == q["target"] else "")) for j, x in enumerate(q["top5"][last])]
        return "<div class='row'>" + "".join(cells) + "</div>"

    parts = [
        "<!doctype html><meta charset='utf-8'><title>evaluation gallery</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:20px}.row{display:flex;gap:8px;align-items:center;"
        "border-bottom:1px solid #ddd;padding:6px 0}figure{margin:0;width:124px;text-align:center;font-size:11px}"
        "img{max-width:120px;max-height:120px}.t{width:220px;font-size:13px}</style>",
        f"<h1>{html.escape(result.dataset['dataset'])} {html.escape(result.dataset['split'])}</h1>",
        f"<h2>Worst queries after {html.escape(last)}</h2>",
        *[row(q) for q in worst],
    ]
    if improved:
        parts += [f"<h2>Most improved from {html.escape(first)} to {html.escape(last)}</h2>", *[row(q) for q in improved]]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
