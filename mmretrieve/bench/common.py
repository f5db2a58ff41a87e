"""Timing helpers and the machine's measured limits, shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def machine_info() -> dict[str, Any]:
    import torch

    try:
        import faiss

        faiss_version = faiss.__version__
        faiss_opts = faiss.get_compile_options()
    except Exception:
        faiss_version, faiss_opts = None, None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss": faiss_version,
        "faiss_compile": faiss_opts,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def child_json(argv: list[str], *, timeout: float, env: dict | None = None) -> dict[str, Any]:
    """Run a benchmark's child process (this Python on a script, or another one: LanceDB's) and read the JSON
    object on the last line of its output; a failure is ``{"error": its last line of stderr, "stderr": the
    tail}`` (the caller reports it or raises)."""
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1], "stderr": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def times(fn: Callable[[], Any], repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def median_time(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    return statistics.median(times(fn, repeat, warmup))


def best_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeat`` runs: what a machine's limits are measured with (noise only adds time)."""
    return min(times(fn, repeat, warmup))


def median_per_call(fn: Callable[[int], Any], n: int) -> float:
    """Median time of ``fn(0) ... fn(n - 1)``, each call timed alone (e.g. one query each)."""
    calls = iter(range(n))
    return median_time(lambda: fn(next(calls)), repeat=n, warmup=0)


def memory_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
    """Read bandwidth (sums of a float32 array on 1 thread and on FAISS's thread count; the larger is the
    bound, since a scan may be split over threads) and copy bandwidth, bytes/s. Plain threads over numpy
    (which releases the GIL in reductions), not torch: a torch thread pool left spinning was measured to
    slow the FAISS searches timed right after it 2x on 2 cores."""
    import concurrent.futures as cf

    import faiss

    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    read1_s = best_time(lambda: a.sum(dtype=np.float32))
    nt = max(1, faiss.omp_get_max_threads())
    parts = np.array_split(a, nt)
    with cf.ThreadPoolExecutor(nt) as ex:
        readn_s = best_time(lambda: list(ex.map(lambda p: p.sum(dtype=np.float32), parts)))
    copy_s = best_time(lambda: np.copyto(b, a))
    return {"read_Bps": max(nbytes / read1_s, nbytes / readn_s), "read_1thread_Bps": nbytes / read1_s,
            "copy_rw_Bps": 2 * nbytes / copy_s}


def sgemm_flops(m: int = 1000, k: int = 512, n: int = 100_000) -> float:
    """Measured fp32 GEMM FLOP/s with the current BLAS threads (the compute bound of batched flat search)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, k), dtype=np.float32)
    B = rng.standard_normal((k, n), dtype=np.float32)
    t = best_time(lambda: A @ B)
    return 2.0 * m * k * n / t


def gpu_limits(d: int, nbytes: int = 1 << 30) -> dict[str, float]:
    """The GPU's measured read bandwidth (a sum over ``nbytes``) and fp32 GEMM FLOP/s (TF32 off, as searched)."""
    import torch

    def timed(fn):  # GPU work is asynchronous: each timed run waits for it
        return median_time(lambda: (fn(), torch.cuda.synchronize()), repeat=5)

    ones = torch.ones(nbytes // 4, device="cuda")
    read_s = timed(ones.sum)
    del ones
    A = torch.randn(1000, d, device="cuda")
    B = torch.randn(d, 100_000, device="cuda")
    mm_s = timed(lambda: A @ B)
    return {"read_Bps": nbytes / read_s, "flops": 2.0 * 1000 * d * 100_000 / mm_s}

