"""Tiny random-initialised models and fixtures for tests and smoke benchmarks.

Nothing on the product path (search, ingest, evaluation, the service) imports this package; the test
suite and the ``bench`` smoke runs do. The models are real architectures built from configs and saved
as ordinary local model folders, so the code under test loads them exactly as it loads real weights.

- ``write_tiny_open_clip(dir)`` -> an ``open_clip:local-dir:`` encoder name
- ``write_tiny_vlm(dir, family)`` -> a Qwen2-VL / LLaVA / Idefics3 folder for the ``mllm`` reranker
"""

from mmretrieve.testing.tiny_clip import tiny_open_clip_config, write_tiny_open_clip
from mmretrieve.testing.tiny_locore import write_tiny_locore
from mmretrieve.testing.tiny_vlm import FAMILIES, write_tiny_vlm

__all__ = ["write_tiny_open_clip", "tiny_open_clip_config", "write_tiny_vlm", "FAMILIES", "write_tiny_locore"]
