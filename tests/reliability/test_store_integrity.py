"""Damage to the store's small files, to .npy headers and to manifests (issue 17, items 9-12): a damaged
deletion file, patch projection or FAISS template is caught on open (or by the writer reading it) by its
sha256; a damaged .npy header is an error naming the file; a forged retained manifest fails its own
checksum in verify and is refused by rollback; an unreadable live manifest is restored from the newest
intact retained version by ``index verify --repair`` and ``index rollback``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmretrieve import IndexCorruptedError, open_index
from mmretrieve.cli import main
from mmretrieve.store import IndexWriter, Item, rollback_index, verify_index

pytestmark = pytest.mark.reliability

DIM = 16
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
FACTORIES = ["Flat", "HNSW16", "IVF4,Flat"]


def _vectors(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _items(keys):
    return [Item(id=-1, key=str(k), uri=f"vec://{k}") for k in keys]


def _build(path: Path, factory: str = "Flat", n: int = 200, **kw) -> np.ndarray:
    x = _vectors(n)
    with IndexWriter(path, encoder_info=INFO, create=True, factory=factory, auto_compact=False, **kw) as w:
        w.add(_items(range(n)), x)
    return x


def _remove(path: Path, ids) -> None:
    w = IndexWriter(path, auto_compact=False)
    w.remove(ids)
    w.commit()


def _add(path: Path, keys, seed) -> None:
    with IndexWriter(path, auto_compact=False) as w:
        w.add(_items(keys), _vectors(len(keys), seed))


def _flip(f: Path, pos: int = -1) -> None:
    b = bytearray(f.read_bytes())
    b[pos] ^= 0x01
    f.write_bytes(bytes(b))


def _live(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _state(path: Path):
    with open_index(path, nprobe=4) as idx:
        D, I = idx.search_vectors(_vectors(4, seed=9), 5)
        return idx.version, len(idx), I.tolist()


# ---- item 9: small files are checked on open -----------------------------------------------------
@pytest.mark.parametrize("factory", FACTORIES)
def test_a_flipped_byte_in_a_deletion_file_is_caught_on_open(tmp_path, factory):
    path = tmp_path / "i"
    x = _build(path, factory)
    _remove(path, [7, 150])
    with open_index(path, nprobe=4) as idx:
        assert idx.search_vectors(x[7], 1)[1][0, 0] != 7
    (seg,) = _live(path)["segments"]
    dfile = path / "segments" / seg["id"] / seg["deletions"]
    for pos in (-16, -1):  # the low byte of row 7 (it becomes row 6: item 7 is back), of row 150 (151)
        data = dfile.read_bytes()
        _flip(dfile, pos)
        for verify in ("fast", "none"):  # small files read whole are checked whatever the level
            with pytest.raises(IndexCorruptedError, match=f"{re.escape(str(dfile))}: sha256 does not match"):
                open_index(path, verify=verify)
        with pytest.raises(IndexCorruptedError, match=re.escape(str(dfile))):
            verify_index(path)
        with pytest.raises(IndexCorruptedError, match=re.escape(str(dfile))):  # nor does a writer start from it
            _add(path, ["w"], 3)
        dfile.write_bytes(data)
    assert _state(path)[1] == 198


def test_a_damaged_patch_projection_or_template_is_caught_when_read(tmp_path):
    path = tmp_path / "p"
    cfg = {"grid": 2, "dim": 4, "native_dim": 8, "dtype": "float16", "projection": "patch_proj.npy", "seed": 0}
    with IndexWriter(path, encoder_info=INFO, create=True, patches=cfg) as w:
        w.patch_projection()
        w.add(_items(range(10)), _vectors(10), np.ones((10, 4, 4), np.float32))
    with open_index(path) as idx:
        assert idx.patch_projection().shape == (8, 4)
    _flip(path / "patch_proj.npy")
    with open_index(path) as idx, pytest.raises(IndexCorruptedError, match="patch_proj.npy: sha256 does not match"):
        idx.patch_projection()
    ivf = tmp_path / "ivf"
    _build(ivf, "IVF4,Flat")
    _flip(ivf / "template.faiss", 200)
    with pytest.raises(IndexCorruptedError, match="template.faiss: sha256 does not match"):
        _add(ivf, ["new"], 4)
    with pytest.raises(IndexCorruptedError, match="template.faiss: sha256 does not match"):
        verify_index(ivf)


# ---- item 10: damaged .npy headers name the file --------------------------------------------------
def _descr(value: bytes):
    return lambda h: re.sub(rb"'descr': '...'", b"'descr': '" + value + b"'", h, count=1)


HEADER_DAMAGE = {  # each keeps the file's size, so only the header parser can tell
    "unbalanced parenthesis": lambda h: h.replace(b"'shape': (", b"'shape':((", 1),  # tokenize.TokenError
    "unterminated string": lambda h: h.replace(b"'descr'", b"'descr ", 1),
    "not a dict": lambda h: h.replace(b"{'descr'", b"('descr'", 1),
    "not a literal": lambda h: h.replace(b"'fortran_order': False", b"'fortran_order': Fals(", 1),
    "object dtype": _descr(b"|O8"),
    "unknown dtype": _descr(b"<x9"),
    "latin-1 key": lambda h: h.replace(b"'descr'", b"'d\xe9\xffcr'", 1),
    "format 3 (utf-8 header)": lambda h: h[:6] + b"\x03" + h[7:],
    "bad magic": lambda h: h.replace(b"\x93NUMPY", b"\x93NUMPZ", 1),
    "header length": lambda h: h[:8] + b"\xff\x7f" + h[10:],
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_a_damaged_npy_header_is_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "i"
    _build(path, n=20)
    (seg,) = _live(path)["segments"]
    for name in ("vectors.npy", "ids.npy"):
        f = path / "segments" / seg["id"] / name
        data = f.read_bytes()
        bad = HEADER_DAMAGE[damage](data[:128])
        assert bad != data[:128] and len(bad) == 128, (name, bad)
        f.write_bytes(bad + data[128:])
        for call in (lambda: open_index(path), lambda: verify_index(path)):
            with pytest.raises(IndexCorruptedError, match=re.escape(str(f))):
                call()
        assert main(["index", "verify", str(path)]) != 0
        f.write_bytes(data)
    assert verify_index(path)["ok"]


# ---- item 11: retained manifests carry their own checksum -----------------------------------------
def test_a_forged_retained_manifest_fails_verify_and_is_not_rolled_back_to(tmp_path, capsys):
    path = tmp_path / "i"
    _build(path, n=20, retain=3)
    _add(path, ["a", "b"], 5)
    assert verify_index(path)["ok"] and "checksum" in _live(path)
    mfile = path / "v0001" / "manifest.json"
    m = json.loads(mfile.read_text())
    m["counts"]["items"] = 999
    mfile.write_text(json.dumps(m))
    with pytest.raises(IndexCorruptedError, match=f"{re.escape(str(mfile))}: the manifest does not match its checksum"):
        verify_index(path)
    with pytest.raises(IndexCorruptedError, match=re.escape(str(mfile))):
        rollback_index(path, "v0001")
    assert main(["index", "rollback", str(path), "--to", "v0001"]) != 0
    assert "does not match its checksum" in capsys.readouterr().err
    assert _state(path)[:2] == ("v0002", 22)  # nothing was published
    _add(path, ["c"], 6)  # a write still works (the damaged version is kept until it ages out)
    assert _state(path)[:2] == ("v0003", 23)


def test_manifests_written_before_checksums_still_open_and_verify_says_so(tmp_path, capsys):
    path = tmp_path / "i"
    _build(path, n=20)
    _add(path, ["a"], 5)
    for f in [path / "manifest.json", *path.glob("v*/manifest.json")]:
        m = json.loads(f.read_text())
        del m["checksum"]
        f.write_text(json.dumps(m))
    before = _state(path)
    res = verify_index(path)
    assert res["manifest_checksum"] == "none" and res["unsealed"] == ["v0001", "v0002"]
    assert main(["index", "verify", str(path)]) == 0
    assert "carry no checksum" in capsys.readouterr().out
    assert rollback_index(path)["counts"]["items"] == 20  # a rollback to one works (its files are checked)
    res = verify_index(path)
    assert res["manifest_checksum"] == "ok" and res["unsealed"] == ["v0002"]  # v0001 aged out; v0003 is sealed
    assert before[1] == 21


# ---- item 12: an unreadable live manifest is repaired from the versions kept -----------------------
@pytest.mark.parametrize("damage", ["empty", "garbage", "forged", "missing"])
def test_verify_repair_restores_an_unreadable_live_manifest(tmp_path, capsys, damage):
    path = tmp_path / "i"
    _build(path, n=30)
    _add(path, ["a", "b"], 5)
    before = _state(path)
    live = path / "manifest.json"
    if damage == "missing":
        live.unlink()
    elif damage == "forged":
        m = _live(path)
        m["counts"]["items"] = 5
        live.write_text(json.dumps(m))
    else:
        live.write_bytes(b"" if damage == "empty" else b"\x00\x17garbage{")
    with pytest.raises(IndexCorruptedError, match=rf"{re.escape(str(live))}: .*index verify {re.escape(str(path))} --repair"):
        open_index(path)
    assert main(["index", "verify", str(path)]) != 0
    assert "--repair" in capsys.readouterr().err
    assert main(["index", "verify", str(path), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "restored v0002" in out and "v0002: ok" in out
    assert _state(path) == before
    from mmretrieve.store import repair_index

    assert repair_index(path) is None  # nothing left to repair
    _add(path, ["c"], 6)
    assert _state(path)[:2] == ("v0003", 33)


def test_rollback_restores_the_newest_intact_version(tmp_path, capsys):
    path = tmp_path / "i"
    _build(path, n=30, retain=3)
    v1 = _state(path)
    _add(path, ["a", "b"], 5)
    new_seg = _live(path)["segments"][-1]["id"]
    _flip(path / "segments" / new_seg / "vectors.npy")  # v0002's files no longer verify
    (path / "manifest.json").write_bytes(b"")
    assert main(["index", "rollback", str(path)]) == 0
    out = capsys.readouterr().out
    assert "restored v0001" in out and "not v0002" in out and "sha256 does not match" in out
    assert _state(path) == v1
    assert json.loads((path / "manifest.json").read_text())["version"] == "v0001"
    # nothing intact at all: the error says so and names every version it tried
    (path / "manifest.json").write_bytes(b"")
    (path / "v0001" / "manifest.json").write_bytes(b"{")
    with pytest.raises(IndexCorruptedError, match=r"no version the index keeps is intact \(v0002: .*v0001: "):
        rollback_index(path)


def test_a_write_to_an_index_whose_live_manifest_is_gone_points_to_the_repair(tmp_path):
    """`index add` (and a build without --overwrite) on a folder that keeps versions but lost manifest.json:
    the repair is named, and nothing is written over the kept versions."""
    from mmretrieve.errors import IndexCorruptedError
    from mmretrieve.store.layout import MANIFEST, list_versions

    path = tmp_path / "ix"
    _build(path)
    _add(path, ["extra"], seed=3)
    kept = list_versions(path)
    assert kept
    (path / MANIFEST).unlink()
    for create in (False, True):
        with pytest.raises(IndexCorruptedError, match="--repair"):
            IndexWriter(path, create=create, encoder_info=INFO)
    assert list_versions(path) == kept
