"""The segment store: snapshots that last, equivalence with one Flat index, compaction, import, fp16,
versions and rollback, verification, the previous format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import faiss
import numpy as np
import pytest

import mmretrieve as mr
from mmretrieve import IndexCorruptedError, open_index
from mmretrieve.store import IndexWriter, Item, compact_index, rollback_index, verify_index
from mmretrieve.store.compaction import merge_segments, plan, write_amplification_bound

DIM = 16
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
PATCHES = {"grid": 2, "dim": 8, "native_dim": 8, "dtype": "float16", "projection": None}


def _vectors(n: int, seed: int = 0, d: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _items(keys, kind="image") -> list[Item]:
    return [Item(id=-1, key=str(k), uri=f"vec://{k}", kind=kind) for k in keys]


def _patches(n: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).standard_normal((n, 4, 8)).astype(np.float32)
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


def _write(path, keys, x, *, seed=0, create=False, **kw):
    w = IndexWriter(path, encoder_info=INFO, create=create, **kw)
    stored = w.add(_items(keys), x, _patches(len(keys), seed) if w.patch_cfg else None)
    w.commit()
    return stored


def test_snapshot_survives_many_writes_and_a_compaction(tmp_path):
    path = tmp_path / "i"
    x = _vectors(60)
    w = IndexWriter(path, encoder_info=INFO, create=True, patches=PATCHES)
    w.add(_items(range(50)), x[:50], _patches(50, 1))
    frames = _vectors(6, seed=7)
    w.add(_items(["clip"], kind="video"), x[50:51], _patches(1, 2), frames=[(frames, np.arange(6, dtype=np.float32))])
    w.commit()
    reader = open_index(path)
    q = _vectors(4, seed=3)
    before = reader.search_vectors(q, 10)
    p_before, f_before = reader.patches([0, 7, 50]), reader.frames([50])[0]
    for j in range(12):  # adds, replacements and removals, then everything merged into one segment
        w = IndexWriter(path, encoder_info=INFO)
        w.add(_items([f"new{j}", str(j)]), _vectors(2, seed=100 + j), _patches(2, 100 + j))
        if j % 3 == 0:
            w.remove([w.meta.item_by_key(str(20 + j)).id])
        w.commit()
    compact_index(path, everything=True)
    live = open_index(path)
    assert len(live.manifest["segments"]) == 1 and live.manifest["counts"]["tombstones"] == 0
    after = reader.search_vectors(q, 10)  # the old reader: same answers, same side-stores
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(reader.patches([0, 7, 50]), p_before)
    np.testing.assert_array_equal(reader.frames([50])[0][0], f_before[0])
    assert len(live) == 50 + 1 + 12 - 4
    np.testing.assert_allclose(live.frames([50])[0][0], f_before[0])  # compaction carried the frames over
    reader.close()


@pytest.mark.parametrize("segment_rows", [1, 7, 1000])
def test_any_segment_count_gives_the_top_k_of_one_flat_index(tmp_path, segment_rows):
    x = _vectors(300, seed=1)
    path = tmp_path / "i"
    w = IndexWriter(path, encoder_info=INFO, create=True, segment_rows=segment_rows, auto_compact=False)
    w.add(_items(range(300)), x)
    w.commit()
    w = IndexWriter(path, encoder_info=INFO, auto_compact=False)
    w.remove(list(range(0, 300, 7)))
    w.commit()
    idx = open_index(path)
    assert len(idx.manifest["segments"]) == -(-300 // segment_rows)
    live = np.array([i for i in range(300) if i % 7])
    ref = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    ref.add_with_ids(x[live], live)
    q = _vectors(9, seed=2)
    for nq in (1, 9):  # the single-query path and the batch path
        D0, I0 = ref.search(q[:nq], 25)
        D1, I1 = idx.search_vectors(q[:nq], 25)
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_allclose(D1, D0, atol=1e-5)


def test_tiered_policy_bounds_segments_and_rewrites(tmp_path):
    path = tmp_path / "i"
    _write(path, range(1000), _vectors(1000), create=True)
    for j in range(25):
        _write(path, [f"a{j}_{i}" for i in range(10)], _vectors(10, seed=j + 5))
    m = open_index(path).manifest
    tiers = {}
    for e in m["segments"]:
        tiers.setdefault(int(np.floor(np.log10(e["rows"]))), []).append(e["rows"])
    assert all(len(v) < 10 for v in tiers.values()), tiers
    assert m["counts"]["items"] == 1250 and not plan(m["segments"])
    assert write_amplification_bound(10**6) == 7


def test_a_merge_returns_its_entry_and_leaves_the_session_untouched(tmp_path):
    """Compaction works on explicit inputs (the folder, the session's database, the index's fields): it
    writes the merged segment and its metadata rows and returns the segment's entry; the session's
    segments change only when the writer puts the entry in. A merged folder no version lists is
    collected by the next writer."""
    path = tmp_path / "i"
    with IndexWriter(path, encoder_info=INFO, create=True, segment_rows=10, auto_compact=False) as w:
        w.add(_items(range(30)), _vectors(30))
    with IndexWriter(path, auto_compact=False) as w:
        w.remove([0])
    w = IndexWriter(path, auto_compact=False)
    before = [dict(e) for e in w.segments]
    entry = merge_segments(w.path, w.meta, w.segments[:2], "s000099", version=w.version, manifest=w.manifest)
    assert (entry["id"], entry["rows"], entry["deleted"], entry["kind"]) == ("s000099", 19, 0, "flat")
    assert w.segments == before and "s000099" not in w.view.segments
    assert sorted(r[2] for r in w.meta.rows_of("s000099")) == list(range(19))
    assert (path / "segments" / "s000099").is_dir()
    w.abort()
    IndexWriter(path).abort()  # opening a writer collects what a crashed session left
    assert not (path / "segments" / "s000099").exists()
    assert open_index(path).manifest["counts"]["items"] == 29


def test_fp16_vectors_keep_the_top_k_scores_within_1e_3(tmp_path):
    x, q = _vectors(2000, seed=4, d=64), _vectors(5, seed=5, d=64)
    info = {**INFO, "dim": 64}
    for dt in ("float32", "float16"):
        with IndexWriter(tmp_path / dt, encoder_info=info, create=True, vector_dtype=dt) as w:
            w.add(_items(range(2000)), x)
    a, b = open_index(tmp_path / "float32"), open_index(tmp_path / "float16")
    assert b.manifest["vector_dtype"] == "float16" and not b.exact_vectors()
    assert b.info()["bytes"] < 0.6 * a.info()["bytes"]
    Da, Ia = a.search_vectors(q, 10)
    Db, Ib = b.search_vectors(q, 10)
    assert np.abs(Da - Db).max() < 1e-3
    assert (Ia == Ib).mean() > 0.9  # near-ties may swap
    with pytest.raises(mr.UsageError, match="fp16 vectors are offered for Flat"):
        IndexWriter(tmp_path / "x", encoder_info=info, create=True, vector_dtype="float16", factory="HNSW16")


def test_a_write_that_changes_nothing_publishes_nothing(tmp_path, photo_dir, tiny_clip):
    mr.build_index("p", photo_dir, encoder=tiny_clip)
    before = open_index("p").version
    r = mr.add_to_index("p", photo_dir)
    assert r.added == r.updated == 0 and open_index("p").version == before
    w = IndexWriter(open_index("p").path)
    assert w.commit()["version"] == before


def test_versions_and_rollback(tmp_path):
    path = tmp_path / "i"
    _write(path, range(20), _vectors(20), create=True, retain=3)
    _write(path, ["bad1", "bad2"], _vectors(2, seed=9))
    idx = open_index(path)
    assert [v["version"] for v in mr.index_versions(path)] == ["v0001", "v0002"] and idx.version == "v0002"
    assert len(open_index(path, version="previous")) == 20
    m = rollback_index(path)
    assert m["version"] == "v0003" and m["operation"] == "rollback to v0001"
    fresh = open_index(path)
    assert len(fresh) == 20 and "bad1" not in {it.key for it in fresh.meta.iter_items()}
    np.testing.assert_array_equal(fresh.search_vectors(_vectors(3, 1), 5)[1],
                                  open_index(path, version="v0001").search_vectors(_vectors(3, 1), 5)[1])
    _write(path, ["after"], _vectors(1, seed=11))  # life goes on after a rollback, ids stay unique
    last = open_index(path)
    assert len(last) == 21 and last.get("after").id not in {it.id for it in fresh.meta.iter_items()}
    with pytest.raises(mr.VersionNotFoundError, match="does not keep version v0001"):
        open_index(path, version="v0001")


def test_verify_catches_a_flipped_byte_in_any_file(tmp_path):
    path = tmp_path / "i"
    _write(path, range(30), _vectors(30), create=True, patches=PATCHES)
    w = IndexWriter(path, encoder_info=INFO)
    w.remove([3, 4])
    w.commit()
    assert verify_index(path)["ok"]
    m = json.loads((path / "manifest.json").read_text())
    files = [path / "segments" / e["id"] / f for e in m["segments"] for f in [*e["files"], e["deletions"]] if f]
    assert len(files) >= 4
    for f in files:
        data = f.read_bytes()
        bad = bytearray(data)
        bad[-1] ^= 0x01  # the last byte: data, not header
        f.write_bytes(bytes(bad))
        with pytest.raises(IndexCorruptedError, match=f"{f.name}: sha256 does not match"):
            verify_index(path)
        f.write_bytes(data)
    db = path / "meta.sqlite"  # a flipped byte inside a row's stored text
    subprocess.run([sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(db)!r}).execute('PRAGMA wal_checkpoint(TRUNCATE)')"],
                   check=True)
    data = db.read_bytes()
    pos = data.index(b"vec://17")
    db.write_bytes(data[:pos] + b"vec://X7" + data[pos + 8 :])
    with pytest.raises(IndexCorruptedError, match=r"meta.sqlite: .*(checksum|integrity)"):
        verify_index(path)


def test_open_racing_a_commit_loop_never_reports_corruption(tmp_path):
    path = tmp_path / "i"
    _write(path, range(200), _vectors(200), create=True)
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from mmretrieve.store import IndexWriter, Item
        x = np.random.default_rng(0).standard_normal((5, {DIM})).astype("float32")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for j in range(40):
            w = IndexWriter(Path({str(path)!r}), encoder_info={INFO!r})
            w.add([Item(id=-1, key=f"w{{j}}_{{i}}", uri="vec://") for i in range(5)], x)
            if j % 4 == 0:
                w.remove([w.meta.item_by_key(str(j)).id])
            w.commit()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    opened, deadline = 0, time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline and opened < 400:
            with open_index(path) as idx:  # raises IndexCorruptedError if a commit is seen half-way
                D, I = idx.search_vectors(_vectors(1, seed=opened), 5)
                assert (I >= 0).all() and len(idx.items(I[0].tolist())) == 5
            opened += 1
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0 and opened > 5
    assert len(open_index(path)) == 200 + 200 - 10


def test_import_clip_retrieval_layout_and_plain_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "clip-out"
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    x = _vectors(25, seed=3)
    for shard, (s, e) in enumerate([(0, 15), (15, 25)]):  # two shards, as clip-retrieval writes them
        np.save(out / "img_emb" / f"img_emb_{shard}.npy", x[s:e].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"/data/img{i}.jpg" for i in range(s, e)],
                                 "caption": [f"caption {i}" for i in range(s, e)]}), out / "metadata" / f"metadata_{shard}.parquet")
    r = mr.import_embeddings("cr", out, encoder="open_clip:ViT-B-32@laion2b_s34b_b79k")
    assert (r.added, r.scanned) == (25, 25)
    idx = open_index("cr")
    assert idx.manifest["encoder"] == {**idx.manifest["encoder"], "name": "open_clip:ViT-B-32@laion2b_s34b_b79k", "dim": DIM,
                                       "imported": True}
    hit = idx.search(vector=x[17], k=1)[0]
    assert hit.key == "/data/img17.jpg" and hit.caption == "caption 17" and hit.score == pytest.approx(1, abs=1e-3)
    # a plain .npy with its keys, appended; a parquet with a vector column; bad rows
    np.save(tmp_path / "more.npy", _vectors(3, seed=8))
    (tmp_path / "more.keys.txt").write_text("m0\nm1\nm2\n")
    assert mr.import_embeddings("cr", tmp_path / "more.npy").added == 3
    pq.write_table(pa.table({"key": ["p0", "p1"], "embedding": [list(v * 2) for v in _vectors(2, seed=9)]}), tmp_path / "p.parquet")
    with pytest.raises(mr.BadVectorsError, match="not L2-normalised.*--normalize"):
        mr.import_embeddings("cr", tmp_path / "p.parquet")
    assert mr.import_embeddings("cr", tmp_path / "p.parquet", normalize=True).added == 2
    bad = _vectors(3, seed=10)
    bad[1] = np.nan
    with pytest.raises(mr.BadVectorsError, match="1 vector.*NaN.*'b1'"):
        mr.add_vectors("cr", bad, keys=["b0", "b1", "b2"])
    r = mr.add_vectors("cr", bad, keys=["b0", "b1", "b2"], on_bad_vectors="drop")
    assert r.added == 2 and [s.key for s in r.skipped] == ["b1"]
    with pytest.raises(mr.BadVectorsError, match=r"expected vectors of shape \(n, 16\)"):
        mr.add_vectors("cr", _vectors(2, d=8), keys=["w0", "w1"])
    with pytest.raises(mr.UsageError, match="needs the encoder that made them"):
        mr.add_vectors(tmp_path / "new", _vectors(2), keys=["a", "b"])
    assert len(open_index("cr")) == 25 + 3 + 2 + 2


def test_hnsw_with_most_items_deleted_still_returns_k(tmp_path):
    path = tmp_path / "h"
    x = _vectors(400, seed=6)
    with IndexWriter(path, encoder_info=INFO, factory="HNSW16", create=True, auto_compact=False) as w:
        w.add(_items(range(400)), x)
    w = IndexWriter(path, encoder_info=INFO, auto_compact=False)
    w.remove(list(range(0, 400)) [: 360])  # 90% deleted
    w.commit()
    idx = open_index(path)
    assert len(idx) == 40
    for q in _vectors(10, seed=12):
        D, I = idx.search_vectors(q, 20)
        assert (I >= 360).all() and len(set(I[0].tolist())) == 20


def test_ivf_segments_share_one_trained_template(tmp_path):
    path = tmp_path / "ivf"
    x = _vectors(600, seed=13)
    with IndexWriter(path, encoder_info=INFO, factory="IVF8,Flat", create=True) as w:
        w.add(_items(range(400)), x[:400])
    for j in range(3):
        _write(path, range(400 + 50 * j, 450 + 50 * j), x[400 + 50 * j : 450 + 50 * j])
    idx = open_index(path, nprobe=8)
    assert len(idx.manifest["segments"]) == 4 and (path / "template.faiss").is_file()
    D, I = idx.search_vectors(x[[10, 420, 540]], 1)
    assert I[:, 0].tolist() == [10, 420, 540]
    compact_index(path, everything=True)
    idx = open_index(path, nprobe=8)
    assert len(idx.manifest["segments"]) == 1 and idx.search_vectors(x[[10, 420, 540]], 1)[1][:, 0].tolist() == [10, 420, 540]


def test_previous_format_is_refused_with_how_to_rebuild(tmp_path):
    old = tmp_path / "old"
    (old / "v0001").mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"format": "mmretrieve-index", "format_version": 1, "version": "v0001"}))
    with pytest.raises(IndexCorruptedError, match=r"format version 1 .* Rebuild it from its source with `mmretrieve index build old SOURCE --overwrite`"):
        open_index(old)


def test_manifest_errors_name_the_file_and_overwrite_rebuilds_a_damaged_index(tmp_path, photo_dir, tiny_clip):
    path = tmp_path / "i"
    mr.build_index(path, photo_dir, encoder=tiny_clip)
    (path / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(IndexCorruptedError, match=rf"{path / 'manifest.json'}: unreadable manifest \(not UTF-8"):
        open_index(path)
    with pytest.raises(IndexCorruptedError, match="manifest.json"):
        mr.add_to_index(path, photo_dir)
    r = mr.build_index(path, photo_dir, encoder=tiny_clip, overwrite=True)
    assert r.version == "v0001" and len(open_index(path)) == r.added > 0
    (path / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    for f in path.glob("meta.sqlite-*"):
        f.unlink()
    with pytest.raises(IndexCorruptedError, match="meta.sqlite"):
        open_index(path)
    assert mr.build_index(path, photo_dir, encoder=tiny_clip, overwrite=True).added == r.added


def test_strict_build_leaves_nothing_behind(tmp_path, photo_dir, bad_files, tiny_clip):
    shutil.copy(bad_files["text.jpg"][0], photo_dir / "text.jpg")
    with pytest.raises(mr.SkippedInputsError):
        mr.build_index(tmp_path / "strict", photo_dir, encoder=tiny_clip, strict=True)
    assert not (tmp_path / "strict").exists()
