"""Evaluation on the composed-retrieval benchmarks (CIRR, FashionIQ, CIRCO, EgoCVR) and image-caption
sets, with the official metric definitions, per-stage reports and official submission files.

>>> from mmretrieve.eval import load_dataset, CIREvaluator, write_report  # doctest: +SKIP
>>> ds = load_dataset("cirr", "/data/CIRR", "val")                         # doctest: +SKIP
>>> evaluator = CIREvaluator(ds)                                         # doctest: +SKIP
>>> res = evaluator("clip-vit-b32", pipeline="emd")                        # doctest: +SKIP
>>> res.metrics["emd"]["recall@1"]                                         # doctest: +SKIP

Names load on first use (the command line lists the benchmarks without importing torch).
"""

from __future__ import annotations

from mmretrieve.errors import DatasetError
from mmretrieve.registry import lazy_exports

_LAZY = {
    "BENCHMARKS": "mmretrieve.eval.datasets",
    "DATASETS": "mmretrieve.eval.datasets",
    "Benchmark": "mmretrieve.eval.datasets",
    "CIRDataset": "mmretrieve.eval.datasets",
    "CIRQuery": "mmretrieve.eval.datasets",
    "load_dataset": "mmretrieve.eval.datasets",
    "EvalResult": "mmretrieve.eval.runner",
    "evaluate": "mmretrieve.eval.runner",
    "CIREvaluator": "mmretrieve.eval.runner",
    "protocol": "mmretrieve.eval.datasets",
    "evaluate_fusions": "mmretrieve.eval.runner",
    "write_report": "mmretrieve.eval.report",
}


__getattr__ = lazy_exports("mmretrieve.eval", _LAZY, globals())


__all__ = ["DatasetError", *_LAZY]
