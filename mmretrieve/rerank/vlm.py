"""Loading a vision-language model once per process, for every stage that names it.

``load_vlm(model, ...)`` returns the processor and the model (``AutoProcessor`` +
``AutoModelForImageTextToText``, optionally a PEFT LoRA adapter merged in), loaded once per
(model, adapter, precision, device): the yes/no verifier, the ``describe``, ``listwise`` and
``pairwise`` stages of one pipeline, and the server's requests all share one copy. A hub id that is
neither reachable nor cached fails at once (``hub_source``), as the encoders do.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmretrieve.encoders.hub import hub_source
from mmretrieve.errors import MissingDependencyError, MLLMError, UsageError
from mmretrieve.runtime import resolve_device

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")

def how_to(what: str = "mllm") -> str:
    """How to give the ``what`` stage a model (named in every error that lacks one)."""
    return (f"the {what} stage needs a vision-language model: {what}:model=Qwen/Qwen2-VL-2B-Instruct (a Hugging Face "
            f"hub id, downloaded on first use: about 4.5 GB in bf16) or {what}:model=/path/to/model (a local folder with "
            "the processor and weights, e.g. from `huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir DIR`)")


HOW_TO = how_to()


@dataclass(frozen=True)
class LoadedVLM:
    processor: Any
    model: Any
    device: torch.device

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def context_length(self) -> int | None:
        """The model's maximum number of positions (prompt + generated), when its config says."""
        cfg = self.model.config
        for c in (getattr(cfg, "text_config", None), cfg):
            n = getattr(c, "max_position_embeddings", None) if c is not None else None
            if n:
                return int(n)
        return None


def torch_dtype(dtype: str, dev: torch.device):
    """``auto``: bf16 on a GPU that has it (else fp16), bf16 on a CPU with native bf16, else fp32."""
    from mmretrieve.runtime import cpu_has_native_bf16
    from mmretrieve.settings import forced_precision

    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto" and forced_precision():
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[forced_precision()]
    if dtype == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[dtype]


_LOADED: dict[tuple, LoadedVLM] = {}
_LOCK = threading.Lock()


def load_vlm(model: str, *, adapter: str | None = None, merge_adapter: bool = True, dtype: str = "auto",
             device: str | None = None, trust_remote_code: bool = False, what: str = "mllm") -> LoadedVLM:
    """The processor and model of ``model`` (a local folder or a hub id), loaded once per process for
    each (model, adapter, dtype, device); raises ``MLLMError`` saying how to provide them."""
    dev = resolve_device(device)
    dt = torch_dtype(dtype, dev)
    key = (os.path.realpath(model) if os.path.isdir(model) else model, adapter, bool(merge_adapter), str(dt), str(dev),
           bool(trust_remote_code))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(model, adapter, merge_adapter, dt, dev, trust_remote_code, what)
        return _LOADED[key]


def _load(model, adapter, merge_adapter, dtype, dev, trust_remote_code, what) -> LoadedVLM:
    local = os.path.isdir(model)
    if not local and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise MLLMError(f"{what}: model folder not found: {model}. {how_to(what)}")
    source = contextlib.nullcontext("local") if local else hub_source(  # entered first: fails before any import
        model, asked=f"could not load vision-language model {model!r} ({what}:model=)", error=MLLMError,
        local_hint=f"{what}:model=/path/to/model (a folder with the processor and weights), or --vlm DIR for every "
                   "generative stage of a preset")
    with source as where:
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise MissingDependencyError(f"the {what} stage needs transformers: pip install 'mmretrieve[mllm]'") from None
        hf_logging.disable_progress_bar()
        offline = where != "hub"
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=offline)
            net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                              local_files_only=offline)
        except (OSError, ValueError) as e:
            raise MLLMError(f"could not load vision-language model {model!r}: {e}. {how_to(what)}") from None
    if adapter:
        try:
            from peft import PeftModel
        except ImportError:
            raise MissingDependencyError("LoRA adapters need peft: pip install 'mmretrieve[mllm]'") from None
        if not os.path.isdir(adapter):
            raise MLLMError(f"{what}: adapter folder not found: {adapter}")
        net = PeftModel.from_pretrained(net, adapter)
        if merge_adapter:
            net = net.merge_and_unload()
    net.to(dev).eval()
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"  # the answer position is the last one for every row of a batch
    if getattr(processor, "chat_template", None) is None and getattr(tok, "chat_template", None) is None:
        raise MLLMError(f"{model}: the processor has no chat template; the {what} stage needs a chat model")
    log.info("%s: loaded %s on %s (%s)", what, model, dev, dtype)
    return LoadedVLM(processor, net, dev)


def fit_pixels(im: Image.Image, max_pixels: int | None) -> Image.Image:
    """``im`` scaled down (aspect kept) to at most ``max_pixels`` pixels."""
    if not max_pixels or im.width * im.height <= max_pixels:
        return im
    s = math.sqrt(max_pixels / (im.width * im.height))
    return im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.BICUBIC)


def collage(left: Image.Image, right: Image.Image) -> Image.Image:
    h = max(left.height, right.height)
    out = Image.new("RGB", (left.width + right.width, h), (255, 255, 255))
    out.paste(left, (0, (h - left.height) // 2))
    out.paste(right, (left.width, (h - right.height) // 2))
    return out


def strip(images: list[Image.Image], height: int = 224) -> Image.Image:
    """Images side by side at one height (a video's frames shown as one picture)."""
    ims = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    out = Image.new("RGB", (sum(im.width for im in ims), height), (255, 255, 255))
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width
    return out


def numbered_grid(images: list[Image.Image], *, cell: int = 224, labels: list[str] | None = None) -> Image.Image:
    """A grid of ``images`` (square-ish), each cell labelled in its corner (``labels``, default 1, 2, ...):
    the candidates of a listwise prompt for models that take one image per prompt."""
    from PIL import ImageDraw

    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        s = min(cell / im.width, cell / im.height)
        im = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))))
        x, y = (i % cols) * cell, (i // cols) * cell
        out.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        label = labels[i] if labels else str(i + 1)
        w = 12 + 9 * len(label)
        draw.rectangle([x, y, x + w, y + 22], fill=(0, 0, 0))
        draw.text((x + 5, y + 5), label, fill=(255, 255, 255))
    return out


def item_image(item_or_path, max_pixels: int | None, *, frames: int = 1) -> Image.Image:
    """The picture a model is shown for an item (an image; a video frame at its timestamp; a video as
    ``frames`` frames side by side) or a file or PIL image, capped at ``max_pixels``."""
    from mmretrieve.media.images import load_image
    from mmretrieve.media.scan import media_kind
    from mmretrieve.media.video import sample_frames

    if isinstance(item_or_path, Image.Image):
        return fit_pixels(item_or_path.convert("RGB"), max_pixels)
    uri = getattr(item_or_path, "uri", item_or_path)
    kind = getattr(item_or_path, "kind", None) or media_kind(str(uri))
    if kind == "frame":
        im = sample_frames(uri, timestamps=[float(item_or_path.extra.get("timestamp", 0.0))]).images[0]
    elif kind == "video":
        ims = sample_frames(uri, num_frames=max(1, int(frames))).images
        im = ims[0] if len(ims) == 1 else strip(ims)
    else:
        im = load_image(uri)
    return fit_pixels(im, max_pixels)


__all__ = ["load_vlm", "LoadedVLM", "torch_dtype", "fit_pixels", "collage", "strip", "numbered_grid", "item_image",
           "DTYPES", "HOW_TO", "how_to"]
