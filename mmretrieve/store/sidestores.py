"""Side-stores kept beside the vectors, and the patch projection, in one place.

- **Patch features** (for the EMD reranker): fp16 ``(rows, P, Dp)`` segments ``patches-<version>-NNN.npy``,
  memory-mapped by readers; an item records its segment and row. ``patches={"dim": D}`` stores them
  projected to fewer dimensions by a fixed random orthogonal matrix (``patch_proj.npy``, stored with
  the index so queries are projected the same way).
- **Frames** of videos: fp16 ``(T, D)`` rows ``frames-<version>.npy`` with their timestamps in
  ``frames-<version>.ts.npy``; an item records its segment, first row and row count.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmretrieve.errors import BadVectorsError, UsageError


def patch_config(encoder, patches: bool | dict) -> dict | None:
    """The index's patch-store settings for ``encoder`` from ``patches`` (``True``: the encoder's native
    grid and dim; a dict ``{"grid": G, "dim": D}`` pools the grid / projects the features)."""
    if not patches:
        return None
    if encoder.patch_grid is None or encoder.patch_dim is None:
        raise UsageError(f"encoder {encoder.name!r} has no patch features; build without --patches")
    cfg = dict(patches) if isinstance(patches, dict) else {}
    from mmretrieve.config import check_options

    check_options("patches", cfg, ("grid", "dim", "seed"))
    grid = int(cfg.get("grid") or encoder.patch_grid)
    if grid > encoder.patch_grid:
        raise UsageError(f"patch grid {grid} is finer than the encoder's native {encoder.patch_grid}x{encoder.patch_grid}")
    dim = int(cfg.get("dim") or encoder.patch_dim)
    if dim > encoder.patch_dim:
        raise UsageError(f"patch dim {dim} exceeds the encoder's {encoder.patch_dim}")
    out = {"grid": grid, "dim": dim, "native_dim": encoder.patch_dim, "dtype": "float16", "projection": None}
    if dim < encoder.patch_dim:
        out.update(projection="patch_proj.npy", seed=int(cfg.get("seed", 0)))
    return out


def make_projection(cfg: dict) -> np.ndarray:
    """The fixed random orthogonal (native_dim, dim) projection of a patch config (seeded)."""
    src, dst = int(cfg["native_dim"]), int(cfg["dim"])
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    q, _ = np.linalg.qr(rng.standard_normal((src, dst)))
    return q.astype(np.float32)


def load_projection(folder: Path, cfg: dict | None) -> np.ndarray | None:
    if not cfg or not cfg.get("projection"):
        return None
    return np.load(Path(folder) / cfg["projection"], allow_pickle=False)


def project_patches(P: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    """Patch features (..., native_dim) projected to the stored dim and re-normalised (identity without
    a projection)."""
    if proj is None:
        return P
    P = P @ proj
    return P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-12)


class PatchSegments:
    """Writes fp16 patch segments into a version folder, each opened with room to spare and trimmed on close."""

    def __init__(self, folder: Path, version: str) -> None:
        self.folder, self.version = Path(folder), version
        self._seg: np.memmap | None = None
        self._name: str | None = None
        self._rows = 0

    def begin(self, capacity: int, n_patches: int, patch_dim: int) -> None:
        from numpy.lib.format import open_memmap

        self.close()
        existing = [f for f in os.listdir(self.folder) if f.startswith("patches-")]
        self._name = f"patches-{self.version}-{len(existing):03d}.npy"
        self._seg = open_memmap(self.folder / self._name, mode="w+", dtype=np.float16,
                                shape=(max(capacity, 1), n_patches, patch_dim))
        self._rows = 0

    def write(self, patches: np.ndarray) -> tuple[str, int]:
        """Store ``patches`` (n, P, Dp); returns (segment name, first row)."""
        n = len(patches)
        if self._seg is None or self._rows + n > self._seg.shape[0]:
            self.begin(max(n, 1024), patches.shape[1], patches.shape[2])
        first = self._rows
        self._seg[first : first + n] = patches.astype(np.float16)
        self._rows += n
        return self._name, first

    def close(self) -> None:
        """Flush the open segment, trimmed to the rows used."""
        if self._seg is None:
            return
        seg, used = self._seg, self._rows
        self._seg = None
        seg.flush()
        path = self.folder / self._name
        if used < seg.shape[0]:
            if used == 0:
                del seg
                path.unlink()
            else:
                tmp = path.with_suffix(".trim.npy")
                np.save(tmp, np.asarray(seg[:used]))
                del seg
                os.replace(tmp, path)
        else:
            del seg


class FrameStore:
    """Collects the per-frame embeddings of one write's videos; ``write`` saves them as one segment."""

    def __init__(self, version: str, dim: int) -> None:
        self.segment = f"frames-{version}.npy"
        self.dim = dim
        self._emb: list[np.ndarray] = []
        self._ts: list[np.ndarray] = []
        self._rows = 0

    def add(self, emb: np.ndarray, ts: np.ndarray, uri: str) -> tuple[str, int, int]:
        """Store one video's frames; returns (segment, first row, count)."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(ts) != len(emb):
            raise BadVectorsError(f"frames of {uri}: expected ({len(ts)}, {self.dim}) embeddings, got {emb.shape}")
        first = self._rows
        self._emb.append(emb.astype(np.float16))
        self._ts.append(np.asarray(ts, dtype=np.float32))
        self._rows += len(emb)
        return self.segment, first, len(emb)

    def write(self, folder: Path) -> None:
        if not self._emb:
            return
        for arr, suffix in ((np.concatenate(self._emb), ".npy"), (np.concatenate(self._ts), ".ts.npy")):
            with open(Path(folder) / self.segment.replace(".npy", suffix), "wb") as fh:
                np.save(fh, arr, allow_pickle=False)


def timestamps_file(frame_segment: str) -> str:
    return frame_segment.replace(".npy", ".ts.npy")


__all__ = ["patch_config", "make_projection", "load_projection", "project_patches", "PatchSegments", "FrameStore",
           "timestamps_file"]
