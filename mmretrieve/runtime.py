"""Device, precision and thread choices, made once and explicitly.

Thread counts matter a lot on small machines: on a 2-core box, an oversubscribed torch + FAISS +
decoder-worker mix runs several times slower than a deliberate split. Everything that spins up
threads reads its count from here.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch

from mmretrieve import settings
from mmretrieve.errors import DeviceError, UsageError

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N (or another torch device)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX).

    Without it, bf16 on CPU is emulated and measured here 3x *slower* than fp32 (EfficientNet-Lite0,
    AVX2-only EPYC), while with it open_clip ViT-B/32 ran 4x faster than fp32.
    """
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision | str, device: torch.device, *, allow_bf16_cpu: bool = True) -> str:
    """Pick the fastest precision that keeps embeddings within cosine 0.999 of fp32.

    auto: CUDA -> fp16 (bf16 where the GPU supports it natively is equally fast; fp16 has more mantissa);
    CPU -> bf16 only with native bf16 instructions, else fp32. ``$MMRETRIEVE_PRECISION`` (``fp32``,
    ``bf16``, ``fp16``) replaces the automatic choice everywhere (tests use it to run both paths).
    """
    precision = (precision or "auto").lower()
    if precision not in ("auto", *_DTYPES):
        raise UsageError(f"unknown precision {precision!r}; expected one of auto, fp32, bf16, fp16")
    if precision == "auto":
        precision = settings.forced_precision() or "auto"
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "cpu" and allow_bf16_cpu and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("fp16 is only offered on GPU (CPU fp16 matmuls are emulated and slow); use bf16 or fp32")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


#: how much work one call does: ``query`` (one query at a time: a search, a server) or ``batch`` (ingest,
#: evaluation, benchmarks)
WORKLOADS = ("query", "batch")


def default_threads(workload: str = "batch") -> int:
    """torch intra-op threads for ``workload`` when neither ``--threads`` nor ``MMRETRIEVE_THREADS`` says.

    Measured with ``mmretrieve bench threads`` on 2 cores (docs/benchmarks.md, "Threads"): two threads beat one only
    while nothing else wants the CPU (up to 1.8x for a ViT query image, about 20% for ingest) and lose
    1.24x to 44x as soon as another process takes a core (OpenMP workers spin for the descheduled one);
    a batch job's decoder worker processes take a core each already. So the defaults never oversubscribe:
    ``query`` -> 1, ``batch`` -> cores minus decoder workers (1 on 2 cores, 8 on 16)."""
    env = settings.threads_env()
    if env is not None:
        return env
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if workload == "query":
        return 1
    return max(1, settings.available_cores() - default_workers())


def default_workers() -> int:
    """Decoder processes: one per spare core, at least one (measured on 2 cores: 1 worker + 1 torch thread
    keeps the encoder busy; see ``mmretrieve bench ingest``)."""
    return max(1, min(8, settings.available_cores() - 1))


def progress_disable() -> bool | None:
    """The value for tqdm's ``disable=``, so progress bars follow the log level: True (hidden) above INFO,
    None (shown on a terminal only) otherwise."""
    return None if logging.getLogger("mmretrieve").getEffectiveLevel() <= logging.INFO else True


def set_threads(n: int | None = None, workload: str = "batch") -> int:
    """Set torch intra-op and FAISS OpenMP threads to ``n`` (default: ``MMRETRIEVE_THREADS``, else
    ``default_threads(workload)``). Both get the same count: where they share one OpenMP runtime (the
    wheels here do), setting one sets the other. Returns the count."""
    given = int(n) if n else settings.threads_env()
    if given is not None and given < 1:
        raise UsageError(f"threads must be >= 1, got {given}")
    t = given or default_threads(workload)
    try:
        import faiss

        faiss.omp_set_num_threads(t)
    except Exception:  # faiss missing or built without OpenMP
        log.debug("could not set FAISS threads", exc_info=True)
    torch.set_num_threads(t)
    return t
