"""Worker-side image transforms shared by encoders."""

from __future__ import annotations

import torch


class Uint8Transform:
    """A torchvision preprocessing up to (not including) ToTensor + Normalize, ending in a uint8 tensor.

    ``ToTensor`` + ``Normalize`` are applied per batch by the encoder (``normalize_batch``), which gives
    the same values as open_clip's own transform while workers pass 4x smaller tensors."""

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

    def __call__(self, im):
        x = self.pre(im)
        return self.to_tensor(x) if self.to_tensor is not None else x

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> what the original transform would have produced (ToTensor + Normalize)."""
        if self.mean is None:
            return batch.float()
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std
