"""``mmretrieve index build|add|rm|info|list``."""

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
    n = args.show_skipped
    for s in report.skipped[:n]:
        print(f"  skipped {printable(s.uri)}: {printable(s.reason)}")
    if len(report.skipped) > n:
        print(f"  ... and {len(report.skipped) - n} more (see `mmretrieve index info NAME --skipped`)")
    for uri in report.pruned[:n]:
        print(f"  removed {printable(uri)}: file deleted")
    for alias, kept in report.aliases[:n]:
        print(f"  alias {printable(alias)}: the same file as {printable(kept)} (indexed once)")
    return EXIT_OK


def cmd_build(args) -> int:
    from mmretrieve.ingest import build_index

    video = {"num_frames": args.frames, "fps": args.fps, "max_frames": args.max_frames, "pooling": args.video_pooling,
             "frame_entries": args.frame_entries or None, "timeout": args.video_timeout}
    report = build_index(
        args.name, args.source, encoder=args.encoder, index_dir=args.index_dir, factory=args.factory,
        patches=_patches_arg(args), video={k: v for k, v in video.items() if v is not None}, overwrite=args.overwrite,
        batch_size=args.batch_size, workers=args.workers, on_bad_vectors=args.on_bad_vectors, strict=args.strict,
        image_timeout=args.image_timeout,
    )
    return _report_out(report, args)


def cmd_add(args) -> int:
    from mmretrieve.ingest import add_to_index

    report = add_to_index(args.name, args.source, index_dir=args.index_dir, batch_size=args.batch_size, workers=args.workers,
                          on_bad_vectors=args.on_bad_vectors, strict=args.strict, image_timeout=args.image_timeout,
                          prune=not args.no_prune)
    return _report_out(report, args)


def cmd_rm(args) -> int:
    from mmretrieve.ingest import remove_from_index

    n = remove_from_index(args.name, args.items, index_dir=args.index_dir)
    print(f"removed {n} item(s)")
    return EXIT_OK


def cmd_info(args) -> int:
    from mmretrieve.index import open_index
    from mmretrieve.results import printable

    idx = open_index(args.name, index_dir=args.index_dir, verify=not args.no_verify)
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
    print(f"size      {info['bytes'] / 1e6:.2f} MB")
    for s in info.get("skipped_items", []):
        print(f"  skipped {printable(s['uri'])}: {printable(s['reason'])}")
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show-skipped", type=int, default=20, metavar="N", help="list up to N skipped files (default 20)")
    return p


def _build_parser(isub, common, ingest) -> None:
    b = isub.add_parser("build", parents=[common, ingest], help="index a folder (recursive) or a CSV/JSONL manifest")
    b.add_argument("name", help="index name (under the indexes home) or a path to an index directory")
    b.add_argument("source", help="folder of images/videos, or a manifest with path[,id][,caption] columns")
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
    b.set_defaults(func=cmd_build)


def register(sub, common: argparse.ArgumentParser) -> None:
    ix = sub.add_parser("index", parents=[common], help="build, grow, shrink and inspect indexes")
    isub = ix.add_subparsers(dest="index_cmd", required=True, metavar="{build,add,rm,info,list}")
    ingest = _ingest_options()
    _build_parser(isub, common, ingest)
    a = isub.add_parser("add", parents=[common, ingest],
                        help="add new or changed files (only those are encoded), remove those deleted from the folder")
    a.add_argument("name", help="index name or path")
    a.add_argument("source", help="the folder or manifest (new and changed files are encoded)")
    a.add_argument("--no-prune", action="store_true",
                   help="keep indexed items whose file was deleted from the folder (default: remove and list them)")
    a.set_defaults(func=cmd_add)
    r = isub.add_parser("rm", parents=[common], help="remove items by id, key or path")
    r.add_argument("name", help="index name or path")
    r.add_argument("items", nargs="+", help="items to remove: ids, keys or file paths (id:N / key:K when a number is both)")
    r.set_defaults(func=cmd_rm)
    i = isub.add_parser("info", parents=[common], help="show an index's manifest and counts")
    i.add_argument("name", help="index name or path")
    i.add_argument("--skipped", action="store_true", help="list skipped inputs and their reasons")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)
    ls = isub.add_parser("list", parents=[common], help="list the indexes under the indexes home")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(func=cmd_list)
