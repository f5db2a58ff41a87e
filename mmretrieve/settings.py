"""Settings read from the environment, in one place (light: no torch, no numpy).

| variable | meaning | default |
|---|---|---|
| ``MMRETRIEVE_INDEX_DIR`` | home of named indexes | ``./indexes`` |
| ``MMRETRIEVE_CACHE`` | caches (class-text embeddings, evaluation galleries) | ``~/.cache/mmretrieve`` |
| ``MMRETRIEVE_THREADS`` | torch + FAISS threads | 1 for queries (search), the cores decoder workers leave for batch work |
| ``MMRETRIEVE_PRECISION`` | forces every ``precision="auto"`` (encoders, MLLM verifier): ``fp32``, ``bf16``, ``fp16`` | unset: per device |
| ``MMRETRIEVE_DECODER_START`` | how decoder worker processes start: ``forkserver``, ``spawn``, ``fork`` | ``forkserver`` (``spawn`` where there is none) |
| ``MMRETRIEVE_SEARCH_DEVICE`` | where the coarse search runs: ``auto``, ``cpu``, ``cuda`` | ``auto`` |
| ``MMRETRIEVE_CONFIG_DIR`` | an extra folder of presets, searched first | unset |
| ``MMRETRIEVE_OPENCV_DOC`` | where Debian's opencv-doc sample data was unpacked | ``.cache/opencv-doc/...`` |
| ``MMRETRIEVE_TOKEN`` | the API token ``mmretrieve serve`` requires (when ``--token`` is not given) | unset |
"""

from __future__ import annotations

import os
from pathlib import Path

from mmretrieve.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def index_dir() -> Path:
    return Path(os.environ.get("MMRETRIEVE_INDEX_DIR") or "indexes")


def cache_dir(create: bool = True) -> Path:
    d = Path(os.environ.get("MMRETRIEVE_CACHE") or Path.home() / ".cache" / "mmretrieve")
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def generation_cache_path() -> Path:
    """The generation cache's file (``$MMRETRIEVE_GENERATION_CACHE``, else ``generations.sqlite`` under
    ``cache_dir()``): the generative stages' answers, shared by CLI, evaluation and the server."""
    p = os.environ.get("MMRETRIEVE_GENERATION_CACHE")
    return Path(p) if p else cache_dir() / "generations.sqlite"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_env() -> int | None:
    """``MMRETRIEVE_THREADS`` when set (it replaces every default thread count), else None."""
    env = os.environ.get("MMRETRIEVE_THREADS")
    if not env:
        return None
    try:
        return max(1, int(env))
    except ValueError:
        raise UsageError(f"MMRETRIEVE_THREADS must be a whole number, got {env!r}") from None


def threads() -> int:
    """``MMRETRIEVE_THREADS``, else every available core (thread pools outside torch: the EMD solvers)."""
    env = threads_env()
    return env if env is not None else max(1, available_cores())


def forced_precision() -> str | None:
    """``MMRETRIEVE_PRECISION`` when set (what every ``precision="auto"`` then resolves to)."""
    env = (os.environ.get("MMRETRIEVE_PRECISION") or "").strip().lower()
    if not env or env == "auto":
        return None
    if env not in PRECISIONS:
        raise UsageError(f"MMRETRIEVE_PRECISION must be one of {', '.join(PRECISIONS)}, got {env!r}")
    return env


def search_device() -> str:
    return (os.environ.get("MMRETRIEVE_SEARCH_DEVICE") or "auto").lower()


def config_dir() -> Path | None:
    env = os.environ.get("MMRETRIEVE_CONFIG_DIR")
    return Path(env) if env else None


def opencv_doc_dir() -> Path | None:
    env = os.environ.get("MMRETRIEVE_OPENCV_DOC")
    return Path(env) if env else None


def serve_token() -> str | None:
    """``MMRETRIEVE_TOKEN``: the API token of ``mmretrieve serve`` (unset or empty: none)."""
    return os.environ.get("MMRETRIEVE_TOKEN") or None
