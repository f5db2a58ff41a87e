"""Hybrid search: the FTS5 table in step with the items across adds, removes, versions, compaction and
old databases; BM25 against FTS5's own ``bm25()`` and a hand computation; reciprocal-rank fusion golden
values; a visually perfect match without text stays on top; hostile FTS syntax is text; ``where=``;
``--fusion hybrid`` on the command line."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest

from mmretrieve import open_index
from mmretrieve.errors import UsageError
from mmretrieve.index.index import Index
from mmretrieve.query import CoarsePlan, Query, hybrid_scores
from mmretrieve.store import IndexWriter, Item, compact_index
from mmretrieve.store.layout import META

DIM = 8
INFO = {"name": "toy", "dim": DIM, "modalities": ["image", "text"]}
CAPTIONS = ["a red dress on a chair", "a blue dress", "red red red shoes", None, "a dog in the park",
            "the red balloon", None, "green dress with red dots"]
EXTRA = [{"license": "cc0"}, {"license": "cc-by", "note": "summer collection"}, {}, {"year": 2020},
         {"license": "cc0"}, {"license": "cc-by"}, {}, {"license": "cc0", "tag": "dress"}]


def _vectors(n=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _build(path, x=None):
    x = _vectors() if x is None else x
    with IndexWriter(path, encoder_info=INFO, create=True) as w:
        w.add([Item(id=-1, key=f"k{i}", uri=f"toy://{i}", caption=c, extra=e)
               for i, (c, e) in enumerate(zip(CAPTIONS, EXTRA))], x)
    return x


def _fts_rows(path):
    conn = sqlite3.connect(path / META)
    try:
        n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        n_docs = conn.execute("SELECT COUNT(*) FROM items_fts_docsize").fetchone()[0]
        conn.execute("INSERT INTO items_fts(items_fts, rank) VALUES('integrity-check', 0)")
        return n_items, n_docs
    finally:
        conn.close()


class _Stub:
    def __init__(self, img=None, txt=None):
        self.img, self.txt = img, txt

    def encode_images(self, images):
        return self.img[None]

    def encode_texts(self, texts):
        return self.txt[None]


# ---- in step with the items --------------------------------------------------------------------------
def test_fts_in_step_across_add_remove_versions_and_compaction(tmp_path):
    path = tmp_path / "i"
    _build(path)
    idx = open_index(path)
    ids, _ = idx.text_search("dress", k=10)
    assert sorted(ids.tolist()) == [0, 1, 7]
    assert idx.text_search("summer", k=5)[0].tolist() == [1]  # string metadata is searched too
    with IndexWriter(path) as w:
        w.remove([1])
        w.add([Item(id=-1, key="new", uri="toy://new", caption="a yellow dress")], _vectors(1, 5))
    new = open_index(path)
    assert sorted(new.text_search("dress", k=10)[0].tolist()) == [0, 7, 8]
    assert sorted(idx.text_search("dress", k=10)[0].tolist()) == [0, 1, 7]  # the old snapshot keeps its view
    assert sorted(open_index(path, version="previous").text_search("dress", k=10)[0].tolist()) == [0, 1, 7]
    assert _fts_rows(path)[0] == _fts_rows(path)[1]
    with pytest.raises(RuntimeError):  # an aborted write leaves no text behind
        with IndexWriter(path) as w:
            w.add([Item(id=-1, key="ghost", uri="toy://g", caption="ghost dress")], _vectors(1, 6))
            raise RuntimeError("boom")
    assert open_index(path).text_search("ghost", k=5)[0].tolist() == []
    compact_index(path, everything=True)
    n_items, n_docs = _fts_rows(path)
    assert n_items == n_docs
    assert sorted(open_index(path).text_search("dress", k=10)[0].tolist()) == [0, 7, 8]


def test_a_database_without_the_table_gets_it_on_first_use(tmp_path):
    path = tmp_path / "old"
    _build(path)
    conn = sqlite3.connect(path / META)
    for t in ("ins", "del", "upd"):
        conn.execute(f"DROP TRIGGER items_fts_{t}")
    conn.execute("DROP TABLE items_fts")
    conn.execute("DROP VIEW items_text")
    conn.commit()
    conn.close()
    idx = open_index(path)
    assert not idx.meta.has_fulltext()
    assert sorted(idx.text_search("dress", k=10)[0].tolist()) == [0, 1, 7]
    assert _fts_rows(path)[0] == _fts_rows(path)[1] == len(CAPTIONS)


# ---- BM25 ------------------------------------------------------------------------------------------------
def _tokens(i):
    words = (CAPTIONS[i] or "").split() + [v for v in EXTRA[i].values() if isinstance(v, str)]
    return [t for w in words for t in w.lower().replace("-", " ").split()]


def test_bm25_matches_fts5_and_a_hand_computation(tmp_path):
    path = tmp_path / "i"
    _build(path)
    idx = open_index(path)
    ids, scores = idx.text_search("red dress", k=10)
    conn = sqlite3.connect(path / META)
    direct = dict(conn.execute("SELECT rowid, bm25(items_fts) FROM items_fts WHERE items_fts MATCH '\"red\" OR \"dress\"'"))
    rid = dict(conn.execute("SELECT id, rid FROM items"))
    np.testing.assert_allclose(scores, [-direct[rid[i]] for i in ids.tolist()], rtol=1e-6)
    docs = [_tokens(i) for i in range(len(CAPTIONS))]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)

    def bm25(doc):
        s = 0.0
        for term in ("red", "dress"):
            df = sum(term in d for d in docs)
            idf = max(math.log((n - df + 0.5) / (df + 0.5)), 1e-6)
            f = doc.count(term)
            s += idf * f * 2.2 / (f + 1.2 * (0.25 + 0.75 * len(doc) / avgdl))
        return s

    hand = {i: bm25(d) for i, d in enumerate(docs) if bm25(d) > 0}
    assert sorted(hand, key=lambda i: (-hand[i], i)) == ids.tolist()
    np.testing.assert_allclose(scores, [hand[i] for i in ids.tolist()], rtol=1e-5)


@pytest.mark.parametrize("text", ['"red', 'NEAR(red dress', 'red*', '-red', 'red AND OR NOT', 'caption:red', "'; DROP"])
def test_hostile_fts_syntax_is_just_text(tmp_path, text):
    path = tmp_path / "i"
    _build(path)
    idx = open_index(path)
    ids, _ = idx.text_search(text, k=10)
    if "red" in text.lower():
        assert set(ids.tolist()) >= {0, 2, 5, 7}
    assert idx.text_search("* - \" (", k=3)[0].tolist() == []
    with pytest.raises(UsageError, match="full-text query"):
        idx.text_search(fts='NEAR(', k=3)
    assert idx.text_search(fts='"red dress"', k=3)[0].tolist() == [0]


def test_text_search_respects_where_and_exclude(tmp_path):
    path = tmp_path / "i"
    _build(path)
    idx = open_index(path)
    assert sorted(idx.text_search("red dress", k=10, where="license = 'cc0'")[0].tolist()) == [0, 7]
    assert idx.text_search("red dress", k=10, exclude=[0, 2, 5, 1])[0].tolist() == [7]


# ---- fusion ----------------------------------------------------------------------------------------------
def test_rrf_and_weighted_golden_values():
    union = np.array([1, 2, 3, 4])
    sims = np.array([0.9, 0.5, 0.1, 0.3])
    s = hybrid_scores([1, 2, 4], [3, 2], [5.0, 1.0], union, sims)
    np.testing.assert_allclose(s, [1 / 61, 1 / 62 + 1 / 62, 1 / 61, 1 / 63])
    s = hybrid_scores([1, 2, 4], [3, 2], [5.0, 1.0], union, sims, k_rrf=0)
    np.testing.assert_allclose(s, [1, 1 / 2 + 1 / 2, 1, 1 / 3])
    w = hybrid_scores([1, 2, 4], [3, 2], [5.0, 1.0], union, sims, mode="weighted", weight=0.25)
    np.testing.assert_allclose(w, [0.75 * 1, 0.75 * 0.5 + 0.25 * 0.2, 0.25 * 1, 0.75 * 0.25])
    with pytest.raises(UsageError):
        hybrid_scores([], [], [], union, sims, mode="max")
    with pytest.raises(UsageError):
        Query(text="x", fusion="hybrid", options={"mode": "max"})


def _corpus_with_fillers(path):
    """The captioned items far from the query's direction (e0), item 3 (no text) on it, 20 fillers
    without text in between."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(CAPTIONS) + 20, DIM)).astype(np.float32) * 0.2
    x[:, 0] = 0.3
    x[[0, 1, 2, 4, 5, 7], 0] = -1.0
    x[3] = np.eye(DIM, dtype=np.float32)[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with IndexWriter(path, encoder_info=INFO, create=True) as w:
        w.add([Item(id=-1, key=f"k{i}", uri=f"toy://{i}", caption=CAPTIONS[i] if i < len(CAPTIONS) else None,
                    extra=EXTRA[i] if i < len(CAPTIONS) else {}) for i in range(len(x))], x)
    return x


def test_a_perfect_visual_match_without_text_stays_on_top(tmp_path):
    path = tmp_path / "i"
    x = _corpus_with_fillers(path)
    idx = open_index(path)
    idx._encoder = _Stub(txt=x[3])  # item 3 has no caption and no string metadata; its vector is the query's
    res = idx.search(text="red dress", fusion="hybrid", k1=6, k=8)
    # rank 1 of the vector list only = rank 1 of the text list only (1/61 each): the vector similarity decides
    assert res.hits[0].id == 3 and res.hits[1].id == idx.text_search("red dress", k=1)[0][0]
    assert res.hits[0].score == pytest.approx(1 / 61) == res.hits[1].score
    weighted = idx.search(text="red dress", fusion="hybrid", mode="weighted", weight=0.3, k1=6, k=3)
    assert weighted.hits[0].id == 3
    assert res.query["fusion"] == "hybrid"
    filtered = idx.search(text="red dress", fusion="hybrid", k=30, where="license = 'cc0'")
    assert {h.id for h in filtered.hits} == {0, 4, 7}


def test_composed_hybrid_searches_the_modification_text(tmp_path):
    path = tmp_path / "i"
    x = _build(path)
    idx = open_index(path)
    idx._encoder = _Stub(img=x[6], txt=x[6])
    comp = idx.search(text="balloon", item="k6", fusion="hybrid", k=3)  # the reference (6) is left out
    assert comp.hits[0].id == 5 and 6 not in [h.id for h in comp.hits]
    assert comp.query["kind"] == "composed" and comp.query["fusion"] == "hybrid"


def test_coarse_runs_the_text_list(tmp_path):
    from mmretrieve.index.search import coarse

    path = tmp_path / "i"
    x = _build(path)
    idx = open_index(path)
    seen = {}

    def merge(union, V, lists):
        seen.update(lists)
        return union, np.zeros(len(union), np.float32)

    ids, _ = coarse(idx, CoarsePlan(x[3][None], 2, merge, text="balloon"))
    assert seen["text"][0].tolist() == [5] and 5 in ids.tolist() and not CoarsePlan(x[:1], 2, merge, text="a").single


def test_cli_fusion_hybrid(tmp_path, capsys, monkeypatch):
    from mmretrieve.cli import main

    path = tmp_path / "i"
    x = _corpus_with_fillers(path)
    monkeypatch.setattr(Index, "encoder", property(lambda self: _Stub(txt=x[3]), lambda self, v: None))
    capsys.readouterr()
    assert main(["search", str(path), "--text", "red dress", "--fusion", "hybrid", "--fusion-options", "k1=6", "-k", "4",
                 "--json",
                 "--search-device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hits"][0]["id"] == 3 and out["query"]["fusion"] == "hybrid"
    assert main(["search", str(path), "--text", "red dress", "--fusion", "hybrid", "--fusion-options",
                 "mode=weighted,weight=0.9", "-k", "2", "--json", "--search-device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["mode"] == "weighted" and out["hits"][0]["caption"] is not None


def test_verify_runs_fts5_integrity_check_and_reports_damage(tmp_path, capsys):
    from mmretrieve.cli import main
    from mmretrieve.errors import IndexCorruptedError
    from mmretrieve.store import verify_index

    path = tmp_path / "idx"
    _build(path)
    assert verify_index(path)["fulltext"] == "ok"
    open_index(path, verify="full").close()
    conn = sqlite3.connect(path / META)
    leaf = conn.execute("SELECT id FROM items_fts_data ORDER BY length(block) DESC LIMIT 1").fetchone()[0]
    conn.execute("UPDATE items_fts_data SET block = substr(block, 1, length(block) / 2) WHERE id = ?", (leaf,))
    conn.commit()
    conn.close()
    assert len(open_index(path, verify="fast").search(vector=_vectors()[0], k=2)) == 2  # vectors still fine
    with pytest.raises(IndexCorruptedError, match="items_fts"):
        verify_index(path)
    with pytest.raises(IndexCorruptedError, match="items_fts"):
        open_index(path, verify="full")
    capsys.readouterr()
    assert main(["index", "verify", str(path)]) != 0
    assert "items_fts" in capsys.readouterr().err
