"""Multi-image, video and dynamic resolution through the whole stack: the media router
(`SampleTransform` + `MediaProcessor`), the vision encoder's temporal patches and 2D RoPE, token
counts between template and model, M-RoPE, extreme inputs through the loader, and checkpoint configs."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlm.build.model import build_model, build_processor, build_template, geometry_of
from vlm.data.collate import Collator, collate
from vlm.data.sample import SampleError, SampleTransform
from vlm.data.template import IGNORE
from vlm.data.video import VideoProcessor, encode_video
from vlm.data.webdataset import ShardDataset
from vlm.model.generate import generate
from vlm.model.geometry import Geometry
from vlm.model.projector import visual_token_count
from vlm.model.rope import apply_rope
from vlm.model.vision import PatchEmbed, VisionEncoder
from vlm.tokenizer import train_tokenizer

av = pytest.importorskip("av")

WORDS = [
    "What is shown?",
    "Which image has more shapes, the first or the second?",
    "first",
    "second",
    "Which way is the red circle moving?",
    "left",
    "right",
    "up",
    "down",
    "and then",
    "a red square",
    "user\n",
    "assistant\n",
    "system\n",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 10, vocab_size=300)


# ------------------------------------------------------------------------------------ helpers


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def moving(n=4, size=(48, 32), dx=6, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(220, 256, (size[1], size[0], 3), dtype=np.uint8)
        a[8:16, 2 + dx * i : 10 + dx * i] = (220, 30, 30)
        out.append(Image.fromarray(a))
    return out


def frame_bytes(frames, fmt="PNG") -> list[bytes]:
    out = []
    for f in frames:
        b = io.BytesIO()
        f.save(b, fmt)
        out.append(b.getvalue())
    return out


def gif(frames) -> bytes:
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=500, loop=0)
    return b.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims `width x height` (CRC recomputed): a decompression bomb."""
    p = png((1, 1))
    body = b"IHDR" + struct.pack(">II", width, height) + p[24:29]
    return p[:12] + body + struct.pack(">I", zlib.crc32(body)) + p[33:]


def chat(content, answer="first") -> bytes:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "meta": {"qtypes": ["multi_image"]},
        }
    ).encode()


def processor(tok, T=2, merge=2, resolution="dynamic", rope="mrope", max_length=512, mode="train", **kw):
    proc = build_processor(
        dict(
            patch_size=4,
            merge_size=merge,
            resolution=resolution,
            image_size=32,
            min_pixels=kw.pop("min_pixels", 64),
            max_pixels=kw.pop("max_pixels", 48 * 48),
            video={"temporal_patch": T, "max_frames": 8, "max_video_tokens": kw.pop("max_video_tokens", 64)},
            **kw,
        )
    )
    template = build_template({"max_length": max_length, "rope": rope, "merge_size": merge}, tok)
    return SampleTransform(proc, template, mode=mode)


def tiny_model(tok, T=2, pos="rope2d", merge=2, rope="mrope", seed=0):
    torch.manual_seed(seed)
    cfg = {
        "encoder": {
            "_target_": "vlm.model.vision.VisionEncoder",
            "patch_size": 4,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "pos_grid": 4,
            "patch_embed": "conv",
            "conv_channels": 8,
            "temporal_patch": T,
            "pos": pos,
        },
        "projector": {"_target_": "vlm.model.projector.Projector", "in_dim": 32, "out_dim": 32, "merge_size": merge},
        "decoder": {
            "_target_": "vlm.model.decoder.Decoder",
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "n_kv_heads": 1,
            "rope": rope,
            "max_seq_len": 1024,
        },
    }
    return build_model(cfg, tok)


# --------------------------------------------------------------------------- vision encoder


@pytest.mark.parametrize("pos,T", [("learned", 1), ("rope2d", 1), ("learned", 2), ("rope2d", 2)])
def test_block_diagonal_with_video_and_rope2d(pos, T):
    """A change to one item's pixels leaves every other item's features unchanged, and the packed
    result equals encoding each item alone (the rope2d tables are gathered like the tokens)."""
    torch.manual_seed(0)
    enc = VisionEncoder(
        patch_size=4,
        dim=32,
        n_layers=2,
        n_heads=2,
        pos_grid=4,
        patch_embed="conv",
        conv_channels=8,
        temporal_patch=T,
        pos=pos,
    ).eval()
    grid = torch.tensor([[1, 4, 4], [2, 2, 4], [1, 2, 8], [1, 3, 5], [3, 2, 2], [1, 4, 4]])
    sizes = grid.prod(-1).tolist()
    x = torch.randn(sum(sizes), 3 * T * 16)
    s = torch.tensor([0] + sizes).cumsum(0)
    with torch.no_grad():
        base = enc(x, grid)
        for changed_item in (1, 4):
            x2 = x.clone()
            x2[s[changed_item] : s[changed_item + 1]] += 1.0
            changed = enc(x2, grid)
            for i in range(len(sizes)):
                same = torch.allclose(base[s[i] : s[i + 1]], changed[s[i] : s[i + 1]], atol=1e-6)
                assert same == (i != changed_item), (pos, T, changed_item, i)
        for i in range(len(sizes)):
            alone = enc(x[s[i] : s[i + 1]], grid[i : i + 1])
            torch.testing.assert_close(alone, base[s[i] : s[i + 1]], atol=1e-5, rtol=1e-5)
    if pos == "rope2d":
        assert not hasattr(enc, "pos_embed") and "rope_inv_freq" not in enc.state_dict()


def test_rope2d_is_translation_equivariant():
    """With the encoder's own rope2d tables, a query-key logit depends only on the (row, column)
    offset between the two patches, and rows and columns are both encoded (distinctly)."""
    enc = VisionEncoder(patch_size=4, dim=64, n_layers=1, n_heads=2, pos="rope2d")
    h, w = 6, 7
    cos, sin = enc.rope_tables(2, h, w)  # two frames: both reuse the same (row, col) positions
    assert cos.shape == (2 * h * w, 32)
    torch.testing.assert_close(cos[: h * w], cos[h * w :])
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g), torch.randn(32, generator=g)

    def logit(pq, pk):
        iq, ik = pq[0] * w + pq[1], pk[0] * w + pk[1]
        qr = apply_rope(q.view(1, 1, 1, -1), cos[iq].view(1, 1, -1), sin[iq].view(1, 1, -1))
        kr = apply_rope(k.view(1, 1, 1, -1), cos[ik].view(1, 1, -1), sin[ik].view(1, 1, -1))
        return float((qr * kr).sum())

    inside = lambda p: 0 <= p[0] < h and 0 <= p[1] < w
    for pq, pk in [((0, 0), (2, 3)), ((1, 4), (5, 0)), ((3, 3), (3, 3)), ((5, 6), (0, 0))]:
        ref = logit(pq, pk)
        for sh, sw in [(1, 0), (0, -3), (-1, 1), (-5, -6)]:
            q2, k2 = (pq[0] + sh, pq[1] + sw), (pk[0] + sh, pk[1] + sw)
            if inside(q2) and inside(k2):
                assert abs(logit(q2, k2) - ref) < 1e-4, (pq, pk, sh, sw)
    # offsets along rows and along columns change the logit, and differently
    base, down, right = logit((2, 2), (2, 2)), logit((2, 2), (3, 2)), logit((2, 2), (2, 3))
    assert abs(base - down) > 1e-3 and abs(base - right) > 1e-3 and abs(down - right) > 1e-3


def test_patch_embed_takes_temporal_patches():
    for kind in ("linear", "conv"):
        pe = PatchEmbed(4, 16, 3, kind, 8, temporal_patch=2)
        assert pe(torch.randn(5, 3 * 2 * 16)).shape == (5, 16)
        with pytest.raises(ValueError, match=r"temporal_patch.*model.encoder.temporal_patch=2"):
            pe(torch.randn(5, 3 * 16))
    # T=1 keeps the old parameter shapes (old checkpoints load)
    old = VisionEncoder(patch_size=4, dim=32, n_layers=1, n_heads=2, pos_grid=4, patch_embed="conv", conv_channels=8)
    assert old.patch_embed.conv[0].weight.shape == (8, 3, 3, 3) and old.patch_dim == 48
    with pytest.raises(ValueError, match="encoder.pos"):
        VisionEncoder(pos="sincos")
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionEncoder(dim=24, n_heads=4, pos="rope2d")  # head_dim 6


# ---------------------------------------------------------------------- media routing / counts


def _raw(key, content, media: dict, answer="first") -> dict:
    return {"__key__": key, "json": chat(content, answer), **media}


def test_token_counts_agree_for_every_media_kind(tok):
    """Image (fixed and dynamic), mp4, animated GIF and APNG videos and a frame-list video: the
    template's span, the model's token count, the projector's output and M-RoPE positions agree."""
    frames = moving(4)
    mp4, apng = encode_video(frames, 2.0, "mp4"), encode_video(frames, 2.0, "apng")
    items = {
        "image": ({"0.png": png((40, 24))}, "image"),
        "mp4": ({"0.mp4": mp4}, "video"),
        "gif": ({"0.gif": gif(frames)}, "video"),
        "apng": ({"0.apng": apng}, "video"),
        "frames": ({f"0.{i}.png": b for i, b in enumerate(frame_bytes(frames))}, "video"),
    }
    model = tiny_model(tok).eval()
    for resolution in ("dynamic", "fixed"):
        sp = processor(tok, resolution=resolution)
        for name, (media, kind) in items.items():
            content = [{"type": "text", "text": "What is shown?"}, {"type": kind, "media": 0}]
            s = sp(_raw(name, content, media))
            (grid,) = s.grids
            n = visual_token_count(grid, 2)
            pad = tok.video_pad_id if kind == "video" else tok.image_pad_id
            other = tok.image_pad_id if kind == "video" else tok.video_pad_id
            ids = s.input_ids.tolist()
            assert ids.count(pad) == n == model.token_count(grid) and other not in ids, (resolution, name)
            assert s.patches[0].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 16)
            assert s.kinds == [kind]
            if kind == "video":
                assert grid[0] == 2, name  # 4 frames at 2 fps, T=2 -> two temporal patches
            with torch.no_grad():
                visual = model.encode_media(s.patches[0], torch.tensor([grid]))
            assert visual.shape[0] == n
            # M-RoPE: the span starts one past the text before it; time advances per temporal patch
            span = [i for i, t in enumerate(ids) if t == pad]
            p0 = int(s.position_ids[0, span[0] - 1]) + 1
            hw = (grid[1] // 2) * (grid[2] // 2)
            assert s.position_ids[0, span].tolist() == [p0 + t for t in range(grid[0]) for _ in range(hw)]
            assert int(s.position_ids[:, span[-1] + 1].unique()) == p0 + max(grid[0], grid[1] // 2, grid[2] // 2)
            b = collate([s], tok.pad_id)
            with torch.no_grad():  # the model's own per-sample check passes
                model(
                    b["input_ids"],
                    b["position_ids"],
                    b["attention_mask"],
                    b["pixel_patches"],
                    b["grid_thw"],
                    b["media_per_sample"],
                    b["keys"],
                )
    # an image repeated T times is T identical frames in the C*T*P*P layout
    sp = processor(tok, T=2)
    s = sp(_raw("img", [{"type": "image", "media": 0}], {"0.png": png((32, 32))}))
    x = s.patches[0].view(-1, 3, 2, 16)
    assert torch.equal(x[:, :, 0], x[:, :, 1])
    # and the example-table path (MediaProcessor.to_pil) undoes it: the first frame, as resized
    shown = sp.media_processor.to_pil(s.patches[0], s.grids[0])
    assert shown.size == (32, 32) and shown.getpixel((5, 5)) == (200, 30, 30)


def test_multi_image_order_and_any_turn(tok):
    """Media referenced out of index order and in several turns (the assistant's too): patches
    come in span order and each span receives its own image's visual tokens."""
    colors = [(220, 30, 30), (30, 160, 50), (30, 70, 220)]
    sizes = [(32, 32), (48, 16), (16, 40)]
    media = {f"{i}.png": png(sizes[i], colors[i]) for i in range(3)}
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "media": 2},
                {"type": "text", "text": "and then"},
                {"type": "image", "media": 0},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "first"}]},
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, {"type": "image", "media": 1}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square"}, {"type": "image", "media": 1}]},
    ]
    sp = processor(tok, T=1)
    with pytest.raises(SampleError) as e:  # media 1 referenced twice: the template refuses it
        sp({"__key__": "k", "json": json.dumps({"messages": msgs}).encode(), **media})
    assert e.value.reason == "template"
    msgs[3]["content"] = [{"type": "text", "text": "a red square"}]
    msgs[1]["content"] = [{"type": "image", "media": 1}, {"type": "text", "text": "first"}]
    msgs[2]["content"] = [{"type": "text", "text": "What is shown?"}]
    s = sp({"__key__": "k", "json": json.dumps({"messages": msgs}).encode(), **media})
    alone = [sp.media_processor.process_image(Image.open(io.BytesIO(media[f"{i}.png"]))) for i in range(3)]
    assert s.grids == [alone[i][1] for i in (2, 0, 1)]
    for k, i in enumerate((2, 0, 1)):
        assert torch.equal(s.patches[k], alone[i][0])
    model = tiny_model(tok, T=1, pos="learned").eval()
    b = collate([s], tok.pad_id)
    with torch.no_grad():
        emb = model.embed(b["input_ids"], b["pixel_patches"], b["grid_thw"], b["media_per_sample"], b["keys"])[0]
        ids = b["input_ids"][0]
        slots = (ids == tok.image_pad_id).nonzero().flatten()
        start = 0
        for i in (2, 0, 1):
            n = visual_token_count(alone[i][1], 2)
            own = model.encode_media(alone[i][0], torch.tensor([alone[i][1]]))
            torch.testing.assert_close(emb[slots[start : start + n]], own, atol=1e-5, rtol=1e-5)
            start += n
    # image in the assistant turn: no labels on its span, labels on the assistant's text
    lab = s.labels
    assert (lab[ids == tok.image_pad_id] == IGNORE).all() and (lab != IGNORE).any()


def test_document_with_images_and_video_trains_on_all_text(tok):
    frames = moving(4)
    doc = {
        "document": [
            {"type": "text", "text": "a red square"},
            {"type": "image", "media": 0},
            {"type": "text", "text": "and then"},
            {"type": "video", "media": 1},
            {"type": "image", "media": 2},
            {"type": "text", "text": "left"},
        ]
    }
    raw = {
        "__key__": "doc",
        "json": json.dumps(doc).encode(),
        "0.jpg": png(),
        "1.mp4": encode_video(frames),
        "2.webp": png((24, 24)),
    }
    s = processor(tok)(raw)
    ids, lab = s.input_ids, s.labels
    media = (
        (ids == tok.image_pad_id)
        | (ids == tok.video_pad_id)
        | (ids == tok.vision_start_id)
        | (ids == tok.vision_end_id)
    )
    assert (lab[media] == IGNORE).all() and (lab[~media] == ids[~media]).all()
    assert s.kinds == ["image", "video", "image"] and [g[0] for g in s.grids] == [1, 2, 1]


def test_media_refusals_have_reasons(tok):
    sp = processor(tok)
    frames = moving(4)
    mp4 = encode_video(frames)
    v = [{"type": "video", "media": 0}]
    cases = {
        "media_corrupt": {"0.mp4": mp4[: len(mp4) // 3]},
        "media_unidentified": {"0.mp4": b"definitely not a video container at all"},
        "media_empty": {"0.mp4": b""},
        "media_bad_size": {"0.0.png": png((32, 32)), "0.1.png": png((16, 32))},
        "bad_media_index": {"0.mp4": mp4, "0.0.png": png()},
    }
    for reason, media in cases.items():
        with pytest.raises(SampleError) as e:
            sp(_raw(reason, v, media))
        assert e.value.reason == reason, (reason, str(e.value))
    # an mp4 referenced as an image is not an image
    with pytest.raises(SampleError) as e:
        sp(_raw("k", [{"type": "image", "media": 0}], {"0.mp4": mp4}))
    assert e.value.reason == "media_unidentified"
    # one index as both kinds; a frame list as an image; unreferenced media
    both = [{"type": "image", "media": 0}, {"type": "video", "media": 0}]
    for content, media, reason in [
        (both, {"0.mp4": mp4}, "bad_media_kind"),
        ([{"type": "image", "media": 0}], {"0.0.png": png(), "0.1.png": png()}, "bad_media_kind"),
        ([{"type": "image", "media": 0}], {"0.png": png(), "1.png": png()}, "template"),
    ]:
        with pytest.raises(SampleError) as e:
            sp(_raw("k", content, media))
        assert e.value.reason == reason
    # a 1-frame list is a video of one temporal patch (the frame repeats to fill it)
    s = sp(_raw("k", v, {"0.0.png": png()}))
    assert s.grids[0][0] == 1 and s.kinds == ["video"]


def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_extreme_sizes_and_aspects_through_the_loader(tmp_path, tok):
    """Dynamic resolution: strips, bombs, tiny and large images are resized within the caps or
    refused with a counted reason; nothing is decoded at full size when it would not fit."""
    max_pixels, min_pixels = 48 * 48, 64
    sp = processor(tok, max_pixels=max_pixels, min_pixels=min_pixels, max_aspect_ratio=200)
    img = [{"type": "image", "media": 0}]
    sizes = {
        "strip_1x4000": (1, 4000),
        "strip_4000x1": (4000, 1),
        "wide_4000x30": (4000, 30),
        "tall_25x3000": (25, 3000),
        "large_3000x2000": (3000, 2000),
        "tiny_2x2": (2, 2),
        "pixel_1x1": (1, 1),
        "ok_40x24": (40, 24),
    }
    samples = [_raw(k, img, {"0.png": png(wh)}) for k, wh in sizes.items()]
    samples.append(_raw("bomb_20000x20000", img, {"0.png": huge_png_header(20000, 20000)}))
    samples.append(
        _raw(
            "bomb_frames", [{"type": "video", "media": 0}], {"0.0.png": huge_png_header(20000, 20000), "0.1.png": png()}
        )
    )
    samples.append(
        _raw("strip_video", [{"type": "video", "media": 0}], {f"0.{i}.png": png((1000, 2)) for i in range(2)})
    )
    samples.append(_raw("ok_last", img, {"0.png": png()}))  # skip counts ride on the next good sample
    _write(tmp_path / "x-000000.tar", samples)
    ds = ShardDataset(str(tmp_path / "x-000000.tar"), sp, train=False)
    batches = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=Collator(tok.pad_id)))
    skipped = sum((b["skipped"] for b in batches), Counter())
    keys = [k for b in batches for k in b["keys"]]
    assert dict(skipped) == {"media_aspect_ratio": 3, "media_too_many_pixels": 2}
    assert sorted(keys) == sorted(
        ["wide_4000x30", "tall_25x3000", "large_3000x2000", "tiny_2x2", "pixel_1x1", "ok_40x24", "ok_last"]
    )
    for b in batches:
        for _t, h, w in b["grid_thw"].tolist():
            assert h % 2 == 0 and w % 2 == 0 and h * w * 16 <= max_pixels
    grids = {k: g for b in batches for k, g in zip(b["keys"], b["grid_thw"].tolist())}
    assert grids["tiny_2x2"][1] * grids["tiny_2x2"][2] * 16 >= min_pixels
    assert grids["wide_4000x30"][2] > 4 * grids["wide_4000x30"][1]  # the aspect ratio survives


# ------------------------------------------------------------------ the real model, end to end


@pytest.fixture(scope="module")
def real_cfg(tmp_path_factory):
    """The real composed config (experiment=synthvqa_v2_dynamic), shrunk: rope2d, T=2, M-RoPE."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_train

    tmp = tmp_path_factory.mktemp("cfg")
    cfg = compose_train(["experiment=synthvqa_v2_dynamic", "model.projector.merge_size=2"], tmp, tmp)
    return OmegaConf.to_container(cfg, resolve=True)


def test_two_images_and_a_video_through_the_real_model(real_cfg, tok):
    torch.manual_seed(0)
    model = build_model(real_cfg["model"], tok)
    geo = geometry_of(real_cfg["model"])
    proc = build_processor(real_cfg["data"]["processor"], geometry=geo)
    assert proc.temporal_patch == 2 and model.encoder.pos == "rope2d" and model.decoder.rope == "mrope"
    assert (proc.patch_size, proc.temporal_patch, proc.merge_size) == (
        model.encoder.patch_size,
        model.encoder.temporal_patch,
        model.projector.merge_size,
    )
    template = build_template(real_cfg["data"]["template"], tok, geometry=geo)
    assert template.rope == "mrope" and template.token_grid((2, 8, 4)) == tuple(model.token_grid((2, 8, 4)))
    frames = moving(6, size=(64, 48))
    content = [
        {"type": "image", "media": 0},
        {"type": "text", "text": "and then"},
        {"type": "image", "media": 1},
        {"type": "video", "media": 2},
        {"type": "text", "text": "Which way is the red circle moving?"},
    ]
    raw = _raw(
        "2img1vid",
        content,
        {"0.png": png((64, 64)), "1.png": png((128, 32), (30, 70, 220)), "2.mp4": encode_video(frames)},
        answer="right",
    )
    train = SampleTransform(proc, template, mode="train")(raw)
    assert train.kinds == ["image", "image", "video"] and train.grids[2][0] == 3
    assert train.position_ids.dim() == 2 and train.position_ids.shape[0] == 3
    b = collate([train, train], tok.pad_id)
    model.train()
    hidden = model(
        b["input_ids"],
        b["position_ids"],
        b["attention_mask"],
        b["pixel_patches"],
        b["grid_thw"],
        b["media_per_sample"],
        b["keys"],
    )
    sel = b["labels"][:, 1:] != IGNORE
    loss = torch.nn.functional.cross_entropy(model.logits(hidden[:, :-1][sel]), b["labels"][:, 1:][sel])
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("encoder.patch_embed.conv.0.weight", "encoder.blocks.0.attn.q_proj.weight", "projector.proj.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # generation: the KV cache gives exactly the tokens of a full re-forward (M-RoPE positions)
    model.eval()
    ev = SampleTransform(proc, template, mode="eval")(raw)
    batch = collate(
        [ev, SampleTransform(proc, template, mode="eval")(_raw("1img", content[:2], {"0.png": png()}))],
        tok.pad_id,
        padding_side="left",
    )
    a = generate(model, batch, 6, eos_ids=[tok.im_end_id], use_cache=True)
    c = generate(model, batch, 6, eos_ids=[tok.im_end_id], use_cache=False)
    assert a == c and len(a[0]) > 0


# -------------------------------------------------------------------------------- configs


def test_processor_config_round_trip_and_old_configs():
    cfg = {
        "patch_size": 8,
        "merge_size": 1,
        "resolution": "dynamic",
        "min_pixels": 1024,
        "max_pixels": 14400,
        "video": {"temporal_patch": 2, "max_frames": 8, "max_video_tokens": 256, "max_pixels": 4096},
    }
    p = build_processor(cfg)
    assert isinstance(p.video, VideoProcessor) and p.temporal_patch == 2
    assert p.video.image.max_pixels == 4096 and p.max_pixels == 14400  # per-frame cap of its own
    again = build_processor(p.to_config())
    assert again == p and again.video == p.video
    assert build_processor(json.loads(json.dumps(p.to_config()))) == p
    old = build_processor({"patch_size": 8, "merge_size": 1, "resolution": "fixed", "image_size": 64})
    assert old.temporal_patch == 1 and old.video.resolution == "fixed"  # checkpoints before video support
    with pytest.raises(ValueError, match="unknown processor.video keys"):
        build_processor({"patch_size": 8, "video": {"temporal_pach": 2}})
    with pytest.raises(ValueError, match="differs"):
        build_processor({"patch_size": 8, "video": {"patch_size": 14}})
    # a stored processor config (an older checkpoint's) whose temporal patch is not the model's:
    # a clear error naming both values; one that agrees is built with the model's geometry
    stored = {
        "patch_size": 4,
        "merge_size": 2,
        "resolution": "dynamic",
        "min_pixels": 64,
        "max_pixels": 4096,
        "video": {"temporal_patch": 2},
    }
    t1 = Geometry(patch_size=4, temporal_patch=1, merge_size=2)
    with pytest.raises(
        ValueError, match=r"processor.video.temporal_patch=2 disagrees with the model's model.encoder.temporal_patch=1"
    ):
        build_processor(stored, geometry=t1)
    p4 = build_processor(stored, geometry=Geometry(patch_size=4, temporal_patch=2, merge_size=2))
    assert (p4.patch_size, p4.merge_size, p4.temporal_patch) == (4, 2, 2)
    assert build_processor({"resolution": "fixed", "image_size": 32}, geometry=t1).temporal_patch == 1


def test_token_caps_and_make_synthetic_families(tmp_path):
    p = build_processor(
        {
            "patch_size": 8,
            "merge_size": 2,
            "resolution": "dynamic",
            "min_tokens": 4,
            "max_tokens": 225,
            "video": {"temporal_patch": 2, "max_tokens": 64},
        }
    )
    assert (p.min_pixels, p.max_pixels, p.video.image.max_pixels) == (4 * 256, 225 * 256, 64 * 256)
    assert p.grid_for(64, 512) == (1, 8, 64)  # ocr_wide keeps 512x64: 128 tokens after the 2x2 merge
    assert build_processor(p.to_config()) == p
    with pytest.raises(ValueError, match="not both"):
        build_processor({"resolution": "dynamic", "max_tokens": 10, "max_pixels": 640})
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "data" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = mod.main(
        [
            "--out",
            str(tmp_path / "sv"),
            "--families",
            "shapes,video",
            "--train-samples",
            "12",
            "--heldout-samples",
            "4",
            "--workers",
            "1",
            "--video-format",
            "apng",
        ]
    )
    info = json.loads((root / "dataset.json").read_text())
    assert set(info["splits"]["train"]["families"]) <= {"shapes", "video"}
    assert info["splits"]["train"]["cfg"]["families"] == ["shapes", "video"]
