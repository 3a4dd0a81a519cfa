"""Our image processor built from a folder's preprocessor_config.json agrees with transformers'
processors (CLIP, SigLIP, Qwen2-VL; the PIL implementations) within one grey level after
normalisation, on photo-like, odd-sized, grey, transparent and extreme-aspect images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlm.build.model import build_processor  # noqa: E402
from vlm.data.hf_processor import ProcessorConfigError, processor_config_from_hf  # noqa: E402


def images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    photo = np.stack([xx * 255 / 640, yy * 255 / 480, (xx * yy) % 256], -1) + rng.normal(0, 6, (480, 640, 3))
    out = [Image.fromarray(photo.clip(0, 255).astype(np.uint8))]
    for w, h in ((50, 37), (37, 50), (300, 41), (29, 29)):
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    out.append(out[1].convert("L").convert("RGB"))
    return out


def grey_levels(ours: torch.Tensor, theirs: torch.Tensor, std) -> float:
    """Largest difference in units of one grey level (1/255 of the range, divided by std)."""
    s = torch.tensor(std).view(1, 3, 1)
    return float(((ours - theirs).abs().view(ours.shape[0], 3, -1) * s * 255).max())


def _ours(folder, img):
    proc = build_processor({"pretrained": str(folder), "patch_size": 14, "merge_size": 1})
    return proc, proc(img)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_square_processors_match_transformers(tmp_path, family):
    if family == "clip":
        hf = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    else:
        hf = transformers.SiglipImageProcessor(size={"height": 224, "width": 224})
    hf.save_pretrained(tmp_path)
    for img in images():
        proc, p = _ours(tmp_path, img)
        want = hf(images=img, return_tensors="pt")["pixel_values"][0]  # [3, 224, 224]
        from vlm.data.processor import unpatchify

        got = unpatchify(p.patches, p.grid, 14)
        assert got.shape == want.shape
        assert grey_levels(got.view(1, 3, -1), want.reshape(1, 3, -1), proc.std) <= 1.0 + 1e-3, (family, img.size)


def test_qwen2vl_processor_matches_transformers(tmp_path):
    hf = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    hf.save_pretrained(tmp_path)
    proc = build_processor({"pretrained": str(tmp_path), "video": {"temporal_patch": 2}})
    assert (proc.patch_size, proc.merge_size, proc.resolution, proc.video.temporal_patch) == (14, 2, "dynamic", 2)
    from vlm.data.video import repeat_temporal

    for img in images():
        out = hf(images=img, return_tensors="pt")
        t, h, w = out["image_grid_thw"][0].tolist()
        p = proc(img)
        assert p.grid == (1, h, w), img.size
        ours = repeat_temporal(p.patches, 2)  # [h*w, 3*2*14*14], row-major
        idx = torch.arange(h * w).view(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).reshape(-1)  # HF: 2x2 windows
        theirs = out["pixel_values"]
        assert grey_levels(ours[idx].view(h * w, 3, -1), theirs.view(h * w, 3, -1), proc.std) <= 1.0 + 1e-3, img.size


def test_unsupported_preprocessing_is_named(tmp_path):
    hf = transformers.CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    hf.save_pretrained(tmp_path)
    with pytest.raises(ProcessorConfigError, match="crop_size"):
        processor_config_from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        processor_config_from_hf(tmp_path / "nowhere")
