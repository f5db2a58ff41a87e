"""``timm:<model>``: an image-only encoder (global + patch features) from any timm model.

Self-supervised ViT patch tokens (DINOv2) are strong local descriptors for patch-level re-ranking
(LOCORE uses them), so ``emd:patches=timm:vit_small_patch14_dinov2.lvd142m`` pairs a CLIP coarse stage
with DINOv2 patches. Names:

- ``timm:vit_small_patch14_dinov2.lvd142m`` -- pretrained weights from the hub (cached after first use);
- ``timm:vit_small_patch14_dinov2.lvd142m@/path/model.safetensors`` -- a local weights file;
- ``timm:<model>@random`` -- random weights, for tests and speed benchmarks only.

Options: ``img_size`` (ViTs interpolate their position embeddings; e.g. 224 instead of DINOv2's 518),
``model_kwargs`` (passed to ``timm.create_model``, e.g. a tiny ``depth``/``embed_dim`` for tests).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from mmretrieve.encoders.base import Encoder, EncoderError, stat_files
from mmretrieve.encoders.hub import hub_source
from mmretrieve.encoders.transforms import Uint8Transform
from mmretrieve.errors import MissingDependencyError
from mmretrieve.runtime import resolve_device, resolve_precision, torch_dtype

log = logging.getLogger(__name__)


def _hub_weights(model_name: str, from_hub: bool):
    """Fail at once when hub weights can be neither downloaded nor found in the cache (``encoders.hub``)."""
    if not from_hub:
        return contextlib.nullcontext()
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:  # an unknown name: timm.create_model says so
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return contextlib.nullcontext()
    return hub_source(repo.split("@")[0], asked=f"could not create timm model {model_name!r}",
                      local_hint=f"timm:{model_name}@/path/to/model.safetensors")


class TimmEncoder(Encoder):
    modalities = ("image",)

    def __init__(
        self,
        spec: str,
        *,
        img_size: int | None = None,
        model_kwargs: dict | None = None,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int = 32,
    ) -> None:
        try:
            import timm
            from timm.data import create_transform, resolve_data_config
        except ImportError:
            raise MissingDependencyError("timm encoders need `timm`: pip install timm") from None
        model_name, _, source = spec.partition("@")
        if not model_name:
            raise EncoderError("timm: empty model name; expected e.g. timm:vit_small_patch14_dinov2.lvd142m")
        kwargs = dict(model_kwargs or {})
        if img_size:
            kwargs["img_size"] = int(img_size)
        pretrained, overlay = True, None
        if source == "random":
            log.warning("timm:%s@random has RANDOM weights: use it for speed benchmarks and tests only", model_name)
            pretrained = False
        elif source:
            source = os.path.abspath(os.path.expanduser(source))  # the stored name means this file from any cwd
            if not os.path.isfile(source):
                raise EncoderError(f"timm: weights file not found: {source}")
            overlay = {"file": source}
        try:
            with _hub_weights(model_name, pretrained and not overlay), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(
                    model_name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
                )
        except EncoderError:
            raise
        except Exception as e:
            hint = (
                " Pretrained weights come from the Hugging Face hub on first use; offline, download them on a "
                f"connected machine and pass timm:{model_name}@/path/to/model.safetensors."
                if pretrained and not overlay else ""
            )
            raise EncoderError(f"could not create timm model {model_name!r}: {e}.{hint}") from e
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        model.eval()
        if self.precision != "fp32":
            model = model.to(torch_dtype(self.precision))
        self.model = model.to(self.device)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        override = {"input_size": (3, *size)} if img_size and size else {}
        cfg = resolve_data_config(override, model=model)
        self._transform = Uint8Transform(create_transform(**cfg, is_training=False))
        self._prefix = int(getattr(model, "num_prefix_tokens", 0))
        with torch.inference_mode():
            x = torch.zeros(1, *cfg["input_size"], device=self.device, dtype=torch_dtype(self.precision))
            feats = model.forward_features(x)
            pooled = model.forward_head(feats, pre_logits=True)
        self.dim = int(pooled.shape[-1])
        grid = self._grid(feats)
        self.patch_grid = grid[1] if grid[1] == grid[2] else None
        self.patch_dim = grid[3]
        self.name = f"timm:{model_name}" + (f"@{source}" if source else "")
        self._source = os.path.basename(source) if source else None
        self._img_size = cfg["input_size"][-1]

    def identity(self) -> dict:
        return {"weights": self._source, "img_size": self._img_size}

    def weights_fingerprint(self) -> list | None:
        path = self.name.partition("@")[2]
        return stat_files([path]) if path and path != "random" else None

    @property
    def image_transform(self):
        return self._transform

    def normalize_batch(self, batch):
        return self._transform.normalize(batch)

    def _patch_map(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:  # CNN: (B, C, H, W)
            return feats.permute(0, 2, 3, 1)
        tokens = feats[:, self._prefix :]
        b, n, d = tokens.shape
        g = int(math.isqrt(n))
        if g * g != n:
            raise EncoderError(f"{self.name}: {n} patch tokens do not form a square grid")
        return tokens.reshape(b, g, g, d)

    def _grid(self, feats):
        return tuple(self._patch_map(feats).shape)

    def _forward_images(self, batch, *, with_patches):
        x = batch.to(torch_dtype(self.precision))
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        return pooled, (self._patch_map(feats) if with_patches else None)
