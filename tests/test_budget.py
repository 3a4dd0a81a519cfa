"""`python -m vlm.cli.budget`: the seed's token-budget numbers, real files, caps, configs and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from vlm.cli.budget import TOOL, budget, build_processors, main, options
from vlm.data.media import decode_image
from vlm.data.processor import ImageProcessor
from vlm.data.video import VideoProcessor, encode_video

SEED = [("896x896", (1, 64, 64), 4096, 1024), ("1568x784", (1, 56, 112), 6272, 1568), ("224x224", (1, 16, 16), 256, 64)]


def _rows(*argv):
    opts, items = options(TOOL.compose(list(argv)))
    image, video, context, caps_off = build_processors(opts)
    return budget(items, image, video), context, caps_off


def test_seed_numbers():
    rows, context, caps_off = _rows(*(f"size={s}" for s, *_ in SEED), "patch_size=14", "merge_size=2", "context=4096")
    assert caps_off and context == 4096
    for row, (size, grid, patches, tokens) in zip(rows, SEED):
        assert row.error is None and row.resized == size  # caps off: already multiples of 28
        assert (row.grid, row.patches, row.tokens) == (grid, patches, tokens)
    rows, _, _ = _rows("size=896x896", "patch_size=14", "merge_size=1")
    assert rows[0].tokens == 4096


def test_cli_prints_the_table(capsys):
    assert main(["size=896x896", "size=1568x784", "size=224x224", "patch_size=14", "merge_size=2", "context=4096"]) == 0
    out = capsys.readouterr().out
    assert "(1, 64, 64)" in out and " 4096 " in out and " 1024 " in out and "25.0%" in out
    assert " 6272 " in out and " 1568 " in out and " 256 " in out and " 64 " in out
    total = next(line for line in out.splitlines() if "total" in line).split()
    assert total[-3:] == [str(4096 + 6272 + 256), str(1024 + 1568 + 64), f"{100 * 2656 / 4096:.1f}%"]


def test_module_entry_point(tmp_path):
    """`python -m vlm.cli.budget` is a Hydra app that writes nothing where it runs (no outputs/,
    no .hydra/, no log file); a bad key is one `error:` line and exit 2."""
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "vlm.cli.budget", *a], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    r = run("size=224x224", "size=28x56")
    assert r.returncode == 0 and "(1, 16, 16)" in r.stdout and "(1, 4, 2)" in r.stdout, r.stderr
    r = run("size=224x224", "patch_sise=14")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown key 'patch_sise'") and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_files_agree_with_the_processors(tmp_path):
    # a JPEG whose EXIF says "rotate 90": the header is 300x200 but it decodes to 200x300
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 200), "red").save(tmp_path / "rot.jpg", exif=exif)
    Image.new("RGB", (1000, 600), "blue").save(tmp_path / "a.png")
    frames = [Image.fromarray(np.full((48, 80, 3), 8 * i, np.uint8)) for i in range(30)]
    (tmp_path / "c.mp4").write_bytes(encode_video(frames, fps=10.0))
    argv = [
        f"image={tmp_path / 'rot.jpg'}",
        f"image={tmp_path / 'a.png'}",
        f"video={tmp_path / 'c.mp4'}",
        "patch_size=14",
        "merge_size=2",
        "max_pixels=200704",
        "max_video_tokens=16",
    ]
    rows, _, caps_off = _rows(*argv)
    assert not caps_off and [r.error for r in rows] == [None] * 3
    ip = ImageProcessor(patch_size=14, merge_size=2, resolution="dynamic", min_pixels=784, max_pixels=200704)
    for row, name in zip(rows[:2], ["rot.jpg", "a.png"]):
        img = decode_image((tmp_path / name).read_bytes())
        assert row.input == f"{img.width}x{img.height}" and row.grid == ip(img).grid
    assert rows[0].input == "200x300"
    vp = VideoProcessor.from_image_processor(ip, max_video_tokens=16)
    out = vp((tmp_path / "c.mp4").read_bytes())
    assert rows[2].grid == out.grid and rows[2].tokens <= 16 and rows[2].input == "80x48 x30f @10fps"


def test_caps_and_config(tmp_path):
    rows, _, _ = _rows("size=896x896", "size=4000x3000", "max_tokens=256", "min_tokens=4")
    assert all(r.tokens <= 256 for r in rows) and rows[0].grid == (1, 32, 32)
    cfg = {
        "processor": {
            "patch_size": 8,
            "merge_size": 1,
            "resolution": "fixed",
            "image_size": 64,
            "video": {"temporal_patch": 2, "max_video_tokens": 256},
        },
        "template": {"max_length": 512},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rows, context, caps_off = _rows(f"config={tmp_path / 'config.json'}", "size=512x64", "video_size=64x64x8@2")
    assert context == 512 and not caps_off
    assert rows[0].grid == (1, 8, 8) and rows[0].tokens == 64  # fixed: squashed into the square
    assert rows[1].grid == (4, 8, 8) and rows[1].tokens == 256
    rows, _, _ = _rows(f"config={tmp_path / 'config.json'}", "resolution=dynamic", "max_pixels=4096", "size=512x64")
    assert rows[0].resized == "176x16" and rows[0].tokens == 44  # same budget, aspect ratio kept


def test_bad_input(tmp_path, capsys):
    assert main(["foo=1"]) == 2
    assert main(["size=896"]) == 1 and "expected WxH" in capsys.readouterr().out
    assert main([f"image={tmp_path / 'missing.png'}", "size=224x224"]) == 1
    out = capsys.readouterr().out
    assert "[missing]" in out and "(1, 16, 16)" in out  # the good item is still sized
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    assert main([f"video={tmp_path / 'junk.mp4'}", f"image={tmp_path / 'junk.png'}"]) == 1
    out = capsys.readouterr().out
    assert "[unidentified]" in out and "[corrupt]" in out
    assert main(["size=4000x1"]) == 1 and "aspect_ratio" in capsys.readouterr().out
    assert main(["size=20000x20000", "max_tokens=1024"]) == 0
    assert main(["context=0", "size=10x10"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: context must be positive, got 0",
        "error: nothing to size; give image=, video=, size=WxH or video_size=WxHxN",
    ]


def test_arguments_as_typed(tmp_path):
    """Repeated item keys keep their order within a kind; paths are taken verbatim (a comma, a
    space, `${`); a Hydra list works too."""
    odd = tmp_path / "a, b ${x}.png"
    Image.new("RGB", (56, 28)).save(odd)
    rows, _, _ = _rows(f"image={odd}", "size=28x28", "size=56x56", "size=84x84")
    assert [r.source for r in rows] == [odd.name, "size=28x28", "size=56x56", "size=84x84"]
    assert rows[0].error is None and rows[0].input == "56x28"
    rows, _, _ = _rows("size=[28x28,56x56]", "max_video_tokens=inf", "video_size=28x28x4")
    assert [r.input for r in rows] == ["28x28", "56x56", "28x28 x4f @30fps"]
