"""Videos as embeddings: every sampled frame encoded, pooled into one video vector.

Ingestion and queries both go through these, so a query video is embedded exactly as the index's
videos were (same sampling, same pooling).
"""

from __future__ import annotations

import numpy as np
import torch


def encode_frames(encoder, frames: np.ndarray, batch_size: int, patches: bool = False, patch_grid=None):
    """Encode (T, 3, H, W) uint8 frames in batches; returns (T, D) [and (T, P, Dp) patches]."""
    embs, pats = [], []
    for s in range(0, len(frames), batch_size):
        out = encoder.encode_image_tensors(torch.from_numpy(frames[s : s + batch_size]), patches=patches, patch_grid=patch_grid)
        if patches:
            embs.append(out[0])
            pats.append(out[1])
        else:
            embs.append(out)
    return (np.concatenate(embs), np.concatenate(pats)) if patches else np.concatenate(embs)


def pool_video(frames: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """Video-level vector from (T, D) unit frame embeddings: their normalised mean, or the middle frame."""
    v = frames[len(frames) // 2] if pooling == "middle" else frames.mean(0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def encode_video(encoder, path, sampling: dict) -> np.ndarray:
    """A video file's vector, sampled and pooled as ``sampling`` says (in-process, no timeout)."""
    from mmretrieve.media.video import decode_video, resolve_video_config

    cfg = resolve_video_config(sampling)
    res = decode_video(str(path), transform=encoder.image_transform, sampling=cfg)
    return pool_video(encode_frames(encoder, res["frames"], encoder.batch_size), cfg["pooling"])


__all__ = ["encode_frames", "pool_video", "encode_video"]
