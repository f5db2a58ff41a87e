"""Counters, gauges and histograms for ``GET /metrics``, thread-safe: requests, errors and latency per
endpoint, time per search stage, encoder batch sizes, the heavy queue, index versions, and the process
(CPU, memory, open files) and platform metrics of ``prometheus_client``.

The series live in this module's store (a series' labels may differ within a metric, e.g. a stage timed
per index or per encoder); each ``Metrics`` is a collector on its own ``prometheus_client``
``CollectorRegistry`` (one per service, so several services in one process do not mix), and
``prometheus_client`` writes the exposition: the Prometheus text format, or OpenMetrics when the client
asks for it (``Accept: application/openmetrics-text``)."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

#: latency buckets in seconds (1 ms .. 30 s)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

_HELP = {
    "mmretrieve_http_requests_total": ("counter", "HTTP requests by endpoint (route template), method and status"),
    "mmretrieve_http_errors_total": ("counter", "HTTP answers with status >= 400, by endpoint and status"),
    "mmretrieve_http_request_duration_seconds": ("histogram", "time from request to response, by endpoint"),
    "mmretrieve_stage_duration_seconds": ("histogram", "time spent in one search stage (decode, encode, coarse, rerankers)"),
    "mmretrieve_batch_size": ("histogram", "requests served by one batch: query encodings in one encoder forward "
                                           "(batcher=encode), coarse searches in one scan (batcher=search)"),
    "mmretrieve_generation_runs_total": ("counter", "searches a generative stage (describe, listwise, pairwise) ran in, "
                                                    "by index and stage"),
    "mmretrieve_generation_prompts_total": ("counter", "prompts a generative stage asked its model, by index and stage"),
    "mmretrieve_generation_cache_hits_total": ("counter", "prompts answered from the generation cache, by index and stage"),
    "mmretrieve_generation_prompt_tokens_total": ("counter", "prompt tokens of generated answers, by index and stage"),
    "mmretrieve_generation_generated_tokens_total": ("counter", "tokens generated, by index and stage"),
    "mmretrieve_generation_seconds_total": ("counter", "seconds spent generating, by index and stage"),
    "mmretrieve_generation_unparsed_total": ("counter", "answers that could not be read (the stage fell back), by index "
                                                        "and stage"),
    "mmretrieve_heavy_rejected_total": ("counter", "re-ranking requests refused with 503 because the queue was full"),
    "mmretrieve_timeouts_total": ("counter", "requests answered 504 after the per-request time limit"),
    "mmretrieve_index_reloads_total": ("counter", "newly published index versions picked up while serving"),
    "mmretrieve_index_reload_errors_total": ("counter", "new index versions that could not be opened (the old one stays)"),
    "mmretrieve_requests_in_flight": ("gauge", "requests being handled now"),
    "mmretrieve_heavy_queue_depth": ("gauge", "re-ranking requests running or waiting"),
    "mmretrieve_index_items": ("gauge", "items in the served snapshot of each index"),
    "mmretrieve_index_info": ("gauge", "the served version of each index (value 1)"),
}


#: a generative stage's cost key (``rerank.generate.Cost``) -> its counter
GENERATION_COUNTERS = {
    "prompts": "mmretrieve_generation_prompts_total", "cache_hits": "mmretrieve_generation_cache_hits_total",
    "prompt_tokens": "mmretrieve_generation_prompt_tokens_total",
    "generated_tokens": "mmretrieve_generation_generated_tokens_total",
    "seconds": "mmretrieve_generation_seconds_total", "unparsed": "mmretrieve_generation_unparsed_total",
}


def _labels(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _le(b: float) -> str:
    return "+Inf" if math.isinf(b) else repr(float(b))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], list] = {}  # [bucket bounds, counts, sum, count]
        self._callbacks: list[Callable[[Metrics], None]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        key = (name, _labels(labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def set(self, name: str, labels: dict[str, str] | None = None, value: float = 0.0) -> None:
        with self._lock:
            self._gauges[(name, _labels(labels))] = float(value)

    def replace(self, name: str, match: dict[str, str], labels: dict[str, str], value: float) -> None:
        """Set a gauge after removing every series of ``name`` whose labels include ``match`` (e.g. the
        previous version of an index)."""
        want = set(match.items())
        with self._lock:
            for key in [k for k in self._gauges if k[0] == name and want <= set(k[1])]:
                del self._gauges[key]
            self._gauges[(name, _labels(labels))] = float(value)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None,
                buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        key = (name, _labels(labels))
        with self._lock:
            h = self._hists.get(key)
            if h is None:
                h = self._hists[key] = [buckets, [0] * len(buckets), 0.0, 0]
            i = bisect.bisect_left(h[0], value)
            if i < len(h[1]):
                h[1][i] += 1
            h[2] += value
            h[3] += 1

    def on_render(self, fn: Callable[[Metrics], None]) -> None:
        """``fn(metrics)`` runs before each render (to set gauges that are read, not pushed)."""
        self._callbacks.append(fn)

    def counter(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._counters.get((name, _labels(labels)), 0.0)

    def collect(self):
        """The series as ``prometheus_client`` metric families (the registry's collector interface)."""
        for fn in self._callbacks:
            fn(self)
        families: dict[str, Metric] = {}

        def family(name: str, kind: str) -> Metric:
            if name not in families:
                doc = _HELP.get(name, (kind, name))[1]
                families[name] = Metric(name.removesuffix("_total") if kind == "counter" else name, doc, kind)
            return families[name]

        with self._lock:
            for (name, lab), v in sorted(self._counters.items()):
                family(name, "counter").add_sample(name, dict(lab), v)
            for (name, lab), v in sorted(self._gauges.items()):
                family(name, "gauge").add_sample(name, dict(lab), v)
            for (name, lab), (bounds, counts, total, n) in sorted(self._hists.items(), key=lambda kv: kv[0]):
                f, acc = family(name, "histogram"), 0
                for b, c in zip(bounds, counts):
                    acc += c
                    f.add_sample(f"{name}_bucket", {**dict(lab), "le": _le(b)}, acc)
                f.add_sample(f"{name}_bucket", {**dict(lab), "le": "+Inf"}, n)
                f.add_sample(f"{name}_count", dict(lab), n)
                f.add_sample(f"{name}_sum", dict(lab), round(total, 9))
        yield from (families[n] for n in sorted(families))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): OpenMetrics when ``accept`` asks for it, else the Prometheus text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


__all__ = ["GENERATION_COUNTERS", "Metrics", "LATENCY_BUCKETS", "BATCH_BUCKETS"]
