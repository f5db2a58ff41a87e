"""Reading items back through the service, tried the hostile way (issue 17, items 2, 3, 6, 7, 8): the media
and thumbnail routes serve only what was indexed, as an image or video type sniffed from its bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
from fastapi.testclient import TestClient  # noqa: E402

from mmretrieve.ingest import build_index  # noqa: E402
from mmretrieve.serve import ServeConfig, Service, create_app  # noqa: E402
from mmretrieve.testing.shards import truncate, write_webdataset  # noqa: E402

SECRET = "root:x:0:0:this is the secret file\n"


@pytest.fixture()
def gallery(tmp_path, samples, embedded):
    """A folder of photos (one JPEG named `.html`), a webdataset shard, both indexed; a 'secret' file."""
    src = tmp_path / "src"
    src.mkdir()
    jpg = next(s for s in samples if s.path.endswith(".jpg"))
    shutil.copyfile(jpg.path, src / "evil.html")
    shutil.copyfile(samples[0].path, src / ("a" + Path(samples[0].path).suffix))
    shutil.copyfile(samples[1].path, src / ("b" + Path(samples[1].path).suffix))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id,caption\n" + "".join(f"{p},{p.stem},x\n" for p in sorted(src.iterdir())))
    home = tmp_path / "indexes"
    build_index("files", manifest, encoder=embedded, index_dir=home)
    tars = write_webdataset(samples[2:4], tmp_path / "wds", per_shard=2)
    build_index("wds", tars[0], encoder=embedded, index_dir=home)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    svc = Service(ServeConfig(indexes=["files", "wds"], index_dir=str(home), reload_interval_s=0),
                  encoders={"embedded": embedded}).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            yield c, svc, src, tars[0], secret
    finally:
        svc.close()


def _item(svc, index: str, key: str):
    return svc.manager.get(index).index.get(f"key:{key}")


def _urls(index: str, item_id: int) -> tuple[str, str]:
    base = f"/api/v1/indexes/{index}/items/{item_id}"
    return base + "/media", base + "/thumbnail"


def _refused(r, status: int = 410) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert b"secret" not in r.content and str(Path("/")) + "tmp" not in r.text  # no bytes, no server path


def test_a_jpeg_named_html_is_served_as_the_image_it_is(gallery):
    c, svc, *_ = gallery
    media, thumb = _urls("files", _item(svc, "files", "evil").id)
    r = c.get(media)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == "sandbox"
    assert r.headers["content-disposition"].startswith("inline;")
    t = c.get(thumb)
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert t.headers["content-security-policy"] == "sandbox" and t.headers["x-content-type-options"] == "nosniff"
    page = c.get("/")  # the page keeps its own policy
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_a_file_that_is_not_an_image_or_video_is_never_served(gallery):
    c, svc, src, *_ = gallery
    it = _item(svc, "files", "b")
    p = Path(it.uri)
    html = b"<html><script>alert(document.cookie)</script></html>".ljust(it.size, b" ")[: it.size]
    st = p.stat()
    p.write_bytes(html)  # same size and mtime: the fingerprint holds, the bytes are not an image
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = c.get(_urls("files", it.id)[0])
    assert r.status_code == 404 and "not an image or a video" in r.json()["error"]["message"]
    assert b"<script>" not in r.content


@pytest.mark.parametrize("how", ["link to a secret", "link to a copy with the same size and mtime", "rewritten",
                                 "touched", "folder replaced by a link"])
def test_an_indexed_file_changed_since_is_gone_not_served(gallery, how, tmp_path):
    c, svc, src, _, secret = gallery
    it = _item(svc, "files", "a")
    p = Path(it.uri)
    if how == "link to a secret":
        p.unlink()
        p.symlink_to(secret)
    elif how == "link to a copy with the same size and mtime":
        copy = tmp_path / "copy"
        shutil.copy2(p, copy)
        p.unlink()
        p.symlink_to(copy)
    elif how == "rewritten":
        p.write_bytes(secret.read_bytes())
    elif how == "touched":
        os.utime(p, (it.mtime + 5, it.mtime + 5))
    else:
        moved = tmp_path / "moved"
        src.rename(moved)
        src.symlink_to(moved)
    media, thumb = _urls("files", it.id)
    _refused(c.get(media))
    _refused(c.get(thumb))
    assert "changed since it was indexed" in c.get(media).json()["error"]["message"] or how.startswith(("link", "folder"))


def test_a_file_planted_under_a_member_name_is_not_read(gallery):
    """A symlink named like `<shard>.tar#<member>` next to the shard: the uri names a member, so the
    member is read from the shard and the planted file never is."""
    c, svc, _, shard, secret = gallery
    items = list(svc.manager.get("wds").index.items([0, 1]).values())
    for it in items:
        planted = Path(it.uri)
        assert not planted.exists()
        planted.symlink_to(secret)
        r = c.get(_urls("wds", it.id)[0])
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
        assert r.content != secret.read_bytes() and len(r.content) == it.size


def test_a_shard_replaced_by_a_link_is_gone(gallery):
    c, svc, _, shard, secret = gallery
    it = next(iter(svc.manager.get("wds").index.items([0]).values()))
    keep = shard.with_suffix(".kept")
    shard.rename(keep)
    shard.symlink_to(keep)  # the same bytes, size and mtime, reached through a link
    _refused(c.get(_urls("wds", it.id)[0]))


def test_byte_ranges(gallery):
    c, svc, *_ = gallery
    it = _item(svc, "files", "a")
    media = _urls("files", it.id)[0]
    whole = c.get(media).content
    r = c.get(media, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == whole[10:20] and r.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    r = c.get(media, headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == whole[-5:]
    assert c.get(media, headers={"Range": f"bytes={len(whole)}-"}).status_code == 416


def test_large_files_are_served_from_the_checked_descriptor(gallery, monkeypatch):
    from mmretrieve.media import readback

    c, svc, *_ = gallery
    it = _item(svc, "files", "a")
    whole = Path(it.uri).read_bytes()
    real = readback.open_indexed
    monkeypatch.setattr(readback, "open_indexed", lambda item: real(item, in_memory_bytes=0))
    media = _urls("files", it.id)[0]
    r = c.get(media)
    assert r.status_code == 200 and r.content == whole
    r = c.get(media, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == whole[100:]
    assert not [f for f in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{f}") == it.uri]  # closed


def test_members_before_the_cut_of_a_truncated_tar_read_back(tmp_path, samples, embedded):
    tars = write_webdataset(samples[:6], tmp_path / "wds", per_shard=6)
    truncate(tars[0], 0.6)
    home = tmp_path / "indexes"
    report = build_index("cut", tars[0], encoder=embedded, index_dir=home)
    assert report.added >= 1 and report.skipped
    svc = Service(ServeConfig(indexes=["cut"], index_dir=str(home), reload_interval_s=0), encoders={"embedded": embedded}).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            idx = svc.manager.get("cut").index
            items = list(idx.items(list(range(report.added))).values())
            assert len(items) == report.added
            with tarfile.open(fileobj=open(tars[0], "rb"), mode="r|") as tf:  # noqa: SIM115
                first = tf.next()
                first_bytes = tf.extractfile(first).read()
            for it in items:
                media, thumb = _urls("cut", it.id)
                r = c.get(media)
                assert r.status_code == 200 and len(r.content) == it.size, r.text[:200]
                assert c.get(thumb).status_code == 200
            assert any(c.get(_urls("cut", it.id)[0]).content == first_bytes for it in items)
    finally:
        svc.close()
    from mmretrieve.media.images import load_image  # `--image shard#member` reads back too

    assert all(load_image(it.uri).size == (it.width, it.height) for it in items)


PARQUET_BOMB_WRITE = r"""
import sys, pyarrow as pa, pyarrow.parquet as pq
big = int(sys.argv[2])
t = pa.table({"key": ["a", "bomb", "c"], "jpg": pa.array([b"\xff\xd8small", bytes(big), b"\xff\xd8small"], pa.binary())})
pq.write_table(t, sys.argv[1], compression="zstd", row_group_size=1)
"""
PARQUET_BOMB_READ = r"""
import pathlib, resource, sys
import pyarrow.compute, pyarrow.parquet
from mmretrieve.media.shards import iter_parquet
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print([(s.key, getattr(s, "reason", None)) for s in iter_parquet(pathlib.Path(sys.argv[1]))])
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_a_parquet_cell_bomb_is_refused_from_the_metadata(tmp_path):
    """A 600 MB cell (compressed to a few KB): its row group is refused from the column chunk's metadata,
    before any data is read, naming the fix; the rows around it are indexed; the read's memory does not
    grow by the cell (before: by ~4 cells, 2.4 GB)."""
    from mmretrieve.media.shards import MAX_GROUP_IMAGE_BYTES

    path, big = str(tmp_path / "bomb.parquet"), 600 << 20
    assert big > MAX_GROUP_IMAGE_BYTES
    w = subprocess.run([sys.executable, "-c", PARQUET_BOMB_WRITE, path, str(big)], capture_output=True, text=True, timeout=120)
    assert w.returncode == 0, w.stderr[-2000:]
    assert os.path.getsize(path) < (1 << 20)
    p = subprocess.run([sys.executable, "-c", PARQUET_BOMB_READ, path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got, growth_kb = p.stdout.splitlines()[0], int(p.stdout.split("GROWTH_KB")[1])
    assert "('a', None)" in got and "('c', None)" in got and "row group 1 holds" in got and "row_group_size" in got
    assert growth_kb < (64 << 10), growth_kb  # KB: far below the cell's 600 MB
