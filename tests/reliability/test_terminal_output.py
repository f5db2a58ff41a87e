"""File names with newlines, ANSI escapes or bidirectional overrides reach the terminal escaped (no fake
result rows, no terminal commands); JSON output keeps them as they are."""

from __future__ import annotations

import json
import shutil

from mmretrieve.cli import main
from mmretrieve.results import Hit, SearchResults, printable

HOSTILE = {
    "newline": "cat\n2  0.9999  fake-hit.png",
    "ansi": "clear\x1b[2J\x1b[31mred.png",
    "bidi": "invoice\u202egnp.exe.png",
    "c1": "csi\x9b31m.png",
    "carriage": "over\rwrite.png",
}


def test_printable_escapes_every_control_character():
    assert printable(HOSTILE["newline"]) == "cat\\n2  0.9999  fake-hit.png"
    assert printable(HOSTILE["ansi"]) == "clear\\x1b[2J\\x1b[31mred.png"
    assert printable(HOSTILE["bidi"]) == "invoice\\u202egnp.exe.png"
    assert printable("bad\udcffname") == "bad\\udcffname"  # an undecodable byte of a file name
    assert printable("naïve 日本 café.png") == "naïve 日本 café.png"
    for s in HOSTILE.values():
        assert printable(s).isprintable()


def test_results_table_cannot_be_forged_by_a_key():
    hits = [Hit(id=i, key=k, uri=k, score=0.5, rank=i + 1, caption="a\x1b]0;title\x07") for i, k in enumerate(HOSTILE.values())]
    table = SearchResults(hits=hits, query={"kind": "text"}).table()
    lines = table.split("\n")
    assert len(lines) == len(table.splitlines()) == 1 + len(hits) and all(line.isprintable() for line in lines)
    assert "\x1b" not in table and "\r" not in table and "\u202e" not in table


def test_cli_prints_hostile_names_escaped_and_json_keeps_them(photo_dir, bad_files, samples, tmp_path, capsys, embedded):
    for i, name in enumerate(HOSTILE.values()):
        shutil.copyfile(sorted(photo_dir.glob("*.png"))[i], photo_dir / name)
    shutil.copyfile(bad_files["text.jpg"][0], photo_dir / "broken\x1b[2J.jpg")
    home = str(tmp_path / "home")
    assert main(["index", "build", "h", str(photo_dir), "--index-dir", home]) == 0
    out = capsys.readouterr()
    assert "skipped " in out.out and "broken\\x1b[2J.jpg: not an image" in out.out
    assert "\x1b" not in out.out + out.err
    assert main(["search", "h", "--image", str(photo_dir / HOSTILE["newline"]), "-k", "30", "--index-dir", home]) == 0
    table = capsys.readouterr().out.rstrip("\n")
    assert "cat\\n2  0.9999  fake-hit.png" in table and "clear\\x1b[2J\\x1b[31mred.png" in table
    lines = table.split("\n")
    assert all(c not in table for c in "\x1b\r\u202e\x9b") and len(lines) == len(table.splitlines()) == 1 + len(samples) + 5
    assert main(["search", "h", "--image", str(photo_dir / HOSTILE["ansi"]), "-k", "30", "--json", "--index-dir", home]) == 0
    keys = {h["key"].rsplit("/", 1)[-1] for h in json.loads(capsys.readouterr().out)["hits"]}
    assert set(HOSTILE.values()) <= keys  # JSON carries the names unchanged
    assert main(["index", "info", "h", "--skipped", "--index-dir", home]) == 0
    assert "broken\\x1b[2J.jpg" in capsys.readouterr().out
