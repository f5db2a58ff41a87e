"""Presets as data (``configs/*.yaml``) and compact ``name:k=v,k=v`` specs from the command line.

>>> parse_kv("k=100,alpha=0.7,weights=apc,exact=true")
{'k': 100, 'alpha': 0.7, 'weights': 'apc', 'exact': True}
>>> parse_spec("emd:k=100,solver=sinkhorn")
('emd', {'k': 100, 'solver': 'sinkhorn'})
"""

from __future__ import annotations

import difflib
import operator
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmretrieve import settings
from mmretrieve.errors import ConfigNotFoundError, UnknownOptionError, UsageError

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_CONFIGS = PACKAGE_ROOT.parent / "configs"


def coerce(value: str) -> Any:
    """'100' -> 100, '0.7' -> 0.7, 'true' -> True, 'none' -> None, anything else stays a string."""
    v = value.strip()
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_kv(text: str | None) -> dict[str, Any]:
    """Parse ``"a=1,b=x"``. Values may contain ':' and '/' (e.g. encoder names); a bare word is an error."""
    out: dict[str, Any] = {}
    if not text:
        return out
    parts: list[str] = []
    for piece in text.split(","):
        if "=" in piece or not parts:
            parts.append(piece)
        else:  # a comma inside a value, e.g. a FAISS factory string "IVF64,Flat"
            parts[-1] += "," + piece
    for piece in parts:
        key, sep, val = piece.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"expected key=value in {text!r}, got {piece!r}")
        out[key.strip()] = coerce(val)
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,..."`` -> (name, options)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise UsageError(f"empty name in spec {spec!r}")
    return name, parse_kv(rest)


def config_dirs() -> list[Path]:
    dirs = []
    env = settings.config_dir()
    if env is not None:
        dirs.append(env)
    dirs += [Path.cwd() / "configs", REPO_CONFIGS, PACKAGE_ROOT / "configs"]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A YAML path, or a preset name looked up in the config folders (with or without ``.yaml``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidates = [str(name_or_path)]
    if p.suffix not in (".yaml", ".yml"):
        candidates += [f"{name_or_path}.yaml", f"{name_or_path}.yml"]
    for d in config_dirs():
        for c in candidates:
            if (d / c).is_file():
                return d / c
    searched = ", ".join(str(d) for d in config_dirs()) or "(no config folders found)"
    raise ConfigNotFoundError(f"config {str(name_or_path)!r} not found as a file or a preset in: {searched}")


def load_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = find_config(name_or_path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def check_options(where: str, given: Iterable[str], accepted: Iterable[str], *, noun: str = "option") -> None:
    """Refuse options that ``where`` does not take, naming the ones it does (and the closest match)."""
    accepted = sorted(set(accepted))
    unknown = sorted(set(given) - set(accepted))
    if not unknown:
        return
    hints = [m for u in unknown for m in difflib.get_close_matches(u, accepted, n=1)]
    hint = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
    known = ", ".join(accepted) if accepted else "none"
    raise UnknownOptionError(f"unknown {noun}(s) {', '.join(map(repr, unknown))} for {where}; known: {known}{hint}")


def positive_int(value: Any, name: str, where: str) -> int:
    """``value`` as an int >= 1, else a ``UsageError`` naming ``where`` and ``name`` (``True``, ``2.5``,
    ``"3"`` are refused: a count is never silently rounded or coerced).

    >>> positive_int(5, "k", "Index.search")
    5
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise UsageError(f"{where}: {name} must be a positive integer, got {n}")
    return n


def list_presets(subdir: str = "") -> list[str]:
    names = set()
    for d in config_dirs():
        base = d / subdir if subdir else d
        if base.is_dir():
            names.update(p.relative_to(d).with_suffix("").as_posix() for p in base.glob("*.y*ml"))
    return sorted(names)
