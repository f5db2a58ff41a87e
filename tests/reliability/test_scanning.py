"""Scanning never raises for one entry: symlink loops, undecodable names, aliases of one file, hostile
manifest rows. Every media entry is counted exactly once; ``index add`` prunes what was deleted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mmretrieve import ManifestError, SkippedInputsError, add_to_index, build_index, open_index
from mmretrieve.cli import main
from mmretrieve.media.scan import scan_source


def _balanced(report) -> bool:
    """Every media entry scanned is accounted for exactly once."""
    return report.added + report.updated + report.unchanged + len(report.skipped) + len(report.aliases) == report.scanned


def _photos(d: Path, samples, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for s in samples[:n]:
        out.append(d / Path(s.path).name)
        shutil.copyfile(s.path, out[-1])
    return out


# ---- folders -------------------------------------------------------------------------------------------
def test_symlink_loops_are_skipped_with_their_reason(tmp_path, samples, tiny_clip):
    d = tmp_path / "f"
    _photos(d, samples, 3)
    (d / "a.png").symlink_to(d / "b.png")
    (d / "b.png").symlink_to(d / "a.png")  # a.png -> b.png -> a.png
    (d / "self.jpg").symlink_to(d / "self.jpg")
    (d / "sub").mkdir()
    (d / "sub" / "up").symlink_to(d, target_is_directory=True)  # a directory loop (links are not followed)
    report = build_index("loops", d, encoder=tiny_clip)
    reasons = {Path(s.uri).name: s.reason for s in report.skipped}
    assert reasons == {"a.png": "symlink loop", "b.png": "symlink loop", "self.jpg": "symlink loop"}
    assert report.added == 3 and report.scanned == 6 and _balanced(report)
    with pytest.raises(SkippedInputsError, match="3 input"):
        build_index("loops-strict", d, encoder=tiny_clip, strict=True)


def test_undecodable_file_name_is_skipped_and_reported_readably(tmp_path, samples, tiny_clip, capsys):
    d = tmp_path / "f"
    _photos(d, samples, 2)
    bad = os.fsdecode(b"caf\xe9-latin1.png")  # a name written by a latin-1 system: not UTF-8
    shutil.copyfile(samples[2].path, os.path.join(os.fsencode(d), os.fsencode(bad)))
    report = build_index("names", d, encoder=tiny_clip)
    assert report.added == 2 and len(report.skipped) == 1 and _balanced(report)
    s = report.skipped[0]
    assert s.uri.endswith("caf\\xe9-latin1.png") and "not valid UTF-8" in s.reason
    assert s.uri.encode("utf-8")  # stored as text (the index's database took it)
    assert main(["index", "info", "names", "--skipped"]) == 0
    assert "caf\\xe9-latin1.png: file name is not valid UTF-8" in capsys.readouterr().out


@pytest.mark.parametrize("batch_size", [1, 8])
def test_aliases_of_one_file_are_indexed_once_and_reported(tmp_path, samples, tiny_clip, batch_size):
    d = tmp_path / "f"
    coffee, other = _photos(d, samples, 2)
    (d / "latest.png").symlink_to(coffee)  # latest.png -> the first photo, in the same folder
    (d / "a-link-first.png").symlink_to(other)  # sorted before the file it points to
    os.link(coffee, d / "zz-hardlink.png")
    report = build_index("alias", d, encoder=tiny_clip, batch_size=batch_size)
    assert report.added == 2 and not report.skipped and report.scanned == 5 and _balanced(report)
    assert sorted((Path(a).name, Path(b).name) for a, b in report.aliases) == sorted(
        [("latest.png", coffee.name), ("a-link-first.png", other.name), ("zz-hardlink.png", coffee.name)])
    assert sorted(it.uri for it in open_index("alias").meta.iter_items()) == sorted(str(p.resolve()) for p in (coffee, other))
    again = add_to_index("alias", d)
    assert (again.added, again.unchanged, len(again.aliases)) == (0, 2, 3) and _balanced(again)


def test_an_unreadable_folder_is_reported_not_fatal(tmp_path, samples, tiny_clip, monkeypatch):
    d = tmp_path / "f"
    _photos(d, samples, 2)
    _photos(d / "locked", samples[2:], 1)
    real = os.scandir

    def scandir(path="."):  # what listing a folder without read permission does (root could list it anyway)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = build_index("locked", d, encoder=tiny_clip)
    assert report.added == 2 and [(s.uri, s.reason) for s in report.skipped] == [
        (str(d / "locked"), "cannot list folder: Permission denied")]
    assert _balanced(report)


def test_index_add_prunes_deleted_files_and_no_prune_keeps_them(tmp_path, samples, tiny_clip, capsys):
    d = tmp_path / "f"
    files = _photos(d, samples, 4)
    _photos(d / "sub", samples[4:], 2)
    other = _photos(tmp_path / "elsewhere", samples[6:], 1)  # another source of the same index
    build_index("p", d, encoder=tiny_clip)
    add_to_index("p", other[0])
    files[0].unlink()
    shutil.rmtree(d / "sub")
    kept = add_to_index("p", d, prune=False)
    assert not kept.pruned and len(open_index("p")) == 7
    report = add_to_index("p", d)
    assert sorted(Path(u).name for u in report.pruned) == sorted(
        [files[0].name] + [Path(s.path).name for s in samples[4:6]])
    assert report.unchanged == 3 and "3 indexed item(s) removed (file deleted)" in report.summary()
    idx = open_index("p")
    assert len(idx) == 4 and idx.get(str(other[0].resolve()))  # the other source's item stays
    files[1].unlink()
    assert main(["index", "add", "p", str(d), "--no-prune"]) == 0 and len(open_index("p")) == 4
    capsys.readouterr()
    assert main(["index", "add", "p", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"removed {files[1].resolve()}: file deleted" in out and len(open_index("p")) == 3



def test_an_item_reached_through_a_link_to_outside_the_folder_is_pruned_with_the_link(tmp_path, samples, tiny_clip):
    d = tmp_path / "f"
    _photos(d, samples, 2)
    (outside,) = _photos(tmp_path / "outside", samples[2:], 1)
    (d / "sub").mkdir()
    (d / "sub" / "via-link.png").symlink_to(outside)
    report = build_index("links", d, encoder=tiny_clip)
    assert report.added == 3 and _balanced(report)
    item = open_index("links").get(str(outside.resolve()))  # keyed by the file's real path, outside the folder
    assert item.extra["symlink"] == str(d.resolve() / "sub" / "via-link.png")
    again = add_to_index("links", d)
    assert (again.unchanged, again.pruned) == (3, [])  # still reached: kept
    (d / "sub" / "via-link.png").unlink()
    report = add_to_index("links", d)
    assert report.pruned == [str(outside.resolve())] and "1 indexed item(s) removed" in report.summary()
    idx = open_index("links")
    assert len(idx) == 2 and str(outside.resolve()) not in {it.key for it in idx.meta.iter_items()}
    assert outside.exists()  # the file itself is untouched


# ---- manifests -----------------------------------------------------------------------------------------
def _manifest_error(tmp_path, name: str, content: bytes, tiny_clip) -> str:
    m = tmp_path / name
    m.write_bytes(content)
    with pytest.raises(ManifestError) as e:
        build_index(tmp_path / f"idx-{name}", m, encoder=tiny_clip)
    return str(e.value)


def test_hostile_manifest_rows_are_refused_naming_file_and_line(tmp_path, samples, tiny_clip):
    p0, p1 = samples[0].path, samples[1].path
    cases = {
        "nul.csv": (f"path,id\n{p0},a\n{p1}\x00.jpg,b\n".encode(), ":3: ", "NUL"),
        "nul.jsonl": (f'{{"path": "{p0}"}}\n{{"path": "{p1}\\u0000.jpg"}}\n'.encode(), ":2: ", "contains a NUL byte"),
        "latin1.csv": (f"path,caption\n{p0},ok\n{p1},caf\xe9 au lait\n".encode("latin-1"), ":3: ", "not UTF-8 text"),
        "latin1.jsonl": (f'{{"path": "{p0}", "caption": "caf\xe9"}}\n'.encode("latin-1"), ":1: ", "not UTF-8 text"),
        "quote.csv": (f'path,caption\n{p0},fine\n{p1},"never closed\n{p0},lost\n'.encode(), ":3: ", "never closed"),
        "deep.jsonl": (f'{{"path": "{p0}"}}\n'.encode() + b'{"path": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                       ":2: ", "nested too deeply"),
        "surrogate.jsonl": (f'{{"path": "{p0}", "caption": "\\udcff"}}\n'.encode(), ":1: ", "not valid Unicode"),
        "list.jsonl": (b'{"path": ["a.jpg", "b.jpg"]}\n', ":1: ", "column 'path' must be text, got list"),
        "reserved.csv": (f"path,timestamp\n{p0},2024-01-01\n".encode(), ":2: ", "column 'timestamp' is a name mmretrieve keeps"),
        "reserved.jsonl": (f'{{"path": "{p0}"}}\n{{"path": "{p1}", "video": "x"}}\n'.encode(), ":2: ", "column 'video'"),
    }
    for name, (content, line, what) in cases.items():
        msg = _manifest_error(tmp_path, name, content, tiny_clip)
        assert f"{tmp_path / name}{line}" in msg and what in msg, (name, msg)


def test_manifest_rows_that_repeat_a_file_are_indexed_once(tmp_path, samples, tiny_clip):
    m = tmp_path / "m.csv"
    m.write_text(f"path,caption\n{samples[0].path},one\n{samples[1].path},two\n{samples[0].path},again\n")
    report = build_index("rep", m, encoder=tiny_clip)
    assert report.added == 2 and report.aliases == [(f"{m}:4: {samples[0].path}", "line 2")] and _balanced(report)


def test_nul_byte_and_loop_in_manifest_paths_never_reach_the_store(tmp_path, samples, tiny_clip):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [{"path": samples[0].path}, {"path": "loop.png", "id": "L"}]))
    scan = scan_source(m)
    assert [it.key for it in scan.items] == [samples[0].path] and [(it.key, why) for it, why in scan.skipped] == [
        ("L", "symlink loop")]
    report = build_index("ml", m, encoder=tiny_clip)
    assert report.added == 1 and [s.reason for s in report.skipped] == ["symlink loop"] and _balanced(report)
