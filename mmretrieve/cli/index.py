"""``mmretrieve index build|add|rm|info|dupes|export|list|...``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmretrieve.cli.common import EXIT_OK, out_json


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
    from mmretrieve.results import printable

    if args.json:
        out_json(report.to_dict())
        return EXIT_OK
    print(report.summary())
    if getattr(args, "show_stages", False) and report.stages:
        print(f"  stages: {report.stage_summary()}")
    n = args.show_skipped
    for s in report.skipped[:n]:
        print(f"  skipped {printable(s.uri)}: {printable(s.reason)}")
    if len(report.skipped) > n:
        print(f"  ... and {len(report.skipped) - n} more (see `mmretrieve index info NAME --skipped`)")
    for uri in report.pruned[:n]:
        print(f"  removed {printable(uri)}: file deleted")
    for uri in getattr(report, "not_readded", [])[:n]:
        print(f"  {printable(uri)}: removed by index rm, not re-added (use --include-removed to add them back)")
    for alias, kept in report.aliases[:n]:
        print(f"  alias {printable(alias)}: the same file as {printable(kept)} (indexed once)")
    return EXIT_OK


def build_options(args, *, shape: bool = True):
    """The ``BuildOptions`` of ``index build`` / ``index add`` from their arguments (one place; ``shape``:
    the options that make a new index, which only ``build`` takes)."""
    from mmretrieve.ingest import BuildOptions

    run = {n: getattr(args, n) for n in ("batch_size", "workers", "on_bad_vectors", "strict", "image_timeout", "engine",
                                          "ray_address", "ray_actors", "decode", "unit_items")}
    if not shape:
        return BuildOptions(**run)
    video = {"num_frames": args.frames, "fps": args.fps, "max_frames": args.max_frames, "pooling": args.video_pooling,
             "frame_entries": args.frame_entries or None, "timeout": args.video_timeout}
    return BuildOptions(factory=args.factory, patches=_patches_arg(args), vector_dtype=args.vector_dtype,
                        retain=args.retain, video={k: v for k, v in video.items() if v is not None}, **run)


def cmd_build(args) -> int:
    from mmretrieve.ingest import build_index

    report = build_index(args.name, args.source, encoder=args.encoder, index_dir=args.index_dir, overwrite=args.overwrite,
                         resume=args.resume, options=build_options(args))
    return _report_out(report, args)


def cmd_import(args) -> int:
    from mmretrieve.ingest import import_embeddings
    from mmretrieve.ingest.columns import split_names

    report = import_embeddings(args.name, args.source, encoder=args.encoder, index_dir=args.index_dir, keys=args.keys,
                               metadata=args.metadata, columns=split_names(args.columns),
                               exclude_columns=split_names(args.exclude_columns),
                               normalize=args.normalize, on_bad_vectors=args.on_bad_vectors, factory=args.factory,
                               vector_dtype=args.vector_dtype)
    return _report_out(report, args)


def cmd_compact(args) -> int:
    from mmretrieve.store import compact_index

    m = compact_index(args.name, index_dir=args.index_dir, everything=args.all)
    if args.json:
        out_json({"version": m["version"], "segments": len(m["segments"])} if m else {"version": None})
    elif m is None:
        print("nothing to merge")
    else:
        print(f"published {m['version']}: {len(m['segments'])} segment(s), {m['counts']['items']} items, "
              f"{m['counts']['tombstones']} deleted rows left")
    return EXIT_OK


def _print_repair(fix: dict | None, name: str) -> None:
    from mmretrieve.results import printable

    if fix is None:
        return
    print(f"repaired: the live manifest of {printable(name)} was unreadable ({printable(fix['reason'])}); "
          f"restored {fix['restored']}, the newest version kept whose manifest and files verify")
    for v, why in fix["refused"]:
        print(f"  not {v}: {printable(why)}")


def cmd_verify(args) -> int:
    from mmretrieve.store import repair_index, verify_index

    if args.repair:
        _print_repair(repair_index(args.name, index_dir=args.index_dir), args.name)
    res = verify_index(args.name, index_dir=args.index_dir, version=args.version, all_versions=args.all)
    rows = res if isinstance(res, list) else [res]
    if args.json:
        out_json(rows)
    else:
        for r in rows:
            print(f"{r['version']}: ok ({r['segments']} segment(s), {r['files']} files, {r['bytes'] / 1e6:.2f} MB, "
                  f"{r['rows']} metadata rows checked, full-text index {r.get('fulltext', '-')})")
        unsealed = rows[-1].get("unsealed") if rows else None
        if unsealed:
            print(f"note: the manifests of {', '.join(unsealed)} carry no checksum (written before mmretrieve kept "
                  "them); their files were checked, the manifests themselves cannot be; the next write's carries one")
    return EXIT_OK


def cmd_versions(args) -> int:
    from mmretrieve.store import index_versions

    rows = index_versions(args.name, index_dir=args.index_dir)
    if args.json:
        out_json(rows)
        return EXIT_OK
    import time as _time

    for r in rows:
        when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(r["updated_at"])) if r.get("updated_at") else "?"
        flag = "  (live)" if r["live"] else ""
        print(f"{r['version']}  {when}  {r.get('items', '?'):>9} items  {r.get('segments', '?'):>3} segment(s)  "
              f"{r.get('operation') or ''}{flag}" if "error" not in r else f"{r['version']}  unreadable: {r['error']}")
    return EXIT_OK


def cmd_rollback(args) -> int:
    from mmretrieve.store import repair_index, rollback_index

    fix = repair_index(args.name, index_dir=args.index_dir)
    _print_repair(fix, args.name)
    if fix is not None and args.to in ("previous", fix["restored"]):
        return EXIT_OK
    m = rollback_index(args.name, args.to, index_dir=args.index_dir)
    print(f"published {m['version']}: the content of {m['operation'].split()[-1]} ({m['counts']['items']} items)")
    return EXIT_OK


def cmd_add(args) -> int:
    from mmretrieve.ingest import add_to_index

    report = add_to_index(args.name, args.source, index_dir=args.index_dir, prune=not args.no_prune,
                          include_removed=args.include_removed, options=build_options(args, shape=False))
    return _report_out(report, args)


def cmd_rm(args) -> int:
    from mmretrieve.ingest import remove_from_index

    n = remove_from_index(args.name, args.items, index_dir=args.index_dir)
    print(f"removed {n} item(s)")
    return EXIT_OK


def cmd_info(args) -> int:
    from mmretrieve.index import open_index
    from mmretrieve.results import printable

    idx = open_index(args.name, index_dir=args.index_dir, verify="none" if args.no_verify else "fast",
                     version=args.version)
    info = idx.info()
    if args.skipped:
        info["skipped_items"] = [{"key": s.key, "uri": s.uri, "reason": s.reason} for s in idx.meta.skipped()]
    if args.json:
        out_json(info)
        return EXIT_OK
    c = info["counts"]
    p = info.get("patches")
    patches = f"{p['grid']}x{p['grid']} grid, dim {p['dim']}, fp16" if p else "none"
    print(f"index     {info['path']}")
    print(f"version   {info['version']}")
    print(f"encoder   {info['encoder']['name']} (dim {info['encoder']['dim']})")
    print(f"faiss     {info['factory']} ({info['faiss']}), metric {info['metric']}")
    print(f"items     {c['items']} ({c['images']} images, {c['videos']} videos), {c['skipped']} skipped, {c['tombstones']} tombstones")
    print(f"patches   {patches}")
    print(f"segments  {info['segments']} ({info['vector_dtype']} vectors), keeps {info['retain']} version(s)")
    print(f"size      {info['bytes'] / 1e6:.2f} MB")
    for s in info.get("skipped_items", []):
        print(f"  skipped {printable(s['uri'])}: {printable(s['reason'])}")
    return EXIT_OK


def cmd_dupes(args) -> int:
    from mmretrieve.cli.common import usage_error
    from mmretrieve.index import open_index
    from mmretrieve.results import printable

    if args.k < 1 or not 0 < args.threshold <= 1:
        return usage_error("--k must be at least 1 and --threshold in (0, 1]")
    with open_index(args.name, index_dir=args.index_dir, search_device=args.search_device) as idx:
        groups = idx.near_duplicates(args.threshold, args.k)
    if args.json:
        out_json({"threshold": args.threshold, "k": args.k, "groups": [g.to_dict() for g in groups]})
        return EXIT_OK
    print(f"{len(groups)} group(s) of near-duplicates (similarity >= {args.threshold:g}), "
          f"{sum(len(g.ids) for g in groups)} items")
    for g in groups:
        rep = g.keys[0] if g.keys else str(g.representative)
        others = ", ".join(printable(k) for k in g.keys[1:])
        print(f"  {printable(rep)} (id {g.representative}, {len(g.ids)} items): {others}")
    return EXIT_OK


def cmd_export(args) -> int:
    from mmretrieve.cli.common import usage_error
    from mmretrieve.index import open_index
    from mmretrieve.results import printable

    if args.limit is not None and args.limit < 1:
        return usage_error(f"--limit must be at least 1 (got {args.limit})")
    with open_index(args.name, index_dir=args.index_dir, verify="fast") as idx:
        report = idx.export(args.out, where=args.where, format=args.format, limit=args.limit)
    if args.json:
        out_json(report.to_dict())
        return EXIT_OK
    print(f"exported {report.written} item(s) to {printable(args.out)} ({report.format})"
          + (f"; skipped {len(report.skipped)}" if report.skipped else ""))
    for key, why in report.skipped[: args.show_skipped]:
        print(f"  skipped {printable(key)}: {printable(why)}")
    if len(report.skipped) > args.show_skipped:
        print(f"  ... and {len(report.skipped) - args.show_skipped} more (--json lists them all)")
    return EXIT_OK


def cmd_list(args) -> int:
    from mmretrieve.store import default_index_dir, describe_manifest, read_manifest

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
        out_json(dict(rows))
    elif not rows:
        print(f"no indexes under {base}")
    else:
        from mmretrieve.results import printable

        for name, desc in rows:
            print(f"{printable(name):24s} {printable(desc)}")
    return EXIT_OK


def _ingest_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", type=int, default=None, help="images per encoder batch (default: the encoder's)")
    p.add_argument("--workers", type=int, default=None, help="decoder processes (default: cores - 1, at least 1)")
    p.add_argument("--strict", action="store_true", help="any skipped input is an error: nothing is written")
    p.add_argument("--image-timeout", type=float, default=None,
                   help="seconds one image may take to decode before its worker is killed (default 30)")
    p.add_argument("--on-bad-vectors", choices=["error", "drop"], default="error",
                   help="NaN / inf / zero embeddings: fail the write (default) or drop them and report them")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process and its decoders; ray: Ray Data decode tasks and an encoder "
                        "actor pool (pip install 'mmretrieve[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: a running cluster (HEAD:6379, or auto); default: start Ray on this machine")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="with --engine ray: encoder actors (default: one per GPU, else one per two CPUs)")
    p.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where images are decoded and resized: auto (on the GPU when the encoder runs on CUDA), cpu, gpu")
    p.add_argument("--unit-items", type=int, default=None, metavar="N",
                   help="a folder or manifest commits every N files (default 1024; shards commit one by one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show-stages", action="store_true", help="also print the time spent per stage")
    p.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list up to N skipped files (default 20)")
    return p


def _build_parser(isub, common, ingest) -> None:
    b = isub.add_parser("build", parents=[common, ingest],
                        help="index a folder (recursive), a CSV/JSONL manifest, webdataset tar shards or parquet files")
    b.add_argument("name", help="index name (under the indexes home) or a path to an index directory")
    b.add_argument("source", help="folder of images/videos, a manifest with path[,id][,caption] columns, webdataset "
                                  "shards (a .tar, a folder of them, a pattern such as 'shards/{00000..00123}.tar') or "
                                  ".parquet files with image bytes or paths")
    resume = b.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue an interrupted build of the same source (the default when the index exists "
                             "and was being built from it): committed shards / files are skipped")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse to continue an existing index (use --overwrite to start again)")
    b.add_argument("--encoder", default="embedded",
                   help="e.g. embedded (default), open_clip:ViT-B-32@laion2b_s34b_b79k, open_clip:local-dir:DIR, a preset")
    b.add_argument("--factory", default="Flat", help='FAISS factory string, e.g. Flat (default), HNSW32, "IVF1024,PQ64"')
    b.add_argument("--patches", action="store_true", help="store patch features (fp16) for the EMD reranker")
    b.add_argument("--patch-grid", type=int, default=None, help="pool the patch grid to GxG (implies --patches)")
    b.add_argument("--patch-dim", type=int, default=None, help="project patch features to D dims (implies --patches)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index (atomically, as a new version)")
    b.add_argument("--frames", type=int, default=None, help="videos: N uniformly sampled frames per clip (default 8)")
    b.add_argument("--fps", type=float, default=None, help="videos: sample at a fixed rate instead (frames per second)")
    b.add_argument("--max-frames", type=int, default=None, help="videos: cap on frames per clip with --fps (default 32)")
    b.add_argument("--video-pooling", choices=["mean", "middle"], default=None,
                   help="videos: how frames make the video vector (default mean)")
    b.add_argument("--frame-entries", action="store_true", help="videos: also index every frame (moment search)")
    b.add_argument("--video-timeout", type=float, default=None,
                   help="videos: seconds per file before the decoder is killed (default 60)")
    b.add_argument("--vector-dtype", choices=["float32", "float16"], default="float32",
                   help="how Flat segments store vectors (float16: half the memory and bandwidth)")
    b.add_argument("--retain", type=int, default=None, help="versions to keep, the live one included (default 2)")
    b.set_defaults(func=cmd_build)


def register(sub, common: argparse.ArgumentParser) -> None:
    ix = sub.add_parser("index", parents=[common], help="build, grow, shrink and inspect indexes")
    isub = ix.add_subparsers(dest="index_cmd", required=True,
                             metavar="{build,add,rm,info,dupes,export,list,import,compact,verify,versions,rollback}")
    ingest = _ingest_options()
    _build_parser(isub, common, ingest)
    a = isub.add_parser("add", parents=[common, ingest],
                        help="add new or changed files (only those are encoded), remove those deleted from the folder")
    a.add_argument("name", help="index name or path")
    a.add_argument("source", help="the folder or manifest (new and changed files are encoded)")
    a.add_argument("--no-prune", action="store_true",
                   help="keep indexed items whose file was deleted from the folder (default: remove and list them)")
    a.add_argument("--include-removed", action="store_true",
                   help="also add back files `index rm` removed (by default they stay out while unchanged)")
    a.set_defaults(func=cmd_add)
    r = isub.add_parser("rm", parents=[common],
                        help="remove items by id, key or path (a later `index add` of their folder leaves them out)")
    r.add_argument("name", help="index name or path")
    r.add_argument("items", nargs="+", help="items to remove: ids, keys or file paths (id:N / key:K when a number is both)")
    r.set_defaults(func=cmd_rm)
    i = isub.add_parser("info", parents=[common], help="show an index's manifest and counts")
    i.add_argument("name", help="index name or path")
    i.add_argument("--skipped", action="store_true", help="list skipped inputs and their reasons")
    i.add_argument("--no-verify", action="store_true", help="skip the size and header checks of the files")
    i.add_argument("--version", default=None, help="a retained version (e.g. v0007, previous; default: live)")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)
    du = isub.add_parser("dupes", parents=[common], help="groups of near-duplicate items, each with a representative")
    du.add_argument("name", help="index name or path")
    du.add_argument("--threshold", type=float, default=0.95, help="similarity at which two items are duplicates (default 0.95)")
    du.add_argument("--k", type=int, default=10, help="neighbours searched per item (default 10)")
    du.add_argument("--search-device", choices=["auto", "cpu", "cuda"], default=None, help="where the searches run")
    du.add_argument("--json", action="store_true", help="print the groups as JSON")
    du.set_defaults(func=cmd_dupes)

    ex = isub.add_parser("export", parents=[common], help="write the index, or the items that meet a filter, as CSV, "
                         "JSONL, a webdataset tar or a folder of symlinks")
    ex.add_argument("name", help="index name or path")
    ex.add_argument("out", help="the file (.csv, .jsonl, .tar) or new folder (links) to write")
    ex.add_argument("--where", default=None, metavar="FILTER", help="only the items whose metadata match (as search --where)")
    ex.add_argument("--format", choices=["csv", "jsonl", "wds", "links"], default=None,
                    help="default: from OUT's suffix (.csv, .jsonl, .tar = wds; none = links)")
    ex.add_argument("--limit", type=int, default=None, metavar="N", help="at most N items (by id)")
    ex.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list up to N skipped items (default 20)")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.set_defaults(func=cmd_export)
    ls = isub.add_parser("list", parents=[common], help="list the indexes under the indexes home")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(func=cmd_list)
    _maintenance_parsers(isub, common)


def _maintenance_parsers(isub, common) -> None:
    im = isub.add_parser("import", parents=[common], help="import embeddings computed elsewhere (new index or append)")
    im.add_argument("name", help="index name or path (created when missing)")
    im.add_argument("source", help="clip-retrieval output folder (img_emb/ + metadata/), a .npy (+ --keys) or a .parquet")
    im.add_argument("--encoder", default=None, help="the model that computed the vectors (needed for a new index)")
    im.add_argument("--keys", default=None, help="for a .npy: a text file with one key per row (default <stem>.keys.txt)")
    im.add_argument("--metadata", default=None, metavar="FILE.parquet",
                    help="for a .npy: its metadata, one row per vector in the same order (columns become item metadata)")
    im.add_argument("--columns", default=None, metavar="A,B",
                    help="carry only these metadata columns (default: every column but the key, vector, uri and caption)")
    im.add_argument("--exclude-columns", default=None, metavar="A,B", help="carry every metadata column but these")
    im.add_argument("--normalize", action="store_true", help="L2-normalise vectors that are not (default: refuse them)")
    im.add_argument("--on-bad-vectors", choices=["error", "drop"], default="error",
                    help="NaN / inf / zero vectors: fail (default) or drop them and report them")
    im.add_argument("--factory", default="Flat", help="FAISS factory string of a new index (default Flat)")
    im.add_argument("--vector-dtype", choices=["float32", "float16"], default="float32",
                    help="how a new Flat index stores vectors")
    im.add_argument("--json", action="store_true", help="print the report as JSON")
    im.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list up to N skipped rows (default 20)")
    im.set_defaults(func=cmd_import)
    c = isub.add_parser("compact", parents=[common], help="merge segments (tiered policy) and drop deleted rows")
    c.add_argument("name", help="index name or path")
    c.add_argument("--all", action="store_true", help="merge every segment into one")
    c.add_argument("--json", action="store_true", help="print as JSON")
    c.set_defaults(func=cmd_compact)
    v = isub.add_parser("verify", parents=[common], help="check every byte of a version against its checksums")
    v.add_argument("name", help="index name or path")
    v.add_argument("--version", default=None, help="a retained version (default: the live one)")
    v.add_argument("--all", action="store_true", help="every retained version")
    v.add_argument("--repair", action="store_true",
                   help="first restore an unreadable live manifest from the newest kept version that verifies")
    v.add_argument("--json", action="store_true", help="print as JSON")
    v.set_defaults(func=cmd_verify)
    vs = isub.add_parser("versions", parents=[common], help="list the versions the index keeps")
    vs.add_argument("name", help="index name or path")
    vs.add_argument("--json", action="store_true", help="print as JSON")
    vs.set_defaults(func=cmd_versions)
    rb = isub.add_parser("rollback", parents=[common], help="publish a new version with an older version's content")
    rb.add_argument("name", help="index name or path")
    rb.add_argument("--to", default="previous", help="the version to go back to (default: previous)")
    rb.set_defaults(func=cmd_rollback)
