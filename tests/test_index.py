"""The index store: build, bad inputs, atomic versioned writes, checksums, add/rm, mismatch, readers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from mmretrieve import (
    EncoderMismatchError,
    IndexCorruptedError,
    IndexExistsError,
    IndexLockedError,
    SkippedInputsError,
    add_to_index,
    build_index,
    open_index,
    remove_from_index,
)
from mmretrieve.index.search import coarse
from mmretrieve.query import coarse_strategy
from mmretrieve.store import IndexWriter, Item
from mmretrieve.store import layout as store

DIM = 16
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _items(keys) -> list[Item]:
    return [Item(id=-1, key=str(k), uri=f"vec://{k}") for k in keys]


def _vector_index(path: Path, n: int = 50, factory: str = "Flat", seed: int = 0) -> np.ndarray:
    x = _vectors(n, seed)
    with IndexWriter(path, encoder_info=INFO, factory=factory, create=True) as w:
        w.add(_items(range(n)), x)
    return x


def _search_all(path: Path, q: np.ndarray, k: int = 10):
    idx = open_index(path)
    try:
        return idx.search_vectors(q, k)
    finally:
        idx.close()


# ---- building from real files -----------------------------------------------------------------------
def test_build_with_bad_inputs_indexes_good_and_reports_bad(photo_dir, bad_files, embedded, samples):
    for name, (p, _) in bad_files.items():
        os.replace(p, photo_dir / name)
    (photo_dir / "README.txt").write_text("not media")
    report = build_index("photos", photo_dir, encoder=embedded)
    assert report.added == len(samples)
    assert len(report.skipped) == len(bad_files)
    assert report.ignored == 1
    reasons = {Path(s.uri).name: s.reason for s in report.skipped}
    for name, (_, reason) in bad_files.items():
        assert reason in reasons[name], (name, reasons[name])
    idx = open_index("photos")
    assert len(idx) == len(samples)
    assert idx.manifest["counts"]["skipped"] == len(bad_files)
    assert {Path(s.uri).name for s in idx.meta.skipped()} == set(bad_files)
    assert idx.search(text="a photo of a cat", k=1)[0].key.endswith("chelsea.png")


def test_strict_writes_nothing(photo_dir, bad_files, embedded):
    build_index("photos", photo_dir, encoder=embedded)
    before = open_index("photos").manifest["version"]
    os.replace(bad_files["text.jpg"][0], photo_dir / "text.jpg")
    with pytest.raises(SkippedInputsError, match="text.jpg"):
        add_to_index("photos", photo_dir, encoder=embedded, strict=True)
    assert open_index("photos").manifest["version"] == before


def test_build_refuses_existing_without_overwrite(photo_dir, tmp_path, embedded):
    build_index("photos", photo_dir, encoder=embedded)
    again = build_index("photos", photo_dir, encoder=embedded)  # the same source: a resume that finds it complete
    assert again.up_to_date and again.version == "v0001" and not again.added
    with pytest.raises(IndexExistsError, match="already exists"):
        build_index("photos", photo_dir, encoder=embedded, resume=False)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(IndexExistsError, match="already exists and was built from"):
        build_index("photos", other, encoder=embedded)
    r = build_index("photos", photo_dir, encoder=embedded, overwrite=True)
    assert r.version == "v0002"


def test_manifest_source_with_ids_and_captions(tmp_path, samples, embedded):
    m = tmp_path / "m.jsonl"
    rows = [{"path": s.path, "id": s.id, "caption": s.caption} for s in samples[:5]]
    rows.append({"path": str(tmp_path / "missing.jpg"), "id": "ghost"})
    m.write_text("\n".join(json.dumps(r) for r in rows))
    report = build_index(tmp_path / "idx", m, encoder=embedded)
    assert report.added == 5
    assert [s.reason for s in report.skipped] == ["file not found"]
    idx = open_index(tmp_path / "idx")
    it = idx.get(samples[0].id)
    assert it.caption == samples[0].caption and it.uri == samples[0].path
    dup = tmp_path / "dup.csv"
    dup.write_text(f"path,id\n{samples[0].path},a\n\n\n{samples[1].path},a\n")
    with pytest.raises(ValueError, match="dup.csv:5: duplicate id 'a'"):  # physical line, blank lines counted
        build_index(tmp_path / "idx2", dup, encoder=embedded)


def test_dangling_link_is_reported_and_strict_refuses_it(tmp_path, samples, tiny_clip):
    d = tmp_path / "f"
    d.mkdir()
    (d / "ok.png").write_bytes(Path(samples[0].path).read_bytes())
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    report = build_index(tmp_path / "i", d, encoder=tiny_clip)
    assert report.added == 1 and [(Path(s.uri).name, s.reason) for s in report.skipped] == [("gone.png", "file not found")]
    with pytest.raises(SkippedInputsError):
        build_index(tmp_path / "j", d, encoder=tiny_clip, strict=True)


# ---- save / load, checksums -----------------------------------------------------------------------
def test_save_load_identical_and_mmap(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_SEARCH_DEVICE", "cpu")  # (the GPU scan: test_gpu_search)
    x = _vector_index(tmp_path / "i", 200)
    q = _vectors(7, seed=1)
    D1, I1 = _search_all(tmp_path / "i", q)
    # the same search on an in-memory FAISS index built directly
    import faiss

    ref = faiss.IndexFlatIP(DIM)
    ref.add(x)
    D0, I0 = ref.search(q, 10)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, rtol=0, atol=1e-6)  # few queries: a BLAS scan (flatscan.py), other rounding
    assert np.array_equal(open_index(tmp_path / "i").search_vectors(np.tile(q, (3, 1)), 10)[1][:7], I0)  # FAISS's path
    idx = open_index(tmp_path / "i")
    D2, I2 = idx.search_vectors(q, 10)
    np.testing.assert_array_equal(I2, I1)
    np.testing.assert_array_equal(D2, D1)


def _segment_file(path: Path, name: str = "vectors.npy") -> Path:
    m = json.loads((path / "manifest.json").read_text())
    return path / "segments" / m["segments"][0]["id"] / name


def test_checksum_mismatch_detected(tmp_path):
    _vector_index(tmp_path / "i")
    f = _segment_file(tmp_path / "i")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    # opening is O(segments): every byte is checked by the full verification (open_index(verify=True),
    # `mmretrieve index verify`)
    with pytest.raises(IndexCorruptedError, match="vectors.npy: sha256 does not match"):
        open_index(tmp_path / "i", verify="full")


def test_truncated_index_clear_error(tmp_path):
    _vector_index(tmp_path / "i")
    m = json.loads((tmp_path / "i" / "manifest.json").read_text())
    f = _segment_file(tmp_path / "i")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(IndexCorruptedError, match="vectors.npy: size"):
        open_index(tmp_path / "i")
    # without checksum verification (and with the manifest's size forged to match, its own checksum
    # dropped as in a manifest written before checksums) the file's own header still gives it away: a
    # library error naming the file
    m["segments"][0]["files"]["vectors.npy"]["bytes"] = f.stat().st_size
    m.pop("checksum")
    (tmp_path / "i" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexCorruptedError, match="vectors.npy"):
        open_index(tmp_path / "i", verify="fast")


def test_index_and_metadata_consistency_checked(tmp_path):
    _vector_index(tmp_path / "i", 20)
    db = tmp_path / "i" / "meta.sqlite"
    con = sqlite3.connect(db)
    con.execute("DELETE FROM items WHERE id = 3")
    con.commit()
    con.close()
    with pytest.raises(IndexCorruptedError, match="FAISS holds 20 vectors but the metadata lists 19"):
        open_index(tmp_path / "i", verify="fast")
    # verify=False says what it does: no checks of the stored files at open (as "none"; benchmarks)
    open_index(tmp_path / "i", verify=False).close()
    open_index(tmp_path / "i", verify="none").close()


def test_not_an_index(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not an mmretrieve index"):
        open_index(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="index not found"):
        open_index("no-such-index")


# ---- crashes mid-write ---------------------------------------------------------------------------
STAGES = ["before-index-write", "after-index-write", "after-meta-write", "before-version-rename", "before-manifest",
          "before-manifest-replace"]


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("stage", STAGES)
def test_crash_mid_write_leaves_previous_version(tmp_path, monkeypatch, stage):
    path = tmp_path / "i"
    _vector_index(path, 40)
    q = _vectors(5, seed=9)
    before = _search_all(path, q)
    manifest_before = (path / "manifest.json").read_bytes()

    def hook(s):
        if s == stage:
            raise Crash(s)

    monkeypatch.setattr(store, "_CRASH_HOOK", hook)
    with pytest.raises(Crash):
        with IndexWriter(path, encoder_info=INFO) as w:
            w.add(_items(range(100, 110)), _vectors(10, seed=3))
            w.remove([0, 1, 2])
    monkeypatch.setattr(store, "_CRASH_HOOK", None)
    assert (path / "manifest.json").read_bytes() == manifest_before
    after = _search_all(path, q)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    # the lock was released and the next write cleans strays and succeeds
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add(_items(["new"]), _vectors(1, seed=4))
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    assert open_index(path).manifest["counts"]["items"] == 41


def test_killed_process_mid_write(tmp_path):
    """SIGKILL (no cleanup at all) between writing the index and swapping the manifest."""
    path = tmp_path / "i"
    _vector_index(path, 30)
    q = _vectors(3, seed=5)
    before = _search_all(path, q)
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from pathlib import Path
        from mmretrieve.store import IndexWriter, Item, layout
        layout._CRASH_HOOK = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == "before-manifest-replace" else None
        x = np.random.default_rng(1).standard_normal((5, {DIM})).astype("float32")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        w = IndexWriter(Path({str(path)!r}), encoder_info={INFO!r})
        w.add([Item(id=-1, key=f"k{{i}}", uri="vec://") for i in range(5)], x)
        w.commit()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # a stray new version folder and a temp manifest are left behind, and ignored
    assert any(p.name.startswith(".manifest.json") for p in path.iterdir())
    after = _search_all(path, q)
    np.testing.assert_array_equal(before[1], after[1])
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add(_items(["after-crash"]), _vectors(1, seed=6))
    assert open_index(path).manifest["counts"]["items"] == 31
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


# ---- add / rm ----------------------------------------------------------------------------------------
def test_add_then_rm_keeps_other_ids_and_results(tmp_path):
    path = tmp_path / "i"
    x = _vector_index(path, 60)
    q = x[10:13] * 0.9 + _vectors(3, seed=2) * 0.1
    D0, I0 = _search_all(path, q, k=60)
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add(_items(range(60, 80)), _vectors(20, seed=7))
    idx = open_index(path)
    assert len(idx) == 80
    assert idx.get("5").id == 5 and idx.get("70").id == 70
    removed = [idx.get("70").id, idx.get("3").id, idx.get("61").id]
    remove_from_index(path, ["70", 3, "vec://61"])  # by key, by id, by uri
    idx = open_index(path)
    assert len(idx) == 77
    D1, I1 = idx.search_vectors(q, 77)
    assert not set(removed) & set(I1.ravel().tolist())
    # the original items keep their ids and, among themselves, their order and scores
    for row0, d0, row1, d1 in zip(I0, D0, I1, D1):
        keep0 = [(i, d) for i, d in zip(row0, d0) if i != 3]
        keep1 = [(i, d) for i, d in zip(row1, d1) if i < 60]
        assert keep0 == keep1
    np.testing.assert_array_equal(idx.vectors([5, 10]), x[[5, 10]])
    # re-adding a removed key works (new id) and survives save/load
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add(_items(["3"]), x[3:4])
    idx = open_index(path)
    new_id = idx.get("3").id
    assert new_id not in range(80)
    assert idx.search_vectors(x[3], 1)[1][0, 0] == new_id
    with pytest.raises(KeyError, match="no item 'nope'"):
        remove_from_index(path, ["nope"])


def test_add_follows_manifest_edits_and_drops_items_whose_file_broke(tmp_path, tiny_clip, samples):
    import csv
    import shutil

    d = tmp_path / "m"
    d.mkdir()
    for s in samples[:4]:
        shutil.copyfile(s.path, d / Path(s.path).name)
    names = [Path(s.path).name for s in samples[:4]]

    def manifest(rows):
        with open(d / "m.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "id", "caption"])
            w.writerows(rows)
        return d / "m.csv"

    # keys "1" and "0" on purpose: numbers that are also ids of other items
    rows = [[names[0], "1", "first"], [names[1], "0", "second"], [names[2], "c", "third"], [names[3], "d", "fourth"]]
    build_index("m", manifest(rows), encoder=tiny_clip)
    idx = open_index("m")
    assert idx.get("key:1").id == 0 and idx.get("key:0").id == 1 and idx.get("id:0").key == "1"
    with pytest.raises(KeyError, match="'1' is the key of item 0 .* and the id of item 1 .*write id:1 or key:1"):
        idx.get("1")
    # a caption edit and a key pointed at another file are changes, not "unchanged"
    rows[2][2] = "third, re-captioned"
    rows[3][0] = names[0]
    r = add_to_index("m", manifest(rows))
    assert (r.updated, r.unchanged) == (2, 2)
    idx = open_index("m")
    assert idx.get("c").caption == "third, re-captioned" and idx.get("d").uri == str((d / names[0]).resolve())
    # a file that was indexed and is now broken is reported and no longer searchable
    (d / names[1]).write_bytes(b"not an image any more")
    r = add_to_index("m", manifest(rows))
    assert len(r.skipped) == 1 and r.stale_removed == 1
    idx = open_index("m")
    with pytest.raises(KeyError):
        idx.get("key:0")
    assert len(idx) == 3
    # removing by a bare number that names two different items is refused too; id:/key: say which
    build_index("m2", manifest([[names[0], "1", "a"], [names[2], "0", "b"]]), encoder=tiny_clip)
    with pytest.raises(KeyError, match="is the key of item 1 .* and the id of item 0"):
        remove_from_index("m2", ["0"])
    assert remove_from_index("m2", ["id:0"]) == 1
    idx = open_index("m2")
    assert [it.key for it in idx.meta.iter_items()] == ["0"]
    assert remove_from_index("m2", ["key:0"]) == 1


def test_incremental_add_only_new_or_changed(photo_dir, embedded, samples):
    build_index("photos", photo_dir, encoder=embedded)
    idx = open_index("photos")
    ids_before = {it.key: it.id for it in idx.meta.iter_items()}
    r = add_to_index("photos", photo_dir)
    assert (r.added, r.updated, r.unchanged) == (0, 0, len(samples))
    # change one file, add one file
    f = {p.name: p for p in photo_dir.rglob("*.*")}
    changed = f["coffee.png"]
    changed.write_bytes(f["flower.jpg"].read_bytes())
    (photo_dir / "new_cat.png").write_bytes(f["chelsea.png"].read_bytes())
    r = add_to_index("photos", photo_dir)
    assert (r.added, r.updated, r.unchanged) == (1, 1, len(samples) - 1)
    idx = open_index("photos")
    assert {it.key: it.id for it in idx.meta.iter_items() if it.key in ids_before} == ids_before  # ids stable
    top2 = {h.key for h in idx.search(text="a photo of a cat", k=2)}
    assert top2 == {str(f["chelsea.png"].resolve()), str((photo_dir / "new_cat.png").resolve())}
    coffee_id = ids_before[str(changed.resolve())]
    v = idx.vectors([coffee_id])[0]
    flower = idx.get(str(f["flower.jpg"].resolve())).id
    np.testing.assert_allclose(v, idx.vectors([flower])[0], atol=1e-6)  # re-encoded with the new content


def test_index_rm_sticks_until_include_removed(photo_dir, embedded, samples, capsys):
    """A file ``index rm`` removed is not brought back by the next ``index add`` of its folder (listed
    instead); ``--include-removed`` adds it back and forgets the removal; a changed file is new content."""
    from mmretrieve.cli import main

    build_index("rm", photo_dir, encoder=embedded)
    files = sorted(p for p in photo_dir.rglob("*.*"))
    gone, edited = str(files[0].resolve()), files[1]
    assert remove_from_index("rm", [gone, str(edited)]) == 2
    r = add_to_index("rm", photo_dir)
    assert (r.added, r.unchanged) == (0, len(samples) - 2)
    assert sorted(r.not_readded) == sorted([gone, str(edited.resolve())]) and "2 not re-added" in r.summary()
    assert len(open_index("rm")) == len(samples) - 2
    # the CLI says why, and how to add them back
    assert main(["index", "add", "rm", str(photo_dir)]) == 0
    assert f"{gone}: removed by index rm, not re-added (use --include-removed to add them back)" in capsys.readouterr().out
    # a file changed since its removal is new content: indexed again
    edited.write_bytes(files[2].read_bytes())
    r = add_to_index("rm", photo_dir)
    assert r.added == 1 and r.not_readded == [gone]
    # --include-removed adds the rest back, and the next add has nothing left out
    assert main(["index", "add", "rm", str(photo_dir), "--include-removed"]) == 0
    assert len(open_index("rm")) == len(samples)
    r = add_to_index("rm", photo_dir)
    assert (r.unchanged, r.not_readded) == (len(samples), [])
    # a build from scratch ignores the removals of the index it replaces
    assert remove_from_index("rm", [gone]) == 1
    assert build_index("rm", photo_dir, encoder=embedded, overwrite=True).added == len(samples)
    assert add_to_index("rm", photo_dir).not_readded == []


def test_hnsw_delete_uses_tombstones(tmp_path):
    path = tmp_path / "h"
    x = _vector_index(path, 300, factory="HNSW16")
    remove_from_index(path, ["7", "8"])
    idx = open_index(path)
    assert idx.manifest["counts"]["tombstones"] == 2 and len(idx) == 298
    D, I = idx.search_vectors(x[7], 5)
    assert 7 not in I[0] and 8 not in I[0]
    # replacing a vector in HNSW: the old one is tombstoned, the item gets a new id
    with IndexWriter(path, encoder_info=INFO) as w:
        w.add(_items(["9"]), x[100:101])
    idx = open_index(path)
    assert idx.get("9").id != 9
    assert 9 not in idx.search_vectors(x[9], 5)[1][0]


def test_ivf_delete_keeps_every_other_id_right(tmp_path):
    # IVF's remove_ids does not renumber what stays, which IDMap2's bookkeeping assumes: deleting there
    # made every later search return wrong ids. IVF tombstones instead, and keeps a direct map so stored
    # vectors can be read back (intersection fusion).
    path = tmp_path / "ivf"
    x = _vector_index(path, 200, factory="IVF4,Flat")
    remove_from_index(path, ["3", "150"])
    idx = open_index(path, search_device="cpu")
    assert idx.nprobe == 4 and open_index(path, nprobe=2).nprobe == 2  # default min(nlist, 32), not FAISS's 1
    assert idx.manifest["counts"]["tombstones"] == 2 and len(idx) == 198
    keep = [i for i in range(200) if i not in (3, 150)]
    D, I = idx.search_vectors(x[keep], 1, nprobe=4)
    assert I[:, 0].tolist() == keep  # each vector finds itself
    assert 3 not in idx.search_vectors(x[3], 10, nprobe=4)[1][0]
    np.testing.assert_allclose(idx.vectors([5, 199]), x[[5, 199]], atol=1e-6)
    res = coarse(idx, coarse_strategy("intersection").plan({"image": x[10], "text": x[11]}, 5), nprobe=4)
    assert len(res[0]) == 5 and 3 not in res[0]
    with IndexWriter(path, encoder_info=INFO) as w:  # a changed vector: the old one tombstoned, a new id
        w.add(_items(["20"]), x[100:101])
    idx = open_index(path, search_device="cpu")
    assert idx.get("20").id != 20 and idx.search_vectors(x[20], 3, nprobe=4)[1][0][0] != 20


def test_empty_index_searches_return_nothing(tmp_path):
    for factory in ("Flat", "IVF4,Flat", "HNSW16"):
        path = tmp_path / factory.replace(",", "_")
        with IndexWriter(path, encoder_info=INFO, factory=factory, create=True):
            pass
        idx = open_index(path)
        D, I = idx.search_vectors(_vectors(2), 5)
        assert (I == -1).all()
        ids, scores = coarse(idx, coarse_strategy("intersection").plan({"image": _vectors(1)[0], "text": _vectors(1, 1)[0]}, 5))
        assert len(ids) == 0 and len(scores) == 0


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW16"])
def test_deleted_ids_are_filtered_by_one_selector_per_snapshot(tmp_path, monkeypatch, factory):
    """A profile put 97% of an ANN query after deletions in rebuilding each segment's set of deleted ids:
    the selector is made once per open snapshot, a search's own exclusions on top; numpy exclusions work."""
    import faiss

    path = tmp_path / "i"
    x = _vector_index(path, 200, factory=factory)
    remove_from_index(path, [str(i) for i in range(0, 200, 3)])
    idx = open_index(path, search_device="cpu")
    made = []
    real_batch, real_bitmap = faiss.IDSelectorBatch, faiss.IDSelectorBitmap
    monkeypatch.setattr(faiss, "IDSelectorBatch", lambda ids: made.append(("batch", len(ids))) or real_batch(ids))
    monkeypatch.setattr(faiss, "IDSelectorBitmap", lambda n, bm: made.append(("bitmap", n)) or real_bitmap(n, bm))
    for i in range(1, 40, 3):
        D, I = idx.search_vectors(x[i], 5, nprobe=4, ef_search=64)
        assert I[0, 0] == i and not set(I[0].tolist()) & set(range(0, 200, 3))
    assert made == [("bitmap", 25)]  # the live ids as one bitmap of 200 bits (25 bytes: FAISS takes bytes), made once
    I = idx.search_vectors(x[1], 5, nprobe=4, exclude=np.array([1, 2]))[1][0]
    assert 1 not in I and 2 not in I and made == [("bitmap", 25), ("batch", 2)]
    assert 1 not in idx.search(vector=x[1], k=5, exclude=np.array([1])).ids


def test_ivf_training_and_clear_error(tmp_path):
    _vector_index(tmp_path / "ivf", 400, factory="IVF8,Flat")
    idx = open_index(tmp_path / "ivf")
    assert idx.manifest["faiss"] == "IndexIVFFlat"
    D, I = idx.search_vectors(_vectors(1, seed=3), 5, nprobe=8)
    assert (I >= 0).all()
    with pytest.raises(ValueError, match="could not be trained on 5 vectors"):
        _vector_index(tmp_path / "ivf2", 5, factory="IVF64,Flat")
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        _vector_index(tmp_path / "bad", 5, factory="NotAnIndex")
    # a transform in front would make the segments' lists, graphs and codes another space than the queries'
    for factory in ("PCA16,IVF8,Flat", "OPQ4,IVF8,PQ4", "RR32,HNSW8"):
        with pytest.raises(ValueError, match="starts with a vector transform"):
            _vector_index(tmp_path / "pre", 400, factory=factory)
        assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").rglob("index.faiss"))
    # fast-scan codes are packed in blocks: a search of such segments crashed the process (std::bad_alloc)
    for factory in ("IVF16,PQ16x4fs", "PQ16x4fs", "IVF16,PQ16x4fsr"):
        with pytest.raises(ValueError, match="fast-scan"):
            _vector_index(tmp_path / "fs", 400, factory=factory)


def test_bad_vectors_policy(tmp_path):
    x = _vectors(4)
    x[1] = np.nan
    x[2] = 0
    with pytest.raises(ValueError, match="NaN, infinite or zero"):
        with IndexWriter(tmp_path / "a", encoder_info=INFO, create=True) as w:
            w.add(_items(range(4)), x)
    with IndexWriter(tmp_path / "b", encoder_info=INFO, create=True) as w:
        stored = w.add(_items(range(4)), x, on_bad_vectors="drop")
    assert [it.key for it in stored] == ["0", "3"]
    idx = open_index(tmp_path / "b")
    assert len(idx) == 2 and {s.key for s in idx.meta.skipped()} == {"1", "2"}
    with pytest.raises(ValueError, match=r"expected vectors of shape \(n, 16\)"):
        with IndexWriter(tmp_path / "c", encoder_info=INFO, create=True) as w:
            w.add(_items(range(2)), np.ones((2, 8), np.float32))


# ---- encoders vs index -------------------------------------------------------------------------------
def test_encoder_mismatch_is_refused(photo_dir, embedded, tiny_clip):
    build_index("photos", photo_dir, encoder=embedded)
    with pytest.raises(EncoderMismatchError, match=r"built with encoder 'embedded' \(dim 1000\).*expected dim 1000, got 32"):
        open_index("photos", encoder=tiny_clip)
    with pytest.raises(EncoderMismatchError, match="expected dim 1000, got 32"):
        add_to_index("photos", photo_dir, encoder=tiny_clip)
    from mmretrieve.store import check_encoder_compat

    built = embedded.info.to_dict()
    with pytest.raises(EncoderMismatchError, match="recipe='1'.*recipe='2'"):
        check_encoder_compat(built, {**built, "recipe": "2"}, "x")
    with pytest.raises(EncoderMismatchError, match="'open_clip:ViT-B-32@a'.*'open_clip:ViT-B-32@b'"):
        check_encoder_compat({"name": "open_clip:ViT-B-32@a", "dim": 512}, {"name": "open_clip:ViT-B-32@b", "dim": 512}, "x")


def test_tiny_open_clip_index_with_patches(photo_dir, tiny_clip, samples):
    r = build_index("tc", photo_dir, encoder=tiny_clip, patches={"grid": 2})
    assert r.added == len(samples)
    idx = open_index("tc")
    assert idx.encoder.name == tiny_clip.name  # recreated from the manifest through the registry
    P = idx.patches(idx.meta.all_ids()[:3])
    assert P.shape == (3, 4, tiny_clip.dim)
    ref = tiny_clip.encode_patches([idx.items([i])[i].uri for i in idx.meta.all_ids()[:3]], grid=2)
    np.testing.assert_allclose(P, ref, atol=2e-3)  # fp16 side-store


def test_patch_projection(photo_dir, embedded):
    build_index("p", photo_dir, encoder=embedded, patches={"grid": 4, "dim": 64})
    idx = open_index("p")
    assert idx.manifest["patches"]["projection"] == "patch_proj.npy"
    P = idx.patches(idx.meta.all_ids()[:2])
    assert P.shape == (2, 16, 64)
    np.testing.assert_allclose(np.linalg.norm(P, axis=-1), 1, atol=2e-3)


# ---- readers and writers ------------------------------------------------------------------------------
def test_concurrent_readers_match_serial(tmp_path):
    _vector_index(tmp_path / "i", 500)
    idx = open_index(tmp_path / "i")
    q = _vectors(40, seed=11)
    serial = [idx.search_vectors(q[i], 10)[1] for i in range(40)]
    out = [None] * 40

    def work(lo):
        for i in range(lo, 40, 4):
            out[i] = idx.search_vectors(q[i], 10)[1]

    ts = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for a, b in zip(serial, out):
        np.testing.assert_array_equal(a, b)


def test_single_writer_lock_and_reader_snapshot(tmp_path):
    path = tmp_path / "i"
    x = _vector_index(path, 30)
    reader = open_index(path)
    w = IndexWriter(path, encoder_info=INFO)
    with pytest.raises(IndexLockedError, match="being written by another process"):
        IndexWriter(path, encoder_info=INFO)
    w.remove([0])
    w.commit()
    assert reader.search_vectors(x[0], 1)[1][0, 0] == 0  # the old snapshot still answers
    assert len(reader) == 30
    fresh = reader.reopen()
    assert len(fresh) == 29 and fresh.search_vectors(x[0], 1)[1][0, 0] != 0
    # two writes later the reader's snapshot still answers; its version (and the reopened one's) is kept
    # while a reader holds its lease, beside the retained live and previous ones, and collected once the
    # readers are closed
    for k in ("a", "b"):
        with IndexWriter(path, encoder_info=INFO) as w2:
            w2.add(_items([k]), _vectors(1, seed=ord(k)))
    assert reader.search_vectors(x[0], 1)[1][0, 0] == 0
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("v")) == ["v0001", "v0002", "v0003", "v0004"]
    reader.close()
    fresh.close()
    with IndexWriter(path, encoder_info=INFO) as w3:
        w3.add(_items(["c"]), _vectors(1, seed=99))
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("v")) == ["v0004", "v0005"]


def test_no_pickle_anywhere():
    """A grep-lint: no pickle loads, no torch.load without weights_only=True, no numpy pickles."""
    root = Path(__file__).resolve().parent.parent / "mmretrieve"
    offenders = []
    for f in root.rglob("*.py"):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            s = line.strip()
            # the patterns are assembled so that this file does not match the project's own grep
            banned = ("allow_" + "pickle=True", "pickle." + "load", "weights_only=" + "False")
            if any(b in s for b in banned):
                offenders.append(f"{f}:{n}: {s}")
            if "torch.load(" in s and "weights_only=True" not in s:
                offenders.append(f"{f}:{n}: {s}")
    assert not offenders, offenders


def test_malicious_pickle_refused(tmp_path):
    """A .npy holding a pickled object that would run code is refused by the loaders we use."""
    import pickle

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    p = tmp_path / "evil.npy"
    np.save(p, arr, **{"allow_" "pickle": True})  # writing the hostile file needs pickling, on purpose
    with pytest.raises(ValueError):
        np.load(p, allow_pickle=False)
    import torch

    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        torch.load(pt, weights_only=True)
    assert not sentinel.exists()


def test_query_image_encoding_matches_ingestion(photo_dir, embedded):
    """A JPEG decoded for a query gives the same vector it got at ingestion (same draft decoding)."""
    build_index("photos", photo_dir, encoder=embedded)
    idx = open_index("photos")
    for jpg in sorted(photo_dir.rglob("*.jpg"))[:3]:
        stored = idx.vectors([idx.get(str(jpg.resolve())).id])[0]
        fresh = embedded.encode_images([jpg])[0]
        np.testing.assert_allclose(fresh, stored, atol=1e-5)


def test_missing_ray_is_reported_before_any_model_loads(monkeypatch, tmp_path, samples):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no ray here")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from mmretrieve.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"mmretrieve\[ray\]"):
        build_index("x", samples[0].path, encoder="no-such-encoder", engine="ray")


@pytest.mark.parametrize("gpus,cpus,nodes,asked,want", [
    (2, 16, [16], None, (2, 1.0)),  # one actor per GPU
    (2, 16, [16], 1, (1, 1.0)),
    (2, 16, [16], 3, "has 2 GPU"),  # more actors than GPUs: refused, not silently run on CPUs
    (0, 2, [2], None, (1, 0.0)),  # one per two CPUs
    (0, 2, [2], 8, "leave no CPU"),  # would starve the read and decode tasks (a silent hang in Ray)
    (0, 2, [1, 1], 2, (2, 0.0)),
])
def test_the_encoder_pool_is_sized_to_the_cluster(gpus, cpus, nodes, asked, want):
    """The pool-size rule on the resources a cluster reports (GPUs cannot be had here)."""
    from mmretrieve.errors import UsageError
    from mmretrieve.ingest.ray_engine import _actor_count

    class Cluster:  # what ray.cluster_resources() and ray.nodes() report
        def cluster_resources(self):
            return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": float(c)}} for c in nodes]

    if isinstance(want, str):
        with pytest.raises(UsageError, match=want):
            _actor_count(Cluster(), asked)
    else:
        assert _actor_count(Cluster(), asked) == want


def test_bench_search_runs_against_plain_faiss(capsys):
    """The search benchmark runs end to end on a small size (it broke unnoticed when the index stopped
    being one FAISS object): mmretrieve's path and a FAISS IndexFlatIP over the same vectors."""
    import json as _json

    from mmretrieve.cli import main

    assert main(["bench", "search", "--sizes", "3000", "--queries", "3", "--batch", "8", "--no-gpu", "--json"]) == 0
    row = _json.loads(capsys.readouterr().out)["results"][0]
    assert row["n"] == 3000 and row["single_query_ms_mmretrieve"] > 0 and row["batch_qps_faiss"] > 0


def test_bench_scan_compares_the_flat_scan_with_faiss_knn(capsys):
    """`bench scan` times the hand-written scan, faiss.knn (BLAS threshold default and 1) and IndexFlatIP
    on the same rows in one run, fp32 and fp16, and reports each as a ratio of the scan's time."""
    import json as _json

    from mmretrieve.cli import main

    assert main(["bench", "scan", "--sizes", "2000", "--batches", "1,8", "--thread-counts", "1", "--repeat", "1",
                 "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)["rows"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 8), ("fp16", 1), ("fp16", 8)]
    assert set(rows[0]["ms"]) == {"flatscan", "faiss.knn (blas>=20)", "faiss.knn (blas>=1)", "IndexFlatIP"}
    assert all(r["over_flatscan"]["flatscan"] == 1.0 and min(r["ms"].values()) > 0 for r in rows)


@pytest.mark.parametrize("metric_ip", [True, False])
def test_flat_scan_paths_agree(metric_ip, monkeypatch):
    """The three ways a Flat segment is scanned give the same top-k: few queries (rows x queries product),
    batches (``faiss.knn`` on the rows), batches with masked rows (torch, masking): against FAISS."""
    import faiss

    from mmretrieve.index import flatscan

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((4000, 32), dtype=np.float32)
    ids = np.arange(4000, dtype=np.int64) * 5 + 1
    ref = faiss.IndexFlatIP(32) if metric_ip else faiss.IndexFlatL2(32)
    ref.add(xb)
    scan = flatscan.FlatScan(xb, ids, metric_ip=metric_ip)
    for nq in (1, 3, 100):
        q = rng.standard_normal((nq, 32), dtype=np.float32)
        D0, I0 = ref.search(q, 20)
        D, I = scan.search(q, 20)
        np.testing.assert_array_equal(I, ids[I0])
        np.testing.assert_allclose(D, D0, rtol=1e-4, atol=1e-4)
    q = rng.standard_normal((100, 32), dtype=np.float32)
    monkeypatch.setattr(flatscan, "FAISS_BATCH", 10**9)  # the torch path for the same batch
    D1, I1 = scan.search(q, 20)
    monkeypatch.undo()
    D2, I2 = scan.search(q, 20)
    np.testing.assert_array_equal(I1, I2)
    gone = np.unique(ref.search(q, 3)[1].ravel())  # the 3 best rows of each query, deleted
    D3, I3 = scan.search(q, 20, deleted_rows=gone)
    assert not np.isin(I3, ids[gone]).any()
    np.testing.assert_array_equal(I3[:, :5], np.array([[i for i in row if i not in set(ids[gone])][:5] for row in I2]))
