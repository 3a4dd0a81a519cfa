"""vlm.data.media: every image is decoded to a loaded RGB image or refused with a reason code."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlm.data import media
from vlm.data.media import MediaError, decode_image, load_image

WHITE, BLACK, RED, GREEN, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def reason_of(fn, *a, **kw) -> str:
    with pytest.raises(MediaError) as ei:
        fn(*a, **kw)
    return ei.value.reason


def close(px, ref, tol=3) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, ref))


def png_with_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is patched to claim ``width x height`` (CRC recomputed)."""
    png = encode(Image.new("RGB", (8, 8), RED), "PNG")
    assert png[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


# ------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_loaded_rgb(fmt):
    src = Image.new("RGB", (40, 24), BLUE)
    img = decode_image(encode(src, fmt), key=f"k.{fmt.lower()}")
    assert img.mode == "RGB" and img.size == (40, 24)
    assert close(img.getpixel((5, 5)), BLUE, tol=8)
    assert img.im is not None  # loaded, pixels available without the source bytes


def test_extension_is_not_trusted_content_is(tmp_path):
    path = tmp_path / "actually_a_jpeg.png"
    path.write_bytes(encode(noise(), "JPEG"))
    assert load_image(path).size == (48, 32)


# ----------------------------------------------------------------------------- modes → RGB


def test_rgba_composited_on_white():
    src = Image.new("RGBA", (4, 1))
    src.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128), (10, 20, 30, 255)])
    img = decode_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE  # fully transparent red → white, not red or black
    assert img.getpixel((1, 0)) == BLUE
    assert close(img.getpixel((2, 0)), (127, 127, 127), tol=1)
    assert img.getpixel((3, 0)) == (10, 20, 30)


def test_la_composited_on_white():
    src = Image.new("LA", (2, 1))
    src.putdata([(0, 0), (0, 255)])
    img = decode_image(encode(src, "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [WHITE, BLACK]


def _palette_image() -> Image.Image:
    src = Image.new("P", (3, 1))
    src.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    src.putdata([0, 1, 2])
    return src


def test_palette():
    img = decode_image(encode(_palette_image(), "PNG"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [RED, GREEN, BLUE]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    img = decode_image(encode(_palette_image(), fmt, transparency=0))
    assert [img.getpixel((x, 0)) for x in range(3)] == [WHITE, GREEN, BLUE]


def test_grayscale_and_one_bit():
    gray = Image.new("L", (2, 1))
    gray.putdata([0, 200])
    img = decode_image(encode(gray, "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [BLACK, (200, 200, 200)]

    bits = Image.new("1", (2, 1))
    bits.putdata([0, 255])
    img = decode_image(encode(bits, "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [BLACK, WHITE]


def test_cmyk_jpeg():
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB" and close(img.getpixel((8, 8)), RED, tol=6)


def test_16bit_png_is_scaled_not_clipped():
    src = Image.fromarray(np.array([[0, 32768, 65535, 1000]], dtype=np.uint16))
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    assert out[0, :, 0].tolist() == [0, 128, 255, 4]  # 1000/257 ≈ 3.9, clipping would give 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_big_endian_mode():
    # (built from bytes: Pillow's convert("I;16B") itself squashes values to 8 bits)
    src = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], dtype=">u2").tobytes())
    assert src.getpixel((1, 0)) == 32768
    assert np.asarray(media.to_rgb(src))[0, :, 0].tolist() == [0, 128, 255]


def test_32bit_int_tiff():
    small = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(decode_image(encode(small, "TIFF")))[0, :, 0].tolist() == [0, 1, 255]
    big = Image.fromarray(np.array([[-10, 69990, 139990]], dtype=np.int32), mode="I")
    assert np.asarray(decode_image(encode(big, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiff():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32), mode="F")
    data = encode(unit, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.asarray(decode_image(data))[0, :, 0].tolist() == [0, 128, 255, 64]
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_image(encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 64, 255]


def test_exif_orientation_applied():
    # Stored 40 wide x 20 tall with a red block at the stored top-left. Orientation 6 means
    # "rotate 90° clockwise to display": displayed 20 x 40, the block lands top-right.
    src = Image.new("RGB", (40, 20), BLUE)
    src.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (20, 40)
    assert close(img.getpixel((16, 3)), RED, tol=20)  # top-right
    assert close(img.getpixel((3, 3)), BLUE, tol=20)  # top-left is no longer the marker
    assert close(img.getpixel((16, 36)), BLUE, tol=20)


def test_broken_exif_is_ignored_not_fatal(monkeypatch):
    def boom(*a, **k):
        raise SyntaxError("bad exif")

    monkeypatch.setattr(media.ImageOps, "exif_transpose", boom)
    assert decode_image(encode(noise(), "JPEG")).size == (48, 32)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    opened = Image.open(io.BytesIO(data))
    assert getattr(opened, "n_frames", 1) == 3
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert close(img.getpixel((8, 8)), RED)
    assert getattr(img, "n_frames", 1) == 1  # a standalone image, not the animation


# --------------------------------------------------------------------------------- refusals


def test_empty():
    assert reason_of(decode_image, b"") == "empty"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("allow_truncated", [False, True])
def test_truncated_is_corrupt_even_if_pillow_is_told_to_allow_it(fmt, allow_truncated, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allow_truncated)
    data = encode(noise(64, 64), fmt)
    for frac in (0.5, 0.95):
        assert reason_of(decode_image, data[: int(len(data) * frac)]) == "corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is allow_truncated  # restored


def test_not_an_image_is_unidentified(tmp_path):
    rng = np.random.default_rng(1234)
    assert reason_of(decode_image, rng.bytes(1000)) == "unidentified"
    path = tmp_path / "notes.png"
    path.write_text("this is a text file with a .png name\n")
    with pytest.raises(MediaError) as ei:
        load_image(path)
    assert ei.value.reason == "unidentified" and "notes.png" in str(ei.value)


def test_broken_header_with_image_magic_is_corrupt():
    assert reason_of(decode_image, b"\x89PNG\r\n\x1a\n" + b"x" * 40) == "corrupt"


def test_zero_size_header_is_bad_size():
    assert reason_of(decode_image, png_with_size(0, 8)) == "bad_size"
    bmp = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
    bmp[18:22] = struct.pack("<i", 0)
    assert reason_of(decode_image, bytes(bmp)) == "bad_size"


@pytest.mark.parametrize("size", [(40000, 40000), (10000, 10000), (8000, 8000)])
def test_bomb_refused_from_header_without_decoding(size, monkeypatch):
    # 40000² trips Pillow's own hard limit, 10000² only its warning, 8000² only our max_pixels.
    data = png_with_size(*size)
    assert len(data) < 200

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as ei:
        decode_image(data)
    assert time.perf_counter() - t0 < 1.0
    assert ei.value.reason == "too_many_pixels"


def test_max_pixels_applies_to_real_images():
    data = encode(noise(100, 100), "PNG")
    assert reason_of(decode_image, data, max_pixels=9_999) == "too_many_pixels"
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_unexpected_errors_are_wrapped_as_corrupt(monkeypatch):
    def boom(img):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(media, "to_rgb", boom)
    with pytest.raises(MediaError) as ei:
        decode_image(encode(noise(), "PNG"), key="s1.0.png")
    assert ei.value.reason == "corrupt"
    assert "decoder exploded" in str(ei.value) and "s1.0.png" in str(ei.value)


def test_disallowed_format_is_unidentified():
    data = encode(noise(8, 8), "PPM")
    assert Image.open(io.BytesIO(data)).format == "PPM"
    assert reason_of(decode_image, data) == "unidentified"


def test_missing_and_unreadable(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(MediaError) as ei:
        load_image(path)
    assert ei.value.reason == "missing" and str(path) in str(ei.value)
    assert reason_of(load_image, tmp_path) == "unreadable"


def test_media_error_shape():
    e = MediaError("corrupt", "line one\nline two", key="abc.0.jpg")
    assert isinstance(e, ValueError)
    assert e.reason == "corrupt" and e.key == "abc.0.jpg"
    assert "\n" not in str(e) and "abc.0.jpg" in str(e) and "corrupt" in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.reason, e2.key, str(e2)) == (e.reason, e.key, str(e))
    assert MediaError(reason="missing").reason == "missing"


def test_jpeg_draft_decodes_smaller_but_never_below_the_target():
    """`jpeg_draft`: libjpeg's DCT downscale for big photos; the processed patches stay within a few
    grey levels of the exact path, EXIF rotation is respected, other formats are untouched."""
    import io

    import numpy as np
    from PIL import Image

    from vlm.data.media import decode_image
    from vlm.data.processor import ImageProcessor

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    a = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) % 256], -1) + rng.normal(0, 4, (480, 640, 3))
    img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    exact, drafted = (
        ImageProcessor(patch_size=8, image_size=64),
        ImageProcessor(patch_size=8, image_size=64, jpeg_draft=True),
    )
    small = decode_image(data, draft=drafted.draft_size)
    assert small.size == (160, 120)  # 1/4 scale: 1/8 would give 80x60, below the 64x64 target
    d = (exact(decode_image(data)).patches - drafted(small).patches).abs()
    assert float(d.mean()) < 2 * 2 / 255 and float(d.max()) < 2 * 24 / 255
    # EXIF orientation 6 (rotate 90): the drafted decode keeps the displayed orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    wide = ImageProcessor(patch_size=8, resolution="dynamic", max_pixels=64 * 48, jpeg_draft=True)
    rot = decode_image(buf.getvalue(), draft=wide.draft_size)
    full = decode_image(buf.getvalue())
    assert full.size == (480, 640) and rot.size[0] < rot.size[1] and rot.size[0] >= wide.target_size(640, 480)[1]
    # a PNG is decoded whole
    png = io.BytesIO()
    img.save(png, "PNG")
    assert decode_image(png.getvalue(), draft=drafted.draft_size).size == (640, 480)
