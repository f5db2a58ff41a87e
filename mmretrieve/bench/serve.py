"""``mmretrieve bench serve``: a bounded load on ``mmretrieve serve`` over loopback vs. the same searches
called in-process, so what HTTP adds is a measured ratio.

For each index (the demo index, and N random unit vectors of the embedded encoder's dimension, 1000,
so real text queries run against them), a server is started as its own process on a free 127.0.0.1
port, timed from launch to its first answer and to its first search; then, for each client count,
a fixed number of text searches (different texts, k = 10) is sent over keep-alive connections, one
thread per client, and stopped at a time limit whatever happens. The same searches then run
in-process at the same concurrency, twice: through the serving engine without HTTP (the same
batching: the ratio is the HTTP overhead) and as plain ``Index.search`` calls from threads (what a
Python user writes). Memory: the server's resident set before and after a long run (10,000 requests
by default). Targets: overhead <= 20% at 8 clients, zero errors, no memory growth beyond noise.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HELP = "requests/s and latency of mmretrieve serve over loopback vs. the same searches in-process"

TEXTS = [f"a photo of {w}" for w in (
    "a cat", "a dog", "a red car", "a boat", "an airplane", "a tree", "a house", "a bird", "a horse", "a cup of coffee",
    "a pagoda", "a rocket", "the moon", "a flower", "a bicycle", "a motorcycle", "a taxi", "a clock", "a guitar",
    "a pizza", "a banana", "an orange", "a laptop", "a keyboard", "a mountain", "a lake", "a bridge", "a castle",
    "a train", "a bus", "a tennis ball", "a teapot")]


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="100000", help="random indexes of these sizes, comma-separated (default 100000; '' none)")
    p.add_argument("--demo", default="demo", help="the demo index (name or folder; built aside when missing; '' skips it)")
    p.add_argument("--clients", default="8,32", help="concurrent clients, comma-separated (default 8,32)")
    p.add_argument("--requests", type=int, default=500, help="requests per run (default 500)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of server / engine / plain runs, interleaved; the best of each is kept (default 3)")
    p.add_argument("--memory-requests", type=int, default=10_000,
                   help="requests between the two memory readings, on the first index (default 10000; 0 skips)")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds a run may take before it stops (default 30)")
    p.add_argument("--server-threads", type=int, default=None, help="the server's --threads, FAISS's (default: the cores)")
    p.add_argument("--torch-threads", type=int, default=1, help="the server's --torch-threads (default 1, as the server's)")
    p.add_argument("--no-batching", action="store_true", help="query encodings one by one (the server's --no-batching)")
    p.add_argument("--no-search-batching", action="store_true",
                   help="one index scan per query (the server's --no-search-batching)")
    p.add_argument("--compare-batching", action="store_true",
                   help="also run servers without encode batching and without search batching, interleaved with the rest")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="the server's --batch-window-ms (default 10)")


# ---- indexes ------------------------------------------------------------------------------------------
def _demo_index(name: str, tmp: Path) -> Path:
    """The demo index if it exists, else one built the way ``mmretrieve demo`` builds it."""
    from mmretrieve.ingest import build_index
    from mmretrieve.media.samples import sample_images, sample_videos, write_manifest
    from mmretrieve.store import resolve_index_path

    path = resolve_index_path(name, None)
    if (path / "manifest.json").is_file():
        return path
    gallery = sample_images() + [v for v in sample_videos() if v.id != "carphone_distorted"]
    manifest = write_manifest(gallery, tmp / "demo.csv")
    return Path(build_index(tmp / "demo", manifest, encoder="embedded", patches=True, video={"num_frames": 16}).index_path)


def _random_index(path: Path, n: int) -> Path:
    """N random unit vectors recorded as the embedded encoder's, so the server encodes real text queries."""
    from mmretrieve.encoders import create_encoder
    from mmretrieve.store import IndexWriter, Item

    info = create_encoder("embedded").info.to_dict()
    rng = np.random.default_rng(0)
    w = IndexWriter(path, encoder_info=info, create=True)
    for s in range(0, n, 50_000):
        e = min(n, s + 50_000)
        x = rng.standard_normal((e - s, info["dim"]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        w.add([Item(id=-1, key=f"r{i}", uri=f"vec://{i}") for i in range(s, e)], x)
    w.commit()
    return path


# ---- the server process ---------------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, index: Path, args, log: Path, extra: tuple[str, ...] = ()) -> None:
        from mmretrieve.serve.server import CONFIG_ENV  # noqa: F401  (the serve extra must be installed)

        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mmretrieve", "serve", str(index), "--port", str(self.port), "--no-verify",
               "--reload-interval", "0", "--max-k", "100", "-q"]
        if args.server_threads:
            cmd += ["--threads", str(args.server_threads)]
        cmd += ["--torch-threads", str(args.torch_threads)]
        if args.no_batching:
            cmd.append("--no-batching")
        if args.no_search_batching:
            cmd.append("--no-search-batching")
        cmd += ["--batch-window-ms", str(args.batch_window_ms), *extra]
        env = {**os.environ, "MMRETRIEVE_TOKEN": ""}
        self.name = index.name
        self.log = open(log, "w")  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.startup_s = self._wait_ready(t0, 300)
        t1 = time.perf_counter()
        status, _ = request(http.client.HTTPConnection("127.0.0.1", self.port, timeout=60), self.name, TEXTS[0])
        self.first_query_ms = (time.perf_counter() - t1) * 1000
        if status != 200:
            raise RuntimeError(f"the server answered {status} to the first search (log: {log})")

    def _wait_ready(self, t0: float, limit: float) -> float:
        while time.perf_counter() - t0 < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} (log: {self.log.name})")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start in time")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ---- load -----------------------------------------------------------------------------------------------
def request(conn: http.client.HTTPConnection, name: str, text: str, k: int = 10) -> tuple[int, bytes]:
    body = json.dumps({"text": text, "k": k})
    conn.request("POST", f"/api/v1/indexes/{name}/search", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def _stats(lat: list[float], wall: float, errors: int, stopped: bool) -> dict:
    ms = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"requests": len(lat), "errors": errors, "wall_s": round(wall, 3), "rps": round(len(lat) / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "stopped_by_time_limit": stopped}


def _threads_load(clients: int, n: int, limit: float, make_worker) -> dict:
    """``clients`` threads share a counter of ``n`` requests and stop at ``limit`` seconds."""
    lock = threading.Lock()
    state = {"next": 0, "errors": 0, "stopped": False}
    lat: list[float] = []
    t_end = time.perf_counter() + limit

    def take() -> int | None:
        with lock:
            if state["next"] >= n:
                return None
            if time.perf_counter() > t_end:
                state["stopped"] = True
                return None
            state["next"] += 1
            return state["next"] - 1

    def record(dt: float | None) -> None:
        with lock:
            if dt is None:
                state["errors"] += 1
            else:
                lat.append(dt)

    threads = [threading.Thread(target=make_worker(take, record), daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit + 60)
    return _stats(lat, time.perf_counter() - t0, state["errors"], state["stopped"])


async def _post(reader, writer, head: bytes, body: bytes) -> int:
    """One request on a keep-alive connection; returns the status (the body is read and dropped)."""
    writer.write(head + body)
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.split(b"\r\n")
    length = next(int(x.split(b":", 1)[1]) for x in lines[1:] if x.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(lines[0][9:12])


def http_load(port: int, name: str, clients: int, n: int, limit: float) -> dict:
    """``clients`` keep-alive connections driven by one asyncio loop (a lean client: it shares the
    server's cores, and threads would queue on the GIL and inflate the latencies they measure)."""
    path = f"/api/v1/indexes/{name}/search"
    reqs = []
    for t in TEXTS:
        body = json.dumps({"text": t, "k": 10}).encode()
        reqs.append(((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode(), body))
    lat: list[float] = []
    state = {"next": 0, "errors": 0, "stopped": False}

    async def client(t_end: float):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while state["next"] < n:
                if time.perf_counter() > t_end:
                    state["stopped"] = True
                    return
                i = state["next"]
                state["next"] += 1
                t = time.perf_counter()
                try:
                    status = await _post(reader, writer, *reqs[i % len(reqs)])
                except (OSError, ValueError, StopIteration, asyncio.IncompleteReadError):
                    state["errors"] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    state["errors"] += 1
        finally:
            writer.close()

    async def main():
        t_end = time.perf_counter() + limit
        await asyncio.gather(*(client(t_end) for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    return _stats(lat, time.perf_counter() - t0, state["errors"], state["stopped"])


def plain_load(idx, clients: int, n: int, limit: float) -> dict:
    """``Index.search`` from threads, as a Python program would call it."""
    def make_worker(take, record):
        def work():
            while (i := take()) is not None:
                t = time.perf_counter()
                try:
                    idx.search(text=TEXTS[i % len(TEXTS)], k=10)
                    record(time.perf_counter() - t)
                except Exception:
                    record(None)
        return work

    return _threads_load(clients, n, limit, make_worker)


def engine_load(service, name: str, clients: int, n: int, limit: float) -> dict:
    """The serving engine (batching included) without HTTP: ``clients`` concurrent tasks on one event loop."""
    from mmretrieve.serve.models import SearchRequest

    lat: list[float] = []
    state = {"next": 0, "errors": 0, "stopped": False}

    async def client(t_end: float):
        while state["next"] < n:
            if time.perf_counter() > t_end:
                state["stopped"] = True
                return
            i = state["next"]
            state["next"] += 1
            t = time.perf_counter()
            try:
                await service.search(name, SearchRequest(text=TEXTS[i % len(TEXTS)], k=10))
                lat.append(time.perf_counter() - t)
            except Exception:
                state["errors"] += 1

    async def main():
        t_end = time.perf_counter() + limit
        await asyncio.gather(*(client(t_end) for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    return _stats(lat, time.perf_counter() - t0, state["errors"], state["stopped"])


# ---- the benchmark ----------------------------------------------------------------------------------------
def _with_cpu(fn, server=None):
    """``fn`` with the CPU time it cost per request: this process's (the in-process searches, or the load
    generator) and the server's. CPU time is far less sensitive to a shared machine's load than
    req/s, so the HTTP overhead is also reported as CPU per request."""
    def run() -> dict:
        me0, srv0 = sum(os.times()[:2]), server.cpu_s() if server else 0.0
        res = fn()
        me, srv = sum(os.times()[:2]) - me0, (server.cpu_s() - srv0) if server else 0.0
        n = max(1, res["requests"])
        if server:
            return {**res, "cpu_ms_per_request": round(srv / n * 1000, 3), "client_cpu_ms_per_request": round(me / n * 1000, 3)}
        return {**res, "cpu_ms_per_request": round(me / n * 1000, 3)}
    return run


def _interleaved(servers: dict, svc, idx, name: str, clients: int, n: int, limit: float, rounds: int) -> dict:
    """Rounds of every way, interleaved (a shared machine's load drifts); the best round of each is
    kept (noise only adds time), every round's req/s is reported, and errors of all rounds add up."""
    ways = {w: _with_cpu(lambda s=srv: http_load(s.port, s.name, clients, n, limit), srv) for w, srv in servers.items()}
    ways["engine"] = _with_cpu(lambda: engine_load(svc, name, clients, n, limit))
    ways["plain"] = _with_cpu(lambda: plain_load(idx, clients, n, limit))
    seen: dict[str, list[dict]] = {w: [] for w in ways}
    for _ in range(max(1, rounds)):
        for w, fn in ways.items():
            seen[w].append(fn())
    out: dict = {"clients": clients}
    for w, runs in seen.items():
        best = max(runs, key=lambda r: r["rps"])
        out[w] = {**best, "errors": sum(r["errors"] for r in runs), "rounds_rps": [r["rps"] for r in runs],
                  "cpu_ms_per_request": min(r["cpu_ms_per_request"] for r in runs)}
    s, e, p = out["server"]["rps"], out["engine"]["rps"], out["plain"]["rps"]
    out["overhead_vs_engine"] = round(e / s - 1, 3) if s else None
    out["overhead_vs_plain"] = round(p / s - 1, 3) if s else None
    out["cpu_overhead_vs_engine"] = round(out["server"]["cpu_ms_per_request"] / out["engine"]["cpu_ms_per_request"] - 1, 3)
    return out


def _bench_index(label: str, path: Path, args, clients: list[int], enc, tmp: Path, memory: bool) -> dict:
    from mmretrieve.serve import ServeConfig, Service

    n, limit = int(args.requests), float(args.time_limit)
    server = ServerProcess(path, args, tmp / f"{label}.log")
    servers = {"server": server}
    try:
        if args.compare_batching:
            servers["server_no_encode_batching"] = ServerProcess(path, args, tmp / f"{label}-ne.log", ("--no-batching",))
            servers["server_no_search_batching"] = ServerProcess(path, args, tmp / f"{label}-ns.log",
                                                                 ("--no-search-batching",))
        for srv in servers.values():
            http_load(srv.port, srv.name, 8, 100, limit)  # warm-up
        svc = Service(ServeConfig(indexes=[str(path)], verify=False, reload_interval_s=0, max_k=100,
                                  batching=not args.no_batching, batch_searches=not args.no_search_batching,
                                  batch_window_ms=args.batch_window_ms),
                      encoders={"embedded": enc}).start()
        idx = svc.manager.get(path.name).index
        try:
            runs = [_interleaved(servers, svc, idx, path.name, c, n, limit, int(args.rounds)) for c in clients]
        finally:
            svc.close()
        mem = None
        if memory and args.memory_requests:
            before = server.rss_mb()
            m = http_load(server.port, server.name, 8, int(args.memory_requests), max(limit, 900.0))
            after = server.rss_mb()
            mem = {"requests": m["requests"], "errors": m["errors"], "rss_before_mb": round(before, 1),
                   "rss_after_mb": round(after, 1), "growth_mb": round(after - before, 1), "rps": m["rps"]}
        return {"index": label, "items": len(idx), "dim": idx.dim, "startup_s": round(server.startup_s, 2),
                "first_query_ms": round(server.first_query_ms, 1), "runs": runs, "memory": mem}
    finally:
        for srv in servers.values():
            srv.close()


def run(args) -> dict:
    import torch

    from mmretrieve.encoders import create_encoder
    from mmretrieve.runtime import set_threads

    threads = set_threads(args.server_threads)  # in-process runs use the server's thread counts
    torch.set_num_threads(int(args.torch_threads))
    load0 = [round(x, 2) for x in os.getloadavg()]  # a shared machine: say how busy it was
    clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-serve-"))
    try:
        indexes = [("demo", _demo_index(args.demo, tmp))] if args.demo else []
        indexes += [(f"random-{n}", _random_index(tmp / f"random-{n}", n)) for n in sizes]
        enc = create_encoder("embedded")
        rows = [_bench_index(label, path, args, clients, enc, tmp, memory=(j == 0))
                for j, (label, path) in enumerate(indexes)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "serve", "threads": threads, "batching": not args.no_batching,
            "search_batching": not args.no_search_batching, "torch_threads": int(args.torch_threads),
            "requests": int(args.requests),
            "rounds": int(args.rounds), "clients": clients, "results": rows, "loadavg_before": load0,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def render(res: dict) -> list[str]:
    out = [f"serve benchmark: text searches (k=10) over loopback, {res['requests']} per run, best of {res['rounds']} "
           f"interleaved rounds, threads {res['threads']} (torch {res.get('torch_threads')}), encode batching {'on' if res['batching'] else 'off'}, "
           f"search batching {'on' if res['search_batching'] else 'off'}; "
           f"load average {res['loadavg_before'][0]:.1f} before, {res['loadavg_after'][0]:.1f} after"]
    for row in res["results"]:
        out.append(f"  {row['index']} ({row['items']:,} items, d={row['dim']}): server up in {row['startup_s']:.1f} s, "
                   f"first search {row['first_query_ms']:.0f} ms")
        names = {"server": "HTTP server", "server_no_encode_batching": "HTTP, no encode batching",
                 "server_no_search_batching": "HTTP, no search batching", "engine": "in-process engine",
                 "plain": "in-process Index.search"}
        for r in row["runs"]:
            for kind, what in names.items():
                if kind not in r:
                    continue
                s = r[kind]
                out.append(f"    {r['clients']:>3} clients, {what:24s} {s['rps']:8.1f} req/s  p50 {s['p50_ms']:7.2f}  "
                           f"p95 {s['p95_ms']:7.2f}  p99 {s['p99_ms']:7.2f} ms  errors {s['errors']}  "
                           f"cpu {s['cpu_ms_per_request']:.2f} ms/req  rounds "
                           + "/".join(f"{x:.0f}" for x in s["rounds_rps"])
                           + ("  (stopped by the time limit)" if s["stopped_by_time_limit"] else ""))
            ov = r["overhead_vs_engine"]
            out.append(f"    {'':3s}          HTTP overhead vs the engine: {ov * 100:+.1f}% time per request, "
                       f"{r['cpu_overhead_vs_engine'] * 100:+.1f}% server CPU per request (the load generator: "
                       f"{r['server']['client_cpu_ms_per_request']:.2f} ms/req more); vs plain Index.search: "
                       f"{r['overhead_vs_plain'] * 100:+.1f}% time per request")
        m = row["memory"]
        if m:
            out.append(f"    memory: {m['rss_before_mb']:.0f} MB -> {m['rss_after_mb']:.0f} MB after {m['requests']:,} requests "
                       f"({m['growth_mb']:+.1f} MB; {m['errors']} errors, {m['rps']:.0f} req/s)")
    out.append("  targets: HTTP overhead <= 20% at 8 clients; 0 errors; no memory growth beyond noise")
    return out


__all__ = ["run", "render", "add_arguments", "HELP"]
