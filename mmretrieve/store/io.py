"""File writing for the store: every file is written once, through a hashing writer (its sha256 and size
are known when the last byte is written, never by reading it back), fsynced, and renamed into place.

Reading is checked the same way: a small file read whole (deletion files, the patch projection, the FAISS
template) goes through ``read_checked`` against the size and sha256 its manifest recorded, and every
``.npy`` header is parsed by ``npy_header``, which turns whatever numpy raises on a damaged header into an
``IndexCorruptedError`` naming the file.

A full disk (ENOSPC, EDQUOT) anywhere becomes a ``DiskFullError`` that names the file; nothing written
for the failed version is published, so the previous version stays intact. Tests inject faults through
``_IO_HOOK`` (called with the path before every file write).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as _bytes_io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmretrieve.errors import DiskFullError, IndexCorruptedError, StoreError

#: tests set this to a callable(path) that may raise (e.g. OSError(ENOSPC)) before a file is written
_IO_HOOK = None

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def write_error(path: Path, e: OSError) -> StoreError:
    """What a failed write of ``path`` is reported as: a full disk (or quota) as ``DiskFullError``."""
    if e.errno in _FULL:
        return DiskFullError(f"{path}: no space left on device while writing it; nothing was published, the "
                             "previous version is intact")
    return StoreError(f"{path}: cannot write ({e.strerror or e})")


def io_point(path: Path) -> None:
    if _IO_HOOK is not None:
        _IO_HOOK(Path(path))


class HashingFile:
    """A binary file opened for writing that hashes what goes through it (sha256 + byte count)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.sha.update(mv)
        self.bytes += len(mv)
        return self.fh.write(mv)

    def flush(self) -> None:
        self.fh.flush()

    def info(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


@contextlib.contextmanager
def writing(path: Path) -> Iterator[HashingFile]:
    """Write ``path`` (a new file) through a ``HashingFile``; fsynced on success, removed on failure, a full
    disk reported as ``DiskFullError`` naming the file."""
    path = Path(path)
    try:
        io_point(path)
        with open(path, "xb") as raw:
            hf = HashingFile(raw)
            yield hf
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise write_error(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def write_npy(path: Path, arr: np.ndarray, *, chunk_rows: int | None = None) -> dict[str, Any]:
    """``np.save`` through the hashing writer (``allow_pickle=False``); returns ``{"bytes", "sha256"}``."""
    arr = np.ascontiguousarray(arr)
    with writing(path) as hf:
        np.lib.format.write_array_header_1_0(hf, np.lib.format.header_data_from_array_1_0(arr))
        flat = arr.reshape(len(arr), -1) if arr.ndim > 1 and len(arr) else arr
        step = chunk_rows or max(1, (64 << 20) // max(1, flat[0].nbytes if len(flat) else 1))
        for s in range(0, len(flat), step):
            hf.write(np.ascontiguousarray(flat[s : s + step]).data)
        return hf.info()


class NpyStream:
    """An ``.npy`` file whose total row count is known up front, written in chunks (compaction streams
    merged segments through this without holding them in memory)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]) -> None:
        self.path, self.shape = Path(path), tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._cm = writing(self.path)
        self._hf = self._cm.__enter__()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._hf, header)
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self._hf.write(block.data)
        self.rows += len(block)

    def close(self) -> dict[str, Any]:
        if self.rows != self.shape[0]:
            self._cm.__exit__(StoreError, StoreError("short write"), None)
            raise StoreError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")
        info = self._hf.info()
        self._cm.__exit__(None, None, None)
        return info

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._cm.__exit__(StoreError, StoreError("aborted"), None)


def write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with writing(path) as hf:
        hf.write(data)
        return hf.info()


def write_faiss(path: Path, index) -> dict[str, Any]:
    """``faiss.write_index`` through a callback writer, so the file is hashed as it is written."""
    import faiss

    with writing(path) as hf:
        faiss.write_index(index, faiss.PyCallbackIOWriter(hf.write))
        return hf.info()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_checked(path: Path, info: dict | None) -> bytes:
    """The whole of a small file, checked against the size and sha256 its manifest recorded when it was
    written (``info``: ``{"bytes", "sha256"}``; None for files listed before checksums were kept)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptedError(f"{path}: missing (listed in the manifest)") from None
    except OSError as e:
        raise IndexCorruptedError(f"{path}: unreadable ({e.strerror or e})") from None
    if info:
        if len(data) != int(info["bytes"]):
            raise IndexCorruptedError(f"{path}: size {len(data)} bytes, manifest says {info['bytes']} (truncated or replaced?)")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise IndexCorruptedError(f"{path}: sha256 does not match the manifest (file corrupted or modified)")
    return data


def npy_header(fh, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` open in ``fh``. numpy parses the header as a Python
    literal, so a damaged one raises almost anything (ValueError, SyntaxError, tokenize.TokenError,
    UnicodeDecodeError, ...): each becomes an ``IndexCorruptedError`` naming ``path``."""
    try:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
    except Exception as e:  # noqa: BLE001 - see the docstring: the parser's errors are not one type
        raise IndexCorruptedError(f"{path}: not a valid .npy file (damaged header: {type(e).__name__}: {e})") from None
    if dtype.hasobject or fortran or any(int(n) < 0 for n in shape):
        raise IndexCorruptedError(f"{path}: not a valid .npy file (damaged header: dtype {dtype}, shape {shape}, "
                                  f"fortran_order {fortran})")
    return tuple(int(n) for n in shape), dtype, fh.tell()


def load_npy(path: Path, info: dict | None = None, *, mmap: bool = False) -> np.ndarray:
    """An array of the store: memory-mapped (its header checked; its bytes by ``verify``), or read whole
    and checked against ``info`` first (small files)."""
    path = Path(path)
    if mmap:
        try:
            with open(path, "rb") as fh:
                npy_header(fh, path)
            return np.load(path, mmap_mode="c", allow_pickle=False)
        except OSError as e:
            raise IndexCorruptedError(f"{path}: unreadable ({e.strerror or e})") from None
        except ValueError as e:  # a size that does not match the header
            raise IndexCorruptedError(f"{path}: unreadable ({e})") from None
    data = read_checked(path, info)
    shape, dtype, offset = npy_header(_bytes_io.BytesIO(data), path)
    count = int(np.prod(shape))
    if offset + count * dtype.itemsize != len(data):
        raise IndexCorruptedError(f"{path}: {len(data)} bytes, its header promises {offset + count * dtype.itemsize} (truncated?)")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: dict, *, crash=None) -> None:
    """Write ``path`` as a temp file beside it, fsync, then ``os.replace`` (readers see the old or the new
    file, never a part). ``crash(stage)`` is the writer's crash hook (tests)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    payload = json.dumps(data, indent=1, sort_keys=True).encode()
    try:
        io_point(tmp)
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, e) from None
    if crash is not None:
        crash("before-manifest-replace")
    os.replace(tmp, path)
    fsync_dir(path.parent)


__all__ = ["writing", "write_npy", "NpyStream", "write_bytes", "write_faiss", "write_json_atomic", "sha256_file",
           "fsync_dir", "read_checked", "npy_header", "load_npy", "HashingFile", "io_point"]
