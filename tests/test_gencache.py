"""The generation cache (issue 20): keys that change with everything that decides a text, LRU bounds,
several writer processes at once, and a damaged file that never stops a search."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from mmretrieve.rerank.gencache import Generation, GenerationCache, cache_key, fingerprint


def test_the_key_changes_with_the_model_the_template_the_inputs_and_the_options():
    base = ("qwen2-vl-2b", "Describe {ref} after: {mod}", [fingerprint(b"img"), fingerprint("red")], {"max_new_tokens": 64})
    k = cache_key(*base)
    assert k == cache_key(base[0], base[1], list(base[2]), {"max_new_tokens": 64})  # stable
    assert cache_key(*base[:3], dict(reversed(list({"a": 1, "b": 2}.items())))) == cache_key(*base[:3], {"a": 1, "b": 2})
    others = [cache_key("http://127.0.0.1:8001/v1|qwen", *base[1:]), cache_key(base[0], base[1] + " ", *base[2:]),
              cache_key(base[0], base[1], base[2][::-1], base[3]), cache_key(*base[:3], {"max_new_tokens": 65})]
    assert len({k, *others}) == 5


def test_round_trip_hits_and_misses(tmp_path):
    c = GenerationCache(tmp_path / "g.sqlite")
    assert c.get("k") is None
    c.put("k", Generation("a red dress with long sleeves", 120, 9, 0.4))
    assert c.get("k") == Generation("a red dress with long sleeves", 120, 9, 0.4)
    c.put("k", Generation("replaced", 1, 1, 0.1))  # a re-put replaces, the byte count stays right
    st = c.stats()
    assert st["entries"] == 1 and st["bytes"] == len("replaced") + 1 and (st["hits"], st["misses"]) == (1, 1)
    c.close()
    assert GenerationCache(tmp_path / "g.sqlite").get("k").text == "replaced"  # on disk


def test_the_cache_stays_within_its_bound_dropping_the_least_recently_used(tmp_path):
    c = GenerationCache(tmp_path / "g.sqlite", max_bytes=10_000)
    for i in range(60):
        c.put(f"k{i:02d}", Generation("x" * 500, 1, 1, 0.0))
        if i >= 1:
            c.get("k00")  # kept warm
    st = c.stats()
    assert st["bytes"] <= 10_000 and st["entries"] < 60
    assert c.get("k00") is not None and c.get("k01") is None  # the cold ones went first
    with sqlite3.connect(tmp_path / "g.sqlite") as con:  # the running total is the truth
        assert con.execute("SELECT SUM(bytes) FROM generations").fetchone()[0] == c.stats()["bytes"]


def _writer(path: str, worker: int, n: int) -> None:
    c = GenerationCache(path)
    for i in range(n):
        c.put(f"w{worker}-{i}", Generation(f"text {worker} {i}", i, i, 0.0))
        assert c.get(f"w{worker}-{i // 2}") is not None
    c.close()


def test_several_processes_write_at_once(tmp_path):
    path = str(tmp_path / "g.sqlite")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    c = GenerationCache(path)
    assert c.stats()["entries"] == 600
    assert all(c.get(f"w{w}-{i}").text == f"text {w} {i}" for w in range(4) for i in range(150))


@pytest.mark.parametrize("damage", [b"", b"not a database at all" * 100])
def test_a_damaged_cache_is_moved_aside_and_started_again(tmp_path, caplog, damage):
    path = tmp_path / "g.sqlite"
    c = GenerationCache(path)
    c.put("k", Generation("t", 1, 1, 0.0))
    c.close()
    path.write_bytes(damage or path.read_bytes()[:100])
    c = GenerationCache(path)  # no exception: a cache never stops a search
    assert c.get("k") is None
    c.put("k2", Generation("t2", 1, 1, 0.0))
    assert c.get("k2").text == "t2"
    assert "unreadable generation cache" in caplog.text and list(tmp_path.glob("g.sqlite.damaged-*"))
