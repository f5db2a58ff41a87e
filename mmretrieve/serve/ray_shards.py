"""Sharded vector search on Ray Serve (``mmretrieve serve NAME --ray``; the ``ray`` extra).

One index snapshot, pinned to a version, is split into ``shards``: contiguous ranges of its segments,
balanced by stored rows (``plan_shards``). Each shard is a Serve deployment (``ShardSearcher``) whose
replicas open the index at that version and keep only their segments in a ``SegmentedVectors`` built
with the parameters ``Index`` would use (metric, kind, the resolved IVF ``nprobe`` / HNSW
``ef_search``), so a shard's top-k over its segments is exactly what the whole index computes over
them. A router deployment (``ShardRouter``) sends a batch of query vectors to every shard at once,
merges the per-shard top-k lists with ``merge_topk`` (by score, ties by id: the ids and, to float
rounding, the scores of ``Index.search_vectors`` over the whole snapshot) and hydrates the ids to keys
and URIs from the metadata of the same version.

A call to a shard that fails because its replica died (``RayActorError``, Serve's
``ReplicaUnavailableError``) is retried once; Serve replaces the dead replica on its own. With two
or more replicas per shard, the retry goes to a live one, so a killed replica costs a retry, not a
request.

Every node must see the index at the same path (a shared file system, or the same copy on each).
Importing this module does not import Ray; ``build_app`` and ``run`` do.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import MissingDependencyError, UsageError

log = logging.getLogger(__name__)


def plan_shards(manifest: dict, n_shards: int) -> list[list[str]]:
    """The snapshot's segment ids (``manifest["segments"]``, in order) split into ``n_shards``
    contiguous ranges whose stored rows (what a search scans, deleted ones included) are as even as
    contiguous ranges allow. Each segment is in exactly one range; never more ranges than segments
    (and at least one, possibly empty, for an empty index)."""
    n = int(n_shards)
    if n < 1:
        raise UsageError(f"shards must be >= 1, got {n_shards!r}")
    segs = [(str(e["id"]), int(e.get("rows", 0))) for e in manifest.get("segments", [])]
    if not segs:
        return [[]]
    n = min(n, len(segs))
    rows = np.array([r for _, r in segs], np.float64)
    cum = np.concatenate([[0.0], np.cumsum(rows)])
    total = cum[-1]
    # cut j (1..n-1) after the segment whose cumulative rows come nearest j/n of the total, each range
    # keeping at least one segment
    cuts = [0]
    for j in range(1, n):
        target = total * j / n
        lo, hi = cuts[-1] + 1, len(segs) - (n - j)
        c = int(np.clip(np.argmin(np.abs(cum[lo : hi + 1] - target)) + lo, lo, hi))
        cuts.append(c)
    cuts.append(len(segs))
    return [[sid for sid, _ in segs[a:b]] for a, b in zip(cuts[:-1], cuts[1:])]


def _serve():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependencyError("sharded serving needs Ray Serve: pip install 'mmretrieve[ray]'") from None
    return ray, serve


def _retryable() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError)


class ShardSearcher:
    """One shard: the index at ``version``, searched over ``segment_ids`` only (a Serve deployment's
    class; ``build_app`` makes one deployment of it per shard)."""

    def __init__(self, index_path: str, version: str, segment_ids: Sequence[str], *, nprobe: int | None = None,
                 ef_search: int | None = None, search_device: str = "cpu", shard: int = 0, verify: bool = True) -> None:
        from mmretrieve.index.index import Index
        from mmretrieve.index.vectors import SegmentedVectors

        # the Index is kept: its lease keeps the version's files from being collected while we map them
        self._index = Index.open(index_path, version=version, search_device="cpu", nprobe=nprobe, ef_search=ef_search,
                                 verify="fast" if verify else "none")
        if self._index.version != version:
            raise UsageError(f"{index_path}: asked for version {version}, opened {self._index.version}")
        mine = list(segment_ids)
        by_id = {s.sid: s for s in self._index.segments}
        missing = [s for s in mine if s not in by_id]
        if missing:
            raise UsageError(f"{index_path} {version} has no segment {missing[0]!r}")
        whole = self._index.vector_index
        self.shard, self.version, self.segment_ids = int(shard), version, mine
        # the parameters Index gives its SegmentedVectors, nprobe already resolved from the index's nlist
        self.vectors = SegmentedVectors(
            [by_id[s] for s in mine], dim=whole.dim, metric=self._index.manifest.get("metric", "ip"), kind=whole.kind,
            search_device=search_device, nprobe=whole.nprobe, ef_search=whole.ef_search,
            name=f"{self._index.name}[shard {shard}]")
        log.info("shard %d of %s %s: %d segments, %d live rows, on %s", shard, self._index.name, version, len(mine),
                 self.vectors.live, self.vectors.search_device)

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None,
               exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 -> this shard's (scores (n, k'), ids (n, k')), k' = min(k, its live rows)."""
        return self.vectors.search(queries, k, nprobe=nprobe, ef_search=ef_search, exclude=exclude)

    def info(self) -> dict[str, Any]:
        import ray

        return {"shard": self.shard, "version": self.version, "segments": self.segment_ids,
                "live": self.vectors.live, "rows": self.vectors.ntotal, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "actor_id": ray.get_runtime_context().get_actor_id()}

    def __del__(self) -> None:
        idx = getattr(self, "_index", None)
        if idx is not None:
            idx.close()


class ShardRouter:
    """Fans a batch of query vectors out to every shard, merges, hydrates (a Serve deployment's class)."""

    def __init__(self, index_path: str, version: str, shards: Sequence[Any], plan: Sequence[Sequence[str]], *,
                 token: str | None = None, verify: bool = True) -> None:
        from mmretrieve.index.index import Index

        self._index = Index.open(index_path, version=version, search_device="cpu", verify="fast" if verify else "none")
        self._token = token
        self.version, self.shards, self.plan = version, list(shards), [list(p) for p in plan]
        self.retries = 0  # shard calls retried after a replica failure (for the tests and logs)
        self._retryable = _retryable()

    async def _shard_search(self, i: int, q: np.ndarray, k: int, kw: dict) -> tuple[np.ndarray, np.ndarray]:
        try:
            return await self.shards[i].search.remote(q, k, **kw)
        except self._retryable as e:  # a dead replica: Serve routes the retry to a live (or new) one
            self.retries += 1
            log.warning("shard %d: %s; retrying once", i, type(e).__name__)
            return await self.shards[i].search.remote(q, k, **kw)

    async def search(self, queries, k: int = 10, nprobe: int | None = None, ef_search: int | None = None,
                     exclude: Sequence[int] | None = None, hydrate: bool = True) -> dict[str, Any]:
        """``queries`` (n, d) (or (d,)) -> ``{"version", "scores" (n, k), "ids" (n, k), "keys", "uris"}``
        (ids -1, keys and URIs None where fewer than k live items remain)."""
        from mmretrieve.config import positive_int
        from mmretrieve.errors import BadVectorsError
        from mmretrieve.index.vectors import merge_topk

        k = positive_int(k, "k", "ShardRouter.search")
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self._index.dim:
            raise BadVectorsError(f"expected query vectors of dim {self._index.dim}, got shape {tuple(q.shape)}")
        whole = self._index.vector_index
        k = max(1, min(k, max(1, whole.live)))  # as SegmentedVectors.search clamps it for the whole snapshot
        kw = {"nprobe": nprobe, "ef_search": ef_search,
              "exclude": None if exclude is None else np.asarray(exclude, np.int64).ravel()}
        parts = await asyncio.gather(*(self._shard_search(i, q, k, kw) for i in range(len(self.shards))))
        D, I = merge_topk(list(parts), k, whole.metric_ip)
        if D.shape[1] < k:  # every shard had fewer live rows than k: pad as one index would
            pad = k - D.shape[1]
            D = np.concatenate([D, np.full((len(D), pad), -np.inf if whole.metric_ip else np.inf, D.dtype)], 1)
            I = np.concatenate([I, np.full((len(I), pad), -1, I.dtype)], 1)
        out: dict[str, Any] = {"version": self.version, "scores": D, "ids": I}
        if hydrate:
            items = self._index.items(sorted({int(i) for i in I.ravel() if i >= 0}))
            out["keys"] = [[items[int(i)].key if int(i) in items else None for i in row] for row in I]
            out["uris"] = [[items[int(i)].uri if int(i) in items else None for i in row] for row in I]
        return out

    async def shard_info(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(h.info.remote() for h in self.shards)))

    def stats(self) -> dict[str, Any]:
        return {"version": self.version, "shards": len(self.shards), "plan": self.plan, "retries": self.retries}

    async def __call__(self, request) -> Any:
        """HTTP: ``POST {"vectors": [[...], ...], "k": 10, "exclude": [...], "nprobe": .., "ef_search": ..}``
        -> JSON ``{"version", "results": [[{"id", "score", "key", "uri"}, ...], ...]}``; ``GET`` -> stats."""
        import hmac

        from starlette.responses import JSONResponse

        if self._token:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self._token}".encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        if request.method == "GET":
            return JSONResponse(self.stats())
        try:
            body = await request.json()
            vectors = np.asarray(body["vectors"], np.float32)
            r = await self.search(vectors, int(body.get("k", 10)), nprobe=body.get("nprobe"),
                                  ef_search=body.get("ef_search"), exclude=body.get("exclude"))
        except (KeyError, ValueError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        results = [[{"id": int(i), "score": float(d), "key": key, "uri": uri}
                    for d, i, key, uri in zip(ds, ids, keys, uris) if i >= 0]
                   for ds, ids, keys, uris in zip(r["scores"], r["ids"], r["keys"], r["uris"])]
        return JSONResponse({"version": r["version"], "results": results})


#: a search is milliseconds: a replica being stopped need not wait Serve's default 20 s for requests
SHUTDOWN = {"graceful_shutdown_timeout_s": 5.0, "graceful_shutdown_wait_loop_s": 0.5}


def build_app(index, *, shards: int = 2, replicas: int = 1, gpus_per_replica: float = 0, version: str | None = None,
              nprobe: int | None = None, ef_search: int | None = None, cpus_per_replica: float = 1,
              max_ongoing_requests: int = 16, index_dir=None, name: str = "mmretrieve", token: str | None = None,
              verify: bool = True):
    """A Serve application: ``shards`` shard deployments (``replicas`` replicas each, ``gpus_per_replica``
    GPUs and ``cpus_per_replica`` CPUs per replica) and their router, all pinned to ``version`` (default:
    the live version now). ``index``: an index name, folder or open ``Index``. ``token``: the bearer
    token the HTTP route requires (the handle path needs none). ``verify``: check the files on open
    (``Index.open``'s ``"fast"``), as ``serve`` does unless ``--no-verify``."""
    _, serve = _serve()
    from mmretrieve.store.layout import read_manifest, resolve_index_path

    if hasattr(index, "path") and hasattr(index, "manifest"):  # an open Index
        path, version = Path(index.path), version or index.version
    else:
        path = resolve_index_path(index, index_dir)
    path = path.resolve()
    manifest = read_manifest(path, version)
    version = manifest["version"]
    if int(replicas) < 1:
        raise UsageError(f"replicas must be >= 1, got {replicas!r}")
    plan = plan_shards(manifest, shards)
    device = "auto" if gpus_per_replica else "cpu"
    opts: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        opts["num_gpus"] = gpus_per_replica
    bound = []
    for i, seg_ids in enumerate(plan):
        dep = serve.deployment(ShardSearcher).options(
            name=f"{name}-shard-{i}", num_replicas=int(replicas), ray_actor_options=dict(opts),
            max_ongoing_requests=int(max_ongoing_requests), **SHUTDOWN)
        bound.append(dep.bind(str(path), version, seg_ids, nprobe=nprobe, ef_search=ef_search, search_device=device,
                              shard=i, verify=verify))
    router = serve.deployment(ShardRouter).options(
        name=f"{name}-router", num_replicas=1, ray_actor_options={"num_cpus": min(1, cpus_per_replica)},
        max_ongoing_requests=max(1, int(max_ongoing_requests)) * len(plan), **SHUTDOWN)
    log.info("%s %s: %d shards x %d replicas: %s", path.name, version, len(plan), replicas,
             [len(p) for p in plan])
    app = router.bind(str(path), version, bound, plan, token=token, verify=verify)
    # what the replicas ask of the cluster (``run`` checks it fits)
    app._mmr_needs = {"CPU": len(plan) * int(replicas) * cpus_per_replica + min(1, cpus_per_replica),
                      "GPU": len(plan) * int(replicas) * gpus_per_replica}
    return app


def _check_room(ray, app) -> None:
    """Serve waits for ever for replicas the cluster cannot place: say so now, not after a silent wait."""
    have = ray.cluster_resources()
    for res, need in getattr(app, "_mmr_needs", {}).items():
        if need and need > have.get(res, 0) + 1e-9:
            log.warning("the replicas ask for %g %s and the cluster has %g: Serve will wait until it has them "
                        "(lower --replicas / --shards, or cpus_per_replica)", need, res, have.get(res, 0))


def run(index, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, http: bool = True,
        blocking: bool = False, app_name: str = "mmretrieve", route_prefix: str = "/", num_cpus: int | None = None,
        **app_options):
    """Deploy ``build_app(index, **app_options)`` with ``serve.run``: on the Ray this process is connected
    to, else on ``address`` (an existing cluster), else on a Ray started here on loopback only. HTTP
    (a JSON ``POST`` to ``route_prefix``) on ``host:port`` by the head node's proxy, unless ``http`` is
    false. Returns the router's ``DeploymentHandle``; ``blocking``: serves until Ctrl+C, then stops the
    application (and the Ray started here), returns None."""
    from mmretrieve.ingest.ray_engine import start_ray

    ray, started = start_ray(address, num_cpus=num_cpus)  # before Serve imports Ray: the loopback setting is read then
    try:
        ray, serve = _serve()
    except MissingDependencyError:
        if started:
            ray.shutdown()
        raise
    app = build_app(index, **app_options)
    _check_room(ray, app)
    if not blocking:
        return _deploy(serve, app, index, http, host, port, app_name, route_prefix)
    import signal
    import threading
    import time

    def _stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop) stops it as Ctrl+C does
        signal.signal(signal.SIGTERM, _stop)
    try:  # Ctrl+C at any point, during the start too, stops what was started here
        _deploy(serve, app, index, http, host, port, app_name, route_prefix)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:  # a cluster we joined keeps its other applications
        if started:  # the Ray started here takes Serve and every replica with it (Serve's own graceful
            ray.shutdown()  # shutdown took over a minute on a loaded 2-core machine)
        else:
            serve.delete(app_name)
    return None


def _deploy(serve, app, index, http, host, port, app_name, route_prefix):
    if http:
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": int(port)})
    else:
        serve.start(proxy_location="Disabled")
    handle = serve.run(app, name=app_name, route_prefix=route_prefix if http else None, blocking=False)
    log.info("sharded search of %s ready%s", index, f" at http://{host}:{port}{route_prefix}" if http else "")
    return handle


__all__ = ["plan_shards", "ShardSearcher", "ShardRouter", "build_app", "run"]
