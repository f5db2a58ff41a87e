"""``locore``: list-wise local-descriptor re-ranking with a long-context transformer (LOCORE, CVPR 2025).

The query and the whole shortlist go through one Longformer pass; a 2-way token classifier says, for
every token of every candidate, whether that candidate shows the query's object; the per-candidate
score is fused with the previous (coarse) score. Written for this package after reading
``MrZilinXiao/LongContextReranker`` (no code copied); where each choice comes from:

- **Input sequence** (``models/longformer_universal_v2.py``, ``ExtractiveLongformerForCache.forward``):
  one block per image, the query block first, then one per candidate in shortlist order; a block is
  ``[global] [d_1] ... [d_n] [SEP]`` (``n = num_descriptors``, 48 in the paper). Descriptors go through
  ``local_to_lm`` (a ``Linear`` when their dim differs from the hidden size, else the identity), plus a
  learned *scale* embedding (``scale_encoder``; DINOv2 descriptors are single-scale, index 0, as the
  reference's ``extract/extract_dino.py`` bucketises them); the global token through ``global_to_lm``;
  ``[SEP]`` is a learned vector (``sep_embedding``). Padded descriptors (fewer than ``n`` patches) are
  zero vectors with attention mask 0, the global and ``[SEP]`` tokens always 1. Position ids are the
  Longformer default (sequential from ``pad_token_id + 1``), no token types. Global attention on every
  query-block token and on every ``[SEP]`` (``query_global_attention=True``, ``global_attention_mask
  [:, offset::offset+1] = 1``). The sequence is padded to a multiple of the attention window with the
  learned ``pad_embedding`` (the reference's ``_pad_to_window_size`` override), done here before the
  call so the Longformer never needs its (absent) word embeddings.
- **Per-candidate score** (``LongformerForExtrativeRetrieval.batch_predict``, called with
  ``with_softmax=False`` by ``eval_revisitop.py``): the raw class-1 ("in") logits of a candidate's
  tokens *without* its ``[SEP]`` (its global token and its descriptors), aggregated by ``max-prod``
  (product), ``max-sum`` (sum), ``max-start`` (the first of those tokens: the global token) or
  ``max-end`` (the last: the last descriptor). Default ``max-end``, the mode of the reference's
  sliding-window evaluation (the one its README runs).
- **Fusion** (``global_local_ensemble`` / ``sliding_ranks_adjust``): ``alpha * previous + (1 - alpha) *
  sigmoid(t * local)``; README example ``alpha = 0.5, t = 0.1``. Here ``previous`` is the score the
  previous stage passed (the coarse CLIP similarity, where the reference has DINOv2 global cosine).
  ``alpha`` is therefore LOCORE's *global* weight and the fusing is done by this stage: its ``fuse``
  replaces the previous score with the fused one (the pipeline's ``alpha * fine`` rule does not apply).
- **Long shortlists** (``eval_revisitop.py``, ``--sliding_reranking_type``): windows of ``window``
  candidates (100) moved by ``stride`` (50), one forward pass each, each window re-sorting its slice of
  the current order by the fused score; schedules ``end-to-start`` (README), ``start-to-end``,
  ``start-to-end-to-start``, ``end-to-start-to-end`` with the reference's start ranges. With
  ``max-sum`` the window's local score is divided by the block length (``num_local_features + 1``), as
  the reference does in this mode only. Generalised to shortlists that are not ``window + m * stride``
  long: starts are clipped at 0 and ``end-to-start`` always ends with the window at 0. The scores this
  stage returns then follow the final order (each item's last fused score, made strictly decreasing
  along that order), so the pipeline's sort reproduces it.
- **Checkpoint** (README "Download LOCORE Checkpoints": ``locore_base.safetensors`` on the hub as
  ``vislang/locore_dinov2_base``; ``eval_revisitop.py`` loads ``model.safetensors`` from a folder with
  ``safetensors.torch.load_model`` into the module built from the ``longformer-base-5120`` config): the
  state dict of ``ExtractiveLongformerForCache`` -- ``language_model.longformer.*`` (a
  ``LongformerModel`` without pooler and without word embeddings, plus ``sep_embedding`` and
  ``pad_embedding``), ``language_model.classifier.*``, ``scale_encoder.weight``, optional
  ``local_to_lm.*`` / ``global_to_lm.*`` ``Linear`` projections. Read from a folder holding
  ``model.safetensors`` (or one other ``*.safetensors``, or ``pytorch_model.bin`` read with
  ``weights_only=True``) and ``config.json`` (a ``LongformerConfig``; without one the config is read off
  the weights' shapes, with 64-dim heads and a 512-token attention window as in Longformer-base), a
  single ``.safetensors`` file, or a hub id.
- **Descriptors**: the reference keeps each image's 48 DINOv2 patch tokens with the highest AMES detector
  weight (feature norm without a detector) and a global descriptor that is the weighted mean of the
  patch tokens, L2-normalised. This package stores unit-norm patches (no norm, no detector), so it keeps
  the ``num_descriptors`` patches closest (cosine) to the image's mean patch, in that order, and uses
  the L2-normalised mean patch as the global token. Patches come from the index's patch store or, with
  ``patches=timm:...`` (e.g. ``timm:vit_base_patch14_dinov2.lvd142m``, 768-dim like the published
  model), computed on the fly and cached -- the ``emd`` reranker's machinery, reused.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmretrieve.errors import RerankError, UsageError
from mmretrieve.rerank.base import RERANKERS, Reranker, RerankOutput, option_device

log = logging.getLogger(__name__)

AGGREGATES = ("max-prod", "max-sum", "max-start", "max-end")
SCHEDULES = ("end-to-start", "start-to-end", "start-to-end-to-start", "end-to-start-to-end")
#: the checkpoint the LOCORE README publishes (DINOv2-B descriptors, Longformer-base-5120)
PUBLISHED = "vislang/locore_dinov2_base"


# ---- the model ------------------------------------------------------------------------------------------
def _projection(sd: dict, name: str, dim: int | None, hidden: int) -> nn.Module:
    if f"{name}.0.weight" in sd:
        raise RerankError(f"locore: the checkpoint's {name} is a bottleneck (--bottleneck_dim); only a single "
                          "Linear or the identity is supported")
    if f"{name}.weight" in sd:
        return nn.Linear(sd[f"{name}.weight"].shape[1], hidden)
    if dim is not None and dim != hidden:
        return nn.Linear(dim, hidden)
    return nn.Identity()


class LocoreNet(nn.Module):
    """``ExtractiveLongformerForCache`` in the reference's parameter layout (the same state-dict keys)."""

    def __init__(self, config, *, local_dim: int | None = None, global_dim: int | None = None,
                 num_scales: int = 3, state_dict: dict | None = None) -> None:
        from transformers import LongformerConfig, LongformerModel

        super().__init__()
        sd = state_dict or {}
        hidden = int(config.hidden_size)
        # the word embeddings are dropped (inputs are embeddings): build them tiny, then remove them
        small = LongformerConfig.from_dict({**config.to_dict(), "vocab_size": max(config.pad_token_id, config.sep_token_id) + 1})
        lf = LongformerModel(small, add_pooling_layer=False)
        lf.embeddings.word_embeddings = None
        lf.register_parameter("sep_embedding", nn.Parameter(torch.randn(hidden) * 0.02))
        lf.register_parameter("pad_embedding", nn.Parameter(torch.zeros(hidden)))
        self.language_model = nn.Module()
        self.language_model.longformer = lf
        self.language_model.classifier = nn.Linear(hidden, 2)
        self.config = config
        self.scale_encoder = nn.Embedding(int(num_scales), hidden)
        self.local_to_lm = _projection(sd, "local_to_lm", local_dim, hidden)
        self.global_to_lm = _projection(sd, "global_to_lm", global_dim, hidden)

    @property
    def hidden(self) -> int:
        return int(self.config.hidden_size)

    @property
    def local_dim(self) -> int:
        return self.local_to_lm.in_features if isinstance(self.local_to_lm, nn.Linear) else self.hidden

    @property
    def global_dim(self) -> int:
        return self.global_to_lm.in_features if isinstance(self.global_to_lm, nn.Linear) else self.hidden

    @property
    def attention_window(self) -> int:
        w = self.config.attention_window
        return int(w if isinstance(w, int) else max(w))

    def max_tokens(self) -> int:
        """The longest (window-padded) sequence the position table covers."""
        return int(self.config.max_position_embeddings) - int(self.config.pad_token_id) - 1

    def blocks(self, local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        """(N, n, D) descriptors + (N, Dg) global -> (N, n + 2, H) blocks ``[global] d_1..d_n [SEP]``."""
        n_img, n = local.shape[:2]
        scales = torch.zeros(n_img, n, dtype=torch.long, device=local.device)
        x = self.local_to_lm(local) + self.scale_encoder(scales)
        g = self.global_to_lm(glob)[:, None]
        sep = self.language_model.longformer.sep_embedding.to(x.dtype)[None, None].expand(n_img, 1, -1)
        return torch.cat([g.to(x.dtype), x, sep], dim=1)

    def forward(self, embeds: torch.Tensor, attention: torch.Tensor, global_attention: torch.Tensor) -> torch.Tensor:
        """(B, L, H) embeddings and (B, L) masks -> (B, L, 2) token logits."""
        lf = self.language_model.longformer
        b, length, h = embeds.shape
        pad = (-length) % self.attention_window
        if pad:
            filler = lf.pad_embedding.to(embeds.dtype)[None, None].expand(b, pad, h)
            embeds = torch.cat([embeds, filler], dim=1)
            attention = nn.functional.pad(attention, (0, pad), value=0)
            global_attention = nn.functional.pad(global_attention, (0, pad), value=0)
        out = lf(inputs_embeds=embeds, attention_mask=attention, global_attention_mask=global_attention)
        return self.language_model.classifier(out.last_hidden_state[:, :length])


def sequence_layout(query_valid: np.ndarray, cand_valid: np.ndarray) -> dict[str, np.ndarray]:
    """Token layout of one sequence: ``query_valid`` (n,) and ``cand_valid`` (W, n) descriptor masks ->
    ``kind`` (``G`` global, ``D`` descriptor, ``S`` SEP), ``image`` (0 = query, 1.. = candidates),
    ``attention`` and ``global_attention`` (0/1), all of length ``(1 + W) * (n + 2)``."""
    valid = np.concatenate([np.asarray(query_valid, bool)[None], np.asarray(cand_valid, bool).reshape(-1, len(query_valid))])
    n_img, n = valid.shape
    one = np.ones((n_img, 1), bool)
    attention = np.concatenate([one, valid, one], axis=1).astype(np.int64)
    glob = np.zeros((n_img, n + 2), np.int64)
    glob[0] = 1          # the whole query block
    glob[:, -1] = 1      # every SEP
    kind = np.tile(np.array(["G"] + ["D"] * n + ["S"]), n_img)
    image = np.repeat(np.arange(n_img), n + 2)
    return {"kind": kind, "image": image, "attention": attention.ravel(), "global_attention": glob.ravel()}


def aggregate(in_logits: np.ndarray | torch.Tensor, mode: str):
    """(W, n + 1) "in" logits of each candidate's global + descriptor tokens -> (W,) scores."""
    if mode == "max-prod":
        return in_logits.prod(-1)
    if mode == "max-sum":
        return in_logits.sum(-1)
    if mode == "max-start":
        return in_logits[..., 0]
    if mode == "max-end":
        return in_logits[..., -1]
    raise UsageError(f"locore: aggregate must be one of {', '.join(AGGREGATES)}, got {mode!r}")


def fuse_scores(global_sim, local, alpha: float, t: float) -> np.ndarray:
    """LOCORE's fusion: ``alpha * global + (1 - alpha) * sigmoid(t * local)``."""
    g, x = np.asarray(global_sim, np.float64), np.asarray(local, np.float64)
    return alpha * g + (1.0 - alpha) / (1.0 + np.exp(-t * x))


# ---- sliding windows ---------------------------------------------------------------------------------------
def window_starts(n: int, window: int, stride: int, schedule: str) -> list[int]:
    """The window starts over a shortlist of ``n`` (the reference's ranges, clipped at 0)."""
    if n <= window:
        return [0]
    forward = [s for s in range(0, n - window, stride)] + [n - window]  # the last window ends at n: every
    forward = list(dict.fromkeys(forward))                               # candidate is scored at least once
    backward = [max(0, s) for s in range(n - window, -stride, -stride)]
    if backward[-1] != 0:
        backward.append(0)
    backward = list(dict.fromkeys(backward))
    if schedule == "start-to-end":
        return forward
    if schedule == "end-to-start":
        return backward
    if schedule == "start-to-end-to-start":
        return forward + backward[1:]
    if schedule == "end-to-start-to-end":
        return backward + forward[1:]
    raise UsageError(f"locore: sliding must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def sliding_rerank(n: int, window: int, stride: int, schedule: str,
                   score_window: Callable[[list[int]], np.ndarray]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Re-rank positions ``0..n-1`` window by window: ``score_window(positions)`` returns their fused
    scores; each window re-sorts its slice of the current order (stable, descending). Returns the final
    order, every position's last fused score and how many windows scored it."""
    order = list(range(n))
    last = np.full(n, -np.inf)
    seen = np.zeros(n, np.int64)
    for st in window_starts(n, window, stride, schedule):
        sel = order[st : st + window]
        s = np.asarray(score_window(sel), np.float64)
        last[sel] = s
        seen[sel] += 1
        order[st : st + window] = [sel[j] for j in np.argsort(-s, kind="stable")]
    return order, last, seen


def monotone_scores(order: list[int], last: np.ndarray) -> np.ndarray:
    """Scores (indexed by position) that sort exactly into ``order``: the last fused scores along the
    order, made strictly decreasing."""
    along = np.minimum.accumulate(last[order]) - np.arange(len(order)) * 1e-9
    out = np.empty(len(order))
    out[order] = along
    return out


# ---- checkpoints ----------------------------------------------------------------------------------------
def _weights_file(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if (folder / "pytorch_model.bin").is_file():
        return folder / "pytorch_model.bin"
    what = f"several .safetensors files ({', '.join(p.name for p in found)})" if found else "no weights"
    raise RerankError(f"locore: {folder} has {what}: expected model.safetensors (or a single *.safetensors, or "
                      "pytorch_model.bin) in the LOCORE layout")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(path))
    return {k.removeprefix("module."): v for k, v in sd.items()}


def infer_config(sd: dict[str, torch.Tensor]):
    """A ``LongformerConfig`` read off the weights' shapes (Longformer-base's head size and window)."""
    from transformers import LongformerConfig

    p = "language_model.longformer."
    if f"{p}sep_embedding" not in sd:
        raise RerankError("locore: the weights are not a LOCORE checkpoint (no language_model.longformer.sep_embedding)")
    hidden = sd[f"{p}sep_embedding"].shape[0]
    layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(f"{p}encoder.layer."))
    return LongformerConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=sd[f"{p}encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd[f"{p}embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd[f"{p}embeddings.token_type_embeddings.weight"].shape[0],
        attention_window=[512] * layers,
    )


def resolve_checkpoint(model: str) -> tuple[Path, Path | None]:
    """``model`` (a folder, a weights file or a hub id) -> (weights file, config.json or None)."""
    p = Path(model).expanduser()
    if p.is_file():
        cfg = p.parent / "config.json"
        return p, cfg if cfg.is_file() else None
    if not p.is_dir():
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise RerankError(f"locore: checkpoint {model!r} not found (give a folder with model.safetensors + "
                              f"config.json, a .safetensors file, or a hub id such as {PUBLISHED})")
        from huggingface_hub import snapshot_download

        from mmretrieve.encoders.hub import hub_source

        with hub_source(model, asked=f"locore: could not load checkpoint {model!r}",
                        local_hint="locore:model=/path/to/folder", error=RerankError):
            p = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
    cfg = p / "config.json"
    return _weights_file(p), cfg if cfg.is_file() else None


def load_locore(model: str, device: torch.device, dtype: torch.dtype) -> LocoreNet:
    """The LOCORE module with its weights, in eval mode on ``device``."""
    from transformers import LongformerConfig

    weights, cfg_file = resolve_checkpoint(model)
    sd = read_state_dict(weights)
    if cfg_file is not None:
        cfg = LongformerConfig.from_dict(json.loads(cfg_file.read_text()))
    else:
        cfg = infer_config(sd)
        log.info("locore: %s has no config.json; using one read off the weights (%s)", weights.parent, cfg.to_diff_dict())
    n_scales = sd["scale_encoder.weight"].shape[0] if "scale_encoder.weight" in sd else 3
    net = LocoreNet(cfg, num_scales=n_scales, state_dict=sd)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RerankError(f"locore: {weights} does not match the LOCORE layout: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    log.info("locore: loaded %s (hidden %d, %d layers, descriptors %d-dim)", weights, net.hidden,
             cfg.num_hidden_layers, net.local_dim)
    return net.to(device=device, dtype=dtype).eval()


# ---- descriptors ----------------------------------------------------------------------------------------
def select_descriptors(P: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p, D) patches -> (n, D) descriptors (zero-padded), (n,) valid mask, (D,) global descriptor."""
    P = np.asarray(P, np.float32)
    mean = P.mean(0) if len(P) else np.zeros(P.shape[-1], np.float32)
    glob = mean / max(float(np.linalg.norm(mean)), 1e-12)
    keep = np.argsort(-(P @ glob), kind="stable")[:n]
    out = np.zeros((n, P.shape[-1]), np.float32)
    out[: len(keep)] = P[keep]
    valid = np.zeros(n, bool)
    valid[: len(keep)] = True
    return out, valid, glob.astype(np.float32)


# ---- the reranker ---------------------------------------------------------------------------------------
@RERANKERS.register("locore")
class LocoreReranker(Reranker):
    """LOCORE: the query and the shortlist in one long-context pass, fused with the previous score."""

    name = "locore"

    def __init__(
        self,
        *,
        model: str = PUBLISHED,
        k: int = 100,
        alpha: float = 0.5,
        t: float = 0.1,
        num_descriptors: int = 48,
        window: int = 100,
        stride: int = 50,
        sliding: str = "end-to-start",
        aggregate: str = "max-end",
        patches: str | None = None,
        grid: int | None = None,
        on_the_fly: bool = True,
        device: str | None = None,
        dtype: str = "auto",
        cache_size: int = 4096,
    ) -> None:
        from mmretrieve.rerank.emd import EMDReranker
        from mmretrieve.runtime import resolve_precision

        super().__init__(k=k, alpha=alpha, norm="none")
        for opt, v in (("num_descriptors", num_descriptors), ("window", window), ("stride", stride)):
            if int(v) < 1:
                raise UsageError(f"locore: {opt} must be a positive integer, got {v}")
        if int(stride) > int(window):  # e.g. window=20 with the default stride: the reference's ratio
            log.info("locore: stride %s exceeds window %s; using %d", stride, window, max(1, int(window) // 2))
            stride = max(1, int(window) // 2)
        if aggregate not in AGGREGATES:
            raise UsageError(f"locore: aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        if sliding not in SCHEDULES:
            raise UsageError(f"locore: sliding must be one of {', '.join(SCHEDULES)}, got {sliding!r}")
        self.model, self.t = str(model), float(t)
        self.num_descriptors, self.window, self.stride = int(num_descriptors), int(window), int(stride)
        self.sliding, self.aggregate, self.patches, self.grid = sliding, aggregate, patches, grid
        self.on_the_fly, self.device, self.dtype, self.cache_size = bool(on_the_fly), device, dtype, int(cache_size)
        self._dev = option_device("locore", device)
        self._dtype = resolve_precision(dtype, self._dev, allow_bf16_cpu=False)
        # the patch machinery (store, on-the-fly extraction, cache, composed queries) is emd's
        self._patch_source = EMDReranker(k=k, patches=patches, grid=grid, on_the_fly=on_the_fly, device=device,
                                         cache_size=cache_size)
        self._net: LocoreNet | None = None

    def net(self) -> LocoreNet:
        if self._net is None:
            from mmretrieve.runtime import torch_dtype

            self._net = load_locore(self.model, self._dev, torch_dtype(self._dtype))
        return self._net

    def fuse(self, fine: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The stage fuses itself (``alpha * previous + (1 - alpha) * sigmoid(t * local)``): replace."""
        return np.asarray(fine, dtype=np.float64)

    def check_fits(self, net: LocoreNet, n_candidates: int) -> None:
        block = self.num_descriptors + 2
        tokens = (1 + min(n_candidates, self.window)) * block
        padded = math.ceil(tokens / net.attention_window) * net.attention_window
        if padded > net.max_tokens():
            raise RerankError(
                f"locore: {min(n_candidates, self.window)} candidates x {self.num_descriptors} descriptors make "
                f"{tokens} tokens ({padded} padded to the attention window), more than the checkpoint's "
                f"{net.max_tokens()} positions; lower window, k or num_descriptors")

    def descriptors(self, view, query, ids: np.ndarray):
        """(query descriptors, valid, global), (candidates', valid, globals) as arrays."""
        if query.image is None:
            raise UsageError("the locore reranker compares image descriptors: it needs an image or composed query")
        Q = self._patch_source.query_patches(view, query)
        C = self._patch_source.candidate_patches(view, ids)
        want = self.net().local_dim
        if Q.shape[-1] != want or C.shape[-1] != want:
            raise RerankError(
                f"locore: the descriptors are {C.shape[-1]}-dim but checkpoint {self.model} expects {want}-dim "
                f"descriptors (e.g. DINOv2-B's 768); use patches=timm:<model> with a backbone of that dim, or an "
                f"index whose patch store has it")
        q = select_descriptors(Q, self.num_descriptors)
        c = [select_descriptors(P, self.num_descriptors) for P in C]
        return q, tuple(np.stack(x) for x in zip(*c))

    def _embed(self, net: LocoreNet, d, v, g) -> torch.Tensor:
        dt = next(net.parameters()).dtype
        return net.blocks(torch.as_tensor(d, dtype=dt, device=self._dev), torch.as_tensor(g, dtype=dt, device=self._dev))

    @torch.inference_mode()
    def local_scores(self, q, c, positions: list[int], sliding: bool) -> np.ndarray:
        """Raw aggregated "in" logits of candidates ``positions`` in one forward pass (one window)."""
        net = self.net()
        qb, cb = self._embed(net, *(x[None] for x in q)), self._embed(net, *(x[positions] for x in c))
        lay = sequence_layout(q[1], c[1][positions])
        embeds = torch.cat([qb, cb]).reshape(1, -1, net.hidden)
        att = torch.as_tensor(lay["attention"], device=self._dev)[None]
        glob = torch.as_tensor(lay["global_attention"], device=self._dev)[None]
        logits = net(embeds, att, glob)[0, :, 1].float()
        block = self.num_descriptors + 2
        inside = logits.reshape(1 + len(positions), block)[1:, :-1]
        s = aggregate(inside, self.aggregate)
        if sliding and self.aggregate == "max-sum":
            s = s / block
        return s.double().cpu().numpy()

    def score(self, view, query, ids: np.ndarray, scores: np.ndarray | None = None) -> RerankOutput:
        n = len(ids)
        if n == 0:
            return RerankOutput(np.zeros(0))
        self.check_fits(self.net(), n)
        q, c = self.descriptors(view, query, ids)
        prev = np.zeros(n) if scores is None else np.asarray(scores, np.float64)
        local = np.zeros(n)

        def score_window(pos: list[int]) -> np.ndarray:
            local[pos] = self.local_scores(q, c, pos, sliding=n > self.window)
            return fuse_scores(prev[pos], local[pos], self.alpha, self.t)

        if n <= self.window:
            fine, seen = score_window(list(range(n))), np.ones(n, np.int64)
        else:
            order, last, seen = sliding_rerank(n, self.window, self.stride, self.sliding, score_window)
            fine = monotone_scores(order, last)
        extra = {int(i): {"locore_local": float(x), "locore_windows": int(w)} for i, x, w in zip(ids, local, seen)}
        return RerankOutput(fine, extra=extra)


__all__ = ["LocoreReranker", "LocoreNet", "load_locore", "sequence_layout", "aggregate", "fuse_scores",
           "window_starts", "sliding_rerank", "select_descriptors", "AGGREGATES", "SCHEDULES", "PUBLISHED"]
