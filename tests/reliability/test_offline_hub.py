"""Offline fast-fail: with the hub unreachable (a closed or a silent port on 127.0.0.1, HF_HUB_OFFLINE unset)
a hub model name fails in seconds with one clear message, for open_clip, timm and transformers models;
a model that is in the local cache still loads, without touching the network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from mmretrieve import create_encoder
    from mmretrieve.rerank import create_reranker

    cases = {
        "open_clip": lambda: create_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k", cache=False),
        "open_clip hf-hub": lambda: create_encoder("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", cache=False),
        "timm": lambda: create_encoder("timm:vit_small_patch14_dinov2.lvd142m", cache=False),
        "transformers": lambda: create_reranker("mllm", model="Qwen/Qwen2-VL-2B-Instruct").load(),
        "cached transformers": lambda: create_reranker("mllm", model="tiny-org/tiny-qwen2-vl").load(),
    }
    from huggingface_hub import constants

    out = {}
    for arg in sys.argv[1:]:
        name, _, endpoint = arg.partition("@")
        if endpoint:  # the hub's address for this case (read by every hub call, as HF_ENDPOINT sets it)
            constants.ENDPOINT = endpoint
        t = time.perf_counter()
        try:
            cases[name]()
            out[arg] = ["loaded", time.perf_counter() - t]
        except Exception as e:
            out[arg] = [f"{type(e).__name__}: {e}", time.perf_counter() - t]
    print(json.dumps(out))
""")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    return port


def _run(endpoint: str, hf_home: Path, *cases: str, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([sys.executable, "-c", SCRIPT, *cases], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


EXPECTED = {
    "open_clip": ("EncoderError: could not load open_clip model 'ViT-B-32@laion2b_s34b_b79k': ",
                  "laion/CLIP-ViT-B-32-laion2B-s34B-b79K is not in the local cache", "open_clip:local-dir:"),
    "open_clip hf-hub": ("EncoderError: could not load open_clip model 'hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K': ",
                         "is not in the local cache", "open_clip:local-dir:"),
    "timm": ("EncoderError: could not create timm model 'vit_small_patch14_dinov2.lvd142m': ",
             "timm/vit_small_patch14_dinov2.lvd142m is not in the local cache", "timm:vit_small_patch14_dinov2.lvd142m@/path"),
    "transformers": ("MLLMError: could not load vision-language model 'Qwen/Qwen2-VL-2B-Instruct' (mllm:model=): ",
                     "Qwen/Qwen2-VL-2B-Instruct is not in the local cache", "mllm:model=/path/to/model"),
}


def _tiny_cached_vlm(hf_home: Path) -> None:
    """A tiny Qwen2-VL in the hub cache's own layout, as a download would have left it."""
    from mmretrieve.testing import write_tiny_vlm

    repo = hf_home / "hub" / "models--tiny-org--tiny-qwen2-vl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_tiny_vlm(repo / "snapshots" / commit, "qwen2_vl")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_names_fail_fast_when_the_hub_is_refused_or_silent_and_cached_models_still_load(tmp_path):
    _tiny_cached_vlm(tmp_path / "hf")
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        silent_case = f"open_clip@http://127.0.0.1:{silent.getsockname()[1]}"
        got = _run(f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf", *EXPECTED, "cached transformers", silent_case)
    finally:
        silent.close()
    for name, (head, cache, hint) in EXPECTED.items():
        msg, seconds = got[name]
        assert seconds < 10, (name, seconds, msg)
        assert msg.startswith(head) and "cannot be reached" in msg and cache in msg and hint in msg, (name, msg)
        assert "huggingface-cli download" in msg
    msg, seconds = got["cached transformers"]
    assert msg == "loaded" and seconds < 30, (msg, seconds)
    msg, seconds = got[silent_case]  # a black-holed network costs the probe's timeout, no more
    assert 2 < seconds < 10 and "cannot be reached" in msg, (seconds, msg)


def test_offline_mode_fails_at_once_without_probing(tmp_path):
    got = _run("http://192.0.2.1", tmp_path / "hf", "open_clip", "timm", offline=True)  # TEST-NET-1: never routed
    for name, (msg, seconds) in got.items():
        assert seconds < 5 and "offline mode is on (HF_HUB_OFFLINE)" in msg, (name, seconds, msg)
