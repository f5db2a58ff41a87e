"""Thread defaults that do not oversubscribe (chosen from ``mmretrieve bench threads``), and the overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmretrieve import UsageError
from mmretrieve.runtime import default_threads, default_workers, set_threads

#: cores -> (decoder workers, batch torch threads): the values the defaults were chosen to give (never
#: more threads than cores; one decoder per spare core, at most 8), written out, not recomputed
DEFAULTS = {1: (1, 1), 2: (1, 1), 3: (2, 1), 4: (3, 1), 8: (7, 1), 9: (8, 1), 16: (8, 8), 32: (8, 24)}


@pytest.mark.parametrize("cores", sorted(DEFAULTS))
def test_defaults_per_workload(monkeypatch, cores):
    monkeypatch.delenv("MMRETRIEVE_THREADS", raising=False)
    monkeypatch.setattr("mmretrieve.settings.available_cores", lambda: cores)
    assert (default_workers(), default_threads("batch")) == DEFAULTS[cores]
    assert default_threads("query") == 1
    with pytest.raises(UsageError, match="unknown workload 'serve'"):
        default_threads("serve")


def test_environment_and_explicit_counts_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MMRETRIEVE_THREADS", "3")
        assert default_threads("query") == default_threads("batch") == 3
        assert set_threads(None, workload="query") == 3 and torch.get_num_threads() == 3
        assert set_threads(2, workload="query") == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("MMRETRIEVE_THREADS", "lots")
        with pytest.raises(UsageError, match="MMRETRIEVE_THREADS must be a whole number, got 'lots'"):
            set_threads(None)
    finally:
        torch.set_num_threads(before)


def test_the_cli_sets_threads_by_command(tmp_path):
    cases = [  # (argv, MMRETRIEVE_THREADS, torch threads expected; None: the batch default)
        (["search", "nope", "--text", "x"], None, 1),
        (["search", "nope", "--text", "x", "--threads", "2"], None, 2),
        (["search", "nope", "--text", "x"], "2", 2),
        (["index", "info", "nope"], None, None),
    ]
    code = textwrap.dedent(f"""
        import os, torch
        from mmretrieve.cli import main
        from mmretrieve.runtime import default_threads
        for argv, env, _ in {cases!r}:
            os.environ.pop("MMRETRIEVE_THREADS", None)
            if env:
                os.environ["MMRETRIEVE_THREADS"] = env
            main(argv + ["--index-dir", {str(tmp_path)!r}])
            print(torch.get_num_threads())
        os.environ.pop("MMRETRIEVE_THREADS", None)
        print(default_threads("batch"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MMRETRIEVE_THREADS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    *got, batch = map(int, p.stdout.split())
    assert got == [batch if want is None else want for _, _, want in cases], p.stderr
