"""Encoder preprocessing on tensors (on the encoder's device), equivalent to each encoder's PIL transform.

With GPU decoding (``mmretrieve.media.gpu_decode``) images arrive as CHW uint8 tensors already on the
GPU; these transforms resize, crop or pad them there, so the encoder's input is built on the device
without a round trip through the CPU. Resizing is bicubic with antialiasing (what PIL's bicubic
``resize`` does), so the result matches the PIL path to a few grey levels, and embeddings to a cosine
above 0.99 (tested on the packaged photos).

``device_transform(encoder)`` gives the tensor transform for an encoder's ``image_transform``
(open_clip / timm: ``Resize`` of the short side + ``CenterCrop``; the embedded encoder: resize of the
long side + white padding), or None for transforms it does not know (those images take the CPU path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (x.shape[-2], x.shape[-1]) == (h, w):
        return x
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(x, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)


class ShortSideCrop:
    """Resize the short side to ``size`` (bicubic, antialiased) and centre-crop ``crop`` (open_clip, timm).
    An image longer than ``MAX_ASPECT`` : 1 is first cut to its centre at that ratio, as the PIL path does
    (``Uint8Transform.bound``), so a 1 x 100000 image costs bounded work here too."""

    def __init__(self, size: int, crop: tuple[int, int]) -> None:
        self.size, self.crop = int(size), (int(crop[0]), int(crop[1]))

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        from mmretrieve.encoders.transforms import MAX_ASPECT

        out = []
        for x in images:
            h, w = x.shape[-2:]
            keep = max(1, int(min(h, w) * MAX_ASPECT))
            if max(h, w) > keep:
                off = (max(h, w) - keep) // 2
                x = x[..., :, off : off + keep] if w > h else x[..., off : off + keep, :]
                h, w = x.shape[-2:]
            s = self.size / min(h, w)
            x = _resize(x, max(1, round(h * s)), max(1, round(w * s)))
            out.append(TF.center_crop(x, list(self.crop)))
        return torch.stack(out)


class LongSidePad:
    """Resize the long side to ``size`` and pad to a white square (the embedded encoder's transform)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.full((len(images), 3, self.size, self.size), 255, dtype=torch.uint8,
                         device=images[0].device if len(images) else "cpu")
        for j, x in enumerate(images):
            h, w = x.shape[-2:]
            s = self.size / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            top, left = (self.size - nh) // 2, (self.size - nw) // 2
            out[j, :, top : top + nh, left : left + nw] = _resize(x, nh, nw)
        return out


def device_transform(encoder) -> Callable[[Sequence[torch.Tensor]], torch.Tensor] | None:
    """The tensor equivalent of ``encoder.image_transform`` (uint8 in, uint8 out), or None."""
    tf = encoder.image_transform
    if type(tf).__name__ == "PadSquareTransform":
        return LongSidePad(tf.size)
    steps = list(getattr(getattr(tf, "pre", None), "transforms", []))
    names = [type(s).__name__ for s in steps]
    if getattr(tf, "mean", None) is None:  # a pipeline run whole (float output): no tensor equivalent
        return None
    if names[:2] == ["Resize", "CenterCrop"] and all(n in ("MaybeConvertMode", "_convert_to_rgb", "function") for n in names[2:]):
        size = steps[0].size
        if isinstance(size, (list, tuple)):
            if len(size) != 1:
                return None
            size = size[0]
        return ShortSideCrop(int(size), tuple(steps[1].size))
    return None


__all__ = ["device_transform", "ShortSideCrop", "LongSidePad"]
