"""``mmretrieve``: the command line. Each subcommand is one function over the Python API.

    mmretrieve demo
    mmretrieve index build NAME SOURCE [--encoder E] [--factory F] [--patches] [--strict]
    mmretrieve index add NAME SOURCE | index rm NAME ITEM... | index info NAME | index list
    mmretrieve search NAME --text "..." | --image PATH [--text "..." --fusion sum] [-k N] [--json]
    mmretrieve encoders
    mmretrieve bench ingest|search [...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mmretrieve.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


def _setup_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mmretrieve").setLevel(level)


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from mmretrieve.demo import run_demo

    summary = run_demo(args.out, index_dir=args.index_dir, encoder=args.encoder, k=args.k, preset=args.preset, print_fn=print)
    if args.json:
        _out(summary)
    return EXIT_OK


# ---- index -----------------------------------------------------------------------------------------
def _patches_arg(args) -> bool | dict:
    if not args.patches and not args.patch_grid and not args.patch_dim:
        return False
    cfg = {}
    if args.patch_grid:
        cfg["grid"] = args.patch_grid
    if args.patch_dim:
        cfg["dim"] = args.patch_dim
    return cfg or True


def _report_out(report, args) -> int:
    if args.json:
        _out(report.to_dict())
    else:
        print(report.summary())
        for s in report.skipped[: args.show_skipped]:
            print(f"  skipped {s.uri}: {s.reason}")
        if len(report.skipped) > args.show_skipped:
            print(f"  ... and {len(report.skipped) - args.show_skipped} more (see `mmretrieve index info NAME --skipped`)")
    return EXIT_OK


def cmd_index_build(args) -> int:
    from mmretrieve.index import build_index

    video = {"num_frames": args.frames, "fps": args.fps, "max_frames": args.max_frames, "pooling": args.video_pooling,
             "frame_entries": args.frame_entries or None, "timeout": args.video_timeout}
    report = build_index(
        args.name, args.source, encoder=args.encoder, index_dir=args.index_dir, factory=args.factory,
        patches=_patches_arg(args), video={k: v for k, v in video.items() if v is not None}, overwrite=args.overwrite,
        batch_size=args.batch_size, workers=args.workers, on_bad_vectors=args.on_bad_vectors, strict=args.strict,
    )
    return _report_out(report, args)


def cmd_index_add(args) -> int:
    from mmretrieve.index import add_to_index

    report = add_to_index(
        args.name, args.source, index_dir=args.index_dir, batch_size=args.batch_size, workers=args.workers,
        on_bad_vectors=args.on_bad_vectors, strict=args.strict,
    )
    return _report_out(report, args)


def cmd_index_rm(args) -> int:
    from mmretrieve.index import remove_from_index

    n = remove_from_index(args.name, args.items, index_dir=args.index_dir)
    print(f"removed {n} item(s)")
    return EXIT_OK


def cmd_index_info(args) -> int:
    from mmretrieve.index import open_index

    idx = open_index(args.name, index_dir=args.index_dir, verify=not args.no_verify)
    info = idx.info()
    if args.skipped:
        info["skipped_items"] = [{"key": s.key, "uri": s.uri, "reason": s.reason} for s in idx.meta.skipped()]
    if args.json:
        _out(info)
        return EXIT_OK
    c = info["counts"]
    print(f"index     {info['path']}")
    print(f"version   {info['version']}")
    print(f"encoder   {info['encoder']['name']} (dim {info['encoder']['dim']})")
    print(f"faiss     {info['factory']} ({info['faiss']}), metric {info['metric']}")
    print(f"items     {c['items']} ({c['images']} images, {c['videos']} videos), {c['skipped']} skipped, {c['tombstones']} tombstones")
    p = info.get("patches")
    patches = f"{p['grid']}x{p['grid']} grid, dim {p['dim']}, fp16" if p else "none"
    print(f"patches   {patches}")
    print(f"size      {info['bytes'] / 1e6:.2f} MB")
    for s in info.get("skipped_items", []):
        print(f"  skipped {s['uri']}: {s['reason']}")
    return EXIT_OK


def cmd_index_list(args) -> int:
    from mmretrieve.index.store import default_index_dir, describe_manifest, read_manifest

    base = Path(args.index_dir) if args.index_dir else default_index_dir()
    rows = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if (d / "manifest.json").is_file():
                try:
                    rows.append((d.name, describe_manifest(read_manifest(d))))
                except Exception as e:  # a broken index must not hide the others
                    rows.append((d.name, f"unreadable: {e}"))
    if args.json:
        _out(dict(rows))
    elif not rows:
        print(f"no indexes under {base}")
    else:
        for name, desc in rows:
            print(f"{name:24s} {desc}")
    return EXIT_OK


# ---- search ----------------------------------------------------------------------------------------
def cmd_search(args) -> int:
    from mmretrieve.config import parse_kv
    from mmretrieve.index import open_index
    from mmretrieve.query import Query

    if args.text is None and args.image is None and args.video is None:
        print("error: give --text, --image or --video, or an image/video plus --text (a composed query)", file=sys.stderr)
        return EXIT_USAGE
    if args.image is not None and args.video is not None:
        print("error: give --image or --video, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.k < 1:
        print(f"error: -k must be at least 1 (got {args.k})", file=sys.stderr)
        return EXIT_USAGE
    if args.fusion is not None:
        from mmretrieve.query import FUSIONS

        if args.fusion not in FUSIONS.names():
            print(f"error: unknown fusion {args.fusion!r}; expected one of {', '.join(FUSIONS.names())}", file=sys.stderr)
            return EXIT_USAGE
    idx = open_index(args.name, index_dir=args.index_dir, verify=not args.no_verify, encoder=args.encoder,
                     search_device=args.search_device, nprobe=args.nprobe, ef_search=args.ef_search)
    options = parse_kv(args.fusion_options) if args.fusion_options else {}
    if args.weight is not None:
        options["weight"] = args.weight
    pipeline = None
    if args.pipeline or args.rerank:
        from mmretrieve.rerank.pipeline import Pipeline

        pipeline = Pipeline.from_config(args.pipeline) if args.pipeline else Pipeline.from_specs(args.rerank)
    fusion = args.fusion or (pipeline.coarse_fusion if pipeline is not None else None) or "sum"
    query = Query(text=args.text, image=args.image, video=args.video, fusion=fusion, options=options)
    res = idx.search(query, k=args.k, exclude_reference=not args.keep_reference, pipeline=pipeline)
    if args.json:
        _out(res.to_dict())
    else:
        print(res.table())
    return EXIT_OK


def cmd_encoders(args) -> int:
    from mmretrieve.encoders import ENCODERS, encoder_presets

    print("families:")
    for name, doc in ENCODERS.describe().items():
        print(f"  {name:18s} {doc}")
    print("presets (configs/encoders):")
    for name, p in sorted(encoder_presets().items()):
        print(f"  {name:18s} {p.get('encoder')}  {p.get('description', '')}")
    return EXIT_OK


# ---- eval ------------------------------------------------------------------------------------------
def _pipeline_arg(args):
    if getattr(args, "pipeline", None) or getattr(args, "rerank", None):
        from mmretrieve.rerank.pipeline import Pipeline

        return Pipeline.from_config(args.pipeline) if args.pipeline else Pipeline.from_specs(args.rerank)
    return None


def _eval_out(args) -> Path:
    if args.out:
        return Path(args.out)
    import time as _time

    return Path("eval-runs") / f"{args.eval_cmd}-{args.split}-{_time.strftime('%Y%m%d-%H%M%S')}"


def cmd_eval_benchmark(args) -> int:
    from mmretrieve.config import parse_kv
    from mmretrieve.eval import evaluate_fusions, load_dataset
    from mmretrieve.eval.report import write_report

    kw: dict = {"allow_missing": args.allow_missing}
    if args.eval_cmd == "fashioniq":
        kw.update(categories=args.categories, caption_style=args.caption_style)
    if args.eval_cmd == "circo":
        kw.update(text_style=args.text_style)
    video = None
    if args.eval_cmd == "egocvr":
        kw.update(text=args.text, videos=args.videos)
        video = {"num_frames": args.frames}
        if args.split == "val":
            args.split = "test"  # EgoCVR has one evaluation split
    ds = load_dataset(args.eval_cmd, args.root, args.split, **kw)
    if ds.dropped_queries:
        print(f"note: {len(ds.missing_images)} missing image(s); {ds.dropped_queries} quer{'y' if ds.dropped_queries == 1 else 'ies'} dropped", file=sys.stderr)
    pipeline = _pipeline_arg(args)
    fusions = [f.strip() for f in (args.fusion or (pipeline.coarse_fusion if pipeline is not None else None) or "sum").split(",")]
    res = evaluate_fusions(
        ds, fusions, encoder=args.encoder, pipeline=pipeline,
        fusion_options=parse_kv(args.fusion_options) if args.fusion_options else None,
        batch_size=args.batch_size, workers=args.workers, cache=args.cache, limit=args.limit, video=video,
    )
    out = write_report(res, ds, _eval_out(args))
    if args.json:
        _out(res.flat_metrics() if res.metrics else {"submission_files": str(out / "rankings")})
        return EXIT_OK
    if res.metrics:
        keys = [k for k in res.metrics[res.stages[0]] if not k.startswith("aspect/")]
        width = max(len(s) for s in res.stages)
        print(f"{ds.name} {ds.split}: {len(res.per_query)} queries, encoder {res.config['encoder']['name']}, fusion {res.config['fusion']}")
        print(" " * (width + 2) + "  ".join(f"{k:>{max(8, len(k))}}" for k in keys))
        for s in res.stages:
            print(f"{s:<{width}}  " + "  ".join(f"{res.metrics[s][k]:>{max(8, len(k))}.2f}" for k in keys))
    else:
        print(f"{ds.name} {ds.split} has no ground truth: official submission files written")
    print(f"report: {out.resolve()}")
    return EXIT_OK


def cmd_eval_captions(args) -> int:
    from mmretrieve.eval.captions import evaluate_captions, load_captions

    if args.samples:
        import tempfile

        from mmretrieve.samples import opencv_doc_images, sample_images, write_manifest

        if args.file:
            print("error: give a captions FILE or --samples, not both", file=sys.stderr)
            return EXIT_USAGE
        args.file = str(write_manifest(sample_images() + opencv_doc_images(), Path(tempfile.mkdtemp()) / "samples.csv"))
    elif not args.file:
        print("error: give a captions FILE (or --samples for the packaged photos)", file=sys.stderr)
        return EXIT_USAGE
    cs = load_captions(args.file, images=args.images, split=args.split, allow_missing=args.allow_missing)
    res = evaluate_captions(cs, encoder=args.encoder, cache=args.cache, batch_size=args.batch_size, workers=args.workers)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "captions_report.json").write_text(json.dumps(res, indent=2))
    if args.json:
        _out({k: round(v, 2) for k, v in res["metrics"].items()})
        return EXIT_OK
    m = res["metrics"]
    print(f"{res['dataset']}: {res['images']} images, {res['captions']} captions, encoder {res['encoder']}")
    print("          R@1     R@5    R@10")
    for d in ("t2i", "i2t"):
        print(f"{d}    " + "  ".join(f"{m[f'{d}/recall@{k}']:6.2f}" for k in (1, 5, 10)))
    return EXIT_OK


def cmd_eval_score(args) -> int:
    from mmretrieve.eval import load_dataset
    from mmretrieve.eval.submission import score_files

    ds = load_dataset(args.dataset, args.root, args.split, check_images=False)
    metrics = score_files(ds, args.rankings, args.subset_rankings)
    if args.json:
        _out(metrics)
    else:
        for k, v in metrics.items():
            print(f"{k:32s} {v:7.2f}")
    return EXIT_OK


# ---- bench -----------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    from mmretrieve import bench

    result = bench.run(args.bench, args)
    if args.json:
        _out(result)
    return EXIT_OK


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # common options work before or after the subcommand; SUPPRESS keeps a subparser from resetting a
    # value given earlier on the line (defaults are applied once, in main)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--index-dir", default=argparse.SUPPRESS, help="home of named indexes (default: $MMRETRIEVE_INDEX_DIR or ./indexes)")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch + FAISS threads (default: all available cores)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

    p = argparse.ArgumentParser(prog="mmretrieve", description="Multimodal retrieval and re-ranking.", parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", parents=[common], help="index the packaged sample photos and run example queries (offline)")
    d.add_argument("--out", default="demo-output", help="folder for the contact sheet (default: demo-output)")
    d.add_argument("--encoder", default="embedded")
    d.add_argument("-k", type=int, default=None, help="results per query (default: from configs/demo.yaml)")
    d.add_argument("--preset", default="demo", help="queries preset (default: configs/demo.yaml)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    ix = sub.add_parser("index", parents=[common], help="build, grow, shrink and inspect indexes")
    isub = ix.add_subparsers(dest="index_cmd", required=True)
    ingest_opts = argparse.ArgumentParser(add_help=False)
    ingest_opts.add_argument("--batch-size", type=int, default=None)
    ingest_opts.add_argument("--workers", type=int, default=None, help="decoder processes (default: cores - 1, at least 1)")
    ingest_opts.add_argument("--strict", action="store_true", help="any skipped input is an error: nothing is written")
    ingest_opts.add_argument("--on-bad-vectors", choices=["error", "drop"], default="error")
    ingest_opts.add_argument("--json", action="store_true")
    ingest_opts.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list up to N skipped files")

    b = isub.add_parser("build", parents=[common, ingest_opts], help="index a folder (recursive) or a CSV/JSONL manifest")
    b.add_argument("name", help="index name (under the indexes home) or a path to an index directory")
    b.add_argument("source", help="folder of images, or a manifest with path[,id][,caption] columns")
    b.add_argument("--encoder", default="embedded", help="e.g. embedded, open_clip:ViT-B-32@laion2b_s34b_b79k, open_clip:local-dir:DIR")
    b.add_argument("--factory", default="Flat", help='FAISS factory string, e.g. Flat, HNSW32, "IVF1024,PQ64"')
    b.add_argument("--patches", action="store_true", help="store patch features (fp16) for the EMD reranker")
    b.add_argument("--patch-grid", type=int, default=None, help="pool the patch grid to GxG (implies --patches)")
    b.add_argument("--patch-dim", type=int, default=None, help="project patch features to D dims (implies --patches)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index (atomically, as a new version)")
    b.add_argument("--frames", type=int, default=None, help="videos: N uniformly sampled frames per clip (default 8)")
    b.add_argument("--fps", type=float, default=None, help="videos: sample at a fixed rate instead (frames per second)")
    b.add_argument("--max-frames", type=int, default=None, help="videos: cap on frames per clip with --fps (default 32)")
    b.add_argument("--video-pooling", choices=["mean", "middle"], default=None, help="videos: how frames make the video vector")
    b.add_argument("--frame-entries", action="store_true", help="videos: also index every frame (moment search)")
    b.add_argument("--video-timeout", type=float, default=None, help="videos: seconds per file before the decoder is killed (60)")
    b.set_defaults(func=cmd_index_build)

    a = isub.add_parser("add", parents=[common, ingest_opts], help="add new or changed files")
    a.add_argument("name")
    a.add_argument("source")
    a.set_defaults(func=cmd_index_add)

    r = isub.add_parser("rm", parents=[common], help="remove items by id, key or path")
    r.add_argument("name")
    r.add_argument("items", nargs="+")
    r.set_defaults(func=cmd_index_rm)

    i = isub.add_parser("info", parents=[common], help="show an index's manifest and counts")
    i.add_argument("name")
    i.add_argument("--skipped", action="store_true", help="list skipped inputs and their reasons")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_index_info)

    ls = isub.add_parser("list", parents=[common], help="list the indexes under the indexes home")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_index_list)

    s = sub.add_parser("search", parents=[common], help="search by text, image, or image + text")
    s.add_argument("name")
    s.add_argument("--text", default=None)
    s.add_argument("--image", default=None)
    s.add_argument("--video", default=None, help="a query video (its frames are encoded and pooled)")
    s.add_argument("--fusion", default=None, help="composed queries: sum (default), weighted, intersection, text, image")
    s.add_argument("--weight", type=float, default=None, help="text weight for --fusion weighted (0..1)")
    s.add_argument("--fusion-options", default=None, help="e.g. 'k1=200,mode=product' for intersection")
    s.add_argument("--keep-reference", action="store_true", help="composed queries: keep the reference image in results")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--encoder", default=None, help="query encoder (default: the index's own)")
    s.add_argument("--rerank", action="append", default=None, help='reranker spec, e.g. "emd:k=100,alpha=0.7" (repeatable)')
    s.add_argument("--pipeline", default=None, help="a pipeline preset (configs/pipelines/NAME) or YAML file")
    s.add_argument("--no-verify", action="store_true", help="skip sha256 verification of the index files")
    s.add_argument("--nprobe", type=int, default=None, help="IVF indexes: lists probed (default min(nlist, 32))")
    s.add_argument("--ef-search", type=int, default=None, help="HNSW indexes: search breadth efSearch")
    s.add_argument("--search-device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where the coarse search runs (default: $MMRETRIEVE_SEARCH_DEVICE or auto = GPU when usable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", parents=[common], help="evaluate on CIRR, FashionIQ, CIRCO or a captioned image set")
    esub = ev.add_subparsers(dest="eval_cmd", required=True)
    run_opts = argparse.ArgumentParser(add_help=False)
    run_opts.add_argument("--root", required=True, help="the dataset's top folder, in its official layout")
    run_opts.add_argument("--split", default="val", help="val (metrics) or test (official submission files)")
    run_opts.add_argument("--encoder", default="embedded")
    run_opts.add_argument("--fusion", default=None,
                          help="composed fusion: sum (default), weighted, intersection, text, image; several "
                               "comma-separated (sum,intersection) are evaluated side by side")
    run_opts.add_argument("--fusion-options", default=None, help="e.g. weight=0.7 or k1=200,mode=product")
    run_opts.add_argument("--rerank", action="append", default=None, help='reranker spec, e.g. "emd:k=50" (repeatable)')
    run_opts.add_argument("--pipeline", default=None, help="a pipeline preset or YAML file")
    run_opts.add_argument("--allow-missing", action="store_true", help="evaluate on the images that exist")
    run_opts.add_argument("--limit", type=int, default=None, help="evaluate the first N queries only")
    run_opts.add_argument("--out", default=None, help="report folder (default eval-runs/<dataset>-<split>-<time>)")
    run_opts.add_argument("--cache", default=None, help="gallery feature cache (default $MMRETRIEVE_CACHE/eval)")
    run_opts.add_argument("--batch-size", type=int, default=None)
    run_opts.add_argument("--workers", type=int, default=None)
    run_opts.add_argument("--json", action="store_true", help="print the metrics as one JSON object (percent)")
    for name, helptext in (("cirr", "CIRR: Recall@1/5/10/50 and Recall_subset@1/2/3"),
                           ("fashioniq", "FashionIQ: R@10/R@50 per category and average"),
                           ("circo", "CIRCO: mAP@5/10/25/50 and Recall@k"),
                           ("egocvr", "EgoCVR: global R@1/5/10 and local R@1/2/3 (composed video retrieval)")):
        ep = esub.add_parser(name, parents=[common, run_opts], help=helptext)
        if name == "egocvr":
            ep.add_argument("--text", default="tfcvr", choices=["tfcvr", "instruction", "gt"],
                            help="query text: the modified captions (TF-CVR, default), the instruction, or the target narration")
            ep.add_argument("--videos", default=None, help="clip folder (<videos>/<video_uid>/<clip>.mp4)")
            ep.add_argument("--frames", type=int, default=15, help="frames sampled per clip (EgoCVR: 15)")
        if name == "fashioniq":
            ep.add_argument("--categories", default="dress,shirt,toptee")
            ep.add_argument("--caption-style", default="searle", choices=["searle", "pic2word", "covr"],
                            help="how the two captions are joined (default: SEARLE/LinCIR, both orders averaged)")
        if name == "circo":
            ep.add_argument("--text-style", default="relative", choices=["relative", "shared"],
                            help="relative caption only (SEARLE/LinCIR/CIReVL) or with the shared concept")
        ep.set_defaults(func=cmd_eval_benchmark)
    ec = esub.add_parser("captions", parents=[common], help="text->image and image->text Recall@1/5/10")
    ec.add_argument("file", nargs="?", default=None, help="CSV/JSONL with path,caption columns, or a Karpathy/COCO captions JSON")
    ec.add_argument("--samples", action="store_true",
                    help="the packaged sample photos with their hand-written captions (plus opencv-doc's, if unpacked)")
    ec.add_argument("--images", default=None, help="image folder (for Karpathy/COCO JSON)")
    ec.add_argument("--split", default="test")
    ec.add_argument("--encoder", default="embedded")
    ec.add_argument("--allow-missing", action="store_true")
    ec.add_argument("--cache", default=None)
    ec.add_argument("--batch-size", type=int, default=None)
    ec.add_argument("--workers", type=int, default=None)
    ec.add_argument("--out", default=None)
    ec.add_argument("--json", action="store_true")
    ec.set_defaults(func=cmd_eval_captions)
    es = esub.add_parser("score", parents=[common], help="score a saved ranking file (official format), no model needed")
    es.add_argument("dataset", choices=["cirr", "circo", "fashioniq", "egocvr"])
    es.add_argument("--root", required=True)
    es.add_argument("--split", default="val")
    es.add_argument("--rankings", required=True, help="CIRR recall file / CIRCO submission / FashionIQ rankings")
    es.add_argument("--subset-rankings", default=None, help="CIRR recall_subset file (found next to the recall file by default)")
    es.add_argument("--json", action="store_true")
    es.set_defaults(func=cmd_eval_score)

    e = sub.add_parser("encoders", parents=[common], help="list encoder families")
    e.set_defaults(func=cmd_encoders)

    from mmretrieve import bench

    bn = sub.add_parser("bench", parents=[common], help="benchmarks that print measured ratios")
    bench.add_arguments(bn, common)
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("index_dir", None), ("threads", None), ("verbose", 0), ("quiet", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    _setup_logging(-1 if args.quiet else args.verbose)
    from mmretrieve.runtime import set_threads

    set_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; the traceback with -v
        from mmretrieve.index.index import SkippedInputsError

        if args.verbose:
            log.exception("failed")
        if isinstance(e, SkippedInputsError):
            print(f"error: {e}", file=sys.stderr)
            for s in e.report.skipped[:50]:
                print(f"  skipped {s.uri}: {s.reason}", file=sys.stderr)
            return EXIT_SKIPPED
        msg = str(e) if not isinstance(e, KeyError) else (e.args[0] if e.args else str(e))
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

