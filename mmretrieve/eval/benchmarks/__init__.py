"""The built-in benchmarks, one class each (importing this package registers them)."""

from mmretrieve.eval.benchmarks.circo import CIRCO
from mmretrieve.eval.benchmarks.cirr import CIRR
from mmretrieve.eval.benchmarks.egocvr import EgoCVR
from mmretrieve.eval.benchmarks.fashioniq import FashionIQ

__all__ = ["CIRR", "FashionIQ", "CIRCO", "EgoCVR"]
