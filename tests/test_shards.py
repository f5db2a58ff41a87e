"""Webdataset and parquet inputs: fixtures written in the test from the packaged photos (img2dataset's
layout), with a corrupt member, a sample without an image and a truncated tar; items, captions and
vectors checked against a build of the same photos from a folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmretrieve.errors import InputError, SourceNotFoundError
from mmretrieve.index import open_index
from mmretrieve.ingest import add_to_index, build_index
from mmretrieve.media.images import load_image
from mmretrieve.media.shards import expand_braces, is_shard_source, iter_webdataset, resolve_shards
from mmretrieve.testing.shards import truncate, write_parquet, write_tar, write_webdataset


def _items(name):
    idx = open_index(name)
    items = sorted(idx.meta.iter_items(), key=lambda it: it.key)
    return idx, items


def _vectors_by_caption(name):
    idx, items = _items(name)
    vecs = idx.vectors([it.id for it in items])
    return {it.caption: v for it, v in zip(items, vecs)}


@pytest.fixture()
def folder_ref(tmp_path, samples, tiny_clip):
    """The photos built from a folder, with a manifest carrying the captions: the reference vectors."""
    rows = [{"path": s.path, "id": s.id, "caption": s.caption} for s in samples]
    m = tmp_path / "photos.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows))
    build_index("folder", m, encoder=tiny_clip)
    return _vectors_by_caption("folder")


def test_webdataset_shards_with_bad_samples(tmp_path, samples, tiny_clip, folder_ref):
    photos = list(samples[:18])
    bad = [("broken.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg", "a corrupt member")]
    shards = write_webdataset(photos[:6] + bad + photos[6:], tmp_path / "wds", per_shard=7)
    with tarfile.open(shards[1], "a") as tf:  # a sample with a caption and no image
        info = tarfile.TarInfo("999999999.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"lost"))
    truncate(shards[-1], 0.6)  # the last shard was cut short mid-member

    before = set(os.listdir(tmp_path))
    report = build_index("wds", str(tmp_path / "wds" / "{00000..00002}.tar"), encoder=tiny_clip)
    assert set(os.listdir(tmp_path)) == before  # streamed: nothing unpacked beside the shards

    reasons = {s.uri: s.reason for s in report.skipped}
    assert "corrupt image" in reasons[f"{shards[0]}#000000006.jpg"]
    assert "cut short" in reasons[f"{shards[-1]}#000000017"]  # the sample the cut is in; 16 before it is whole
    assert any("no image in the sample" in r for r in reasons.values())
    assert any(u == str(shards[-1]) and "truncated or corrupt tar" in r for u, r in reasons.items())
    idx, items = _items("wds")
    assert "000000016" in {i.key for i in items}
    assert report.added == len(items) > 12
    assert report.scanned == report.added + len(report.skipped)
    # keys and captions from the samples' json / txt, metadata kept without img2dataset's bookkeeping
    it = next(i for i in items if i.key == "000000000")
    assert it.caption == photos[0].caption and it.extra["url"].endswith("000000000.png") and "status" not in it.extra
    assert it.uri == f"{shards[0]}#000000000{Path(photos[0].path).suffix}"
    # the same vectors as the photos read from files (same bytes, same decoder)
    for i in items:
        np.testing.assert_allclose(idx.vectors([i.id])[0], folder_ref[i.caption], atol=1e-6)
    # a hit can be opened again (search results, rerankers, thumbnails): read at its offset in the tar
    im = load_image(it.uri)
    assert im.size == Image.open(photos[0].path).size
    hits = idx.search(image=it.uri, k=1)
    assert hits[0].key == "000000000"


def test_parquet_bytes_paths_and_bad_rows(tmp_path, samples, tiny_clip, folder_ref):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = write_parquet(samples[:10], tmp_path / "pq", per_file=5)
    # Hugging Face's image struct, a row without an image, a path relative to the file
    rel = tmp_path / "pq" / "imgs"
    rel.mkdir()
    shutil.copyfile(samples[10].path, rel / Path(samples[10].path).name)
    pq.write_table(pa.table({"key": ["hf", "empty"], "caption": [samples[11].caption, "nothing"],
                             "image": [{"bytes": Path(samples[11].path).read_bytes(), "path": None}, None]}),
                   tmp_path / "pq" / "00002.parquet")
    pq.write_table(pa.table({"id": ["rel"], "text": [samples[10].caption],
                             "image_path": [f"imgs/{Path(samples[10].path).name}"]}), tmp_path / "pq" / "00003.parquet")
    (tmp_path / "pq" / "00004.parquet").write_bytes(b"PAR1 not really")
    report = build_index("pq", tmp_path / "pq", encoder=tiny_clip)
    reasons = {s.key: s.reason for s in report.skipped}
    assert "no image bytes and no image path" in reasons["empty"]
    assert any("not a readable parquet file" in r for r in reasons.values())
    idx, items = _items("pq")
    keys = {i.key for i in items}
    assert {"hf", "rel", "000000000", "000000009"} <= keys and len(items) == 12
    for i in items:
        np.testing.assert_allclose(idx.vectors([i.id])[0], folder_ref[i.caption], atol=1e-6)
    row = next(i for i in items if i.key == "000000007")
    assert row.uri == f"{files[1]}#2" and load_image(row.uri).size == Image.open(samples[7].path).size
    assert next(i for i in items if i.key == "rel").uri == str((rel / Path(samples[10].path).name).resolve())


def test_parquet_without_an_image_column_names_the_file(tmp_path, tiny_clip):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"], "url": ["https://example.org/a.jpg"]}), tmp_path / "meta.parquet")
    with pytest.raises(InputError, match="meta.parquet: no image column"):
        build_index("x", tmp_path / "meta.parquet", encoder=tiny_clip)


def test_shard_patterns_and_folders(tmp_path, samples):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    shards = write_webdataset(samples[:4], tmp_path / "d", per_shard=2)
    (tmp_path / "d" / "00000.parquet").write_bytes(b"img2dataset metadata, not a shard")
    (tmp_path / "d" / "00000_stats.json").write_text("{}")
    assert resolve_shards(tmp_path / "d") == [p.resolve() for p in shards]  # the tars, not the metadata
    assert is_shard_source(tmp_path / "d") and is_shard_source(str(tmp_path / "d" / "{00000..00001}.tar"))
    photos = tmp_path / "photos[2024]"  # a folder of images with a stray tar stays a folder
    photos.mkdir()
    shutil.copyfile(samples[0].path, photos / Path(samples[0].path).name)
    shutil.copyfile(shards[0], photos / "backup.tar")
    assert not is_shard_source(photos)
    with pytest.raises(SourceNotFoundError, match="1 shard"):
        resolve_shards(str(tmp_path / "d" / "{00000..00002}.tar"))


def test_missing_shard_is_reported_before_the_model_loads(tmp_path, samples):
    write_webdataset(samples[:2], tmp_path / "d", per_shard=1)
    with pytest.raises(SourceNotFoundError, match=r"4 shard\(s\) of .* not found, e.g. .*00002.tar"):
        build_index("x", str(tmp_path / "d" / "{00000..00005}.tar"), encoder="no-such-encoder")


def test_compressed_tars_are_refused_naming_the_fix(tmp_path, samples):
    """A gzip / bzip2 / xz tar (whatever its name) could only be read back by decompressing from its start
    on every thumbnail: it is refused at build time with the command that unpacks it, and a member uri of
    one is never streamed."""
    import bz2
    import gzip

    shards = write_webdataset(samples[:3], tmp_path / "d", per_shard=3)
    raw = shards[0].read_bytes()
    for name, packed, cmd in (("d.tar.gz", gzip.compress(raw), "gunzip"), ("gz.tar", gzip.compress(raw), "gunzip"),
                              ("b.tar", bz2.compress(raw), "bunzip2")):
        comp = tmp_path / name
        comp.write_bytes(packed)
        got = list(iter_webdataset(comp))
        assert len(got) == 1 and not hasattr(got[0], "data")
        assert "compressed" in got[0].reason and cmd in got[0].reason and "plain .tar" in got[0].reason
        from mmretrieve.errors import BadImageError

        with pytest.raises(BadImageError, match="compressed"):
            load_image(f"{comp}#000000001{Path(samples[1].path).suffix}")
    assert [s.key for s in iter_webdataset(shards[0])] == ["000000000", "000000001", "000000002"]
    from mmretrieve.errors import BadImageError

    with pytest.raises(BadImageError, match="no member"):
        load_image(f"{shards[0]}#nope.jpg")


def test_add_from_shards_encodes_only_new_samples(tmp_path, samples, tiny_clip):
    shards = write_webdataset(samples[:12], tmp_path / "all", per_shard=4)
    (tmp_path / "d").mkdir()
    for p in shards[:2]:
        shutil.copy2(p, tmp_path / "d")
    build_index("wds", tmp_path / "d", encoder=tiny_clip)
    shutil.copy2(shards[2], tmp_path / "d")  # a new shard
    r = add_to_index("wds", tmp_path / "d")
    assert (r.added, r.updated, r.unchanged) == (4, 0, 8)
    _, items = _items("wds")
    assert len(items) == 12


def _tar_of(path: Path, samples: list[tuple[str, Path]]) -> Path:
    """A webdataset shard whose samples are ``(key, photo)``: keys may repeat."""
    return write_tar(path, [m for key, photo in samples for m in ((f"{key}{Path(photo).suffix}", Path(photo).read_bytes()),
                                                                  (f"{key}.txt", f"{key} from {path.name}".encode()))])


def _interrupted_build(monkeypatch, path, source, encoder, *, at_add: int) -> None:
    """A build (batches of 2) interrupted at its ``at_add``-th write of a batch, what was committed kept."""
    from mmretrieve.store.writer import IndexWriter

    real, calls = IndexWriter.add, [0]

    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] == at_add:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(IndexWriter, "add", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(path, source, encoder=encoder, batch_size=2)
    monkeypatch.setattr(IndexWriter, "add", real)


def test_a_key_met_again_is_skipped_and_the_first_sample_kept(tmp_path, samples, tiny_clip, monkeypatch):
    """Keys repeat within a shard, within one batch and across shards: the first sample keeps the key,
    the others are skipped with the reason (keyed by their own uri, so they never remove the first);
    the same index whatever the batch size, and when the build is interrupted and resumed."""
    d = tmp_path / "wds"
    d.mkdir()
    ph = [s.path for s in samples]
    s0 = _tar_of(d / "00000.tar", [("a", ph[0]), ("b", ph[1]), ("a", ph[2]), ("c", ph[3])])
    s1 = _tar_of(d / "00001.tar", [("b", ph[4]), ("d", ph[5])])

    def state(name):
        idx, items = _items(name)
        rows = {it.key: (it.uri, it.caption) for it in items}
        skips = sorted((s.key, s.reason) for s in idx.meta.skipped())
        vecs = {it.key: v for it, v in zip(items, idx.vectors([it.id for it in items]))}
        idx.close()
        return rows, skips, vecs

    r = build_index(tmp_path / "one", d, encoder=tiny_clip, batch_size=4)  # a, b, a, c: a repeat inside a batch
    assert (r.added, len(r.skipped)) == (4, 2)
    rows, skips, vecs = state(tmp_path / "one")
    assert rows == {"a": (f"{s0}#a{Path(ph[0]).suffix}", "a from 00000.tar"), "b": (f"{s0}#b{Path(ph[1]).suffix}", "b from 00000.tar"),
                    "c": (f"{s0}#c{Path(ph[3]).suffix}", "c from 00000.tar"), "d": (f"{s1}#d{Path(ph[5]).suffix}", "d from 00001.tar")}
    assert [k for k, _ in skips] == [f"{s0}#a{Path(ph[2]).suffix}", f"{s1}#b{Path(ph[4]).suffix}"]
    assert all("duplicate key" in why for _, why in skips)
    build_index(tmp_path / "two", d, encoder=tiny_clip, batch_size=1)
    got = state(tmp_path / "two")
    assert got[:2] == (rows, skips)

    # interrupted once the first shard is committed, then the same command: b's repeat in shard 1 is
    # still a repeat of a key committed by the first run
    _interrupted_build(monkeypatch, tmp_path / "resumed", d, tiny_clip, at_add=3)  # a, b | c | d: in the second shard
    r = build_index(tmp_path / "resumed", d, encoder=tiny_clip, batch_size=2)
    assert r.units_resumed == 1
    got = state(tmp_path / "resumed")
    assert got[:2] == (rows, skips)
    for k, v in got[2].items():
        np.testing.assert_allclose(v, vecs[k], atol=1e-6)


def test_a_pattern_of_a_billion_shards_is_refused_at_once():
    with pytest.raises(InputError, match="names 1000000000 shards"):
        expand_braces("shards/{000000000..999999999}.tar")
    with pytest.raises(InputError, match="names more shards than the 1000000"):  # stopped as it passes the cap
        resolve_shards("shards/{0..999}-{0..999}-{0..999}.tar")
    nested = "({{0..9}," + ",".join("abcdefghijklmnopqrstuvwxyz") + "})"
    with pytest.raises(InputError, match="names more shards than"):  # nested groups count too
        expand_braces(nested * 5)
    assert expand_braces("{a,{b,c}}d{1,2}") == ["ad1", "ad2", "bd1", "bd2", "cd1", "cd2"]  # as a shell expands it


def test_hostile_tar_members(tmp_path, samples, tiny_clip, monkeypatch):
    """Links are never followed (a symlink to /etc/passwd, a hard link), directories and `../` names are
    only names (nothing is extracted), and a sample with a member too large is skipped whole."""
    from mmretrieve.media import shards as sh

    monkeypatch.setattr(sh, "MAX_MEMBER_BYTES", 4096)
    small = [s.path for s in samples if Path(s.path).stat().st_size <= 4096]
    if not small:  # a photo small enough to stay under the cap
        im = Image.new("RGB", (32, 24), (200, 30, 30))
        p = tmp_path / "small.png"
        im.save(p)
        small = [str(p)]
    photo = Path(small[0]).read_bytes()
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w") as tf:
        def add(name, data=b"", **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)

        add("passwd.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("dir", type=tarfile.DIRTYPE)
        add("ok.png", photo)
        add("hard.png", type=tarfile.LNKTYPE, linkname="ok.png")
        add("../../escape.png", photo)
        add("big.png", photo)
        add("big.json", b"{" + b" " * 5000 + b"}")  # over the cap: the whole sample goes
    r = build_index(tmp_path / "i", path, encoder=tiny_clip)
    idx, items = _items(tmp_path / "i")
    assert sorted(it.key for it in items) == ["../../escape", "ok"]
    reasons = {s.key: s.reason for s in idx.meta.skipped()}
    assert list(reasons) == ["big"] and "big.json is 5002 bytes" in reasons["big"]
    assert r.added == 2 and not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()
    with pytest.raises(FileNotFoundError, match="no member"):
        sh.read_member(f"{path}#passwd.jpg")  # a link is not a member to read
    assert sh.read_member(f"{path}#../../escape.png") == photo
    idx.close()


def test_a_broken_sample_with_a_kept_key_does_not_remove_it(tmp_path, samples, tiny_clip, monkeypatch):
    """A corrupt sample in a later shard with the key of a good one: the good one stays, interrupted or
    not; and `index add` of the unchanged shards keeps the same sample for each key, again and again."""
    d = tmp_path / "wds"
    d.mkdir()
    ph = [s.path for s in samples]
    _tar_of(d / "00000.tar", [("a", ph[0]), ("b", ph[1])])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _tar_of(d / "00001.tar", [("a", bad), ("c", ph[2])])
    _tar_of(d / "00002.tar", [("b", ph[3]), ("d", ph[4])])

    def state(name):
        idx, items = _items(name)
        out = ({it.key: it.uri for it in items}, sorted((s.key, s.reason[:20]) for s in idx.meta.skipped()))
        idx.close()
        return out

    r = build_index(tmp_path / "one", d, encoder=tiny_clip, batch_size=2)
    want = state(tmp_path / "one")
    assert sorted(want[0]) == ["a", "b", "c", "d"] and want[0]["a"].startswith(str(d / "00000.tar"))
    assert r.stale_removed == 0 and len(want[1]) == 2
    _interrupted_build(monkeypatch, tmp_path / "resumed", d, tiny_clip, at_add=3)  # a, b | c | (the third shard)
    assert build_index(tmp_path / "resumed", d, encoder=tiny_clip, batch_size=2).units_resumed == 2
    assert state(tmp_path / "resumed") == want
    for _ in range(2):  # nothing changed: nothing moves
        r = add_to_index(tmp_path / "one", d, encoder=tiny_clip)
        assert (r.added, r.updated, r.stale_removed) == (0, 0, 0)
        assert state(tmp_path / "one") == want


def test_parquet_cells_of_the_wrong_type_and_corrupt_pages(tmp_path, samples, tiny_clip):
    import pyarrow as pa
    import pyarrow.parquet as pq

    photo = Path(samples[0].path).read_bytes()
    d = tmp_path / "pq"
    d.mkdir()
    # an image column of strings and of huge integers: refused per row, never bytes(10**11)
    pq.write_table(pa.table({"key": ["s"], "image": ["not bytes"]}), d / "a.parquet")
    pq.write_table(pa.table({"key": ["n"], "bytes": [10**11]}), d / "b.parquet")
    pq.write_table(pa.table({"key": ["p"], "path": [12345]}), d / "c.parquet")
    pq.write_table(pa.table({"key": ["ok", "null"], "image": [photo, None]}), d / "d.parquet")
    good = d / "e.parquet"
    pq.write_table(pa.table({"key": [f"e{i}" for i in range(40)], "image": [photo] * 40}), good, row_group_size=10,
                   compression="zstd")
    col = pq.ParquetFile(good).metadata.row_group(1).column(1)  # the second row group's image pages
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    raw = bytearray(good.read_bytes())
    for k in range(start, start + 64):  # a page header overwritten
        raw[k] ^= 0xFF
    good.write_bytes(bytes(raw))
    r = build_index(tmp_path / "i", d, encoder=tiny_clip)
    reasons = {s.key: s.reason for s in r.skipped}
    assert "holds str, not image bytes" in reasons["s"] and "holds int, not image bytes" in reasons["n"]
    assert "holds int, not a path" in reasons["p"] and "no image" in reasons["null"]
    assert any("corrupt parquet data in rows 10-19" in why for why in reasons.values()), reasons
    idx, items = _items(tmp_path / "i")
    keys = {it.key for it in items}
    assert keys == {"ok"} | {f"e{i}" for i in range(40) if not 10 <= i < 20}  # the damaged row group only is lost
    idx.close()
    assert build_index(tmp_path / "i", d, encoder=tiny_clip).up_to_date  # the next run completes, not fails again


def test_members_read_back_are_the_ones_indexed(tmp_path, samples, tiny_clip):
    """A member name added twice (`tar -r`): the first, as the build reads; a `#` in a member's name;
    members other than image, caption and metadata are not read."""
    from mmretrieve.media.shards import iter_webdataset, read_member

    ph = [Path(s.path) for s in samples[:3]]
    t = tmp_path / "twice.tar"
    _tar_of(t, [("a", ph[0]), ("x#1", ph[1])])
    with tarfile.open(t, "a") as tf:  # appended later under the same name
        info = tarfile.TarInfo(f"a{ph[0].suffix}")
        data = ph[2].read_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        npy = tarfile.TarInfo("a.npy")  # a large member nobody asked for
        npy.size = 3 << 20
        tf.addfile(npy, io.BytesIO(b"\0" * npy.size))
    got = [s for s in iter_webdataset(t) if getattr(s, "data", None)]
    first = got[0]
    assert first.key == "a" and first.data == ph[0].read_bytes()
    assert read_member(first.uri) == ph[0].read_bytes()  # the same bytes as indexed
    hashed = next(s for s in got if s.key == "x#1")
    assert read_member(hashed.uri) == ph[1].read_bytes()
    assert all("npy" not in str(s.extra) for s in got)
    r = build_index(tmp_path / "i", t, encoder=tiny_clip)
    idx, items = _items(tmp_path / "i")
    for it in items:
        assert load_image(it.uri).size == (it.width, it.height)
    idx.close()
    assert r.added == 2
