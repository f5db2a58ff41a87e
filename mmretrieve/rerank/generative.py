"""The base of the rerankers that make a model *write* its judgement (``listwise``, ``pairwise``).

It holds what they share: the model options (``model=`` a local folder or hub id, or ``api=`` +
``api_model=`` an OpenAI-compatible endpoint; see ``rerank.generate``), the prompt file, and the
pictures shown (the query's; each candidate's, a video as ``frames`` frames side by side, capped at
``max_pixels``). A candidate whose picture cannot be read is **skipped and reported**: it keeps its
place in the shortlist and the others are ranked around it. A stage's fine score is its ranking turned
into a score (``1 - position / n``), so ``alpha=1`` (the default) re-orders the shortlist by the model's
ranking; the query-level report (cost, reasoning, unread answers, skipped candidates) travels in
``RerankOutput.info``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from mmretrieve.config import load_config
from mmretrieve.errors import BadImageError, BadVideoError, MLLMError
from mmretrieve.rerank.base import Reranker, RerankOutput
from mmretrieve.rerank.generate import Cost, GenStage, Prompt

log = logging.getLogger(__name__)

TEXT_KIND = {"text": "text", "image": "image", "video": "image", "composed": "composed", "composed-video": "composed"}


class GenerativeReranker(Reranker):
    """Shared options and plumbing; subclasses implement ``order(query, query_image, ids, images)``."""

    name = "generative"
    default_prompt = ""

    def __init__(self, *, k: int = 10, alpha: float | None = 1.0, norm: str = "none", prompt: str | None = None,
                 model: str | None = None, adapter: str | None = None, api: str | None = None,
                 api_model: str | None = None, api_key_env: str | None = None, dtype: str = "auto",
                 device: str | None = None, batch_size: int = 4, concurrency: int = 4, timeout: float = 120.0,
                 retries: int = 3, max_new_tokens: int = 256, temperature: float = 0.0, processor_kwargs: Any = None,
                 trust_remote_code: bool = False, cache: str | None = None, max_pixels: int | None = 448 * 448,
                 frames: int = 4, collage: bool = False) -> None:
        super().__init__(k=k, alpha=alpha, norm=norm)
        self.prompt = prompt or self.default_prompt
        try:
            name = self.prompt
            self._prompts = load_config(name) if name.endswith((".yaml", ".yml")) else load_config(f"prompts/{name}")
        except FileNotFoundError:
            raise MLLMError(f"{self.name}: prompt preset {self.prompt!r} not found (configs/prompts/{self.prompt}.yaml "
                            "or a YAML path)") from None
        self.max_pixels = int(max_pixels) if max_pixels else None
        self.frames, self.collage = int(frames), bool(collage)
        opts = dict(model=model, adapter=adapter, api=api, api_model=api_model, api_key_env=api_key_env, dtype=dtype,
                    device=device, batch_size=batch_size, concurrency=concurrency, timeout=timeout, retries=retries,
                    max_new_tokens=max_new_tokens, temperature=temperature, processor_kwargs=processor_kwargs,
                    trust_remote_code=trust_remote_code,
                    cache=None if cache is None else (False if str(cache).lower() in ("off", "false", "none") else cache))
        self.gen = GenStage(self.name, opts)
        if not model and not api:
            self.gen.generator()  # raises: says how to give a model
        # resolved options, for config()
        self.model, self.adapter, self.api, self.api_model = model, adapter, api, api_model
        self.max_new_tokens, self.temperature, self.batch_size = int(max_new_tokens), float(temperature), int(batch_size)

    def template(self, kind: str) -> dict:
        key = TEXT_KIND[kind] + ("_collage" if self.collage else "")
        try:
            return self._prompts[key]
        except KeyError:
            raise MLLMError(f"{self.name}: prompt preset {self.prompt!r} has no {key!r} entry") from None

    def picture(self, item_or_path) -> Image.Image:
        from mmretrieve.rerank.vlm import item_image

        return item_image(item_or_path, self.max_pixels, frames=self.frames)

    def query_picture(self, query) -> Image.Image | None:
        src = query.image if query.image is not None else query.video
        return None if src is None else self.picture(src if isinstance(src, Image.Image) else str(src))

    @staticmethod
    def query_text(query) -> str:
        t = query.text
        return t if isinstance(t, str) else (t[0] if t else "")

    def score(self, view, query, ids: np.ndarray, scores: np.ndarray) -> RerankOutput:
        ids = [int(i) for i in ids]
        if not ids:
            return RerankOutput(np.zeros(0))
        items = view.items(ids)
        qimg = self.query_picture(query)
        pictures: dict[int, Image.Image] = {}
        skipped = []
        for i in ids:
            it = items.get(i)
            try:
                if it is None:
                    raise BadImageError(f"no item {i} in the index")
                pictures[i] = self.picture(it)
            except (BadImageError, BadVideoError, OSError) as e:
                log.warning("%s: candidate %s skipped: %s", self.name, getattr(it, "uri", i), e)
                skipped.append({"id": i, "uri": getattr(it, "uri", None), "error": str(e)})
        shown = [i for i in ids if i in pictures]
        cost = Cost()
        info: dict[str, Any] = {}
        order = self.order(query, qimg, shown, pictures, cost, info) if len(shown) > 1 else shown
        if sorted(order) != sorted(shown):
            raise MLLMError(f"{self.name}: internal error, the ranking is not a permutation of the candidates")
        it = iter(order)  # skipped candidates keep their places, the ranked ones fill the others
        final = [i if i not in pictures else next(it) for i in ids]
        n = len(final)
        pos = {i: p for p, i in enumerate(final)}
        fine = np.array([1.0 - pos[i] / n for i in ids])
        info.update({"cost": cost.to_dict(), **({"skipped": skipped} if skipped else {})})
        return RerankOutput(fine, {i: {f"{self.name}_rank": pos[i] + 1} for i in ids}, info)

    def ask(self, built: list[tuple[str, Prompt]], cost: Cost) -> list[str]:
        """The model's answers to ``(template, prompt)`` pairs of one template, in one batch (through the
        generation cache); their cost is added to ``cost``."""
        answers, c = self.gen.generator().generate([p for _, p in built], template=built[0][0])
        cost.add(c)
        return answers

    def order(self, query, qimg, ids: list[int], pictures: dict[int, Image.Image], cost: Cost,
              info: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        d = super().config()
        d.update(self.gen.config())
        return {k: v for k, v in d.items() if v is not None}


__all__ = ["GenerativeReranker"]
