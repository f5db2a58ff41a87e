"""The embeddings map of an index: every live item projected to 2-D, computed once per index version.

PCA by default (numpy's SVD of the embeddings' covariance, read ``BLOCK`` rows at a time); ``umap`` or
``tsne`` where ``umap-learn`` / ``scikit-learn`` are installed (a ``UsageError`` naming what to install
otherwise, before any vector is read). Coordinates are scaled into [-1, 1] on both axes and kept as
float16: in memory (the last ``MAP_CACHE`` maps of this process) and on disk under
``$MMRETRIEVE_CACHE/maps`` (keyed by the index's path, its version (name and manifest checksum) and the method).

A PCA map holds every live item (its axes fitted on an even sample of at most ``MAX_FIT_POINTS``, every
item then projected, a block at a time), so ``map within`` selects among all of them; the page is sent an
even sample of at most ``MAX_MAP_POINTS`` (``sample``). UMAP and t-SNE maps (their cost grows faster than
linearly, and t-SNE cannot place a point it was not fitted on) hold an even sample of at most
``MAX_NONLINEAR_POINTS`` items, logged: ``map.umap within`` / ``map.tsne within`` select among those.

The served page draws it (``GET /api/v1/indexes/{name}/map``), and the filter predicate ``map within
(x y, ...)`` (``store.filters``) selects the items whose point lies inside a polygon of it: ``ids_within``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from mmretrieve.errors import UsageError
from mmretrieve.lru import LRU

log = logging.getLogger(__name__)

#: the most points of a map sent to draw (a larger map is sampled, evenly by id: ``sample``)
MAX_MAP_POINTS = 500_000
#: the most rows a PCA's axes are fitted on (an even sample by id); every live item is then projected
MAX_FIT_POINTS = 500_000
#: the most points a UMAP or t-SNE map holds (both grow faster than linearly with the points)
MAX_NONLINEAR_POINTS = 20_000
#: rows read at a time to build the projection
BLOCK = 8192
#: maps kept in this process's memory
MAP_CACHE = 4
METHODS = ("pca", "umap", "tsne")

_maps: LRU[tuple] = LRU(MAP_CACHE)
_lock = threading.Lock()
_locks: dict = {}


def check_method(method: str) -> None:
    """A ``UsageError`` for an unknown method, or for one whose package is not installed."""
    if method not in METHODS:
        raise UsageError(f"map method must be one of {', '.join(METHODS)}, got {method!r}")
    need = {"umap": ("umap", "umap-learn"), "tsne": ("sklearn", "scikit-learn")}.get(method)
    if need is None:
        return
    import importlib.util

    if importlib.util.find_spec(need[0]) is None:
        raise UsageError(f"map method {method!r} needs {need[1]} (pip install {need[1]}); method 'pca' needs nothing")


def live_ids(index, method: str = "pca") -> np.ndarray:
    """The ids a map of ``index`` holds: every live item (PCA), or an even sample of them by id (UMAP,
    t-SNE, past ``MAX_NONLINEAR_POINTS``)."""
    ids = index.select(None).ids  # every live item of the snapshot, sorted (the selection's cache)
    if method != "pca" and len(ids) > MAX_NONLINEAR_POINTS:
        log.info("map %s of %s: %d items, more than %d: drawing an even sample of %d", method, index.path,
                 len(ids), MAX_NONLINEAR_POINTS, MAX_NONLINEAR_POINTS)
        ids = sample(ids, MAX_NONLINEAR_POINTS)
    return ids


def sample(ids: np.ndarray, cap: int) -> np.ndarray:
    """At most ``cap`` of ``ids``, evenly spread (all of them when they are fewer)."""
    return ids if len(ids) <= cap else ids[np.linspace(0, len(ids) - 1, cap).astype(np.int64)]


def _pca(index, ids: np.ndarray) -> np.ndarray:
    """(n, 2) float32: the ids' embeddings on their two principal axes (SVD of the covariance of an even
    sample of at most ``MAX_FIT_POINTS`` of them, by blocks)."""
    d = index.dim
    fit = sample(ids, MAX_FIT_POINTS)
    total, cov = np.zeros(d, np.float64), np.zeros((d, d), np.float64)
    for s in range(0, len(fit), BLOCK):
        x = index.vectors(fit[s:s + BLOCK]).astype(np.float64)
        total += x.sum(0)
        cov += x.T @ x
    n = max(len(fit), 1)
    mean = total / n
    cov = cov / n - np.outer(mean, mean)
    u, _, _ = np.linalg.svd(cov)
    axes = u[:, :2] if d >= 2 else np.pad(u, ((0, 0), (0, 2 - d)))
    out = np.zeros((len(ids), 2), np.float32)
    for s in range(0, len(ids), BLOCK):
        out[s:s + BLOCK] = (index.vectors(ids[s:s + BLOCK]) - mean) @ axes
    return out


def _nonlinear(index, ids: np.ndarray, method: str) -> np.ndarray:
    check_method(method)
    x = index.vectors(ids)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=0).fit_transform(x).astype(np.float32)
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, len(ids) // 4)))
    return TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(x).astype(np.float32)


def project(index, ids: np.ndarray, method: str = "pca") -> np.ndarray:
    """(n, 2) float32 coordinates of ``ids``, scaled into [-1, 1] on both axes."""
    if len(ids) < 3:
        xy = np.zeros((len(ids), 2), np.float32)
    elif method == "pca":
        xy = _pca(index, ids)
    else:
        xy = _nonlinear(index, ids, method)
    span = np.abs(xy).max(0) if len(xy) else np.ones(2, np.float32)
    return (xy / np.where(span > 0, span, 1)).astype(np.float32)


def _stamp(index) -> str:
    """The version's name and its manifest's checksum: versions count from v0001 again in an index removed
    and built anew at the same path, so the name alone would find the old index's map."""
    checksum = str((getattr(index, "manifest", None) or {}).get("checksum") or "")[:16]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{index.version}-{checksum}".rstrip("-"))


def map_path(index, method: str) -> Path:
    from mmretrieve import settings

    where = hashlib.sha256(str(Path(index.path).resolve()).encode()).hexdigest()[:16]
    return settings.cache_dir() / "maps" / f"{where}-{_stamp(index)}-{method}.npz"


def load_or_compute_map(index, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, xy float16) of ``index``'s map, read from its cache file or computed and written there."""
    check_method(method)
    path = map_path(index, method)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:  # a cache file: arrays, never objects
                return z["ids"], z["xy"]
        except Exception as e:  # a damaged cache file: computed again
            log.warning("map cache %s unreadable (%s); computing it again", path.name, e)
    ids = live_ids(index, method)
    xy = project(index, ids, method).astype(np.float16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=ids, xy=xy)
        tmp.replace(path)
    except OSError as e:
        log.warning("map cache %s not written (%s)", path.name, e)
    return ids, xy


def get_map(index, method: str = "pca") -> tuple[np.ndarray, np.ndarray]:
    """(ids, xy float16) of ``index``'s map from this process's memory, else ``load_or_compute_map``;
    concurrent first asks for one map compute it once."""
    check_method(method)
    key = (str(Path(index.path).resolve()), _stamp(index), method)
    with _lock:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        return _maps.get_or_make(key, lambda: load_or_compute_map(index, method))


def clear_cache() -> None:
    """Forget the maps kept in memory (the files on disk stay)."""
    _maps.clear()


def ids_within(index, polygon, method: str = "pca") -> np.ndarray:
    """The sorted ids of ``index``'s map whose point lies inside ``polygon`` (or on its boundary)."""
    from mmretrieve.store.filters import points_in_polygon

    ids, xy = get_map(index, method)
    return np.sort(np.asarray(ids, np.int64)[points_in_polygon(xy, polygon)])


__all__ = ["METHODS", "MAX_MAP_POINTS", "MAX_FIT_POINTS", "sample", "MAX_NONLINEAR_POINTS", "check_method", "live_ids", "project", "map_path",
           "load_or_compute_map", "get_map", "clear_cache", "ids_within"]
