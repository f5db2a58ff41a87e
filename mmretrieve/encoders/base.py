"""The encoder interface.

Every encoder maps images and (for dual encoders) texts into one embedding space:

- ``encode_images(images) -> (N, D)`` float32, rows L2-normalised
- ``encode_texts(texts) -> (N, D)`` float32, rows L2-normalised
- ``encode_patches(images) -> (N, P, Dp)`` float32, each patch L2-normalised (for the EMD reranker)

Images are PIL images or paths. Ingestion runs the (picklable) ``image_transform`` in decoder worker
processes and hands ready tensors to ``encode_image_tensors``, so the transform never runs twice.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmretrieve.errors import EncoderError, UsageError

log = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class EncoderInfo:
    """What an index records about the encoder that built it (and checks when opened)."""

    name: str
    dim: int
    modalities: tuple[str, ...]
    normalize: bool = True
    metric: str = "ip"
    extra: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "modalities": list(self.modalities),
            "normalize": self.normalize,
            "metric": self.metric,
            **{k: v for k, v in self.extra},
        }


class Encoder(ABC):
    """Base class. Subclasses set ``name``, ``dim``, ``modalities``, ``device`` and ``precision``."""

    name: str
    dim: int
    modalities: tuple[str, ...] = ("image", "text")
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    batch_size: int = 32
    #: native patch grid side (e.g. 7 for a 7x7 CNN map or ViT-B/32 at 224 px); None if no patch output
    patch_grid: int | None = None
    patch_dim: int | None = None

    # ---- identity -------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Settings that change the embedding space; an index refuses a query encoder that differs."""
        return {}

    def weights_fingerprint(self) -> list | None:
        """(name, size, mtime) of the local weight files the encoder loaded, when it knows them: caches of
        its features (``eval``) are keyed on it, so another checkpoint at the same path is noticed."""
        return None

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(
            name=self.name,
            dim=self.dim,
            modalities=tuple(self.modalities),
            extra=tuple(sorted(self.identity().items())),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device}, precision={self.precision})"

    # ---- images -----------------------------------------------------------------------------------
    @property
    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> (3, H, W) tensor; picklable (runs in worker processes).

        Transforms may return ``uint8`` tensors (4x less to pass between processes, and the float
        arithmetic is done once per batch): ``normalize_batch`` then turns the batch into model input.
        """

    def normalize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) from ``image_transform`` -> float model input. Identity for float batches."""
        return batch.float()

    @abstractmethod
    def _forward_images(self, batch: torch.Tensor, *, with_patches: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,3,H,W) on device -> (B,D) unnormalised embeddings and optionally (B,g,g,Dp) patch maps."""

    def encode_image_tensors(self, batch: torch.Tensor, *, patches: bool = False, patch_grid: int | None = None):
        """Encode preprocessed tensors. Returns ``emb`` (B,D) or ``(emb, patches)`` with patches (B,P,Dp)."""
        if "image" not in self.modalities:
            raise EncoderError(f"encoder {self.name!r} does not encode images")
        if patches and self.patch_grid is None:
            raise EncoderError(f"encoder {self.name!r} has no patch features")
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = self.normalize_batch(x)
            emb, pmap = self._forward_images(x, with_patches=patches)
            emb = _normalize_np(emb)
            if not patches:
                return emb
            return emb, pool_patches(pmap, patch_grid)

    def encode_images(
        self,
        images: Sequence[ImageLike],
        *,
        batch_size: int | None = None,
        patches: bool = False,
        patch_grid: int | None = None,
    ):
        """Encode PIL images or paths (loaded with the safe loader). See ``encode_image_tensors``."""
        from mmretrieve.media.images import load_image

        bs = batch_size or self.batch_size
        tf = self.image_transform
        draft = getattr(tf, "draft_size", None)  # decode exactly as ingestion does (same pixels, same vector)
        embs: list[np.ndarray] = []
        pats: list[np.ndarray] = []
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            tensors = [tf(im if isinstance(im, Image.Image) else load_image(im, draft_size=draft)) for im in chunk]
            out = self.encode_image_tensors(torch.stack(tensors), patches=patches, patch_grid=patch_grid)
            if patches:
                embs.append(out[0])
                pats.append(out[1])
            else:
                embs.append(out)
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32)
        if not patches:
            return emb
        g = patch_grid or self.patch_grid or 0
        pat = np.concatenate(pats) if pats else np.zeros((0, g * g, self.patch_dim or 0), np.float32)
        return emb, pat

    def encode_patches(self, images: Sequence[ImageLike], *, grid: int | None = None, batch_size: int | None = None):
        """(N, P, Dp) float32 L2-normalised patch features, P = grid**2 (default: the native grid)."""
        return self.encode_images(images, batch_size=batch_size, patches=True, patch_grid=grid)[1]

    # ---- texts ------------------------------------------------------------------------------------
    def _forward_texts(self, texts: list[str]) -> torch.Tensor:
        raise EncoderError(f"encoder {self.name!r} is image-only: it cannot encode texts")

    def encode_texts(self, texts: Iterable[str], *, batch_size: int | None = None) -> np.ndarray:
        texts = [str(t) for t in texts]
        if "text" not in self.modalities:
            raise EncoderError(f"encoder {self.name!r} is image-only: it cannot encode texts")
        bs = batch_size or max(self.batch_size, 64)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                out.append(_normalize_np(self._forward_texts(texts[start : start + bs])))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def stat_files(paths) -> list:
    """[(path, size, mtime_ns)] of the files that exist among ``paths``."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def _normalize_np(x: torch.Tensor) -> np.ndarray:
    x = F.normalize(x.float(), dim=-1)
    return x.cpu().numpy().astype(np.float32, copy=False)


def pool_patches(pmap: torch.Tensor, grid: int | None) -> np.ndarray:
    """(B, g, g, D) patch map -> (B, grid*grid, D), average-pooled to ``grid`` and L2-normalised per patch."""
    b, gh, gw, d = pmap.shape
    x = pmap.float()
    if grid and (grid, grid) != (gh, gw):
        if grid > min(gh, gw):
            raise UsageError(f"patch grid {grid} is finer than the encoder's native {gh}x{gw} map")
        x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
    x = F.normalize(x.reshape(b, -1, d), dim=-1)
    return x.cpu().numpy().astype(np.float32, copy=False)
