"""Training: ``mmretrieve train verifier`` adapts the ``mllm`` yes/no verifier with LoRA (SETR).

``mmretrieve.train.data`` makes the examples (triplets, mined negatives, balanced yes/no) and
``mmretrieve.train.verifier`` trains, validates, checkpoints and resumes. See ``docs/training.md``.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train_verifier", "build_data"]


def __getattr__(name: str):
    if name in ("TrainConfig", "train_verifier"):
        from mmretrieve.train import verifier

        return getattr(verifier, name)
    if name == "build_data":
        from mmretrieve.train.data import build_data

        return build_data
    raise AttributeError(name)
