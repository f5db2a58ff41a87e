"""``mmretrieve eval cirr|fashioniq|circo|egocvr|captions|score``: the benchmarks' subcommands come from
their classes (``mmretrieve.eval.benchmarks``), each with the loader options it declares."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmretrieve.cli.common import EXIT_OK, add_generation_args, out_json, usage_error


def _pipeline_arg(args):
    from mmretrieve.cli.common import pipeline_from_args

    return pipeline_from_args(args)


def _print_metrics(res, ds) -> None:
    keys = [k for k in res.metrics[res.stages[0]] if not k.startswith("aspect/")]
    width = max(len(s) for s in res.stages)
    print(f"{ds.name} {ds.split}: {len(res.per_query)} queries, encoder {res.config['encoder']['name']}, fusion {res.config['fusion']}")
    print(" " * (width + 2) + "  ".join(f"{k:>{max(8, len(k))}}" for k in keys))
    for s in res.stages:
        print(f"{s:<{width}}  " + "  ".join(f"{res.metrics[s][k]:>{max(8, len(k))}.2f}" for k in keys))


def cmd_benchmark(args) -> int:
    from mmretrieve.config import parse_kv
    from mmretrieve.eval import evaluate_fusions, load_dataset
    from mmretrieve.eval.datasets import BENCHMARKS
    from mmretrieve.eval.report import write_report

    bench = BENCHMARKS.create(args.eval_cmd)
    load_kw, run_kw = bench.run_options({k: getattr(args, k) for k in bench.cli_options})
    ds = load_dataset(args.eval_cmd, args.root, args.split, allow_missing=args.allow_missing, **load_kw)
    if ds.dropped_queries:
        print(f"note: {len(ds.missing_images)} missing image(s); {ds.dropped_queries} "
              f"quer{'y' if ds.dropped_queries == 1 else 'ies'} dropped", file=sys.stderr)
    pipeline = _pipeline_arg(args)
    fusions = [f.strip() for f in (args.fusion or (pipeline.coarse_fusion if pipeline is not None else None) or "sum").split(",")]
    res = evaluate_fusions(
        ds, fusions, encoder=args.encoder, pipeline=pipeline,
        fusion_options=parse_kv(args.fusion_options) if args.fusion_options else None,
        batch_size=args.batch_size, workers=args.workers, cache=args.cache, limit=args.limit, where=args.where, **run_kw,
    )
    if args.where is not None:
        print(f"note: gallery filtered by {args.where!r}; {res.dataset.get('queries_target_filtered', 0)} "
              "quer(ies) with their target filtered out count as misses", file=sys.stderr)
    out = write_report(res, ds, Path(args.out) if args.out else
                       Path("eval-runs") / f"{args.eval_cmd}-{ds.split}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.json:
        out_json({**(res.flat_metrics() if res.metrics else {"submission_files": str(out / "rankings")}),
                  **({"cost": res.cost} if res.cost else {})})
        return EXIT_OK
    if res.metrics:
        _print_metrics(res, ds)
        from mmretrieve.results import cost_line

        for s, c in res.cost.items():
            print("cost " + cost_line(s, c))
    else:
        print(f"{ds.name} {ds.split} has no ground truth: official submission files written")
    print(f"report: {out.resolve()}")
    return EXIT_OK


def cmd_captions(args) -> int:
    from mmretrieve.eval.captions import evaluate_captions, load_captions

    if args.samples:
        import tempfile

        from mmretrieve.media.samples import opencv_doc_images, sample_images, write_manifest

        if args.file:
            return usage_error("give a captions FILE or --samples, not both")
        args.file = str(write_manifest(sample_images() + opencv_doc_images(), Path(tempfile.mkdtemp()) / "samples.csv"))
    elif not args.file:
        return usage_error("give a captions FILE (or --samples for the packaged photos)")
    cs = load_captions(args.file, images=args.images, split=args.split, allow_missing=args.allow_missing)
    res = evaluate_captions(cs, encoder=args.encoder, cache=args.cache, batch_size=args.batch_size, workers=args.workers)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "captions_report.json").write_text(json.dumps(res, indent=2))
    if args.json:
        out_json({k: round(v, 2) for k, v in res["metrics"].items()})
        return EXIT_OK
    m = res["metrics"]
    print(f"{res['dataset']}: {res['images']} images, {res['captions']} captions, encoder {res['encoder']}")
    print("          R@1     R@5    R@10")
    for d in ("t2i", "i2t"):
        print(f"{d}    " + "  ".join(f"{m[f'{d}/recall@{k}']:6.2f}" for k in (1, 5, 10)))
    return EXIT_OK


def cmd_score(args) -> int:
    from mmretrieve.eval import load_dataset
    from mmretrieve.eval.submission import score_files

    ds = load_dataset(args.dataset, args.root, args.split, check_images=False)
    metrics = score_files(ds, args.rankings, args.subset_rankings)
    if args.json:
        out_json(metrics)
    else:
        for k, v in metrics.items():
            print(f"{k:32s} {v:7.2f}")
    return EXIT_OK


def cmd_check(args) -> int:
    from mmretrieve.eval.submission import check_submission

    reports = check_submission(args.dataset, args.rankings, root=args.root, split=args.split, subset=args.subset_rankings)
    if args.json:
        out_json(reports)
        return EXIT_OK
    for r in reports:
        print(f"ok: {r['file']}: {r['metric']}, {r['queries']} queries, up to {r['ids_per_query']} ids each "
              f"(checked against {r['checked_against']})")
    return EXIT_OK


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", required=True, help="the dataset's top folder, in its official layout")
    p.add_argument("--split", default=None, help="val (metrics; the default) or test (official submission files)")
    p.add_argument("--encoder", default="embedded", help="encoder name or preset (default: embedded)")
    p.add_argument("--fusion", default=None, help="composed fusion: sum (default), weighted, intersection, text, image; "
                   "several comma-separated (sum,intersection) are evaluated side by side")
    p.add_argument("--fusion-options", default=None, help="e.g. weight=0.7 or k1=200,mode=product")
    p.add_argument("--rerank", action="append", default=None, help='reranker spec, e.g. "emd:k=50" (repeatable)')
    p.add_argument("--pipeline", default=None, help="a pipeline preset or YAML file")
    add_generation_args(p)
    p.add_argument("--allow-missing", action="store_true", help="evaluate on the images that exist")
    p.add_argument("--where", default=None, metavar="FILTER",
                   help="search a gallery restricted to the items that match (e.g. \"key != 'dev-3-img0'\", "
                        "\"width >= 256\"); a query whose target is filtered out counts as a miss")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N queries only")
    p.add_argument("--out", default=None, help="report folder (default eval-runs/<dataset>-<split>-<time>)")
    p.add_argument("--cache", default=None, help="gallery feature cache (default $MMRETRIEVE_CACHE/eval)")
    p.add_argument("--batch-size", type=int, default=None, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=None, help="decoder processes")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object (percent)")
    return p


def _captions_parser(esub, common) -> None:
    ec = esub.add_parser("captions", parents=[common], help="text->image and image->text Recall@1/5/10")
    ec.add_argument("file", nargs="?", default=None, help="CSV/JSONL with path,caption columns, or a Karpathy/COCO captions JSON")
    ec.add_argument("--samples", action="store_true",
                    help="the packaged sample photos with their hand-written captions (plus opencv-doc's, if unpacked)")
    ec.add_argument("--images", default=None, help="image folder (for Karpathy/COCO JSON)")
    ec.add_argument("--split", default="test", help="Karpathy split (default test)")
    ec.add_argument("--encoder", default="embedded", help="encoder name or preset (default: embedded)")
    ec.add_argument("--allow-missing", action="store_true", help="evaluate on the images that exist")
    ec.add_argument("--cache", default=None, help="feature cache (default $MMRETRIEVE_CACHE/eval)")
    ec.add_argument("--batch-size", type=int, default=None, help="images per encoder batch")
    ec.add_argument("--workers", type=int, default=None, help="decoder processes")
    ec.add_argument("--out", default=None, help="folder for captions_report.json")
    ec.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ec.set_defaults(func=cmd_captions)


def register(sub, common) -> None:
    import mmretrieve.eval.benchmarks  # noqa: F401 - registers the benchmarks (no torch)
    from mmretrieve.eval.datasets import BENCHMARKS

    ev = sub.add_parser("eval", parents=[common], help="evaluate on CIRR, FashionIQ, CIRCO, EgoCVR or a captioned image set")
    esub = ev.add_subparsers(dest="eval_cmd", required=True)
    run_opts = _run_options()
    for name in BENCHMARKS.names():
        bench = BENCHMARKS.create(name)
        ep = esub.add_parser(name, parents=[common, run_opts], help=bench.help)
        for dest, spec in bench.cli_options.items():
            spec = {k: v for k, v in spec.items() if k not in ("flags", "run")}
            ep.add_argument(*bench.cli_options[dest]["flags"], dest=dest, **spec)
        ep.set_defaults(func=cmd_benchmark)
    _captions_parser(esub, common)
    es = esub.add_parser("score", parents=[common], help="score a saved ranking file (official format), no model needed")
    es.add_argument("dataset", choices=BENCHMARKS.names(), help="which benchmark the file is for")
    es.add_argument("--root", required=True, help="the dataset's top folder")
    es.add_argument("--split", default=None, help="the split the file ranks (default: the benchmark's evaluation split)")
    es.add_argument("--rankings", required=True, help="CIRR recall file / CIRCO submission / FashionIQ rankings")
    es.add_argument("--subset-rankings", default=None, help="CIRR recall_subset file (found next to the recall file by default)")
    es.add_argument("--json", action="store_true", help="print the metrics as JSON")
    es.set_defaults(func=cmd_score)
    ek = esub.add_parser("check", parents=[common],
                         help="check a test-split submission file's format (keys, counts, id formats), no ground truth needed")
    ek.add_argument("dataset", choices=[n for n in BENCHMARKS.names() if BENCHMARKS.get(n).official_queries],
                    help="which benchmark's submission format")
    ek.add_argument("--rankings", required=True, help="the submission file (CIRR recall / recall_subset file, CIRCO file)")
    ek.add_argument("--subset-rankings", default=None, help="CIRR recall_subset file (found next to the recall file by default)")
    ek.add_argument("--root", default=None, help="the dataset's top folder: also check query and image ids against the split")
    ek.add_argument("--split", default="test", help="the split the file is for (default test)")
    ek.add_argument("--json", action="store_true", help="print what was checked as JSON")
    ek.set_defaults(func=cmd_check)
