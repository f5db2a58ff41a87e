"""Work of concurrent requests batched: query encodings into one encoder forward, single-vector coarse
searches into one scan of the index.

One thread per encoder (``EncodeBatcher``) and one per served index (``SearchBatcher``) run that work.
While a batch runs, new requests queue up; the next batch takes all of them (up to ``max_batch``).
When recent batches were larger than what is queued now, the thread waits up to ``window_ms`` for the
clients that are about to come back (without it, 8 clients split into two alternating half batches,
each costing about as much as a full one); a lone client never waits. The encoder thread also keeps
encoder calls one at a time (tokenizers are not safe to call from several threads).

Measured on 2 cores (docs/serving.md): MiniLM text encodings of the embedded encoder cost 8-11 ms
alone and about 2.5 ms each in a batch of 8; one query over 100k x 1000-d vectors reads 400 MB (about
50 ms here) and 16 queries cost little more than one (the scan is bound by memory, not arithmetic).
``batching=False`` keeps the threads but runs one request per batch (for comparison).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


class _Batcher:
    """A thread that takes queued jobs ``(payload, future)`` in batches and hands them to ``_process``."""

    kind = "batch"

    def __init__(self, *, max_batch: int, batching: bool, window_ms: float, metrics, name: str) -> None:
        self.max_batch = max(1, int(max_batch)) if batching else 1
        self.window_s = float(window_ms) / 1000
        self.metrics = metrics
        self.name = name
        self._recent: list[int] = [1]
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"{self.kind}-{name}", daemon=True)
        self._thread.start()

    def _submit(self, payload) -> Future:
        fut: Future = Future()
        self._q.put((payload, fut))
        return fut

    def close(self) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch = [job for job in self._collect(first) if job[1].set_running_or_notify_cancel()]
            self._recent = (self._recent + [len(batch)])[-8:]
            if batch:
                try:
                    self._process(batch)
                except Exception:  # never let the thread die; each job gets the error
                    err = sys.exc_info()[1]
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(err)

    def _collect(self, first) -> list:
        """``first`` and what is queued behind it; waits up to the window while fewer are there than the
        largest of the last batches."""
        batch = [first]
        target = min(self.max_batch, max(self._recent))
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                left = deadline - time.perf_counter()
                nxt = self._q.get(timeout=left) if len(batch) < target and left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                self._q.put(_STOP)
                break
            batch.append(nxt)
        return batch

    def _process(self, batch: list) -> None:
        raise NotImplementedError

    def _observe(self, size: int, seconds: float, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.observe("mmretrieve_batch_size", size, {"batcher": self.kind, **labels},
                                 buckets=(1, 2, 4, 8, 16, 32, 64))
            self.metrics.observe("mmretrieve_stage_duration_seconds", seconds, {"stage": f"{self.kind}_batch", **labels})


class EncodeBatcher(_Batcher):
    """Query encodings of one encoder: texts of a batch in one call, images in another."""

    kind = "encode"

    def __init__(self, encoder, *, max_batch: int = 32, batching: bool = True, window_ms: float = 10.0, metrics=None,
                 name: str = "") -> None:
        self.encoder = encoder
        super().__init__(max_batch=max_batch, batching=batching, window_ms=window_ms, metrics=metrics,
                         name=name or getattr(encoder, "name", "encoder"))

    def text(self, text: str) -> Future:
        """A future of the text's (d,) float32 embedding."""
        return self._submit(("text", text))

    def image(self, image) -> Future:
        """A future of a PIL image's (d,) float32 embedding."""
        return self._submit(("image", image))

    def _process(self, batch: list) -> None:
        for side in ("text", "image"):
            jobs = [(p, f) for (k, p), f in batch if k == side]
            if jobs:
                self._run(side, jobs)

    def _run(self, side: str, jobs: list) -> None:
        t0 = time.perf_counter()
        fn = self.encoder.encode_texts if side == "text" else self.encoder.encode_images
        try:
            out = fn([p for p, _ in jobs])
        except Exception:
            if len(jobs) == 1:
                jobs[0][1].set_exception(sys.exc_info()[1])
                return
            for job in jobs:  # one bad input must not fail the others: each alone, with its own error
                self._run(side, [job])
            return
        for (_, f), v in zip(jobs, out):
            f.set_result(np.ascontiguousarray(v, dtype=np.float32))
        self._observe(len(jobs), time.perf_counter() - t0, encoder=self.name, kind=side)


class SearchBatcher(_Batcher):
    """Single-vector top-k searches of one served index (any of its snapshots) in one scan per snapshot.

    Each job is ``(index, vector, k, exclude)``; the batch asks the snapshot for the largest
    ``k + len(exclude)`` in one ``search_vectors`` call and gives each job its own top ``k`` with its
    own ids left out (the snapshot's tombstones are filtered by the snapshot itself). At most 16 per
    batch: below FAISS's BLAS threshold (20) a Flat snapshot answers them with one BLAS product."""

    kind = "search"

    def __init__(self, name: str, *, max_batch: int = 16, batching: bool = True, window_ms: float = 10.0,
                 metrics=None) -> None:
        super().__init__(max_batch=max_batch, batching=batching, window_ms=window_ms, metrics=metrics, name=name)

    def search(self, index, vector: np.ndarray, k: int, exclude=()) -> Future:
        """A future of ``(ids, scores)``, best first (fewer than ``k`` when the index holds fewer)."""
        return self._submit((index, np.asarray(vector, dtype=np.float32), int(k), frozenset(int(i) for i in exclude)))

    def _process(self, batch: list) -> None:
        groups: dict[int, list] = {}
        for job in batch:
            groups.setdefault(id(job[0][0]), []).append(job)
        for jobs in groups.values():
            t0 = time.perf_counter()
            index = jobs[0][0][0]
            kk = max(k + len(excl) for (_, _, k, excl), _ in jobs)
            D, I = index.search_vectors(np.stack([v for (_, v, _, _), _ in jobs]), kk)
            for row, ((_, _, k, excl), fut) in enumerate(jobs):
                keep = (I[row] >= 0) & ~np.isin(I[row], list(excl)) if excl else I[row] >= 0
                fut.set_result((I[row][keep][:k], D[row][keep][:k]))
            self._observe(len(jobs), time.perf_counter() - t0, index=self.name)


__all__ = ["EncodeBatcher", "SearchBatcher"]
