"""``mmretrieve bench map``: is the page's embeddings map responsive at 100k points?

Data: ``--n`` vectors (default 100,000) of ``--dim`` around 64 clustered Gaussian centres, each item with a
metadata field ``group`` (``g0`` .. ``g7``), written by an ``IndexWriter`` (no encoder). Measured:

- the map (``GET /api/v1/indexes/{name}/map`` over HTTP, a real uvicorn server on 127.0.0.1): its first
  answer (the PCA computed and written to the cache), the next (from memory), one after the memory is
  cleared (from the cache file), and the answer's size;
- ``Index.select`` of a ``map within`` box (4 vertices) and of a 64-vertex lasso (each first, uncached:
  the map read, the points tested, the SQL run), and of the lasso and a metadata clause;
- with ``--chromium PATH`` (and Playwright's Python package): the page in headless Chromium: navigation
  to the map drawn (the map already cached), one map redraw while dragging (the mean over 50 pointer
  moves) and the frame interval with one move per frame (16.7 ms: 60 Hz kept), a filter search to
  its hits shown and highlighted, and a box and a lasso from the mouse's release to the filtered results
  and facets shown.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HELP = "the embeddings map at 100k points: /map computed and cached, map-within filters, the page in Chromium"
NAME = "bench-map"
BOX = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=100_000, help="items (default 100000)")
    p.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    p.add_argument("--chromium", default=None, metavar="PATH",
                   help="a Chromium executable: also time the page with Playwright (default: skipped)")
    p.add_argument("--dir", default=None, help="where the index is written (default: a temp folder, removed)")


def _build(path: Path, n: int, dim: int) -> None:
    from mmretrieve.store import IndexWriter, Item

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    info = {"name": "bench-vectors", "dim": dim, "modalities": ["image"]}
    with IndexWriter(path, encoder_info=info, create=True, auto_compact=False) as w:
        for s in range(0, n, 20_000):
            m = min(20_000, n - s)
            x = centres[rng.integers(0, 64, m)] + 0.4 * rng.standard_normal((m, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}", extra={"group": f"g{i % 8}"}) for i in range(s, s + m)], x)


def lasso(vertices: int = 64) -> list[tuple[float, float]]:
    """A concave star of ``vertices`` points around the map's centre."""
    a = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = np.where(np.arange(vertices) % 2, 0.3, 0.8)
    return [(round(float(x), 3), round(float(y), 3)) for x, y in zip(r * np.cos(a), r * np.sin(a))]


def within(poly) -> str:
    return "map within (" + ", ".join(f"{x} {y}" for x, y in poly) + ")"


@contextmanager
def _server(home: Path):
    import uvicorn

    from mmretrieve.serve import ServeConfig, Service, create_app

    svc = Service(ServeConfig(indexes=[NAME], index_dir=str(home), reload_interval_s=0)).start()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        if not th.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", svc
    finally:
        server.should_exit = True
        th.join(timeout=15)
        svc.close()


def _get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        size = len(r.read())
    return time.perf_counter() - t0, size


def _http_map(base: str) -> dict:
    from mmretrieve.index import embmap

    url = f"{base}/api/v1/indexes/{NAME}/map"
    first, size = _get(url)
    memory, _ = _get(url)
    embmap.clear_cache()
    disk, _ = _get(url)
    return {"first_s": first, "memory_ms": memory * 1e3, "disk_ms": disk * 1e3, "bytes": size}


def _selects(idx) -> dict:
    out = {}
    for label, where in [("box", within(BOX)), ("lasso", within(lasso())),
                         ("lasso_and_group", within(lasso()) + " and group = 'g3'")]:
        t0 = time.perf_counter()
        sel = idx.select(where)
        out[label] = {"ms": (time.perf_counter() - t0) * 1e3, "matches": int(sel.count), "chars": len(where)}
    return out


_DRAWN = "() => Number(document.getElementById('map').dataset.drawn || 0)"
_RESULTS = """(f) => new URLSearchParams(location.search).get('filter') === f
    && /browsing \\d+ matching/.test(document.getElementById('status').textContent)
    && document.querySelectorAll('#col-0 .hit').length > 0"""
_FACETS = """() => { const m = /browsing (\\d+) matching/.exec(document.getElementById('status').textContent);
    return !!m && document.getElementById('facets-info').textContent === m[1] + ' matching'; }"""


def _shown(pg, f: str, t0: float) -> tuple[float, float]:
    """Seconds from ``t0`` to the results of filter ``f`` shown, and to its facets shown."""
    pg.wait_for_function(_RESULTS, arg=f)
    results = time.perf_counter() - t0
    pg.wait_for_function(_FACETS)
    return results, time.perf_counter() - t0


def _drag(pg, points, lasso: bool) -> tuple[float, float]:
    """Drag through ``points`` (map coordinates; a box: from the first to the third), as a box or a lasso;
    seconds from the release to the filtered results shown, and to their facets shown."""
    if lasso:
        pg.click("#map-mode")
    else:
        points = [points[0], points[2]]
    box = pg.locator("#map").bounding_box()
    pad = 6 * box["width"] / 300
    at = [(box["x"] + pad + (x + 1) / 2 * (box["width"] - 2 * pad), box["y"] + pad + (1 - y) / 2 * (box["height"] - 2 * pad))
          for x, y in points]
    pg.mouse.move(*at[0])
    pg.mouse.down()
    for p in at[1:]:
        pg.mouse.move(*p, steps=2)
    before = pg.url
    t0 = time.perf_counter()
    pg.mouse.up()
    pg.wait_for_function("(u) => location.href !== u", arg=before)
    return _shown(pg, pg.evaluate("() => new URLSearchParams(location.search).get('filter')"), t0)


def _redraw(pg) -> tuple[float, float]:
    """While dragging: the mean time of one redraw (the pointer-move handler, 50 moves dispatched at once),
    and the mean frame interval with one move per animation frame (30 frames; 16.7 ms is 60 Hz)."""
    box = pg.locator("#map").bounding_box()
    pg.mouse.move(box["x"] + 20, box["y"] + 20)
    pg.mouse.down()
    ms = pg.evaluate("""async () => { const c = document.getElementById('map'), r = c.getBoundingClientRect();
        const move = (i) => c.dispatchEvent(new PointerEvent('pointermove', { clientX: r.left + 30 + i % 200,
            clientY: r.top + 30 + i % 200, bubbles: true }));
        let t0 = performance.now();
        for (let i = 0; i < 50; i++) move(i);
        const handler = (performance.now() - t0) / 50;
        await new Promise(requestAnimationFrame);
        t0 = performance.now();
        for (let i = 0; i < 30; i++) { move(i); await new Promise(requestAnimationFrame); }
        return [handler, (performance.now() - t0) / 30]; }""")
    pg.mouse.move(box["x"] + 21, box["y"] + 21)
    pg.mouse.up()  # a box under 3 pixels: no filter
    return ms[0], ms[1]


def _page(base: str, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            pg = b.new_page(viewport={"width": 1280, "height": 900})
            pg.set_default_timeout(60_000)
            t0 = time.perf_counter()
            pg.goto(f"{base}/?index={NAME}&k=48")
            pg.wait_for_function(f"() => ({_DRAWN})() > 0")
            load = time.perf_counter() - t0
            redraw = _redraw(pg)
            n = pg.evaluate(_DRAWN)
            t0 = time.perf_counter()
            pg.fill("#filter", "group = 'g5'")
            pg.press("#filter", "Enter")
            pg.wait_for_function(_RESULTS, arg="group = 'g5'")
            pg.wait_for_function(f"(n) => ({_DRAWN})() > n", arg=n)
            search = time.perf_counter() - t0
            pg.goto(f"{base}/?index={NAME}&k=48")
            pg.wait_for_function(f"() => ({_DRAWN})() > 0")
            box = _drag(pg, BOX, False)
            pg.goto(f"{base}/?index={NAME}&k=48")
            pg.wait_for_function(f"() => ({_DRAWN})() > 0")
            lasso_s = _drag(pg, lasso(), True)
        finally:
            b.close()
    return {"load_to_map_s": load, "redraw_ms": redraw[0], "frame_ms": redraw[1], "search_to_highlight_s": search, "box_to_results_s": box[0],
            "box_to_facets_s": box[1], "lasso_to_results_s": lasso_s[0], "lasso_to_facets_s": lasso_s[1]}


def run(args) -> dict:
    from mmretrieve.index import embmap

    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mm-bench-map-"))
    try:
        t0 = time.perf_counter()
        _build(tmp / "indexes" / NAME, args.n, args.dim)
        build = time.perf_counter() - t0
        import os

        os.environ["MMRETRIEVE_CACHE"] = str(tmp / "cache")
        embmap.clear_cache()
        res = {"benchmark": "map", "n": args.n, "dim": args.dim, "build_s": build}
        with _server(tmp / "indexes") as (base, svc):
            res["map"] = _http_map(base)
            res["select"] = _selects(svc.manager.get(NAME).index)
            res["page"] = _page(base, args.chromium) if args.chromium else None
        return res
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


def render(res: dict) -> list[str]:
    m = res["map"]
    out = [f"map of {res['n']} items (dim {res['dim']}; built in {res['build_s']:.1f} s):",
           f"  GET /map: first (PCA computed) {m['first_s']:.2f} s, from memory {m['memory_ms']:.0f} ms, "
           f"from the cache file {m['disk_ms']:.0f} ms; {m['bytes'] / 1e6:.2f} MB"]
    for label, s in res["select"].items():
        out.append(f"  select {label}: {s['ms']:.0f} ms, {s['matches']} matches, a {s['chars']}-character filter")
    pg = res.get("page")
    if pg:
        out += [f"  page: load to map drawn {pg['load_to_map_s']:.2f} s; one redraw while dragging {pg['redraw_ms']:.2f} ms, "
                f"a frame with one move each {pg['frame_ms']:.1f} ms",
                f"  page: filter search to hits highlighted {pg['search_to_highlight_s']:.2f} s; release to filtered "
                f"results (facets): box {pg['box_to_results_s']:.2f} s ({pg['box_to_facets_s']:.2f} s), lasso "
                f"{pg['lasso_to_results_s']:.2f} s ({pg['lasso_to_facets_s']:.2f} s)"]
    else:
        out.append("  page: not timed (give --chromium PATH, with playwright installed)")
    mach = res.get("machine") or {}
    out.append(f"  machine: {mach.get('cpu')}, {mach.get('cores_available')} cores")
    return out
