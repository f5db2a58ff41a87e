"""Worker-side image transforms shared by encoders."""

from __future__ import annotations

import torch

from mmretrieve.errors import BadImageError

#: beyond this long:short side ratio an image is centre-cropped to it before a short-side resize (the
#: centre crop that follows keeps only the middle anyway); without a centre crop it is refused
MAX_ASPECT = 4.0


def _short_side_resize(steps) -> bool:
    """Whether the pipeline resizes the *short* side to a fixed length (the long side then grows with the
    aspect ratio: a 1x100000 image becomes 224 x 22,400,000)."""
    for t in steps:
        name = type(t).__name__
        if name == "Resize":
            size = t.size
            return isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)
        if name == "ResizeKeepRatio":
            return float(getattr(t, "longest", 0.0)) < 1.0
    return False


def centre_crop_aspect(im, max_aspect: float = MAX_ASPECT):
    """The centre of ``im`` cut to at most ``max_aspect`` : 1 (unchanged when it already is)."""
    w, h = im.size
    short, long_ = min(w, h), max(w, h)
    keep = max(1, int(short * max_aspect))
    if long_ <= keep:
        return im
    off = (long_ - keep) // 2
    return im.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))


class Uint8Transform:
    """A torchvision preprocessing up to (not including) ToTensor + Normalize, ending in a uint8 tensor.

    ``ToTensor`` + ``Normalize`` are applied per batch by the encoder (``normalize_batch``), which gives
    the same values as open_clip's own transform while workers pass 4x smaller tensors.

    Work and memory are bounded whatever the image's shape: a short-side resize (open_clip's and timm's
    default) of an image longer than ``MAX_ASPECT`` : 1 runs on its centre cut to that ratio (the centre
    crop after it keeps only the middle anyway), and such an image is refused when no centre crop
    follows the resize."""

    def __init__(self, transform) -> None:
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        names = [type(t).__name__ for t in steps]
        self.mean = self.std = None
        if len(steps) >= 2 and names[-1] == "Normalize" and names[-2] in ("ToTensor", "MaybeToTensor"):
            self.pre = T.Compose(steps[:-2])
            self.mean = tuple(float(m) for m in steps[-1].mean)
            self.std = tuple(float(s) for s in steps[-1].std)
            self.to_tensor = T.PILToTensor()
        else:  # an unexpected pipeline: run it whole (float output)
            self.pre, self.to_tensor = transform, None
        size = next((getattr(t, "size", None) for t in steps if type(t).__name__ == "Resize"), None)
        self.draft_size = size if isinstance(size, int) else (min(size) if size else None)
        self.short_side = _short_side_resize(steps)
        self.centre_crop = any(n in ("CenterCrop", "CenterCropOrPad") for n in names)

    def bound(self, im):
        """``im`` as the resize may take it without unbounded work (see the class docstring)."""
        w, h = im.size
        if not self.short_side or max(w, h) <= MAX_ASPECT * min(w, h):
            return im
        if self.centre_crop:
            return centre_crop_aspect(im, MAX_ASPECT)
        raise BadImageError(None, f"aspect ratio {max(w, h)}:{min(w, h)} is beyond {MAX_ASPECT:g}:1, which this "
                                  "encoder's short-side resize cannot bound")

    def __call__(self, im):
        x = self.pre(self.bound(im))
        return self.to_tensor(x) if self.to_tensor is not None else x

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> what the original transform would have produced (ToTensor + Normalize)."""
        if self.mean is None:
            return batch.float()
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std
