"""One shard with a sample of every bad kind the loader must survive, next to good samples with
every odd-but-valid image kind: the loader yields exactly the good ones, the counts by reason are
exact, nothing hangs, memory stays bounded on the decompression bomb, and a shard whose samples
mostly fail stops the run with a clear error."""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlm.data.processor import ImageProcessor
from vlm.data.sample import SampleTransform
from vlm.data.template import ChatTemplate
from vlm.data.webdataset import ShardDataset
from vlm.model.projector import visual_token_count
from vlm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is shown?", "a red square", "user\n", "assistant\n"] * 10)


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def rgb(size=(40, 32)) -> Image.Image:
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None]
    a[8:20, 10:30] = (200, 30, 30)
    return Image.fromarray(a)


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid tiny PNG whose IHDR claims width x height (CRC fixed): 1.2 GB if it were decoded."""
    p = enc(Image.new("RGB", (1, 1)), "PNG")
    body = b"IHDR" + struct.pack(">II", width, height) + p[24:29]
    return p[:12] + body + struct.pack(">I", zlib.crc32(body)) + p[33:]


def chat(n_media=1, refs=None, question="What is shown?") -> bytes:
    refs = list(range(n_media)) if refs is None else refs
    content = [{"type": "image", "media": i} for i in refs] + [{"type": "text", "text": question}]
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
            ]
        }
    ).encode()


def good_samples() -> list[dict]:
    """Odd but valid inputs: all must come through."""
    a16 = (np.linspace(0, 65535, 40 * 32).reshape(32, 40)).astype(np.uint16)
    pal = Image.new("P", (40, 32), 1)
    pal.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    pal.info["transparency"] = 0
    exif_img = rgb()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    frames = [rgb(), Image.new("RGB", (40, 32), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    media = {
        "g_png": enc(rgb(), "PNG"),
        "g_jpeg": enc(rgb(), "JPEG", quality=90),
        "g_webp": enc(rgb(), "WEBP"),
        "g_png16": enc(Image.fromarray(a16), "PNG"),  # I;16: scaled, not clipped
        "g_float": enc(Image.fromarray(np.linspace(0, 1, 40 * 32, dtype=np.float32).reshape(32, 40)), "TIFF"),
        "g_cmyk": enc(rgb().convert("CMYK"), "JPEG"),
        "g_palette_alpha": enc(pal, "PNG"),
        "g_la": enc(rgb().convert("LA"), "PNG"),
        "g_exif": enc(exif_img, "JPEG", exif=exif.tobytes()),
        "g_animated_gif": gif.getvalue(),
        "g_ext_lies": enc(rgb(), "PNG"),  # stored as .jpg below: the decoder sniffs the real format
    }
    out = []
    for key, data in media.items():
        name = "0.jpg" if key == "g_ext_lies" else "0.png"
        out.append({"__key__": key, "json": chat(), name: data})
    out.append({"__key__": "g_two_images", "json": chat(2, [1, 0]), "0.png": media["g_png"], "1.webp": media["g_webp"]})
    return out


def bad_samples() -> list[tuple[dict, str]]:
    """(sample, the reason it must be counted under)."""
    jpeg, png, webp = enc(rgb(), "JPEG", quality=90), enc(rgb(), "PNG"), enc(rgb(), "WEBP")
    gif = enc(rgb(), "GIF")
    cases = [
        ({"json": chat(), "0.jpg": jpeg[: len(jpeg) // 2]}, "media_corrupt"),  # truncated JPEG
        ({"json": chat(), "0.png": png[: len(png) // 2]}, "media_corrupt"),  # truncated PNG
        ({"json": chat(), "0.webp": webp[: len(webp) // 2]}, "media_corrupt"),  # truncated WebP
        ({"json": chat(), "0.gif": gif[:30]}, "media_corrupt"),  # truncated GIF
        ({"json": chat(), "0.png": b""}, "media_empty"),  # zero-byte file
        ({"json": chat(), "0.png": b"this is not an image at all"}, "media_unidentified"),  # extension lies
        ({"json": chat(), "0.png": bomb_png()}, "media_too_many_pixels"),  # decompression bomb
        ({"json": b"[1, 2, 3]", "0.png": png}, "bad_json"),  # JSON not an object
        ({"json": b'{"text": "no messages"}', "0.png": png}, "bad_json"),  # lacks messages/document
        ({"json": b"{broken", "0.png": png}, "bad_json"),  # not JSON
        ({"0.png": png}, "no_json"),  # no JSON member
        ({"json": chat(1, [1])}, "template"),  # references media not in the sample
        ({"json": chat(1), "0.png": png, "1.png": png}, "template"),  # media the text never references
    ]
    return [({"__key__": f"bad{i:02d}", **s}, reason) for i, (s, reason) in enumerate(cases)]


def processor(tok):
    template = ChatTemplate(tok, lambda g: visual_token_count(g, 2), max_length=256, merge_size=2)
    return SampleTransform(
        ImageProcessor(patch_size=8, merge_size=2, image_size=32), template, mode="train", max_pixels=50_000_000
    )


def test_every_bad_kind_is_skipped_and_counted_exactly(tmp_path, tok):
    good, bad = good_samples(), bad_samples()
    mixed = []
    for i in range(max(len(good), len(bad))):  # interleave so every bad one sits between good ones
        mixed += good[i : i + 1] + [s for s, _ in bad[i : i + 1]]
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as w:
        for s in mixed:
            w.write(s)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    items = list(ShardDataset(str(tmp_path / "bad-000000.tar"), processor(tok), train=False))
    out = [s for s in items if not s.report_only]  # the last item reports the trailing bad samples
    assert items[-1].report_only and not any(s.report_only for s in items[:-1])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert [s.key for s in out] == [g["__key__"] for g in good]
    counts = Counter()
    for s in items:
        counts.update(s.skipped or {})
    assert counts == Counter(reason for _, reason in bad), counts
    # through a DataLoader + collate too: the counts arrive with the batches, the stand-in does not
    from torch.utils.data import DataLoader

    from vlm.data.collate import Collator

    dl = DataLoader(
        ShardDataset(str(tmp_path / "bad-000000.tar"), processor(tok), train=False),
        batch_size=5,
        num_workers=1,
        collate_fn=Collator(tok.pad_id, "left"),
    )
    batches = list(dl)
    assert sum(len(b["keys"]) for b in batches) == len(good)
    assert sum((b["skipped"] for b in batches), Counter()) == counts
    assert grew_mb < 300, f"peak RSS grew {grew_mb:.0f} MB: the bomb was decoded"  # 20000² RGB would be 1.2 GB
    by_key = {s.key: s for s in out}
    assert len(by_key["g_two_images"].grids) == 2
    # 16-bit and float images are scaled, not clipped: the ramp keeps its range
    for key in ("g_png16", "g_float"):
        p = by_key[key].patches[0]
        assert float(p.max() - p.min()) > 1.5  # normalised to [-1, 1]: a full ramp spans ~2


def test_mostly_bad_windows_stop_with_a_clear_error(tmp_path, tok):
    """Bad samples scattered between good ones (never many in a row) still stop the run once more
    than `max_bad_fraction` of the last `bad_window` samples failed."""
    png = enc(rgb(), "PNG")
    samples = []
    for i in range(60):
        samples.append({"__key__": f"bad{i}", "json": b"nope", "0.png": png})
        samples.append({"__key__": f"bad{i}b", "json": b"nope", "0.png": png})
        samples.append({"__key__": f"good{i}", "json": chat(), "0.png": png})
    with wds.TarWriter(str(tmp_path / "mostly-000000.tar")) as w:
        for s in samples:
            w.write(s)
    ds = ShardDataset(
        str(tmp_path / "mostly-000000.tar"), processor(tok), train=False, max_bad_fraction=0.5, bad_window=30
    )
    with pytest.raises(RuntimeError, match=r"of the last 30 samples failed .*bad_json"):
        list(ds)
    ok = ShardDataset(
        str(tmp_path / "mostly-000000.tar"), processor(tok), train=False, max_bad_fraction=0.8, bad_window=30
    )
    assert len([s for s in ok if not s.report_only]) == 60
