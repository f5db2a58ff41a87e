"""GPU decoding's code path, run on the CPU here (``decode_jpeg`` on CPU tensors, the tensor transforms on
the CPU): pixels and embeddings against the PIL path, the safe loader's refusals before any decoder, and
the choice of decoder. The CUDA run itself is in tests/test_gpu_search.py's kind: skipped without a GPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmretrieve.encoders.device_transforms import LongSidePad, ShortSideCrop, device_transform
from mmretrieve.errors import DeviceError
from mmretrieve.ingest.build import _decode_for
from mmretrieve.ingest.stages import UnitEnd, read_images, read_images_on_device
from mmretrieve.media.gpu_decode import decode_batch
from mmretrieve.media.images import load_image
from mmretrieve.media.scan import SourceItem


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def test_decode_batch_matches_the_safe_loader(samples, tmp_path):
    datas, names, want = [], [], []
    for s in samples[:8]:
        data = Path(s.path).read_bytes()
        datas.append(data)
        names.append(s.path)
        want.append(np.asarray(load_image(s.path)))
    out = decode_batch(datas, names, device="cpu")
    assert out.index == list(range(8)) and not out.failed
    for x, w in zip(out.images, want):
        got = x.permute(1, 2, 0).numpy()
        assert got.shape == w.shape
        assert np.abs(got.astype(int) - w.astype(int)).mean() < 1.0  # libjpeg-turbo both ways; PNGs exact


def test_a_batch_of_large_jpegs_is_decoded_in_bounded_calls(samples, monkeypatch):
    """The pixels one batched call decodes are bounded (a batch of huge JPEGs would exhaust the device):
    split calls give the same images as one call."""
    from mmretrieve.media import gpu_decode

    datas = []
    for s in samples[:6]:
        buf = io.BytesIO()
        Image.open(s.path).convert("RGB").save(buf, "JPEG", quality=90)
        datas.append(buf.getvalue())
    names = [f"{i}.jpg" for i in range(6)]
    one = decode_batch(datas, names, device="cpu")
    real, calls = gpu_decode.jpeg_decoder(), []

    def counting(raw, device):
        out = real(raw, device)
        calls.append((len(raw), sum(x.shape[1] * x.shape[2] for x in out)))
        return out

    monkeypatch.setattr(gpu_decode, "jpeg_decoder", lambda: counting)
    biggest = max(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in datas)
    monkeypatch.setattr(gpu_decode, "MAX_CALL_PIXELS", 2 * biggest)
    split = decode_batch(datas, names, device="cpu")
    assert len(calls) >= 2 and sum(n for n, _ in calls) == 6
    assert all(px <= 2 * biggest for _, px in calls)
    assert split.index == one.index and all(torch.equal(a, b) for a, b in zip(split.images, one.images))


def test_decode_batch_refuses_what_the_loader_refuses(samples):
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 0))
    png = io.BytesIO()
    rgba.save(png, "PNG")
    rotated = Image.open(samples[0].path).convert("RGB").resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: decoded by the safe loader, which applies it
    from conftest import png_bomb

    big = png_bomb(20_000, 20_000)  # a few kB, 400 M pixels decoded
    datas = [b"", b"not an image at all", png.getvalue(), _jpeg(rotated, exif=exif), big]
    out = decode_batch(datas, [f"f{i}" for i in range(5)], device="cpu")
    failed = dict(out.failed)
    assert "empty" in failed[0] and "not an image" in failed[1] and "bomb" in failed[4]
    assert out.index == [2, 3]
    assert out.images[0].shape == (3, 8, 16) and out.images[0][:, 0, 0].tolist() == [255, 255, 255]  # alpha on white
    assert out.images[1].shape == (3, 40, 20)  # EXIF rotation applied


@pytest.mark.parametrize("kind", ["open_clip", "embedded"])
def test_device_transforms_match_the_pil_path(kind, samples, tiny_clip, embedded):
    enc = tiny_clip if kind == "open_clip" else embedded
    tf = device_transform(enc)
    assert isinstance(tf, ShortSideCrop if kind == "open_clip" else LongSidePad)
    ims = [load_image(s.path) for s in samples[:10]]
    full = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in ims]
    pil = torch.stack([enc.image_transform(im) for im in ims])
    dev = tf(full)
    assert dev.shape == pil.shape and dev.dtype == torch.uint8
    assert (dev.float() - pil.float()).abs().mean() < 4.0  # bicubic + antialias vs PIL's reducing resize
    a = enc.encode_image_tensors(dev)
    b = enc.encode_image_tensors(pil)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99


def test_long_images_are_cut_to_their_centre_before_resizing(tiny_clip):
    tf = device_transform(tiny_clip)
    strip = torch.zeros((3, 2, 20000), dtype=torch.uint8)
    strip[:, :, 9990:10010] = 255
    out = tf([strip])
    assert out.shape[0] == 1 and out.shape[2:] == (32, 32)


def test_reading_on_the_device_gives_the_cpu_readers_batches(samples, tiny_clip, tmp_path):
    items = [SourceItem(key=s.id, uri=s.path) for s in samples[:6]]
    items.append(SourceItem(key="gone", uri=str(tmp_path / "gone.jpg")))
    items.append((SourceItem(key="known-bad", uri="x.tar#1"), "cut short"))
    cpu = list(read_images(items, tiny_clip.image_transform, batch_size=4, workers=1))
    dev = list(read_images_on_device(items, tiny_clip, batch_size=4))
    ok = lambda batches: [it.key for b in batches for it in b.items]  # noqa: E731
    skipped = lambda batches: sorted((s.key, s.reason) for b in batches for s in b.skipped)  # noqa: E731
    assert ok(dev) == ok(cpu) == [s.id for s in samples[:6]]
    assert skipped(dev) == skipped(cpu) == [("gone", "file not found"), ("known-bad", "cut short")]
    a = tiny_clip.encode_image_tensors(torch.stack([t for b in dev for t in b.tensors]))
    b = tiny_clip.encode_image_tensors(torch.stack([t for b in cpu for t in b.tensors]))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99


def test_both_readers_cut_their_batches_at_each_unit_end(samples, tiny_clip, tmp_path):
    """One stream of several shards: a batch never holds inputs (or skips) of two units, an empty unit or
    one of skips only still ends, and every input comes out once, in order."""
    it = lambda i: SourceItem(key=f"s{i}", uri=samples[i % len(samples)].path)  # noqa: E731
    bad = lambda k: (SourceItem(key=k, uri=f"x.tar#{k}"), "cut short")  # noqa: E731
    stream = [it(0), it(1), it(2), bad("b0"), UnitEnd("u0"),  # 3 ok and a skip, cut short of the batch size
              UnitEnd("u1"),  # an empty unit
              bad("b1"), UnitEnd("u2"),  # skips only
              it(3), SourceItem(key="gone", uri=str(tmp_path / "gone.jpg")), it(4), it(5), it(6), UnitEnd("u3"),
              it(7)]  # a tail without an end
    want = [(["s0", "s1", "s2"], ["b0"], ["u0"]), ([], [], ["u1"]), ([], ["b1"], ["u2"]),
            (["s3", "s4", "s5"], ["gone"], []), (["s6"], [], ["u3"]), (["s7"], [], [])]
    for batches in (list(read_images(stream, tiny_clip.image_transform, batch_size=4, workers=1)),
                    list(read_images_on_device(stream, tiny_clip, batch_size=4))):
        got = [([i.key for i in b.items], [s.key for s in b.skipped], b.unit_ends) for b in batches]
        assert got == want
        assert all(len(b.tensors) == len(b.items) == len(b.sizes) for b in batches)


def test_the_decoder_is_chosen_by_the_encoders_device(tiny_clip):
    assert _decode_for(tiny_clip, "auto") == "cpu" and _decode_for(tiny_clip, "cpu") == "cpu"
    with pytest.raises(DeviceError, match="--decode gpu needs the encoder on a CUDA device"):
        _decode_for(tiny_clip, "gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decoding_on_cuda(samples):
    jpgs = [s for s in samples if s.path.lower().endswith(".jpg")]
    out = decode_batch([Path(s.path).read_bytes() for s in jpgs], [s.path for s in jpgs], device="cuda")
    assert not out.failed and all(x.is_cuda for x in out.images)
    for x, s in zip(out.images, jpgs):
        w = np.asarray(load_image(s.path))
        assert np.abs(x.permute(1, 2, 0).cpu().numpy().astype(int) - w.astype(int)).mean() < 2.0
