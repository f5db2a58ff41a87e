"""``mmretrieve bench ...``: benchmarks that measure the machine's own limits in the same run and report
ratios, so a figure means something on any machine (performance targets live here, not in unit tests).

One module per benchmark, each with ``HELP``, ``add_arguments(parser)``, ``run(args) -> dict`` (the
measurements, as data) and ``render(result) -> list[str]`` (the text the command line prints). Modules
import torch and FAISS only inside ``run``, so listing them costs nothing.

>>> from mmretrieve import bench
>>> sorted(bench.BENCHMARKS)[:3]
['emd-ood', 'encode', 'ingest']
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: benchmark name -> module (under mmretrieve.bench)
BENCHMARKS = {
    "ingest": "ingest",
    "encode": "encode",
    "search": "search",
    "scan": "scan",
    "ann": "ann",
    "store": "store",
    "rerank": "rerank",
    "emd-ood": "emd_ood",
    "video": "video",
    "mllm": "mllm",
    "threads": "threads",
    "serve": "serve",
    "generate": "generate",
    "rankagg": "rankagg",
    "locore": "locore",
    "dupes": "dupes",
    "filter": "filter",
    "map": "embmap",
}


def load(name: str) -> ModuleType:
    from mmretrieve.errors import UnknownNameError

    if name not in BENCHMARKS:
        raise UnknownNameError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return importlib.import_module(f"mmretrieve.bench.{BENCHMARKS[name]}")


def run(name: str, args) -> dict:
    """Run benchmark ``name`` with parsed ``args``; its result carries the machine it ran on."""
    from mmretrieve.bench.common import machine_info

    res = load(name).run(args)
    res.setdefault("machine", machine_info())
    return res


def render(name: str, result: dict) -> list[str]:
    return load(name).render(result)


__all__ = ["BENCHMARKS", "load", "run", "render"]
