"""Tower warm-up (vlm/training/warmup.py): the encoder trains alone on character naming before the VLM stage."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_train
from vlm.build.model import geometry_of
from vlm.data.processor import ImageProcessor
from vlm.model.vision import VisionEncoder
from vlm.training.warmup import WarmupConfig, warm_up_tower


@pytest.mark.parametrize(
    "temporal_patch,pos,task,context",
    [
        (1, "learned", "glyphs", "next"),
        (2, "rope2d", "glyphs+shapes", "next"),
        (1, "learned", "glyphs", "prev_next"),
        (1, "learned", "char", "next"),
        (1, "learned", "shapes", "next"),
    ],
)
def test_warm_up_trains_the_encoder_only(temporal_patch, pos, task, context):
    torch.manual_seed(0)
    enc = VisionEncoder(
        patch_size=8,
        dim=32,
        n_layers=1,
        n_heads=2,
        patch_embed="conv",
        conv_channels=8,
        temporal_patch=temporal_patch,
        pos=pos,
        pre_norm=True,
    )
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    proc = ImageProcessor(patch_size=8, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    res = warm_up_tower(
        enc,
        proc,
        {"steps": 6, "batch_size": 4, "canvas": 32, "task": task, "max_len": 3, "context": context},
        precision="32-true",
    )
    assert res["steps"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    after = enc.state_dict()
    assert after.keys() == before.keys()  # the probe head is not kept
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in enc.parameters())
    assert warm_up_tower(enc, proc, WarmupConfig(steps=0))["steps"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": -1},
        {"batch_size": 0},
        {"lr": 0.0},
        {"steps": 1.5},
        {"task": "ctc"},
        {"task": "glyphs+glyphs"},
        {"task": "glyphs+"},
        {"max_len": 0},
        {"wide": 1.5},
        {"wide": "half"},
        {"context": "prev"},
        {"wide_options": {"canvas": 32}},
    ],
)
def test_bad_warmup_options_are_named(bad):
    with pytest.raises(ValueError, match="tower_warmup"):
        WarmupConfig(**bad)


@pytest.mark.parametrize("context", ["next", "prev_next"])
def test_glyph_loss_reads_the_context_targets(context):
    """Confident right logits give ~0 loss; making the previous-character logits wrong costs only
    under `prev_next` (under `next` that slot is the first-of-string flag)."""
    from vlm.training.warmup import _glyph_head_width, _glyph_loss

    n = 4  # characters; NONE = END = START = 4
    # two tokens x two halves: "AB" in token 0 (left, right), token 1 empty
    labels = torch.tensor([[[0, 0, 1, n], [1, 1, n, 0]], [[n, -1, -1, -1], [n, -1, -1, -1]]])
    second = 2 if context == "next" else n + 1

    def logits(prev_right: bool):
        out = torch.full((2, 2, _glyph_head_width(n, context) // 2), -20.0)
        for t in range(2):
            for k in range(2):
                char, index, nxt, prev = labels[t, k].tolist()
                out[t, k, char] = 20.0
                if char < n:
                    ctx = int(index == 0) if context == "next" else (prev if prev_right else (prev + 1) % (n + 1))
                    out[t, k, n + 1 + ctx] = 20.0
                    out[t, k, n + 1 + second + nxt] = 20.0
        return out.reshape(2, -1)

    good, _ = _glyph_loss(logits(True), labels, n, context)
    bad, acc = _glyph_loss(logits(False), labels, n, context)
    assert float(good) < 1e-3 and float(acc) == 1.0
    assert (float(bad) > 1.0) == (context == "prev_next")


def test_a_string_too_long_for_the_canvas_is_refused_by_name():
    enc = VisionEncoder(patch_size=8, dim=16, n_layers=1, n_heads=2)
    proc = ImageProcessor(patch_size=8, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ValueError, match="tower_warmup.max_len=6 .* tower_warmup.canvas=32"):
        warm_up_tower(enc, proc, {"steps": 1, "canvas": 32, "max_len": 6})


def test_the_warmup_stage_trains_the_tower_alone_and_exports_the_whole_model(tmp_path, synth_dir):
    """`objective: tower_warmup`: the encoder's weights change, the decoder's do not, and the
    export is a model the next stage can start from; a frozen tower and a plain training run
    with `tower_warmup.steps` are refused by name."""
    from safetensors.torch import load_file

    from vlm.training.train import build_module, run
    from vlm.training.warmup_stage import run_warmup_stage

    overrides = ["logger=none", "tower_warmup.steps=4", "tower_warmup.batch_size=4", "tower_warmup.task=shapes"]
    cfg = compose_train(overrides, tmp_path, synth_dir)
    metrics = run_warmup_stage(cfg)
    assert metrics["tower_warmup/steps"] == 4.0 and 0.0 <= metrics["tower_warmup/accuracy_shapes"] <= 1.0
    warm = load_file(str(tmp_path / "export" / "model.safetensors"))
    import lightning as L

    from vlm.training.datamodule import build_datamodule

    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg, geometry_of(cfg.model))
    dm.setup("fit")
    fresh = build_module(cfg, dm).model.state_dict()  # the same seed: the weights before the warm-up
    changed = {k.split(".")[0] for k in warm if not torch.equal(warm[k], fresh[k])}
    assert changed == {"encoder"}, changed
    with pytest.raises(ValueError, match="frozen"):
        run_warmup_stage(compose_train([*overrides, "model.freeze.encoder=true"], tmp_path / "f", synth_dir))
    with pytest.raises(ValueError, match="recipe stage"):
        run(compose_train(overrides, tmp_path / "r", synth_dir))
    from vlm.training.pipeline import PipelineError  # a user error: one line from train.py, no traceback

    with pytest.raises(PipelineError, match="tower_warmup.task must be one of"):
        run_warmup_stage(compose_train([*overrides, "tower_warmup.task=ctc"], tmp_path / "t", synth_dir))
    # a pretrained tower (python train.py model=llava … under the default recipe) is refused, not overwritten
    with pytest.raises(PipelineError, match="from-scratch tower .* model.encoder.pretrained is set"):
        run_warmup_stage(
            compose_train([*overrides, "+model.encoder.pretrained=/models/clip"], tmp_path / "p", synth_dir)
        )


@pytest.mark.parametrize("resolution,wide", [("fixed", 0.0), ("dynamic", 0.0), ("dynamic", 1.0)])
def test_glyph_labels_put_each_character_in_the_half_patch_under_its_ink(resolution, wide):
    """The `glyphs` task's labels: every character of the string sits, in reading order, in the
    half-patch slot that holds the centre of its ink, whatever the processor does to the image size."""
    import random

    import numpy as np

    from vlm.synthvqa import (
        OCR_CHARSET,
        SynthConfig,
        char_centers,
        get_font,
        render,
        sample_ocr_scene,
    )
    from vlm.training.warmup import _glyph_batch

    syn = SynthConfig(canvas=64, ocr_min_len=1, ocr_max_len=6)
    # the centres are where the ink is: each one lies inside its own character's ink box
    scene = sample_ocr_scene(random.Random(5), syn)
    ink = np.asarray(render(scene).convert("L"), dtype=np.int16)
    bg = int(np.median(ink))
    font = get_font(scene.font_size)
    for i, (ch, (cx, cy)) in enumerate(zip(scene.text, char_centers(scene.text, scene.xy, scene.font_size))):
        left, top, right, bottom = font.getbbox(ch)
        x0 = scene.xy[0] + font.getlength(scene.text[:i]) + left
        assert x0 <= cx <= x0 + (right - left) and scene.xy[1] + top <= cy <= scene.xy[1] + bottom
        box = ink[scene.xy[1] + top : scene.xy[1] + bottom, int(x0) : int(x0 + right - left)]
        assert (np.abs(box - bg) > 30).any(), f"no ink under {ch!r}"

    proc = ImageProcessor(
        patch_size=8,
        image_size=64,
        resolution=resolution,
        min_pixels=16 * 16,
        max_pixels=48 * 48,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )

    class Cfg:
        batch_size = 3

    Cfg.wide = wide
    syn = SynthConfig(canvas=64, ocr_min_len=1, ocr_max_len=6, families=["shapes", "ocr", "ocr_wide"])
    patches, grids, labels, scenes = _glyph_batch(random.Random(11), syn, proc, 1, torch.device("cpu"), Cfg)
    assert all(s.family == ("ocr_wide" if wide else "ocr") for s in scenes)
    n_tok = [int(t * h * w) for t, h, w in grids.tolist()]
    assert labels.shape == (sum(n_tok), 2, 4) and patches.shape[0] == sum(n_tok)
    for s, lab, (_t, h, w) in zip(scenes, labels.split(n_tok), grids.tolist()):
        lab = lab.view(h, w, 2, 4)
        found = [
            (r, c, k, OCR_CHARSET[v])
            for r in range(h)
            for c in range(w)
            for k in range(2)
            if (v := int(lab[r, c, k, 0])) < len(OCR_CHARSET)
        ]
        # each slot's index is its character's place in the string; empty slots have none
        assert sorted(int(i) for i in lab[..., 1].flatten() if i >= 0) == list(range(len(s.text)))
        assert ((lab[..., 0] == len(OCR_CHARSET)) == (lab[..., 1] == -1)).all()
        assert ((lab[..., 1] == -1) == (lab[..., 3] == -1)).all()
        # left to right by column, then half: the string itself
        found.sort(key=lambda f: (f[1], f[2]))
        read = "".join(ch for _, _, _, ch in found)
        assert "II" not in s.text  # 'I' advances 3 px: two in a row can share a half-patch (one label lost)
        assert read == s.text, (read, s.text)
        W, H = (s.width, s.height) if wide else (s.canvas, s.canvas)
        for (r, c, k, _), (cx, cy) in zip(found, char_centers(s.text, s.xy, s.font_size)):
            assert int(cx / W * w * 2) == 2 * c + k and int(cy / H * h) == r
            nxt = lab[r, c, k, 2]  # the next character, END after the last
            i = int(lab[r, c, k, 1])
            assert nxt == (OCR_CHARSET.index(s.text[i + 1]) if i + 1 < len(s.text) else len(OCR_CHARSET))
            prev = lab[r, c, k, 3]  # the previous character, START before the first
            assert prev == (OCR_CHARSET.index(s.text[i - 1]) if i > 0 else len(OCR_CHARSET))
    if wide:  # dynamic resolution keeps the strip wide: more columns than rows
        assert all(w > 4 * h for _, h, w in grids.tolist())


def test_shape_labels_mark_each_shape_centre_with_its_shape_and_colour():
    import random

    from vlm.synthvqa import COLOR_NAMES, SHAPES, SynthConfig
    from vlm.training.warmup import _shapes_batch

    class Cfg:
        batch_size = 4

    proc = ImageProcessor(patch_size=8, image_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    _, _, labels, scenes = _shapes_batch(random.Random(3), SynthConfig(canvas=64), proc, 1, torch.device("cpu"), Cfg)
    none = len(SHAPES) * len(COLOR_NAMES)
    for s, lab in zip(scenes, labels.split(64)):
        lab = lab.view(8, 8)
        assert int((lab < none).sum()) == len(s.shapes)  # one token per shape, no two share a patch
        for sh in s.shapes:
            assert int(lab[int(sh.cy // 8), int(sh.cx // 8)]) == SHAPES.index(sh.shape) * len(
                COLOR_NAMES
            ) + COLOR_NAMES.index(sh.color)


def test_warm_up_strips_follow_the_run_data():
    """With `wide > 0`, train.py hands the warm-up the data's `ocr_wide_*` settings: short strips
    in the data give short strips (in the data's font) in the warm-up."""
    import random

    from vlm.synthvqa import sample_wide_ocr_scene
    from vlm.training.warmup import _task, with_data_strips

    data = {"root": "x", "canvas": 64, "ocr_wide_min_len": 3, "ocr_wide_max_len": 6, "ocr_wide_font_frac": 0.40625}
    warm = with_data_strips({"steps": 1, "wide": 1.0}, data)
    assert warm["wide_options"] == {"ocr_wide_min_len": 3, "ocr_wide_max_len": 6, "ocr_wide_font_frac": 0.40625}
    syn, _, _ = _task("glyphs", WarmupConfig(**warm))
    rng = random.Random(0)
    assert all(3 <= len(sample_wide_ocr_scene(rng, syn).text) <= 6 for _ in range(50))
    assert syn.wide_font_px == 26
    # no strips asked for, or options given explicitly: left alone
    assert "wide_options" not in with_data_strips({"steps": 1, "wide": 0.0}, data)
    assert with_data_strips({"wide": 0.5, "wide_options": {}}, data)["wide_options"] == {}
    # without data settings the strips keep synthvqa's defaults (12-20 characters)
    syn, _, _ = _task("glyphs", WarmupConfig(**with_data_strips({"steps": 1, "wide": 1.0}, None)))
    assert all(12 <= len(sample_wide_ocr_scene(rng, syn).text) <= 20 for _ in range(20))
