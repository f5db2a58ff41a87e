"""``bench filter``: a smoke run at a tiny size through the CLI (the output's fields, recall 1.0 on Flat at
every selectivity with matches, the targets line), and the anchor's note when LanceDB is not given."""

from __future__ import annotations

import json

from mmretrieve.bench import filter as bench_filter

SELS = [0.001, 0.01, 0.1, 0.5, 1.0]


def test_bench_filter_smoke_json(capsys, tmp_path):
    from mmretrieve.cli import main

    assert main(["bench", "filter", "--json", "--sizes", "3000", "--dim", "32", "--queries", "8",
                 "--selectivities", ",".join(map(str, SELS)), "--factory", "IVF16,Flat", "--breadth", "4",
                 "--dir", str(tmp_path / "work")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "filter" and out["dim"] == 32 and out["selectivities"] == SELS
    assert out["machine"]["cpu"] is not None and out["lancedb_python"] is None
    (size,) = out["sizes"]
    assert size["n"] == 3000 and size["lancedb"] is None and set(size["build_s"]) == {"Flat", "IVF16,Flat"}
    rows = size["rows"]
    assert [(r["factory"], r["selectivity"]) for r in rows] == [(f, s) for f in ("Flat", "IVF16,Flat") for s in SELS]
    for r in rows:
        assert r["where"] == f"bucket < {round(r['selectivity'] * 10000)}"
        assert r["unfiltered_ms"] > 0 and r["filtered_ms"] > 0 and r["select_ms"] >= 0
        assert abs(r["ratio"] - r["filtered_ms"] / r["unfiltered_ms"]) < 1e-9
        assert 0 <= r["matches"] <= 3000 and isinstance(r["exact_path"], bool)
        if r["factory"] == "Flat" and r["matches"]:
            assert r["recall"] == 1.0 and r["unfiltered_recall"] == 1.0
    full = [r for r in rows if r["selectivity"] == 1.0]
    assert all(r["matches"] == 3000 and not r["exact_path"] for r in full)
    t = out["targets"]
    assert t["flat_recall_min"] == 1.0 and t["recall_met"] is True
    assert t["ratio_at_10pct"] > 0 and t["ratio_met"] in (True, False)
    assert set(t["ratio_at_10pct_by_factory"]) == {"Flat", "IVF16,Flat"}


def test_bench_filter_render_notes_the_missing_anchor():
    row = {"factory": "Flat", "breadth": {}, "selectivity": 0.1, "where": "bucket < 1000", "matches": 10,
           "exact_path": True, "select_ms": 1.0, "unfiltered_ms": 1.0, "filtered_ms": 1.5, "ratio": 1.5,
           "recall": 1.0, "unfiltered_recall": 1.0}
    res = {"dim": 8, "queries": 2, "threads": 1, "sizes": [{"n": 100, "build_s": {"Flat": 0.1}, "rows": [row],
                                                             "lancedb": None}],
           "targets": bench_filter._targets([{"rows": [row]}])}
    text = "\n".join(bench_filter.render(res))
    assert "LanceDB anchor: not run (give --lancedb-python" in text
    assert "Flat x1.50 (missed)" in text and "min 1.000 (met)" in text
