"""Sharded search on Ray Serve (``mmretrieve.serve.ray_shards``) on a 2-node cluster simulated on this
machine (``ray.cluster_utils.Cluster``, loopback only, a temp dir of the module's own): the sharded
service gives ``Index.search_vectors``'s ids and scores (Flat and IVF, with deletions and exclusions),
a killed shard replica costs a retry and not a request, and ``plan_shards`` splits segments by rows.
Marked ``ray``: ``make test`` runs them as a second step."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request

import numpy as np
import pytest

from mmretrieve.index.index import Index
from mmretrieve.ingest import remove_from_index
from mmretrieve.serve.ray_shards import ShardRouter, plan_shards
from mmretrieve.store import IndexWriter, Item

ray = pytest.importorskip("ray", reason="sharded serving needs the ray extra")
serve = pytest.importorskip("ray.serve", reason="sharded serving needs Ray Serve (the ray extra)")
pytestmark = pytest.mark.ray

DIM = 32
BATCHES = (900, 600, 800, 700, 500)  # one segment each


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _build(path, factory):
    """5 segments of random unit vectors (3500 rows), every 37th row deleted."""
    rng = np.random.default_rng(0)
    info = {"name": "test-random", "dim": DIM, "modalities": ["image"]}
    n = 0
    for b, size in enumerate(BATCHES):
        with IndexWriter(path, encoder_info=info, factory=factory, create=b == 0) as w:
            w.add([Item(id=-1, key=str(n + i), uri=f"vec://{n + i}") for i in range(size)], _unit(rng, size))
        n += size
    remove_from_index(path, list(range(0, n, 37)))
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-serve-indexes")
    return {"flat": _build(d / "flat", "Flat"), "ivf": _build(d / "ivf", "IVF16,Flat")}


@pytest.fixture(scope="module")
def cluster():
    """Head + one node on loopback (2 logical CPUs each), the driver connected; all shut down after."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    d = tempfile.mkdtemp(prefix="mmr-rs-", dir="/tmp")  # Ray's socket paths must stay short
    os.makedirs(os.path.join(d, "ray"))
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", d)
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": d, "include_dashboard": False})
        c.add_node(num_cpus=2)
        ray.init(address=c.address, _temp_dir=d, log_to_driver=False)
        assert c.address.startswith("127.0.0.1:")
        yield {"cluster": c, "port": _free_port()}  # Serve's HTTP options are set once per cluster
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            mp.undo()
            shutil.rmtree(d, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- plan_shards (no Ray needed) ----------------------------------------------------------------------
def test_plan_shards_splits_by_rows_and_covers_every_segment_once():
    segs = [{"id": f"s{i}", "rows": r} for i, r in enumerate([900, 600, 800, 700, 500, 100, 100, 1200])]
    m = {"segments": segs}
    rows = {s["id"]: s["rows"] for s in segs}
    order = [s["id"] for s in segs]
    for n in (1, 2, 3, 4, 8, 20):
        plan = plan_shards(m, n)
        assert len(plan) == min(n, len(segs)) and all(plan)
        assert [s for p in plan for s in p] == order  # contiguous, in order, each segment once
        if n <= len(segs):
            # no contiguous split is more even: the largest range is within one segment of the ideal
            worst = max(sum(rows[s] for s in p) for p in plan)
            assert worst <= sum(rows.values()) / n + max(rows.values())
    assert plan_shards(m, 2) == [["s0", "s1", "s2"], ["s3", "s4", "s5", "s6", "s7"]]  # 2300 | 2600
    # by rows, not by segment count: one big segment is a shard of its own
    big = {"segments": [{"id": f"b{i}", "rows": r} for i, r in enumerate([100, 100, 100, 3000])]}
    assert plan_shards(big, 2) == [["b0", "b1", "b2"], ["b3"]]
    assert plan_shards({"segments": []}, 3) == [[]]
    with pytest.raises(ValueError):
        plan_shards(m, 0)


def test_router_retries_a_dead_replica_once():
    """The retry itself, deterministically: a shard whose first call dies is asked again, once."""
    import asyncio

    from ray.exceptions import ActorDiedError

    class Method:
        def __init__(self, fails):
            self.fails, self.calls = fails, 0

        async def _answer(self, q, k):
            self.calls += 1
            if self.calls <= self.fails:
                raise ActorDiedError()
            return np.ones((len(q), k), np.float32), np.arange(k)[None].repeat(len(q), 0)

        def remote(self, q, k, **kw):
            return self._answer(q, k)

    class Handle:
        def __init__(self, fails):
            self.search = Method(fails)

    r = ShardRouter.__new__(ShardRouter)
    r.shards, r.retries = [Handle(1)], 0
    from mmretrieve.serve.ray_shards import _retryable

    r._retryable = _retryable()
    D, I = asyncio.run(r._shard_search(0, np.zeros((2, 4), np.float32), 3, {}))
    assert I.shape == (2, 3) and r.retries == 1 and r.shards[0].search.calls == 2
    r.shards = [Handle(2)]
    with pytest.raises(ActorDiedError):  # at most one retry
        asyncio.run(r._shard_search(0, np.zeros((2, 4), np.float32), 3, {}))


# ---- on the 2-node cluster ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_sharded_service_gives_the_whole_index_results(cluster, indexes, kind):
    from mmretrieve.serve.ray_shards import run

    path = indexes[kind]
    idx = Index.open(path, search_device="cpu")
    assert len(idx.segments) >= 4 and sum(len(s.deleted) for s in idx.segments) > 0
    assert len(ray.nodes()) == 2
    port = cluster["port"]
    app = f"rs-{kind}"
    h = run(str(path), shards=2, replicas=1, cpus_per_replica=0.5, app_name=app, route_prefix=f"/{app}",
            port=port)
    try:
        info = h.shard_info.remote().result(timeout_s=60)
        assert [i["segments"] for i in info] == plan_shards(idx.manifest, 2)
        assert {i["version"] for i in info} == {idx.version}
        q = _unit(np.random.default_rng(1), 16)
        q[:4] = idx.vectors([5, 900, 2000, 3499]) * 0.9 + q[:4] * 0.1  # near stored rows, one per segment
        for k, exclude in ((10, None), (25, [5, 900, 901, 2000, 1, 2, 3]), (1, [3499])):
            want_D, want_I = idx.search_vectors(q, k, exclude=exclude)
            got = h.search.remote(q, k, exclude=exclude).result(timeout_s=60)
            np.testing.assert_array_equal(got["ids"], want_I)
            np.testing.assert_allclose(got["scores"], want_D, atol=1e-5)
            items = idx.items(want_I.ravel().tolist())
            assert got["keys"] == [[items[int(i)].key for i in row] for row in want_I]
            assert got["uris"][0][0] == items[int(want_I[0, 0])].uri
        # nprobe passes through (IVF: fewer lists probed, still the same as the whole index)
        got = h.search.remote(q, 10, nprobe=2).result(timeout_s=60)
        np.testing.assert_array_equal(got["ids"], idx.search_vectors(q, 10, nprobe=2)[1])
        # the JSON route, on loopback
        body = json.dumps({"vectors": q[:2].tolist(), "k": 5, "exclude": [5]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/{app}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.loads(resp.read())
        want_D, want_I = idx.search_vectors(q[:2], 5, exclude=[5])
        assert [[r["id"] for r in row] for row in out["results"]] == want_I.tolist()
        assert out["version"] == idx.version
    finally:
        serve.delete(app)
        idx.close()


def _replicas(app: str, deployment: str) -> set[str]:
    """Names of the live Serve replica actors of one deployment."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if a["namespace"] == "serve"
            and a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")}


def test_a_killed_replica_costs_a_retry_not_a_request(cluster, indexes):
    from ray.serve._private.common import DeploymentStatus

    from mmretrieve.serve.ray_shards import run

    path = indexes["flat"]
    idx = Index.open(path, search_device="cpu")
    app, dep = "rs-kill", "mmretrieve-shard-0"
    h = run(str(path), shards=2, replicas=2, cpus_per_replica=0.5, app_name=app, port=cluster["port"],
            route_prefix=f"/{app}")
    try:
        before = _replicas(app, dep)
        assert len(before) == 2, before
        rng = np.random.default_rng(2)
        queries = [_unit(rng, 4) for _ in range(60)]
        want = [idx.search_vectors(q, 10)[1] for q in queries]
        victim = sorted(before)[0]
        pending = []
        for j, q in enumerate(queries):
            pending.append(h.search.remote(q, 10))
            if j == 20:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            time.sleep(0.01)
        for j, (r, w) in enumerate(zip(pending, want)):  # every request answered, and right
            np.testing.assert_array_equal(r.result(timeout_s=60)["ids"], w, err_msg=f"request {j}")
        # Serve brings the replica back (bounded wait)
        deadline, now = time.monotonic() + 60, set()
        for _ in range(120):
            now = _replicas(app, dep)
            st = serve.status().applications[app].deployments[dep].status
            if len(now) == 2 and victim not in now and st == DeploymentStatus.HEALTHY:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(now) == 2 and victim not in now, now
        # and the service still answers after it
        np.testing.assert_array_equal(h.search.remote(queries[0], 10).result(timeout_s=60)["ids"], want[0])
        stats = h.stats.remote().result(timeout_s=30)
        print("router retries after the kill:", stats["retries"])
    finally:
        serve.delete(app)
        idx.close()


def test_cli_serve_ray_answers_over_http_and_stops_on_ctrl_c(indexes, tmp_path, capsys):
    """``mmretrieve serve PATH --ray``: its own Ray (loopback), the JSON route, SIGINT stops it all."""
    import signal
    import subprocess
    import sys

    from mmretrieve.cli import main

    assert main(["serve", "a", "b", "--ray"]) != 0  # one index only
    assert "serve --ray serves one index" in capsys.readouterr().err
    path, port = indexes["flat"], _free_port()
    d = tempfile.mkdtemp(prefix="mmr-rc-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": d, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    p = subprocess.Popen([sys.executable, "-m", "mmretrieve.cli", "serve", str(path), "--ray", "--port", str(port),
                          "--shards", "3", "--cpus-per-replica", "0.25", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                             # a job started in the background by a shell (make test &) has SIGINT ignored, which
                             # the child would inherit: Ctrl+C is what is tested, so it gets its default back
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        idx = Index.open(path, search_device="cpu")
        q = _unit(np.random.default_rng(3), 3)
        body = json.dumps({"vectors": q.tolist(), "k": 7}).encode()
        out, deadline = None, time.monotonic() + 120
        for _ in range(240):  # Ray, Serve and 4 replicas start: bounded wait
            if p.poll() is not None or time.monotonic() > deadline:
                break
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    out = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.5)
        log.seek(0)
        assert out is not None, log.read()[-3000:]
        assert [[r["id"] for r in row] for row in out["results"]] == idx.search_vectors(q, 7)[1].tolist()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=120) == 0  # bounded; a loaded 2-core machine stops Ray slowly
        idx.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        log.close()
        shutil.rmtree(d, ignore_errors=True)
