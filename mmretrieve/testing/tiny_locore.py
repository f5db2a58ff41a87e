"""A tiny random LOCORE checkpoint (``locore`` reranker) in the published layout, for tests and smoke runs.

The architecture is the real one (``mmretrieve.rerank.locore.LocoreNet``: a Longformer without word
embeddings, ``sep_embedding``/``pad_embedding``, a scale embedding, a 2-way token classifier and, when the
descriptors' dim differs from the hidden size, ``local_to_lm``/``global_to_lm`` projections) with a
tiny config; the folder holds ``config.json`` + ``model.safetensors`` and is loaded exactly as a real
checkpoint (``locore:model=DIR``).
"""

from __future__ import annotations

import math
from pathlib import Path


def tiny_locore_config(*, hidden: int = 32, layers: int = 2, window: int = 16, max_images: int = 21,
                       num_descriptors: int = 48):
    """A Longformer config with positions for ``max_images`` blocks of ``num_descriptors + 2`` tokens."""
    from transformers import LongformerConfig

    tokens = math.ceil(max_images * (num_descriptors + 2) / window) * window
    return LongformerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
        attention_window=[window] * layers, max_position_embeddings=tokens + 2, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def write_tiny_locore(dir, *, descriptor_dim: int = 32, seed: int = 0, size: str = "tiny", max_images: int = 21,
                      num_descriptors: int = 48) -> Path:
    """Write a random LOCORE checkpoint to ``dir`` and return it. ``size="base"``: Longformer-base's shape
    (hidden 768, 12 layers, window 512, 5122 positions) -- for speed benchmarks only."""
    import torch
    from safetensors.torch import save_file

    from mmretrieve.rerank.locore import LocoreNet

    if size == "base":
        from transformers import LongformerConfig

        cfg = LongformerConfig(attention_window=[512] * 12, max_position_embeddings=5122)
    elif size == "tiny":
        cfg = tiny_locore_config(max_images=max_images, num_descriptors=num_descriptors)
    else:
        raise ValueError(f"size must be tiny or base, got {size!r}")
    torch.manual_seed(seed)
    net = LocoreNet(cfg, local_dim=descriptor_dim, global_dim=descriptor_dim)
    with torch.no_grad():  # a non-trivial classifier so the scores vary across candidates
        net.language_model.classifier.weight.normal_(0.0, 1.0)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    cfg.to_json_file(str(out / "config.json"))
    return out


__all__ = ["write_tiny_locore", "tiny_locore_config"]
