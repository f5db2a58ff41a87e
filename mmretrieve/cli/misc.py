"""``mmretrieve demo`` and ``mmretrieve encoders``."""

from __future__ import annotations

from mmretrieve.cli.common import EXIT_OK, out_json


def cmd_demo(args) -> int:
    from mmretrieve.demo import run_demo

    summary = run_demo(args.out, index_dir=args.index_dir, encoder=args.encoder, k=args.k, preset=args.preset, print_fn=print)
    if args.json:
        out_json(summary)
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


def register(sub, common) -> None:
    d = sub.add_parser("demo", parents=[common], help="index the packaged sample photos and run example queries (offline)")
    d.add_argument("--out", default="demo-output", help="folder for the contact sheet (default: demo-output)")
    d.add_argument("--encoder", default="embedded", help="encoder name or preset (default: embedded, offline)")
    d.add_argument("-k", type=int, default=None, help="results per query (default: from configs/demo.yaml)")
    d.add_argument("--preset", default="demo", help="queries preset (default: configs/demo.yaml)")
    d.add_argument("--json", action="store_true", help="also print a JSON summary")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("encoders", parents=[common], help="list encoder families and presets")
    e.set_defaults(func=cmd_encoders)
