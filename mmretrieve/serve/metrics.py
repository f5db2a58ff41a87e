"""Counters, gauges and histograms in the Prometheus text format (``GET /metrics``), thread-safe, with
no dependency: requests, errors and latency per endpoint, time per search stage, encoder batch sizes,
the heavy queue, index versions."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

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
    "mmretrieve_heavy_rejected_total": ("counter", "re-ranking requests refused with 503 because the queue was full"),
    "mmretrieve_timeouts_total": ("counter", "requests answered 504 after the per-request time limit"),
    "mmretrieve_index_reloads_total": ("counter", "newly published index versions picked up while serving"),
    "mmretrieve_index_reload_errors_total": ("counter", "new index versions that could not be opened (the old one stays)"),
    "mmretrieve_requests_in_flight": ("gauge", "requests being handled now"),
    "mmretrieve_heavy_queue_depth": ("gauge", "re-ranking requests running or waiting"),
    "mmretrieve_index_items": ("gauge", "items in the served snapshot of each index"),
    "mmretrieve_index_info": ("gauge", "the served version of each index (value 1)"),
}


def _labels(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(labels: tuple[tuple[str, str], ...], extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], list] = {}  # [bucket bounds, counts, sum, count]
        self._callbacks: list[Callable[[Metrics], None]] = []

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

    def render(self) -> str:
        for fn in self._callbacks:
            fn(self)
        with self._lock:
            series: dict[str, list[str]] = {}
            for (name, lab), v in sorted(self._counters.items()):
                series.setdefault(name, []).append(f"{name}{_fmt_labels(lab)} {_num(v)}")
            for (name, lab), v in sorted(self._gauges.items()):
                series.setdefault(name, []).append(f"{name}{_fmt_labels(lab)} {_num(v)}")
            for (name, lab), (bounds, counts, total, n) in sorted(self._hists.items(), key=lambda kv: kv[0]):
                lines = series.setdefault(name, [])
                acc = 0
                for b, c in zip(bounds, counts):
                    acc += c
                    lines.append(f"{name}_bucket{_fmt_labels(lab, (('le', _num(b)),))} {acc}")
                lines.append(f"{name}_bucket{_fmt_labels(lab, (('le', '+Inf'),))} {n}")
                lines.append(f"{name}_sum{_fmt_labels(lab)} {_num(round(total, 9))}")
                lines.append(f"{name}_count{_fmt_labels(lab)} {n}")
        out = []
        for name in sorted(series):
            kind, doc = _HELP.get(name, ("untyped", name))
            out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *series[name]]
        return "\n".join(out) + "\n"


__all__ = ["Metrics", "LATENCY_BUCKETS", "BATCH_BUCKETS"]
