"""``bench map``: a smoke run at a tiny size through the CLI (the map's timings, the map-within selections'
matches and filter sizes; the page not timed without --chromium)."""

from __future__ import annotations

import json

from mmretrieve.bench import embmap as bench_map
from mmretrieve.store.filters import MAX_LENGTH, parse


def test_bench_map_smoke_json(capsys, tmp_path):
    from mmretrieve.cli import main

    assert main(["bench", "map", "--json", "--n", "600", "--dim", "16", "--dir", str(tmp_path / "work")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "map" and out["n"] == 600 and out["page"] is None
    m = out["map"]
    assert m["first_s"] > 0 and m["memory_ms"] > 0 and m["disk_ms"] > 0 and m["bytes"] > 600 * 6
    s = out["select"]
    assert 0 < s["lasso_and_group"]["matches"] < s["lasso"]["matches"] < 600
    assert all(0 < v["chars"] <= MAX_LENGTH for v in s.values())
    assert "page: not timed" in "\n".join(bench_map.render(out))


def test_the_lasso_is_a_concave_64_vertex_filter_that_parses():
    poly = bench_map.lasso()
    assert len(poly) == 64 and len(parse(bench_map.within(poly)).polygon) == 64
