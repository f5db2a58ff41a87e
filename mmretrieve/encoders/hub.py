"""Hub models that fail fast offline.

Before a model named by a Hugging Face hub repository loads (an open_clip pretrained tag, a timm
pretrained name, a transformers model id), ``hub_source`` asks two cheap questions: are the repository's
files in the local cache, and can the hub be reached (one HEAD request, a few seconds at most)? Reachable:
the library loads as usual. Unreachable (or ``HF_HUB_OFFLINE`` set) but cached: it loads from the cache
with the hub switched off, so no request is retried. Neither: one error at once that says what was asked,
that neither the network nor the cache has it, and how to give a local path -- instead of a minute of
retries and repeated warnings.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mmretrieve.errors import EncoderError

log = logging.getLogger(__name__)

#: seconds the reachability probe may take (a black-holed network waits this long, a refused one not at all)
PROBE_TIMEOUT = 3.0


def _constants():
    from huggingface_hub import constants

    return constants


def hub_endpoint() -> str:
    return str(_constants().ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    return Path(_constants().HF_HUB_CACHE)


def is_cached(repo_id: str) -> bool:
    """Whether the hub cache holds a snapshot of model repository ``repo_id``."""
    snapshots = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        return any(any(d.iterdir()) for d in snapshots.iterdir() if d.is_dir())
    except OSError:
        return False


def reachable(repo_id: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """One HEAD request to the hub's API for ``repo_id``: any HTTP answer (even 401 / 404) means reachable."""
    req = urllib.request.Request(f"{hub_endpoint()}/api/models/{repo_id}", method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _hub_off() -> Iterator[None]:
    """Every hub call of the libraries inside reads the cache only (no request, no retry)."""
    c = _constants()
    before = c.HF_HUB_OFFLINE
    c.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        c.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def hub_source(repo_id: str, *, asked: str, local_hint: str, error: type[Exception] = EncoderError) -> Iterator[str]:
    """Load ``repo_id`` inside this block: yields ``"hub"`` (reachable) or ``"cache"`` (unreachable or
    offline, but cached: the hub is off inside), or raises ``error`` at once when neither has it.
    ``asked``: what the user asked for (named in the error); ``local_hint``: how to give a local path."""
    if _constants().HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE)"
    elif reachable(repo_id):
        yield "hub"
        return
    else:
        why = f"the Hugging Face hub ({hub_endpoint()}) cannot be reached"
    if not is_cached(repo_id):
        raise error(f"{asked}: {why} and {repo_id} is not in the local cache ({cache_dir()}). Download it on a connected "
                    f"machine (`huggingface-cli download {repo_id} --local-dir DIR`) and give the local path: {local_hint}")
    log.info("%s: %s; loading %s from the local cache", asked, why, repo_id)
    with _hub_off():
        yield "cache"


__all__ = ["hub_source", "is_cached", "reachable", "hub_endpoint", "PROBE_TIMEOUT"]
