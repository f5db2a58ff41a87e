"""The package's shape: one-way layers, every module importable on its own, a fast CLI, strict options,
one error hierarchy, small functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mmretrieve
from mmretrieve import errors

PKG = Path(mmretrieve.__file__).resolve().parent

#: each package's layer: a module may import from its own layer and the ones below, never above
LAYERS = {
    "core": 0, "media": 1, "encoders": 2, "store": 3, "rerank": 4, "index": 5, "ingest": 6, "eval": 7,
    "testing": 8, "bench": 9, "demo": 9, "serve": 9, "train": 9, "cli": 10, "__main__": 10,
}
CORE = {"__init__", "errors", "settings", "config", "registry", "runtime", "query", "results", "export", "lru"}


def _modules() -> list[str]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    top = parts[1]
    if top in CORE:
        return 0
    if top not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned (add its package to LAYERS and to docs/ARCHITECTURE.md)")
    return LAYERS[top]


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported mmretrieve module) for every import in the file, inside functions too."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mmretrieve")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("mmretrieve"):
                out.append((node.lineno, base))
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names if (PKG.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                        or (PKG.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()]
    return out


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)
        own = _layer(module)
        for line, imported in _imports(f, module):
            if _layer(imported) > own:
                bad.append(f"{f.relative_to(PKG.parent)}:{line} ({module}, layer {own}) imports {imported} (layer {_layer(imported)})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_testing_helpers_stay_off_the_product_path():
    """mmretrieve.testing (tiny models) is for tests and smoke benchmarks only."""
    allowed = ("mmretrieve.bench", "mmretrieve.testing")
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module.startswith(allowed):
            continue
        bad += [f"{module}:{line}" for line, imp in _imports(f, module) if imp.startswith("mmretrieve.testing")]
    assert not bad, bad


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no mmretrieve module is loaded yet (a fork of one
    that imported only the third-party libraries, so it is fast): an import cycle cannot hide behind
    the order in which mmretrieve/__init__ happens to import things."""
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        import numpy, torch, faiss, PIL.Image, transformers  # third-party only: no mmretrieve module yet
        assert not [m for m in sys.modules if m.startswith("mmretrieve")]
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(name)
        print("FAILED:", failed)
        sys.exit(1 if failed else 0)
    """)
    mods = [m for m in _modules() if not m.endswith("__main__")]  # entry points run the CLI when imported
    assert len(mods) > 40
    p = subprocess.run([sys.executable, "-c", script, *mods], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def _run_cli_in_fresh_python(args: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        from mmretrieve.cli import main
        try:
            rc = main({args!r})
        except SystemExit as e:
            rc = e.code
        heavy = [m for m in ("torch", "faiss", "transformers", "open_clip", "timm", "fastapi", "uvicorn") if m in sys.modules]
        print("HEAVY:", ",".join(heavy), file=sys.stderr)
        sys.exit(rc or 0)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["index", "--help"], ["index", "build", "--help"],
                                  ["search", "--help"], ["eval", "--help"], ["eval", "egocvr", "--help"],
                                  ["bench", "--help"], ["bench", "rerank", "--help"], ["demo", "--help"],
                                  ["serve", "--help"]])
def test_help_and_version_import_neither_torch_nor_faiss(args):
    p = _run_cli_in_fresh_python(args)
    assert p.returncode == 0, p.stderr
    assert "HEAVY: \n" in p.stderr or p.stderr.rstrip().endswith("HEAVY:"), p.stderr
    if args == ["--version"]:
        assert p.stdout.strip() == f"mmretrieve {mmretrieve.__version__}"


def test_every_cli_option_has_help_text():
    import argparse

    from mmretrieve.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sp in action.choices.items():
                    walk(sp, f"{path} {name}")
            elif not action.help and action.dest != "help":
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "mmretrieve")
    assert not missing, missing


def test_build_on_an_existing_index_refuses_before_any_model_loads(photo_dir, tiny_clip, monkeypatch):
    import mmretrieve.encoders
    from mmretrieve import IndexExistsError, build_index

    build_index("p", photo_dir, encoder=tiny_clip)

    def tripwire(*a, **k):
        raise AssertionError("an encoder was created before the refusal")

    monkeypatch.setattr(mmretrieve.encoders, "create_encoder", tripwire)
    monkeypatch.setattr("mmretrieve.ingest.build.create_encoder", tripwire)
    with pytest.raises(IndexExistsError, match="already exists"):
        build_index("p", photo_dir, encoder=tiny_clip.name, resume=False)
    with pytest.raises(IndexExistsError, match="already exists and was built from"):
        build_index("p", photo_dir / "sub", encoder=tiny_clip.name)
    assert build_index("p", photo_dir, encoder=tiny_clip.name).up_to_date  # the same source: nothing to do


# ---- one error hierarchy --------------------------------------------------------------------------
def test_every_error_class_is_exported_and_under_the_base():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.MMRetrieveError), name
        assert getattr(mmretrieve, name) is cls
    defined = [n.name for f in PKG.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
               if isinstance(n, ast.ClassDef) and n.name.endswith("Error")]
    assert sorted(set(defined)) == sorted(errors.__all__), "error classes defined outside mmretrieve/errors.py"


def test_builtin_bases_keep_old_except_clauses_working():
    assert issubclass(errors.IndexNotFoundError, FileNotFoundError)
    assert issubclass(errors.ItemNotFoundError, KeyError)
    assert issubclass(errors.UsageError, ValueError) and issubclass(errors.DatasetError, ValueError)
    assert issubclass(errors.UnknownNameError, KeyError) and issubclass(errors.UnknownOptionError, TypeError)
    assert issubclass(errors.MissingDependencyError, ImportError)


# ---- strict options -------------------------------------------------------------------------------
@pytest.fixture()
def toy_index(tmp_path):
    from mmretrieve import open_index
    from mmretrieve.store import IndexWriter, Item

    X = np.eye(4, dtype=np.float32)
    with IndexWriter(tmp_path / "t", encoder_info={"name": "toy", "dim": 4, "modalities": ["image", "text"]},
                     create=True) as w:
        w.add([Item(id=-1, key=f"i{j}", uri=f"toy://{j}") for j in range(4)], X)
    return open_index(tmp_path / "t")


def test_search_refuses_unknown_options_with_the_valid_ones(toy_index):
    from mmretrieve import UnknownOptionError

    with pytest.raises(UnknownOptionError, match=r"'kk' for Index.search \(fusion 'sum' takes no options\).*did you mean 'k'"):
        toy_index.search(text="x", kk=5)
    with pytest.raises(UnknownOptionError, match=r"'fusoin'.*did you mean 'fusion'"):
        toy_index.search(text="x", image="y.jpg", fusoin="intersection")
    with pytest.raises(UnknownOptionError, match=r"'mod' for Index.search \(fusion 'intersection' takes k1, mode\).*did you mean 'mode'"):
        toy_index.search(text="x", image="y.jpg", fusion="intersection", mod="product")
    with pytest.raises(UnknownOptionError, match=r"'weight' for Index.search \(fusion 'sum' takes no options\)"):
        toy_index.search(text="x", image="y.jpg", weight=0.3)
    with pytest.raises(UnknownOptionError, match=r"'nprob' for Index.search with a vector.*did you mean 'nprobe'"):
        toy_index.search(vector=np.eye(4, dtype=np.float32)[0], k=2, nprob=3)


def test_query_and_fusions_refuse_unknown_options():
    from mmretrieve import Query, UnknownOptionError, UsageError
    from mmretrieve.query import coarse_strategy

    with pytest.raises(UnknownOptionError, match="'k' for fusion 'intersection'.*did you mean 'k1'"):
        Query(text="x", image="y.jpg", fusion="intersection", options={"k": 3})
    with pytest.raises(UsageError, match="apply to composed queries"):
        Query(text="x", fusion="weighted", options={"weight": 0.3})
    with pytest.raises(UsageError, match="weight must be in"):
        coarse_strategy("weighted", {"weight": 2})
    with pytest.raises(UsageError, match="k1 must be a positive integer"):
        coarse_strategy("intersection", {"k1": 0})


def test_intersection_is_a_strategy_not_a_fake_fusion():
    from mmretrieve.query import FUSIONS, Intersection, VectorFusion

    assert isinstance(FUSIONS.create("intersection"), Intersection)
    assert all(isinstance(FUSIONS.create(n), VectorFusion) for n in ("sum", "weighted", "text", "image"))
    switches = []  # no code compares a fusion name with "intersection" to special-case it
    for f in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "intersection"
                                                  for c in [n.left, *n.comparators]):
                switches.append(f"{f.relative_to(PKG.parent)}:{n.lineno}")
    assert not switches, switches


def test_pipeline_specs_refuse_unknown_options_and_bad_values():
    from mmretrieve import UnknownOptionError, UsageError
    from mmretrieve.rerank import Pipeline

    with pytest.raises(UnknownOptionError, match="'kk' for reranker 'emd'"):
        Pipeline.from_specs("emd:kk=3")
    with pytest.raises(UsageError, match="reranker 'emd': option k must be an integer, got 'abc'"):
        Pipeline.from_specs("emd:k=abc")
    with pytest.raises(UsageError, match="emd: grid must be a positive integer"):
        Pipeline.from_specs("emd:grid=-1")
    with pytest.raises(UnknownOptionError, match="coarse stage"):
        Pipeline.from_config({"coarse": {"k": 5, "fuson": "sum"}, "stages": []})


# ---- small functions --------------------------------------------------------------------------------
def test_no_function_over_80_lines_outside_the_cli_parser():
    long = []
    for f in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                if f.parent.name == "cli" and ("parser" in n.name or n.name == "register"):
                    continue
                long.append(f"{f.relative_to(PKG.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_forced_precision_reaches_every_auto_choice(monkeypatch):
    import torch

    from mmretrieve.rerank.mllm import MLLMReranker
    from mmretrieve.runtime import resolve_precision

    monkeypatch.setenv("MMRETRIEVE_PRECISION", "fp32")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert MLLMReranker(model="x")._torch_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("MMRETRIEVE_PRECISION", "bf16")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice still wins
    monkeypatch.setenv("MMRETRIEVE_PRECISION", "fp8")
    with pytest.raises(errors.UsageError, match="MMRETRIEVE_PRECISION must be one of"):
        resolve_precision("auto", torch.device("cpu"))
    assert os.environ["MMRETRIEVE_PRECISION"] == "fp8"
