"""``mmretrieve search NAME ...``."""

from __future__ import annotations

from mmretrieve.cli.common import EXIT_OK, add_generation_args, out_json, usage_error


def cmd_search(args) -> int:
    from mmretrieve.config import parse_kv
    from mmretrieve.query import FUSIONS, Query

    if args.queries is not None:
        return _batch(args)
    if args.text is None and args.image is None and args.video is None and args.item is None:
        if args.where is not None:
            return _browse(args)
        return usage_error("give --text, --image, --video or --item, or one of those plus --text (a composed query), "
                           "or --where alone to browse the items that meet a filter")
    if args.order is not None or args.offset:
        return usage_error("--order and --offset apply to browsing (--where and no query)")
    if sum(x is not None for x in (args.image, args.video, args.item)) > 1:
        return usage_error("give one of --image, --video or --item, not several")
    if args.k < 1:
        return usage_error(f"-k must be at least 1 (got {args.k})")
    if args.fusion is not None and args.fusion not in FUSIONS.names():
        return usage_error(f"unknown fusion {args.fusion!r}; expected one of {', '.join(FUSIONS.names())}")
    options = parse_kv(args.fusion_options) if args.fusion_options else {}
    if args.weight is not None:
        options["weight"] = args.weight
    idx = _open(args)
    from mmretrieve.cli.common import pipeline_from_args

    pipeline = pipeline_from_args(args)
    default = "weighted" if args.weight is not None else "sum"
    fusion = args.fusion or (pipeline.coarse_fusion if pipeline is not None else None) or default
    query = Query(text=args.text, image=args.image, video=args.video, item=args.item, fusion=fusion, options=options)
    res = idx.search(query, k=args.k, exclude_reference=not args.keep_reference, pipeline=pipeline, where=args.where,
                     exclude_dupes=args.exclude_dupes, dupe_threshold=args.dupe_threshold)
    if args.export is not None:
        import sys

        from mmretrieve.results import printable

        n = res.export(args.export)
        print(f"exported {n} hit(s) to {printable(args.export)}", file=sys.stderr)
    return _show(res, args)


def _open(args):
    from mmretrieve.index import open_index

    return open_index(args.name, index_dir=args.index_dir, verify="none" if args.no_verify else "fast",
                      encoder=args.encoder, version=args.version, search_device=args.search_device, nprobe=args.nprobe,
                      ef_search=args.ef_search)


def _show(res, args) -> int:
    """The results as JSON (``--json``) or as a table with the ``--show`` columns."""
    if args.json:
        out_json(res.to_dict())
    else:
        print(res.table(show=[c.strip() for c in (args.show or "").split(",") if c.strip()]))
    return EXIT_OK


def _browse(args) -> int:
    """``--where FILTER`` and no query: the matching items in ``--order``, ``-k`` of them after ``--offset``."""

    extra = [n for n, v in (("--rerank", args.rerank), ("--pipeline", args.pipeline), ("--fusion", args.fusion),
                            ("--weight", args.weight), ("--exclude-dupes", args.exclude_dupes)) if v]
    if extra:
        return usage_error(f"browsing (--where and no query) takes -k, --offset and --order, not {', '.join(extra)}")
    if args.k < 1 or args.offset < 0:
        return usage_error(f"-k must be at least 1 and --offset at least 0 (got {args.k}, {args.offset})")
    idx = _open(args)
    res = idx.browse(args.where, k=args.k, offset=args.offset, order=args.order or "id")
    return _show(res, args)


def _batch(args) -> int:
    """``--queries FILE``: JSONL queries in, JSONL results out (one line each, in order)."""
    import json
    import sys


    if any(x is not None for x in (args.text, args.image, args.video, args.item)):
        return usage_error("--queries takes its queries from the file: no --text, --image, --video or --item")
    if args.export is not None:
        return usage_error("--export writes one query's results; with --queries the results are the JSONL printed")
    queries = []
    with open(sys.stdin.fileno() if args.queries == "-" else args.queries, encoding="utf-8", closefd=args.queries != "-") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    queries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    return usage_error(f"{args.queries} line {n}: not JSON ({e.msg})")
    idx = _open(args)
    for res in idx.search_batch(queries, k=args.k, where=args.where, keep_reference=args.keep_reference):
        print(json.dumps(res.to_dict(), ensure_ascii=False))
    return EXIT_OK


def register(sub, common) -> None:
    s = sub.add_parser("search", parents=[common], help="search by text, image or video, or image/video + text (composed)")
    s.add_argument("name", help="index name or path")
    s.add_argument("--text", default=None, help="query text, or the modification text of a composed query")
    s.add_argument("--image", default=None, help="query image file (with --text: the reference image of a composed query)")
    s.add_argument("--video", default=None, help="query video file (its frames are encoded and pooled)")
    s.add_argument("--item", default=None, metavar="ID|KEY",
                   help="query by an item of the index (id, key, id:N or key:K): its stored vector; --image is always a file")
    s.add_argument("--queries", default=None, metavar="FILE",
                   help='many queries at once: JSONL lines {"text": ..} / {"item": ..} / {"vector": [..]} ("-": stdin); '
                        "one batched encode and scan; prints JSONL, one result line per query")
    s.add_argument("--fusion", default=None, help="composed queries: sum (default), weighted, intersection, text, image")
    s.add_argument("--weight", type=float, default=None, help="text weight for --fusion weighted (0..1; implies weighted)")
    s.add_argument("--fusion-options", default=None, help="e.g. 'k1=200,mode=product' for intersection")
    s.add_argument("--keep-reference", action="store_true", help="keep the query's own item (--item, or a composed query's indexed reference) in the "
                                                                    "results (default: left out)")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--encoder", default=None, help="query encoder (default: the index's own)")
    s.add_argument("--rerank", action="append", default=None, help='reranker spec, e.g. "emd:k=100,alpha=0.7" (repeatable)')
    s.add_argument("--pipeline", default=None, help="a pipeline preset (configs/pipelines/NAME) or YAML file")
    add_generation_args(s)
    s.add_argument("--no-verify", action="store_true", help="skip the size and header checks of the index files")
    s.add_argument("--version", default=None, help="search a retained version (e.g. v0007, previous; default: live)")
    s.add_argument("--nprobe", type=int, default=None, help="IVF indexes: lists probed (default min(nlist, 32))")
    s.add_argument("--ef-search", type=int, default=None, help="HNSW indexes: search breadth efSearch")
    s.add_argument("--search-device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where the coarse search runs (default: $MMRETRIEVE_SEARCH_DEVICE or auto = GPU when usable)")
    s.add_argument("--where", default=None, metavar="FILTER",
                   help="keep to items whose metadata match, e.g. \"year >= 2020 and license in ('cc-by', 'cc0')\" "
                        "(grammar: docs/cli.md; k results whenever k items match)")
    s.add_argument("--order", default=None, metavar="ORDER",
                   help='browsing (--where and no query): "id" (default), "added" or a numeric field, optionally '
                        'followed by " desc", e.g. "year desc"')
    s.add_argument("--offset", type=int, default=0, help="browsing: items to skip (paging; default 0)")
    s.add_argument("--exclude-dupes", action="store_true",
                   help="one result per near-duplicate group, the best-ranked (groups as `index dupes` finds them)")
    s.add_argument("--dupe-threshold", type=float, default=0.95, metavar="SIM",
                   help="--exclude-dupes: the similarity that makes two items duplicates (default 0.95)")
    s.add_argument("--show", default=None, metavar="FIELDS",
                   help="table columns to add: comma-separated fields, e.g. caption,license (JSON output has them all)")
    s.add_argument("--json", action="store_true", help="print the results as JSON (every hit with its metadata)")
    s.add_argument("--export", default=None, metavar="OUT",
                   help="also write the hits to OUT.csv or OUT.jsonl (id, key, uri, kind, caption, score, rank, metadata)")
    s.set_defaults(func=cmd_search)
