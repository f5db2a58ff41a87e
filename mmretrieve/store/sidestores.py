"""Side-stores kept beside the vectors, and the patch projection, in one place.

- **Patch features** (for the EMD reranker): fp16 ``(rows, P, Dp)`` in each segment's ``patches.npy``,
  one row per vector row, memory-mapped by readers. ``patches={"dim": D}`` stores them projected to
  fewer dimensions by a fixed random orthogonal matrix (``patch_proj.npy`` at the index root, so
  queries are projected the same way).
- **Frames** of videos: fp16 ``(T, D)`` rows in each segment's ``frames.npy`` with their timestamps in
  ``frames_ts.npy``; a video's item records its first frame row and frame count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmretrieve.errors import UsageError
from mmretrieve.store.io import load_npy, write_npy

PROJECTION = "patch_proj.npy"


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


def load_projection(root: Path, cfg: dict | None, info: dict | None = None) -> np.ndarray | None:
    """The patch projection, read whole and checked against ``info`` (its size and sha256 in the manifest)."""
    if not cfg or not cfg.get("projection"):
        return None
    return load_npy(Path(root) / PROJECTION, info)


def ensure_projection(root: Path, manifest: dict) -> np.ndarray | None:
    """A writer's patch projection: read back when ``manifest`` (a draft's fields) lists its file, else
    made from the patch config and written, its size and sha256 noted in ``manifest["files"]``. None
    without one."""
    cfg = manifest.get("patches")
    if not cfg or not cfg.get("projection"):
        return None
    path = Path(root) / PROJECTION
    if PROJECTION in manifest["files"] and path.exists():
        return load_npy(path, manifest["files"][PROJECTION])
    proj = make_projection(cfg)
    tmp = path.with_name(path.name + ".new")
    manifest["files"][PROJECTION] = write_npy(tmp, proj)
    tmp.replace(path)
    return proj


def project_patches(P: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    """Patch features (..., native_dim) projected to the stored dim and re-normalised (identity without
    a projection)."""
    if proj is None:
        return P
    P = P @ proj
    return P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-12)


__all__ = ["patch_config", "make_projection", "load_projection", "ensure_projection", "project_patches", "PROJECTION"]
