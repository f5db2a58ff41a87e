"""The Ray Data engine (``index build --engine ray [--ray-address ADDR]``; the ``ray`` extra).

The local engine's stages, spread over a Ray cluster as one streaming Ray Data pipeline:

    read (a task per shard streams its samples on the node that runs it, or the listed files of a
    folder) -> decode tasks (the safe loader + the encoder's image transform, one CPU each) -> an
    encoder actor pool (``ActorPoolStrategy``; ``num_gpus=1`` per actor where the cluster has GPUs, half
    a CPU otherwise, so decode tasks are never starved) -> the driver: ``WriteStage`` -> segments, and a
    commit each time a unit (a shard, a batch of files) is complete

Only embeddings (a few kB per image) travel back to the driver, which writes the segments and publishes
the versions: one writer, no shared file system needed for the index. The order of the input is kept,
so a Ray build gives the local engine's items and ids, and its vectors to float tolerance, and is
resumed like a local one (``ingest.build`` skips the committed units). For a non-Flat factory the
FAISS quantizer is trained once, on the first rows the driver receives, and every later segment is
added with it (FAISS's sharded-build recipe, as autofaiss does).

Ray's own ``read_webdataset`` / ``read_images`` are not used: they end the whole job at the first
corrupt member or truncated tar, where a build must skip and report the sample, and name samples
differently from the local engine. The shard reader here is the local engine's (``media.shards``),
run in Ray tasks. Files of a folder are read by the decode tasks on the nodes that run them, so on a
real cluster the folder (or the shards) must be at the same path on every node (a shared file system).

Ray is started here on this machine (loopback only, all its cores) unless ``address`` names a running
cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mmretrieve.errors import BadImageError, MissingDependencyError, UsageError
from mmretrieve.ingest.report import IngestReport
from mmretrieve.ingest.stages import Encoded, EncodeStage, WriteStage, _item, skipped_of
from mmretrieve.media.scan import SourceItem

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


def check_engine(engine: str) -> str:
    """``local`` or ``ray`` (whose absence is reported now, before any model loads)."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; expected local or ray")
    if engine == "ray":
        _ray()
    return engine


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependencyError("the Ray engine needs Ray Data: pip install 'mmretrieve[ray]'") from None
    return ray


@contextlib.contextmanager
def loopback_only(on: bool) -> Iterator[None]:
    """... and for this one, where Ray read the variable when first imported (by a caller, before us):
    without it, a Ray started on a machine with a network listens on every interface."""
    if not on:
        yield
        return
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") not in ("0", "false", "False")
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> tuple[Any, bool]:
    """``ray.init`` on ``address``, or a Ray of our own on this machine listening on loopback only,
    unless one is initialised already; returns (the ray module, whether it was started here)."""
    if address is None:  # a Ray of our own listens on 127.0.0.1 only: for its processes ...
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kw["address"] = address
    else:
        kw["num_cpus"] = num_cpus
    try:
        with loopback_only(address is None):
            ray.init(**kw)
    except ConnectionError as e:
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return ray, True


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray connected to ``address``, or started on this machine (loopback only); shut down afterwards
    only if started here. An already initialised Ray (a caller's own) is used as it is."""
    ray, started = start_ray(address, num_cpus=num_cpus)
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data logs every execution plan at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# ---- the pipeline's functions (run on the cluster) ----------------------------------------------------
def _shard_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A read task: one shard -> a row per sample (bytes, key, caption, metadata) or per problem."""
    from pathlib import Path

    from mmretrieve.media.sources import shard_items

    for seq, x in enumerate(shard_items(Path(row["shard"]))):
        it, err = x if isinstance(x, tuple) else (x, "")
        yield {"unit": row["unit"], "seq": seq, "uri": it.uri, "data": it.data or b"", "error": err,
               "item": json.dumps({"key": it.key, "caption": it.caption, "size": it.size, "mtime": it.mtime,
                                   "extra": it.extra})}


def _decode_batch(batch: dict[str, np.ndarray], transform, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A decode task: rows (``uri``, ``data`` bytes or empty for a file) -> uint8 pixels of the
    transform's ``shape`` (zeros for a failed row), or the reason."""
    from mmretrieve.ingest.stages import DecodeImage

    t0 = time.perf_counter()
    task = DecodeImage(transform)
    pix, wh, err = [], [], []
    for uri, data, e in zip(batch["uri"], batch["data"], batch["error"]):
        p, size = None, (0, 0)
        if not e:
            try:
                arr, w, h = task((str(uri), bytes(data)) if len(data) else str(uri))
                p, size = arr, (w, h)
            except BadImageError as b:
                e = b.reason
        pix.append(p)
        wh.append(size)
        err.append(str(e))
    out = np.zeros((len(pix), *shape), np.uint8)
    for j, p in enumerate(pix):
        if p is not None:
            out[j] = p
    keep = {k: batch[k] for k in ("unit", "seq", "item") if k in batch}
    return {**keep, "uri": batch["uri"], "pixels": out, "wh": np.asarray(wh, np.int64).reshape(-1, 2),
            "error": np.asarray(err, dtype=object), "decode_node": np.full(len(pix), _node(), dtype=object),
            "t_decode": np.full(len(pix), (time.perf_counter() - t0) / max(1, len(pix)))}


def _node() -> str:
    """The Ray node running this task or actor (the report says how many nodes did the work)."""
    import ray

    return ray.get_runtime_context().get_node_id()


class _EncodeActor:
    """An encoder on a Ray actor (the model loads once per actor): decoded pixels -> embeddings (+ patches)."""

    def __init__(self, encoder, patch_cfg: dict | None, projection, threads: int) -> None:
        import torch

        from mmretrieve.encoders import create_encoder

        torch.set_num_threads(max(1, threads))
        enc = create_encoder(encoder[0], **encoder[1]) if isinstance(encoder, tuple) else encoder
        self.stage = EncodeStage(enc, patch_cfg=patch_cfg, projection=projection)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from mmretrieve.store.sidestores import project_patches

        t0 = time.perf_counter()
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), self.stage.encoder.dim), np.float32)
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "pixels"}
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            with_patches = self.stage.patch_cfg is not None
            res = self.stage.encoder.encode_image_tensors(x, patches=with_patches, patch_grid=self.stage.grid)
            e, p = res if with_patches else (res, None)
            emb[ok] = e
            if p is not None:
                p = project_patches(p, self.stage.projection)
                pat = np.zeros((len(ok), *p.shape[1:]), np.float16)
                pat[ok] = p
                out["patches"] = pat
        out["emb"] = emb
        out["encode_node"] = np.full(len(ok), _node(), dtype=object)
        out["t_encode"] = np.full(len(ok), (time.perf_counter() - t0) / max(1, len(ok)))
        return out


# ---- the driver ----------------------------------------------------------------------------------------
class _Driver:
    """Writes the rows streaming back, in order, and closes each unit (its videos first, through the
    local engine, as the local engine orders them) when the next one starts."""

    def __init__(self, units, writer, report: IngestReport, *, on_unit_done: Callable, local: Callable,
                 on_bad_vectors: str, bar, seen: set[str] | None = None) -> None:
        self.units, self.report, self.bar = list(units), report, bar
        self.sink = WriteStage(writer, report, on_bad_vectors=on_bad_vectors, seen=seen)
        self.on_unit_done, self.local = on_unit_done, local
        self.next = 0  # the next unit to open
        self.open: int | None = None
        #: the images of each batch of files (Ray decodes those; the videos run locally), None for a shard
        self.images = [[it for it in u.items if it.kind != "video"] if u.items is not None else None for u in self.units]
        self.position = {u.index: pos for pos, u in enumerate(self.units)}
        self.select = None  # an add: items -> those to write (the new or changed; ``_Run.select``)

    def open_unit(self, k: int) -> None:
        while self.next <= k:
            self.close()
            u = self.units[self.next]
            self.open, self.next = self.next, self.next + 1
            videos = [it for it in (u.items or []) if it.kind == "video"]
            if videos:
                self.local(videos, self.bar)

    def close(self) -> None:
        if self.open is not None:
            self.on_unit_done(self.units[self.open], self.open == len(self.units) - 1)
            self.open = None

    def finish(self) -> None:
        if self.units:
            self.open_unit(len(self.units) - 1)
        self.close()

    def item(self, pos: int, seq: int, uri: str, meta: str | None) -> SourceItem:
        if self.images[pos] is not None:
            return self.images[pos][seq]
        d = json.loads(meta)
        return SourceItem(key=d["key"], uri=uri, caption=d["caption"], size=d["size"], mtime=d["mtime"], extra=d["extra"])

    def write(self, batch: dict[str, np.ndarray]) -> None:
        units = np.asarray(batch["unit"])
        for k in np.unique(units):  # rows come in order: a batch spans one unit or the end of one and the next
            rows = np.nonzero(units == k)[0]
            self.open_unit(self.position[int(k)])
            u = self.open
            good, bad = [], []
            for j in rows:
                it = self.item(u, int(batch["seq"][j]), str(batch["uri"][j]), batch["item"][j] if "item" in batch else None)
                err = str(batch["error"][j])
                if self.select is not None and not err and not list(self.select([it])):
                    continue
                (bad if err else good).append((j, it, err))
            self.sink.skip([skipped_of(it, err) for _, it, err in bad])
            if good:
                idx = [j for j, _, _ in good]
                items = [_item(it, *map(int, batch["wh"][j])) for j, it, _ in good]
                self.sink.write(Encoded(items, batch["emb"][idx], batch["patches"][idx] if "patches" in batch else None))
            if self.images[u] is None:
                self.report.scanned += len(rows)
            self.bar.update(len(rows))


def _pixel_shape(encoder) -> tuple[int, ...]:
    """What the encoder's transform makes of an image (every row of a Ray batch has this shape)."""
    from PIL import Image

    return tuple(encoder.image_transform(Image.new("RGB", (64, 48))).shape)


#: CPUs each encoder actor (without a GPU), read task and decode task asks for. Actors live for the whole
#: build, tasks come and go: a task must always fit beside the actors, or the pipeline waits forever
#: (measured: two 1-CPU nodes, an actor at 0.5 CPU on each, tasks at 1 CPU: a silent hang).
ACTOR_CPUS = 0.25
TASK_CPUS = 0.5


def _actor_count(ray, actors: int | None) -> tuple[int, float]:
    """(encoder actors, GPUs per actor): one per GPU, else one per two CPUs (at least one). A CPU pool
    too large to leave every task a place is refused (a clear error instead of a silent hang)."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if actors and gpus >= int(actors):
        return int(actors), 1.0
    if not actors and gpus:
        return gpus, 1.0
    if gpus:  # a GPU each or none: actors beyond the GPUs would run the model on CPUs, far slower
        raise UsageError(f"{int(actors)} encoder actors asked, but this Ray cluster has {gpus} GPU(s): one actor per GPU; "
                         f"use --ray-actors {gpus} or fewer")
    n = int(actors) if actors else max(1, int(cpus // 2))
    # the worst placement packs the actors on as few nodes as possible; one node must keep TASK_CPUS free
    room = max((float(x["Resources"].get("CPU", 0)) for x in nodes), default=cpus)
    if cpus - n * ACTOR_CPUS < TASK_CPUS or (len(nodes) == 1 and room - n * ACTOR_CPUS < TASK_CPUS):
        most = max(0, int((cpus - TASK_CPUS) / ACTOR_CPUS))
        raise UsageError(f"{n} encoder actor(s) at {ACTOR_CPUS} CPU each leave no CPU for reading and decoding on "
                         f"this Ray cluster ({cpus:g} CPUs on {len(nodes)} node(s)); use --ray-actors {most} or fewer")
    return n, 0.0


def run_units(writer, units: Sequence, encoder, report: IngestReport, opts, *, on_unit_done: Callable, local: Callable,
              bar=None, select=None, seen: set[str] | None = None) -> None:
    """Decode and encode ``units`` on Ray as ``opts`` (``BuildOptions``: ``ray_address``, ``ray_actors``,
    ``batch_size``, ``on_bad_vectors``) says; the driver writes the rows and calls ``on_unit_done(unit,
    last)`` as each unit completes (in order). ``local(items, bar)`` runs a unit's videos locally."""
    from mmretrieve.encoders import encoder_spec

    bs, actors, on_bad_vectors = int(opts.batch_size or encoder.batch_size), opts.ray_actors, opts.on_bad_vectors
    units = list(units)
    t0 = time.perf_counter()
    with ray_session(opts.ray_address) as ray:
        report.stages["ray_start"] = report.stages.get("ray_start", 0.0) + time.perf_counter() - t0
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the local engine's order: the same ids
        ctx.enable_progress_bars = False
        n_actors, gpu = _actor_count(ray, actors)
        driver = _Driver(units, writer, report, on_unit_done=on_unit_done, local=local, on_bad_vectors=on_bad_vectors,
                         bar=bar, seen=seen)
        driver.select = select
        ds = _dataset(ray, units, driver.images, bs, n_actors)
        if ds is not None:
            ds = ds.map_batches(_decode_batch, fn_kwargs={"transform": encoder.image_transform, "shape": _pixel_shape(encoder)}, batch_size=bs,
                                num_cpus=TASK_CPUS)
            ds = ds.map_batches(
                _EncodeActor, batch_size=bs, compute=ray.data.ActorPoolStrategy(size=n_actors),
                fn_constructor_kwargs={"encoder": encoder_spec(encoder) or encoder, "patch_cfg": writer.patch_cfg,
                                       "projection": writer.patch_projection(), "threads": 1},
                num_gpus=gpu, num_cpus=0 if gpu else ACTOR_CPUS)
            first = None
            nodes: dict[str, set] = {"decode": set(), "encode": set()}
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if first is None:
                    first = time.perf_counter() - t0
                    report.stages["ray_first_batch"] = first
                report.stages["decode"] = report.stages.get("decode", 0.0) + float(np.sum(batch["t_decode"]))
                report.stages["encode"] = report.stages.get("encode", 0.0) + float(np.sum(batch["t_encode"]))
                nodes["decode"].update(set(batch["decode_node"]))
                nodes["encode"].update(set(batch["encode_node"]))
                t = time.perf_counter()
                driver.write(batch)
                report.stages["write"] = report.stages.get("write", 0.0) + time.perf_counter() - t
            report.ray = {"actors": n_actors, "gpus_per_actor": gpu, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                          "decode_nodes": len(nodes["decode"]), "encode_nodes": len(nodes["encode"]),
                          "work_nodes": len(nodes["decode"] | nodes["encode"])}
        driver.finish()
    elapsed = time.perf_counter() - t0
    log.info("ray: %d unit(s) in %.1f s on %d encoder actor(s)%s", len(units), elapsed, n_actors,
             " (1 GPU each)" if gpu else "")


def _dataset(ray, units: Sequence, images: Sequence, bs: int, n_actors: int):
    """The pipeline's input: a read task per shard, or the rows of the files to decode (None: nothing)."""
    if units and units[0].items is None:
        shards = [{"unit": u.index, "shard": str(u.shard)} for u in units]
        return ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(_shard_rows, num_cpus=TASK_CPUS)
    rows = [{"unit": u.index, "seq": j, "uri": str(it.uri), "data": b"", "error": ""}
            for u, ims in zip(units, images) for j, it in enumerate(ims)]
    if not rows:
        return None
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(1, bs) + 1, 8 * n_actors)))


__all__ = ["run_units", "ray_session", "check_engine", "ENGINES"]
