"""Webdataset and parquet collections written from real photos, laid out as img2dataset writes them.

``write_webdataset(photos, folder, per_shard)`` -> the shard paths: per sample ``<key>.<ext>`` (the
photo's own bytes), ``<key>.txt`` (caption) and ``<key>.json`` (key, caption, url, status), keys
``000000000`` ... numbered across shards, ``00000.tar`` ... ``NNNNN.tar``. ``write_parquet(photos, folder,
per_file)`` -> parquet files with ``key``, ``caption``, ``jpg`` (the bytes) and ``url`` columns.
``write_tar(path, members)`` writes named members as given. ``truncate(path, keep)`` cuts a file to a fraction of its size (a download cut short).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path


def _photos(photos: Sequence) -> list[tuple[str, bytes, str]]:
    """(extension, bytes, caption) of each photo: a path, a Sample (``path``, ``caption``) or a
    ``(name, bytes, caption)`` triple for bytes that are not a file (a corrupt member)."""
    out = []
    for p in photos:
        if isinstance(p, tuple):
            name, data, caption = p
            out.append((Path(name).suffix.lstrip(".").lower() or "jpg", data, caption))
            continue
        path = Path(getattr(p, "path", p))
        out.append((path.suffix.lstrip(".").lower(), path.read_bytes(), getattr(p, "caption", None) or path.stem))
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> Path:
    """A tar of ``(name, bytes)`` members in this order (names may repeat, as a hand-made shard's can)."""
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            _add(tf, name, data)
    return path


def write_webdataset(photos: Sequence, folder: str | os.PathLike, per_shard: int = 8) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _photos(photos)
    shards = []
    for s, start in enumerate(range(0, len(rows), per_shard)):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k, (ext, data, caption) in enumerate(rows[start : start + per_shard], start):
                key = f"{k:09d}"
                _add(tf, f"{key}.{ext}", data)
                _add(tf, f"{key}.txt", (caption or "").encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": caption, "url": f"https://example.org/{key}.{ext}",
                                                    "status": "success", "width": None}).encode())
        shards.append(path)
    return shards


def write_parquet(photos: Sequence, folder: str | os.PathLike, per_file: int = 8, *, image_column: str = "jpg") -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _photos(photos)
    files = []
    for s, start in enumerate(range(0, len(rows), per_file)):
        chunk = rows[start : start + per_file]
        keys = [f"{k:09d}" for k in range(start, start + len(chunk))]
        table = pa.table({"key": keys, "caption": [c for _, _, c in chunk], image_column: [d for _, d, _ in chunk],
                          "url": [f"https://example.org/{k}" for k in keys]})
        path = folder / f"{s:05d}.parquet"
        pq.write_table(table, path, row_group_size=4)
        files.append(path)
    return files


def truncate(path: str | os.PathLike, keep: float = 0.5) -> None:
    """Cut ``path`` to ``keep`` of its size."""
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])


__all__ = ["write_webdataset", "write_parquet", "truncate"]
