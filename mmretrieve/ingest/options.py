"""``BuildOptions``: how a build or an add runs, in one checked value (the Python API, the command line,
the run and the Ray driver all take this one object; no list of ingest keywords is written twice).

>>> opts = BuildOptions(batch_size=64, strict=True)
>>> dataclasses.replace(opts, engine="local").batch_size
64
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from mmretrieve.config import check_options
from mmretrieve.errors import UsageError
from mmretrieve.store import DEFAULT_FACTORY

ON_BAD_VECTORS = ("error", "drop")
VECTOR_DTYPES = ("float32", "float16")
DECODES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class BuildOptions:
    """What an index holds (``factory`` .. ``retain``: a new build's only) and how the run goes.

    ``factory``: the FAISS factory string. ``patches``: ``True`` stores the encoder's patch grid (fp16)
    for the EMD reranker, or ``{"grid": 4, "dim": 256}``. ``video``: frame sampling, e.g.
    ``{"num_frames": 16}`` (``mmretrieve.media.video.VIDEO_DEFAULTS``). ``vector_dtype``: ``float16``
    halves a Flat index's memory. ``retain``: versions kept (default 2). ``batch_size`` / ``workers``:
    the encoder's batch and the decoder processes (defaults per machine). ``on_bad_vectors``: what a
    NaN/inf/zero embedding does (``error``, or ``drop`` the row). ``strict``: all or nothing. ``image_timeout``:
    seconds one image may take to decode (default 30). ``engine``: ``local`` or ``ray`` (at
    ``ray_address``, ``ray_actors`` encoder actors). ``decode``: ``auto``, ``cpu``, ``gpu``. ``unit_items``:
    files per committed unit of a folder or manifest (default 1024).
    """

    factory: str = DEFAULT_FACTORY
    patches: bool | dict = False
    video: dict | None = None
    vector_dtype: str = "float32"
    retain: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    on_bad_vectors: str = "error"
    strict: bool = False
    image_timeout: float | None = None
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None
    decode: str = "auto"
    unit_items: int | None = None

    #: the options that shape a new index (an add keeps the index's own)
    INDEX_SHAPE = ("factory", "patches", "video", "vector_dtype", "retain")

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalised once, here)
        set_("factory", str(self.factory).strip())
        set_("vector_dtype", str(self.vector_dtype).lower())
        set_("decode", str(self.decode).lower())
        for name, allowed in (("vector_dtype", VECTOR_DTYPES), ("decode", DECODES), ("on_bad_vectors", ON_BAD_VECTORS),
                              ("engine", ("local", "ray"))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"build option {name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("retain", "batch_size", "workers", "ray_actors", "unit_items"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"build option {name}: expected a positive integer, got {v!r}")
        if self.image_timeout is not None and not (isinstance(self.image_timeout, (int, float)) and self.image_timeout > 0):
            raise UsageError(f"build option image_timeout: expected seconds > 0, got {self.image_timeout!r}")
        if not isinstance(self.patches, (bool, dict)):
            raise UsageError(f"build option patches: expected true/false or a dict like {{'grid': 4}}, got {self.patches!r}")
        if self.video is not None and not isinstance(self.video, dict):
            raise UsageError(f"build option video: expected a dict like {{'num_frames': 16}}, got {self.video!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, options: BuildOptions | None = None, *, where: str = "build_index", allowed: tuple[str, ...] | None = None,
           **overrides: Any) -> BuildOptions:
        """``options`` (default: the defaults) with ``overrides``; an unknown keyword, or one ``where``
        does not take, is refused with the list of those it does."""
        check_options(where, overrides, allowed if allowed is not None else cls.names())
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["BuildOptions"]
