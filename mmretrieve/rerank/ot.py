"""Optimal transport between patch sets: marginals and solvers for the EMD reranker.

Conventions (as in DeepFace-EMD's ``emd_similarity``): for K candidates with n patches each and a query
with m patches, ``S[k] = C[k] @ Q.T`` is the (n, m) cosine matrix (rows: candidate patches, columns:
query patches), the cost is ``1 - S``, ``a[k]`` (n) and ``b[k]`` (m) are the candidate and query
marginals, and the EMD similarity of a candidate is ``sum(T * S)`` for the transport plan ``T``.
With marginals that sum to one this equals ``1 - <T, 1 - S>``, i.e. one minus the EMD.
"""

from __future__ import annotations

import concurrent.futures as cf
import math

import numpy as np
import torch

from mmretrieve.errors import OTConvergenceError, UsageError

WEIGHTS = ("uniform", "apc", "sc")


def _normalize_rows(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to sum to one; an all-zero row (e.g. APC with every weight clipped) becomes uniform."""
    s = w.sum(-1, keepdim=True)
    uniform = torch.full_like(w, 1.0 / w.shape[-1])
    return torch.where(s > eps, w / s.clamp_min(eps), uniform)


def marginals(S: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate marginals ``a`` (K, n) and query marginals ``b`` (K, m).

    - ``uniform``: 1/n and 1/m;
    - ``sc``: row / column sums of the cost ``1 - S``, normalised;
    - ``apc`` (DeepFace-EMD's default): a candidate patch weighs ``relu(<query centre, patch>)``, a query
      patch ``relu(<patch, candidate centre>)``, each set normalised.

    (DeepFace-EMD's unbalanced ``uew`` variant is not offered: with balanced solvers, which renormalise
    both sides, it reduces exactly to ``apc``.)
    """
    K, n, m = S.shape
    if method == "uniform":
        return S.new_full((K, n), 1.0 / n), S.new_full((K, m), 1.0 / m)
    if method == "sc":
        dis = 1.0 - S
        return _normalize_rows(dis.sum(2)), _normalize_rows(dis.sum(1))
    if method == "apc":
        # <patch, centre> with centre = normalize(mean of the other set's patches) is a row / column mean
        # of S divided by a positive norm, which the normalisation cancels: a = relu(mean_m S),
        # b = relu(mean_n S), with no pass over the patch features
        a = torch.relu(S.mean(2))
        b = torch.relu(S.mean(1))
        return _normalize_rows(a), _normalize_rows(b)
    raise UsageError(f"unknown patch weighting {method!r}; expected one of {', '.join(WEIGHTS)}")


# ---- exact -----------------------------------------------------------------------------------------
def _float64(*tensors: torch.Tensor) -> list[np.ndarray]:
    """POT's solvers work in float64 numpy (always copies: callers normalise in place)."""
    return [t.detach().cpu().numpy().astype(np.float64, copy=True) for t in tensors]


def _emd_one(a: np.ndarray, b: np.ndarray, M: np.ndarray, num_iter_max: int) -> float:
    import ot

    cost, log = ot.emd2(a, b, M, numItermax=num_iter_max, log=True)
    if log.get("warning"):  # POT also warns; its log says it without touching the warnings filters
        raise OTConvergenceError(f"exact EMD did not converge: {log['warning']}")
    return float(cost)


def emd_exact(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, threads: int = 1, num_iter_max: int = 200_000) -> np.ndarray:
    """Exact EMD similarity ``1 - emd2(a, b, 1 - S)`` per candidate with POT's network simplex (float64).

    ``threads`` > 1 spreads the candidates over a thread pool (POT releases the GIL while solving).
    Non-convergence is read from POT's log of each solve (``OTConvergenceError``): nothing here changes
    the process's warnings filters (``warnings.catch_warnings`` is not thread-safe, and this runs on
    server threads).
    """
    S64, A, B = _float64(S, a, b)
    A /= A.sum(1, keepdims=True)
    B /= B.sum(1, keepdims=True)
    M = 1.0 - S64

    def solve(k: int) -> float:
        return 1.0 - _emd_one(A[k], B[k], np.ascontiguousarray(M[k]), num_iter_max)

    K = S64.shape[0]
    if threads > 1 and K > 1:
        with cf.ThreadPoolExecutor(max_workers=threads) as ex:
            return np.fromiter(ex.map(solve, range(K)), dtype=np.float64, count=K)
    return np.fromiter((solve(k) for k in range(K)), dtype=np.float64, count=K)


def emd_pot_sinkhorn(
    S: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    reg: float = 0.05,
    max_iter: int = 1000,
    tol: float = 1e-9,
    method: str = "sinkhorn_log",
) -> np.ndarray:
    """POT's ``ot.sinkhorn`` per pair (a reference for the batched solver): ``sum(T * S)``.

    Zero marginal entries (APC clips weights at 0) are floored at 1e-12 so the plain scaling method
    does not divide by zero."""
    import ot

    S64, A, B = _float64(S, a, b)
    out = np.empty(S64.shape[0])
    for k in range(S64.shape[0]):
        ak, bk = np.maximum(A[k], 1e-12), np.maximum(B[k], 1e-12)
        T = ot.sinkhorn(
            ak / ak.sum(), bk / bk.sum(), 1.0 - S64[k], reg, numItermax=max_iter, stopThr=tol, method=method
        )
        out[k] = float((T * S64[k]).sum())
    return out


# ---- batched entropic OT in torch ------------------------------------------------------------------
def similarity_matrices(Q, C, device: torch.device | str = "cpu") -> torch.Tensor:
    """``S[k] = C[k] @ Q.T`` for all candidates: (K, n, m) float32.

    On CPU one large sgemm through numpy; on GPU a torch einsum (why, with the timings:
    docs/benchmarks.md, "EMD solvers: why the CPU path is numpy").
    """
    device = torch.device(device)
    if device.type == "cpu":
        Qn = np.ascontiguousarray(np.asarray(Q, dtype=np.float32))
        Cn = np.ascontiguousarray(np.asarray(C, dtype=np.float32))
        K, n, d = Cn.shape
        return torch.from_numpy((Cn.reshape(K * n, d) @ Qn.T).reshape(K, n, Qn.shape[0]))
    Qt = torch.as_tensor(Q, dtype=torch.float32, device=device)
    Ct = torch.as_tensor(C, dtype=torch.float32, device=device)
    return torch.einsum("knd,md->knm", Ct, Qt)


def sinkhorn_batched(
    S: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    reg: float = 0.05,
    max_iter: int = 50,
    tol: float | None = None,
    check_every: int = 5,
    mode: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    return_info: bool = False,
):
    """Entropic OT for all K candidates in one tensor program; returns ``sum(T * S)`` per candidate.

    ``mode="kernel"`` runs the classic scaling iterations on ``exp(-(1-S)/reg)`` with batched
    matrix-vector products (fast); ``"log"`` runs them in the log domain (stable for any ``reg``);
    ``"auto"`` picks the kernel whenever ``max cost / reg`` is small enough that the kernel cannot
    underflow in the working dtype. Stops early when the row-marginal error (L1, averaged over
    candidates) falls below ``tol``, checked every ``check_every`` iterations. ``tol=None`` adapts to
    the grid: 0.005 for up to 64x64 patch pairs (iterations are cheap there), 0.02 above, chosen with
    ``mmretrieve bench rerank`` to keep the top-10 ranking within 0.9 of the exact one.

    ``backend``: kernel mode on CPU tensors runs in numpy, split over ``threads`` chunks of candidates
    (each candidate's problem is independent; numpy releases the GIL); ``"torch"`` forces the torch
    program (the GPU path). The measurements behind this choice, and the machine where it does not
    hold, are in docs/benchmarks.md ("EMD solvers: why the CPU path is numpy").
    """
    if reg <= 0:
        raise UsageError(f"sinkhorn: reg must be > 0, got {reg}")
    if mode not in ("auto", "kernel", "log"):
        raise UsageError(f"sinkhorn: mode must be auto, kernel or log, got {mode!r}")
    dtype = S.dtype
    limit = 80.0 if dtype == torch.float32 else (600.0 if dtype == torch.float64 else 10.0)
    if mode == "auto":
        mode = "kernel" if (1.0 - float(S.min())) / reg < limit else "log"
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    if tol is None:
        tol = 0.005 if S.shape[1] * S.shape[2] <= 64 * 64 else 0.02
    if mode == "kernel" and S.device.type == "cpu" and backend != "torch":
        out, info = _sinkhorn_kernel_numpy_threaded(
            S.numpy(), a.numpy(), b.numpy(), reg, max_iter, tol, check_every, threads or default_threads()
        )
    elif mode == "kernel":
        out, info = _sinkhorn_kernel_torch(S, a, b, reg, max_iter, tol, check_every)
    else:
        out, info = _sinkhorn_log_torch(S, a, b, reg, max_iter, tol, check_every)
    info["mode"] = mode
    return (out, info) if return_info else out


_POOL: cf.ThreadPoolExecutor | None = None


def _pool(threads: int) -> cf.ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmr-sinkhorn")
    return _POOL


def _sinkhorn_kernel_numpy_threaded(S, a, b, reg, max_iter, tol, check_every, threads):
    # exp(-(1 - S) / reg), (K, n, m), once for all chunks; torch's vectorised exp is 2.5x faster than numpy's
    Kmat = torch.from_numpy(np.ascontiguousarray(S)).sub(1.0).mul_(1.0 / reg).exp_().numpy()
    K = S.shape[0]
    if threads <= 1 or K < 2 * threads or S.size < 1_000_000:  # small problems: thread hand-offs cost more
        return _sinkhorn_kernel_numpy(Kmat, S, a, b, max_iter, tol, check_every)
    bounds = np.linspace(0, K, threads + 1).astype(int)
    futs = [
        _pool(threads).submit(_sinkhorn_kernel_numpy, Kmat[lo:hi], S[lo:hi], a[lo:hi], b[lo:hi], max_iter, tol, check_every)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    parts = [f.result() for f in futs]
    info = {"iterations": max(p[1]["iterations"] for p in parts), "marginal_error": max(p[1]["marginal_error"] for p in parts)}
    return np.concatenate([p[0] for p in parts]), info


def _sinkhorn_kernel_numpy(Kmat, S, a, b, max_iter, tol, check_every):
    u = np.ones_like(a)
    v = np.ones_like(b)
    tiny = np.finfo(Kmat.dtype).tiny
    err, iters = math.inf, 0
    for iters in range(1, max_iter + 1):
        u = a / np.maximum(np.matmul(Kmat, v[:, :, None])[:, :, 0], tiny)
        v = b / np.maximum(np.matmul(u[:, None, :], Kmat)[:, 0, :], tiny)
        if iters % check_every == 0 or iters == max_iter:
            row = u * np.matmul(Kmat, v[:, :, None])[:, :, 0]
            err = float(np.abs(row - a).sum(-1).mean())
            if err < tol:
                break
    # sum(T * S) with T = diag(u) K diag(v), without materialising T
    sim = (u * np.matmul(Kmat * S, v[:, :, None])[:, :, 0]).sum(-1)
    return np.nan_to_num(sim.astype(np.float64)), {"iterations": iters, "marginal_error": err}


def _sinkhorn_kernel_torch(S, a, b, reg, max_iter, tol, check_every):
    Kmat = torch.exp((S - 1.0) / reg)
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    err, iters = math.inf, 0
    for iters in range(1, max_iter + 1):
        u = a / torch.bmm(Kmat, v.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30)
        v = b / torch.bmm(u.unsqueeze(1), Kmat).squeeze(1).clamp_min(1e-30)
        if iters % check_every == 0 or iters == max_iter:
            row = u * torch.bmm(Kmat, v.unsqueeze(-1)).squeeze(-1)
            err = float((row - a).abs().sum(-1).mean())
            if err < tol:
                break
    sim = (u * torch.bmm(Kmat * S, v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return torch.nan_to_num(sim.double()).cpu().numpy(), {"iterations": iters, "marginal_error": err}


def _sinkhorn_log_torch(S, a, b, reg, max_iter, tol, check_every):
    la, lb = torch.log(a.clamp_min(1e-30)), torch.log(b.clamp_min(1e-30))
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    Cr = (1.0 - S) / reg
    err, iters = math.inf, 0
    for iters in range(1, max_iter + 1):
        f = la - torch.logsumexp(g.unsqueeze(-2) - Cr, dim=-1)
        g = lb - torch.logsumexp(f.unsqueeze(-1) - Cr, dim=-2)
        if iters % check_every == 0 or iters == max_iter:
            row = torch.logsumexp(f.unsqueeze(-1) + g.unsqueeze(-2) - Cr, dim=-1).exp()
            err = float((row - a).abs().sum(-1).mean())
            if err < tol:
                break
    T = torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - Cr)
    sim = (T * S).sum((1, 2))
    return torch.nan_to_num(sim.double()).cpu().numpy(), {"iterations": iters, "marginal_error": err}


def default_threads() -> int:
    """torch's intra-op thread count (what ``--threads`` / ``set_threads`` set)."""
    return max(1, torch.get_num_threads())
