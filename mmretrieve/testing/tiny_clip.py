"""A tiny random-initialised open_clip model, written as an ordinary ``local-dir`` model folder.

No CLIP weights can be had offline here, so tests and smoke benchmarks build this one and load it
through ``create_encoder("open_clip:local-dir:DIR")``, the path users take with real weights.
"""

from __future__ import annotations

import os

import torch


def tiny_open_clip_config(embed_dim: int = 32, image_size: int = 32, patch_size: int = 8) -> dict:
    """A tiny ViT CLIP config for tests and smoke runs (random weights; nothing downloads)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def write_tiny_open_clip(directory: str | os.PathLike, *, seed: int = 0, **cfg) -> str:
    """Write a random-initialised tiny open_clip model as a ``local-dir`` folder; returns the encoder name."""
    import json

    import open_clip
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model_cfg = tiny_open_clip_config(**cfg)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as fh:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, fh)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "open_clip_model.safetensors"))
    return f"open_clip:local-dir:{os.path.abspath(directory)}"


__all__ = ["write_tiny_open_clip", "tiny_open_clip_config"]
