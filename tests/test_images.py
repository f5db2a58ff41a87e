"""Safe image loading: every kind of bad input gives a BadImageError with a clear reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmretrieve.media.images import BadImageError, load_image


def test_each_bad_kind_is_refused_with_its_reason(bad_files):
    for name, (path, reason) in bad_files.items():
        with pytest.raises(BadImageError) as ei:
            load_image(path)
        assert reason in ei.value.reason, (name, ei.value.reason)
        assert str(path) in str(ei.value)  # the error names the file
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refused_formats_are_real_files_pillow_would_open(bad_files):
    """The PSD/FITS/EPS fixtures are genuine: without the allowlist Pillow identifies them."""
    for name, fmt in [("photoshop.png", "PSD"), ("fits.png", "FITS"), ("postscript.png", "EPS")]:
        with Image.open(bad_files[name][0]) as im:
            assert im.format == fmt


def test_bomb_between_1x_and_2x_is_only_a_warning_in_pillow(bad_files):
    """Pillow merely warns between 1x and 2x of its limit; load_image turns that into a refusal."""
    path = bad_files["bomb_between_1x_2x.png"][0]
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bad_files["bomb_above_2x.png"][0])


def test_refusing_bombs_on_many_threads_leaves_the_warnings_filters_alone(bad_files):
    """Server threads decode uploads: nothing on them may change the process's warnings filters
    (``warnings.catch_warnings`` is not thread-safe), and every bomb is still refused."""
    import concurrent.futures as cf
    import warnings

    from mmretrieve.media.images import load_image_bytes

    data = Path(bad_files["bomb_between_1x_2x.png"][0]).read_bytes()
    before = list(warnings.filters)

    def one(_):
        with pytest.raises(BadImageError, match="decompression bomb"):
            load_image_bytes(data, max_pixels=None)  # Pillow's own threshold still refuses it
        return list(warnings.filters) == before

    with cf.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, range(16)))
    assert warnings.filters == before


def test_missing_file():
    with pytest.raises(BadImageError, match="file not found"):
        load_image("/definitely/not/here.png")


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    p = tmp_path / "t.png"
    rgba.save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    assert im.getpixel((4, 4)) == (255, 255, 255)
    assert im.getpixel((0, 0)) == (0, 0, 255)
    # palette image with a transparent index
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    p2 = tmp_path / "p.gif"
    pal.save(p2, transparency=0)
    assert load_image(p2).getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.size == (10, 20)


def test_16bit_greyscale_is_scaled(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    out = np.asarray(load_image(p))
    assert out.shape == (8, 8, 3)
    assert out.min() == 0 and out.max() == 255
    # big-endian 16-bit TIFF (mode I;16B) gets the same scaling, not clipping to white
    be = Image.frombuffer("I;16B", (8, 8), a.astype(">u2").tobytes(), "raw", "I;16B", 0, 1)
    be.save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g16b.tif")), out)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 255, 0)]]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    r, g, b = load_image(p).getpixel((2, 2))
    assert r > 200 and g < 50


def test_jpeg_draft_keeps_enough_pixels(samples):
    jpg = next(s for s in samples if s.path.endswith(".jpg"))
    full = load_image(jpg.path)
    small = load_image(jpg.path, draft_size=224)
    assert min(small.size) >= 224 or small.size == full.size
    assert small.size[0] <= full.size[0]


def test_real_photos_load(samples):
    for s in samples:
        im = load_image(s.path)
        assert im.mode == "RGB" and min(im.size) > 0


def test_allowlist_is_configurable(tmp_path):
    p = tmp_path / "x.bmp"
    Image.new("RGB", (4, 4)).save(p)
    assert load_image(p).size == (4, 4)
    with pytest.raises(BadImageError, match="allowlist"):
        load_image(p, formats=("PNG",))
    buf = io.BytesIO()
    Image.new("RGB", (30, 30)).save(buf, "PNG")
    (tmp_path / "y.png").write_bytes(buf.getvalue())
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(tmp_path / "y.png", max_pixels=100)
