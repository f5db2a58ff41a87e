"""``mmretrieve bench NAME``: each benchmark returns its measurements; this prints them (or the JSON)."""

from __future__ import annotations

from mmretrieve.cli.common import EXIT_OK, out_json


def cmd_bench(args) -> int:
    from mmretrieve import bench

    result = bench.run(args.bench, args)
    if args.json:
        out_json(result)
    else:
        print("\n".join(bench.render(args.bench, result)))
    return EXIT_OK


def register(sub, common) -> None:
    from mmretrieve import bench

    bn = sub.add_parser("bench", parents=[common], help="benchmarks that print measured ratios")
    bsub = bn.add_subparsers(dest="bench", required=True)
    for name in sorted(bench.BENCHMARKS):
        mod = bench.load(name)
        sp = bsub.add_parser(name, parents=[common], help=mod.HELP)
        sp.add_argument("--json", action="store_true", help="print the results as JSON")
        mod.add_arguments(sp)
        sp.set_defaults(func=cmd_bench)
