"""What the service keeps loaded: each index's current snapshot, one encoder (and its batcher) per
encoder name, and the pickup of newly published index versions.

Each request takes the snapshot current when it starts (``IndexHandle.index``) and keeps it to the end;
a background thread polls each index's manifest and, when a new version is published, opens it aside
(checksums verified, warmed up) and swaps it in with one assignment. Requests already running finish
on the old snapshot, which is released when the last of them drops it. A version that cannot be
opened is logged and counted; the old one keeps serving.

Concurrent searches on one snapshot share its FAISS index and metadata read-only: FAISS allows
concurrent searches of a CPU index, the metadata connection is SQLite's immutable read-only mode opened
for use from any thread, and the side-stores are read-only memory maps.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from mmretrieve.errors import EncoderUnavailableError, IndexNotFoundError, MMRetrieveError, UsageError
from mmretrieve.serve.batching import EncodeBatcher, SearchBatcher
from mmretrieve.serve.config import ServeConfig
from mmretrieve.serve.metrics import Metrics

log = logging.getLogger(__name__)


class IndexHandle:
    """One served index: its current snapshot, swapped when a new version is published."""

    def __init__(self, name: str, index, manager: IndexManager) -> None:
        self.name = name
        self.path = Path(index.path)
        self.index = index
        self.manager = manager
        self.loaded_at = time.time()
        self.reloads = 0
        self.last_error: str | None = None
        cfg = manager.config
        self.searcher = SearchBatcher(name, batching=cfg.batch_searches, window_ms=cfg.batch_window_ms,
                                      metrics=manager.metrics)

    @property
    def version(self) -> str:
        return self.index.version

    def published_version(self) -> str | None:
        from mmretrieve.store import read_manifest

        try:
            return read_manifest(self.path)["version"]
        except Exception as e:  # mid-rewrite or removed: try again on the next tick
            log.debug("%s: manifest unreadable (%s)", self.name, e)
            return None

    def check(self) -> bool:
        """Swap in a newly published version, if any. Returns whether it swapped."""
        v = self.published_version()
        if v is None or v == self.index.version:
            return False
        t0 = time.perf_counter()
        try:
            new = self.manager.open(self.path)
        except Exception as e:
            if self.last_error != f"{v}: {e}":
                log.error("%s: new version %s could not be opened, still serving %s: %s", self.name, v,
                          self.index.version, e)
            self.last_error = f"{v}: {e}"
            self.manager.metrics.inc("mmretrieve_index_reload_errors_total", {"index": self.name})
            return False
        old, self.index = self.index, new  # requests holding `old` finish on it
        self.reloads += 1
        self.loaded_at = time.time()
        self.last_error = None
        self.manager.metrics.inc("mmretrieve_index_reloads_total", {"index": self.name})
        log.info("%s: now serving version %s (was %s; opened in %.2f s)", self.name, new.version, old.version,
                 time.perf_counter() - t0)
        return True


class IndexManager:
    """The served indexes by name, the shared encoders and their batchers, the version poller."""

    def __init__(self, config: ServeConfig, *, encoders: dict | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.encoders: dict[str, object] = dict(encoders or {})
        self.batchers: dict[str, EncodeBatcher] = {}
        self.encoder_failures: dict[str, str] = {}  # encoder name -> why it cannot be loaded on this server
        self.handles: dict[str, IndexHandle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.metrics.on_render(self._index_gauges)

    # ---- loading --------------------------------------------------------------------------------------
    def load(self) -> None:
        for name in self.config.indexes:
            idx = self.open(name)
            served = Path(name).name
            if served in self.handles:
                raise UsageError(f"serve: two indexes would be served as {served!r} ({self.handles[served].path} and "
                                 f"{idx.path}); serve them from folders with different names")
            self.handles[served] = IndexHandle(served, idx, self)
            log.info("%s: %d items, version %s, encoder %s", served, len(idx), idx.version, idx.encoder_name)

    def open(self, name_or_path):
        """Open an index with the shared encoder of its kind (created once) and warm it up."""
        from mmretrieve.index import open_index
        from mmretrieve.store import read_manifest, resolve_index_path

        path = resolve_index_path(name_or_path, self.config.index_dir)
        if not (path / "manifest.json").is_file():
            raise IndexNotFoundError(f"no index {str(name_or_path)!r} (looked in {path})")
        enc = self.encoder(read_manifest(path)["encoder"]["name"], required=False)
        idx = open_index(path, encoder=enc, verify=self.config.verify)
        if len(idx):  # the first search builds the scan structures; do it before the swap
            idx.search(vector=np.full(idx.dim, idx.dim ** -0.5, np.float32), k=1)
        return idx

    def encoder(self, name: str, *, required: bool = True):
        """The shared encoder ``name``, created once. One that cannot be loaded here (an imported index's
        model name, weights not cached offline) is remembered: with ``required=False`` that gives None (the
        index is served for item and vector searches), else an ``EncoderUnavailableError`` at once."""
        with self._lock:
            enc = self.encoders.get(name)
            if enc is None and name in self.encoder_failures:
                if not required:
                    return None
                raise EncoderUnavailableError(self._unavailable(name))
            if enc is None:
                from mmretrieve.encoders import create_encoder

                t0 = time.perf_counter()
                try:
                    enc = self.encoders[name] = create_encoder(name)
                except MMRetrieveError as e:
                    self.encoder_failures[name] = str(e)
                    log.warning("%s; its indexes are served for searches by item and by vector only",
                                self._unavailable(name))
                    if not required:
                        return None
                    raise EncoderUnavailableError(self._unavailable(name)) from None
                log.info("encoder %s created in %.1f s", name, time.perf_counter() - t0)
            if enc.name not in self.batchers:
                self.batchers[enc.name] = EncodeBatcher(enc, max_batch=self.config.max_batch, batching=self.config.batching,
                                                        window_ms=self.config.batch_window_ms, metrics=self.metrics)
            return enc

    def warm_up(self) -> None:
        """One text and one image encoding per encoder, so the first request does not pay for them."""
        from PIL import Image

        for b in list(self.batchers.values()):
            modalities = getattr(b.encoder, "modalities", ("image", "text"))
            if "text" in modalities:
                b.text("warm up").result()
            if "image" in modalities:
                b.image(Image.new("RGB", (64, 64), (128, 128, 128))).result()

    def _unavailable(self, name: str) -> str:
        return f"encoder {name!r} cannot be loaded on this server ({self.encoder_failures[name]})"

    def encoder_of(self, index):
        """The encoder of a served index, or a clear ``EncoderUnavailableError`` naming the index, what still
        works and how to fix it (never a load attempt per request) where it could not be loaded."""
        try:
            return self.encoder(index.encoder_name)
        except EncoderUnavailableError:
            raise EncoderUnavailableError(
                f"index {index.path.name!r} was built with encoder {index.encoder_name!r}, which cannot be loaded "
                f"on this server ({self.encoder_failures[index.encoder_name]}): search it by item (item_key / "
                "item_id) or by vector, or rebuild it with a known encoder (`mmretrieve encoders` lists them)") from None

    def batcher(self, index) -> EncodeBatcher:
        return self.batchers[self.encoder_of(index).name]

    def get(self, name: str) -> IndexHandle:
        h = self.handles.get(name)
        if h is None:
            raise IndexNotFoundError(f"this server serves no index {name!r}; it serves: {', '.join(sorted(self.handles))}")
        return h

    # ---- version pickup -----------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Check every index for a new version now; returns the names that swapped."""
        return [name for name, h in list(self.handles.items()) if h.check()]

    def start(self) -> None:
        if self._poller is None and self.config.reload_interval_s > 0:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="index-versions", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.config.reload_interval_s):
            try:
                self.refresh()
            except Exception:  # never let the poller die
                log.exception("version check failed")

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
            self._poller = None
        for b in self.batchers.values():
            b.close()
        self.batchers.clear()
        for h in self.handles.values():
            h.searcher.close()

    def _index_gauges(self, m: Metrics) -> None:
        for name, h in self.handles.items():
            m.set("mmretrieve_index_items", {"index": name}, len(h.index))
            m.replace("mmretrieve_index_info", {"index": name}, {"index": name, "version": h.version}, 1)


__all__ = ["IndexHandle", "IndexManager"]
