"""Encoders behind one front door: ``create_encoder(name)`` and ``list_encoders()``.

Names carry their source; the part before the first ``:`` picks the registered family:

>>> from mmretrieve import create_encoder, list_encoders
>>> list_encoders()                                            # doctest: +SKIP
['embedded', 'open_clip', 'timm']
>>> enc = create_encoder("embedded")                           # offline default   # doctest: +SKIP
>>> enc = create_encoder("open_clip:ViT-B-32@laion2b_s34b_b79k")                    # doctest: +SKIP
>>> enc = create_encoder("open_clip:local-dir:/models/my-clip")                     # doctest: +SKIP

Options may follow the family as ``k=v`` pairs (``embedded:space=conse``) or be passed as keyword
arguments (``create_encoder("embedded", space="conse")``).
"""

from __future__ import annotations

import threading
from typing import Any

from mmretrieve.config import parse_kv
from mmretrieve.encoders.base import Encoder, EncoderInfo
from mmretrieve.errors import EncoderError
from mmretrieve.registry import Registry

ENCODERS: Registry[Encoder] = Registry("encoder")

DEFAULT_ENCODER = "embedded"


@ENCODERS.register("embedded")
def _embedded(spec: str = "", **kw: Any) -> Encoder:
    """Offline zero-shot dual encoder from packaged weights (EfficientNet-Lite0 + MiniLM, ImageNet concepts only)."""
    from mmretrieve.encoders.embedded import EmbeddedEncoder

    return EmbeddedEncoder(**{**parse_kv(spec), **kw})


@ENCODERS.register("open_clip")
def _open_clip(spec: str = "", **kw: Any) -> Encoder:
    """Any open_clip model: open_clip:<model>@<tag|checkpoint>, open_clip:local-dir:<dir>, open_clip:hf-hub:<repo>."""
    from mmretrieve.encoders.open_clip_encoder import OpenClipEncoder

    return OpenClipEncoder(spec, **kw)


@ENCODERS.register("timm")
def _timm(spec: str = "", **kw: Any) -> Encoder:
    """Image-only timm model (global + patch features, e.g. DINOv2 for EMD): timm:<model>[@<weights file>|@random]."""
    from mmretrieve.encoders.timm_encoder import TimmEncoder

    return TimmEncoder(spec, **kw)


_CACHE: dict[tuple, Encoder] = {}
_LOCK = threading.Lock()


def split_name(name: str) -> tuple[str, str]:
    """``family:spec``; open_clip's own ``hf-hub:org/repo`` spelling is the open_clip family's."""
    family, _, spec = name.strip().partition(":")
    if family == "hf-hub":
        return "open_clip", name.strip()
    return family, spec


def encoder_presets() -> dict[str, dict]:
    """Named encoder presets from ``configs/encoders/*.yaml`` (e.g. ``clip-vit-b32``)."""
    from mmretrieve.config import list_presets, load_config

    return {p.split("/", 1)[1]: load_config(p) for p in list_presets("encoders")}


def create_encoder(name: str = DEFAULT_ENCODER, *, cache: bool = True, **kwargs: Any) -> Encoder:
    """Create (or reuse) an encoder by name or preset. ``cache=False`` always builds a new instance."""
    family, spec = split_name(name)
    if family not in ENCODERS and not spec:
        presets = encoder_presets()
        if family in presets:
            p = presets[family]
            return create_encoder(p["encoder"], cache=cache, **{**(p.get("options") or {}), **kwargs})
    factory = ENCODERS.get(family)
    key = (family, spec, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if cache:
        with _LOCK:
            if key in _CACHE:
                return _CACHE[key]
    enc = factory(spec=spec, **kwargs)
    enc.spec = (name, dict(kwargs))  # how to make it again elsewhere (a Ray actor)
    if cache:
        with _LOCK:
            _CACHE.setdefault(key, enc)
    return enc


def encoder_spec(encoder: Encoder) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` that ``create_encoder`` turns into this encoder again (another process, a Ray
    actor on another machine), or None for an encoder not made by ``create_encoder``."""
    spec = getattr(encoder, "spec", None)
    return (spec[0], dict(spec[1])) if spec else None


def list_encoders(presets: bool = False) -> list[str]:
    """Registered encoder families (and, with ``presets=True``, the preset names from configs/)."""
    return ENCODERS.names() + (sorted(encoder_presets()) if presets else [])


__all__ = ["Encoder", "EncoderError", "EncoderInfo", "ENCODERS", "create_encoder", "encoder_spec", "list_encoders", "DEFAULT_ENCODER"]
