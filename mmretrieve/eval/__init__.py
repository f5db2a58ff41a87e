"""Evaluation on the composed-retrieval benchmarks (CIRR, FashionIQ, CIRCO) and image-caption sets,
with the official metric definitions, per-stage reports and official submission files.

>>> from mmretrieve.eval import load_dataset, evaluate, write_report      # doctest: +SKIP
>>> ds = load_dataset("cirr", "/data/CIRR", "val")                         # doctest: +SKIP
>>> res = evaluate(ds, encoder="clip-vit-b32", pipeline="emd")             # doctest: +SKIP
>>> res.metrics["emd"]["recall@1"]                                         # doctest: +SKIP
"""

from mmretrieve.eval.datasets import DATASETS, CIRDataset, CIRQuery, DatasetError, load_dataset
from mmretrieve.eval.runner import EvalResult, evaluate, evaluate_fusions

__all__ = ["DATASETS", "CIRDataset", "CIRQuery", "DatasetError", "load_dataset", "EvalResult", "evaluate", "evaluate_fusions"]
