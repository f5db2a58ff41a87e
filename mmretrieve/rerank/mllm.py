"""``mllm``: a vision-language model verifies each shortlisted candidate with a yes/no question (SETR).

For every candidate the model sees the query (text; image; or reference image + modification text)
and the candidate image, asked through a prompt template (``configs/prompts/yesno.yaml``) and the
processor's chat template; the score is ``softmax([logit(Yes), logit(No)])[0]`` at the answer position
(the last position, with left padding), i.e. P(yes). By default the shortlist is re-ranked by P(yes)
alone (``alpha=1``), ties keeping the previous order.

Any image-text-to-text model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works; tested
(on tiny random models of the same architectures) with Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM and
LLaVA. ``model`` is a hub id (downloaded on first use) or a local directory; ``adapter`` a PEFT LoRA
adapter (the ``mllm`` extra). Candidates are batched with left padding; ``max_pixels`` caps every
image's size before the processor sees it.

    --rerank "mllm:model=Qwen/Qwen2-VL-2B-Instruct,k=20"
    --rerank "mllm:model=/models/smolvlm-256m,processor_kwargs=do_image_splitting:false,batch_size=8"
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmretrieve.errors import ItemNotFoundError, MLLMError, UsageError
from mmretrieve.rerank.base import RERANKERS, Reranker, RerankOutput, option_device
from mmretrieve.rerank.vlm import DTYPES, HOW_TO, collage, fit_pixels, item_image, load_vlm, torch_dtype  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def _parse_kwargs(spec: Any) -> dict:
    """``"do_image_splitting:false;longest_edge:512"`` (CLI-friendly) or a dict."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    from mmretrieve.config import coerce

    out = {}
    for part in str(spec).split(";"):
        if part.strip():
            k, _, v = part.partition(":")
            out[k.strip()] = coerce(v)
    return out


def resolve_answer_ids(tokenizer, yes: str, no: str, fallback: str | None = None) -> tuple[int, int]:
    """Token ids of the answer words; each must be a single token unless ``fallback="first"``."""
    ids = []
    for word in (yes, no):
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) == 1:
            ids.append(int(toks[0]))
            continue
        if fallback == "first" and toks:
            log.warning("answer word %r is %d tokens %s for this tokenizer: using its first token", word, len(toks), toks)
            ids.append(int(toks[0]))
            continue
        raise MLLMError(
            f"answer word {word!r} is {len(toks)} tokens {toks} for this tokenizer, not one: set yes=/no= to "
            "single-token words (e.g. 'Yes'/'No', 'True'/'False') or answer_fallback=first to score the first token"
        )
    if ids[0] == ids[1]:
        raise MLLMError(f"answer words {yes!r} and {no!r} map to the same token id {ids[0]}")
    return ids[0], ids[1]


@RERANKERS.register("mllm")
class MLLMReranker(Reranker):
    """Yes/no verification of each candidate by a vision-language model; score = P(yes)."""

    name = "mllm"

    def __init__(
        self,
        *,
        model: str | None = None,
        adapter: str | None = None,
        merge_adapter: bool = True,
        k: int = 20,
        alpha: float | None = 1.0,
        norm: str = "none",
        prompt: str = "yesno",
        yes: str | None = None,
        no: str | None = None,
        answer_fallback: str | None = None,
        collage: bool = False,
        batch_size: int = 4,
        max_pixels: int | None = 448 * 448,
        processor_kwargs: Any = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(k=k, alpha=alpha, norm=norm)
        if not model:
            raise MLLMError(f"{HOW_TO}; add adapter=/path/to/lora for a PEFT LoRA adapter")
        self.model = str(model)
        self.adapter = adapter
        self.merge_adapter = bool(merge_adapter)
        self.prompt = prompt
        self.answer_fallback = answer_fallback
        self.collage = bool(collage)
        if int(batch_size) < 1:
            raise UsageError(f"mllm: batch_size must be >= 1, got {batch_size}")
        if max_pixels is not None and int(max_pixels) < 1:
            raise UsageError(f"mllm: max_pixels must be >= 1 (or none for no cap), got {max_pixels}")
        if dtype not in DTYPES:
            raise UsageError(f"mllm: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if answer_fallback not in (None, "first"):
            raise UsageError(f"mllm: answer_fallback must be 'first' or unset, got {answer_fallback!r}")
        self.batch_size = int(batch_size)
        self.max_pixels = int(max_pixels) if max_pixels else None
        self.processor_kwargs = _parse_kwargs(processor_kwargs)
        self.dtype = dtype
        option_device("mllm", device)  # a bad device fails here, not after the model has loaded
        self.device = device
        self.trust_remote_code = bool(trust_remote_code)
        from mmretrieve.config import load_config

        try:
            self._prompts = load_config(prompt) if str(prompt).endswith((".yaml", ".yml")) else load_config(f"prompts/{prompt}")
        except FileNotFoundError:
            raise MLLMError(f"prompt preset {prompt!r} not found (configs/prompts/{prompt}.yaml or a YAML path)") from None
        answers = self._prompts.get("answer", {})
        self.yes = yes or answers.get("yes", "Yes")
        self.no = no or answers.get("no", "No")
        self._loaded = None

    # ---- model ------------------------------------------------------------------------------------
    def _torch_dtype(self, dev: torch.device):
        return torch_dtype(self.dtype, dev)

    def load(self):
        """Load processor + model (+ adapter) once per process (shared with every stage naming the same
        model); raises ``MLLMError`` saying how to provide them."""
        if self._loaded is not None:
            return self._loaded
        vlm = load_vlm(self.model, adapter=self.adapter, merge_adapter=self.merge_adapter, dtype=self.dtype,
                       device=self.device, trust_remote_code=self.trust_remote_code, what="mllm")
        yes_id, no_id = resolve_answer_ids(vlm.tokenizer, self.yes, self.no, self.answer_fallback)
        self._loaded = (vlm.processor, vlm.model, yes_id, no_id, vlm.device)
        log.info("mllm reranker: %s, answer ids %d/%d", self.model, yes_id, no_id)
        return self._loaded

    # ---- prompts ------------------------------------------------------------------------------------
    def template(self, kind: str) -> dict:
        key = {"text": "text", "image": "image", "video": "image", "composed": "composed", "composed-video": "composed"}[kind]
        if self.collage and key in ("image", "composed"):
            key += "_collage"
        try:
            return self._prompts[key]
        except KeyError:
            raise MLLMError(f"prompt preset {self.prompt!r} has no {key!r} entry") from None

    def build(self, query, query_image: Image.Image | None, candidate: Image.Image) -> tuple[str, list[Image.Image]]:
        """The chat-formatted prompt text and its images (in order) for one candidate."""
        processor = self.load()[0]
        tpl = self.template(query.kind)
        # a list holds phrasings of one request (FashionIQ's captions in both orders): ask with the first
        text = query.text if isinstance(query.text, str) else (query.text[0] if query.text else "")
        images = []
        for role in tpl["images"]:
            if role == "candidate":
                images.append(candidate)
            elif role in ("query", "reference"):
                images.append(query_image)
            elif role == "collage":
                images.append(collage(query_image, candidate))
            else:
                raise MLLMError(f"unknown image role {role!r} in prompt preset {self.prompt!r}")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": tpl["prompt"].format(text=text or "")}]
        msgs = [{"role": "user", "content": content}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), images

    def _image_of(self, index, item_or_path) -> Image.Image:
        return item_image(item_or_path, self.max_pixels)

    # ---- scoring --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_prompts(self, texts: list[str], images: list[list[Image.Image]]) -> np.ndarray:
        """P(yes) for prepared prompts, ``batch_size`` at a time."""
        processor, model, yes_id, no_id, dev = self.load()
        out = []
        for s in range(0, len(texts), self.batch_size):
            bt, bi = texts[s : s + self.batch_size], images[s : s + self.batch_size]
            kw = dict(self.processor_kwargs)
            batch = processor(text=bt, images=bi if any(bi) else None, padding=True, return_tensors="pt", **kw)
            batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
            float_dtype = next(model.parameters()).dtype
            for k in ("pixel_values", "pixel_values_videos"):
                if k in batch:
                    batch[k] = batch[k].to(float_dtype)
            logits = model(**batch).logits[:, -1, :]
            pair = logits[:, [yes_id, no_id]].float()
            out.append(torch.softmax(pair, dim=-1)[:, 0].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, index, query, ids: np.ndarray, scores: np.ndarray | None = None) -> RerankOutput:
        if len(ids) == 0:
            return RerankOutput(np.zeros(0))
        self.load()
        qimg = None
        if query.image is not None:
            qimg = self._image_of(index, query.image)
        elif query.video is not None:
            qimg = self._image_of(index, str(query.video))
        items = index.items([int(i) for i in ids])
        texts, images = [], []
        for i in ids:
            it = items.get(int(i))
            if it is None:
                raise ItemNotFoundError(f"no item {i} in index {index.path}")
            t, ims = self.build(query, qimg, self._image_of(index, it))
            texts.append(t)
            images.append(ims)
        p = self.score_prompts(texts, images)
        return RerankOutput(p.astype(np.float64), {int(i): {"p_yes": float(x)} for i, x in zip(ids, p)})
