"""Qwen2-VL's vision tower and merger from a Hugging Face folder: our packed, row-major encoder +
`merge` projector give the same visual tokens as `transformers`' window-ordered tower, for images
of mixed sizes in one batch; key maps at full size (Qwen2-VL-7B) on the meta device."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm.model.hf import pretrained_qwen2vl_merger, pretrained_qwen2vl_vision  # noqa: E402

VISION = dict(
    depth=2,
    embed_dim=32,
    hidden_size=48,
    num_heads=4,
    mlp_ratio=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
TEXT = dict(
    vocab_size=100,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 1, 3]},
)


def _save(tmp_path):
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(
        transformers.Qwen2VLConfig(vision_config=VISION, text_config=TEXT)
    )
    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    with torch.no_grad():
        for n, p in visual.named_parameters():
            if "norm" in n or "ln_q" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "qwen2vl")
    return visual.eval(), tmp_path / "qwen2vl"


def window_order(t: int, h: int, w: int, m: int = 2) -> torch.Tensor:
    """Row-major patch index of each patch in Qwen2-VL's processor order (2x2 windows, row-major)."""
    idx = torch.arange(t * h * w).view(t, h // m, m, w // m, m)
    return idx.permute(0, 1, 3, 2, 4).reshape(-1)


def test_qwen2vl_vision_and_merger_match_transformers(tmp_path):
    visual, path = _save(tmp_path)
    enc = pretrained_qwen2vl_vision(str(path)).eval()
    proj = pretrained_qwen2vl_merger(str(path)).eval()
    grids = [(1, 4, 6), (1, 8, 4), (1, 4, 6)]  # images of mixed sizes (t = 1 temporal patch each)
    dim = 3 * 2 * 4 * 4
    ours_in, hf_in = [], []
    for t, h, w in grids:
        x = torch.randn(t * h * w, dim)  # row-major patches, [C, T, P, P] each (Qwen2-VL's Conv3d layout)
        ours_in.append(x)
        hf_in.append(x[window_order(t, h, w)])
    g = torch.tensor(grids)
    with torch.no_grad():
        want = visual(torch.cat(hf_in), grid_thw=g).pooler_output
        got = proj(enc(torch.cat(ours_in), g), g)
    assert got.shape == want.shape == (sum(h * w // 4 for _, h, w in grids), 48)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qwen2vl_7b_vision_key_maps_on_meta(tmp_path):
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(hidden_size=3584, num_hidden_layers=1, vocab_size=100),
    )
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    enc = pretrained_qwen2vl_vision(str(tmp_path), device="meta")
    proj = pretrained_qwen2vl_merger(str(tmp_path), device="meta")
    with torch.device("meta"):
        ref = transformers.Qwen2VLForConditionalGeneration(cfg)
    visual = ref.model.visual if hasattr(ref.model, "visual") else ref.visual
    n_ref = sum(v.numel() for v in visual.state_dict().values())
    assert sum(p.numel() for p in enc.parameters()) + sum(p.numel() for p in proj.parameters()) == n_ref
    assert enc.patch_dim == 3 * 2 * 14 * 14 and proj.token_count((1, 32, 32)) == 256


def test_whole_qwen2vl_logits_match_transformers(tmp_path):
    """model=qwen2vl: tower + merger + Qwen2 decoder with M-RoPE from one folder; logits equal
    transformers' on a sequence with two images of different sizes and a video, positions from
    our template's M-RoPE rule."""
    from types import SimpleNamespace

    from vlm.data.template import ChatTemplate
    from vlm.model.hf import pretrained_decoder
    from vlm.model.vlm import VLM

    VS, IMG, VID, VE = 91, 92, 93, 94
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        vision_config=VISION,
        text_config=TEXT,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    ref = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    path = tmp_path / "qwen2vl_full"
    ref.save_pretrained(path)
    enc, proj = pretrained_qwen2vl_vision(str(path)), pretrained_qwen2vl_merger(str(path))
    dec = pretrained_decoder(str(path), rope="mrope")
    assert dec.rope == "mrope" and dec.mrope_section == [2, 1, 3]
    model = VLM(enc, proj, dec, media_token_ids=[IMG, VID]).eval()

    media = [("image", (1, 4, 6)), ("video", (2, 4, 4)), ("image", (1, 8, 4))]
    ids, patches_ours, img_hf, vid_hf = [], [], [], []
    for kind, (t, h, w) in media:
        ids += torch.randint(0, 90, (3,)).tolist() + [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
        x = torch.randn(t * h * w, 3 * 2 * 4 * 4)
        patches_ours.append(x)
        (img_hf if kind == "image" else vid_hf).append(x[window_order(t, h, w)])
    ids += torch.randint(0, 90, (5,)).tolist()
    tok = SimpleNamespace(image_pad_id=IMG, video_pad_id=VID, im_start_id=0, im_end_id=1, encode=lambda s: [2])
    template = ChatTemplate(tok, lambda g: g[0] * (g[1] // 2) * (g[2] // 2), rope="mrope", merge_size=2)
    pos = template.position_ids(ids, [g for _, g in media])[:, None]  # [3, 1, L]
    ids_t = torch.tensor([ids])
    grids = torch.tensor([g for _, g in media])
    with torch.no_grad():
        mm_types = (ids_t == IMG).long() + 2 * (ids_t == VID).long()  # 0 text, 1 image, 2 video (HF's rope index)
        want = ref(
            input_ids=ids_t,
            mm_token_type_ids=mm_types,
            pixel_values=torch.cat(img_hf),
            image_grid_thw=torch.tensor([media[0][1], media[2][1]]),
            pixel_values_videos=torch.cat(vid_hf),
            video_grid_thw=torch.tensor([media[1][1]]),
        ).logits
        got = model.logits(model(ids_t, pos, None, torch.cat(patches_ours), grids, torch.tensor([3])))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qwen2vl_export_round_trips_through_transformers(tmp_path):
    """HF Qwen2-VL -> our modules -> `format=hf_qwen2vl` (hub key layout) -> transformers: same logits."""
    from functools import partial

    from vlm.checkpoint.hf_export import export_hf
    from vlm.checkpoint.load import LoadedVLM
    from vlm.data.media_processor import MediaProcessor
    from vlm.data.template import ChatTemplate
    from vlm.model.geometry import visual_token_count
    from vlm.model.hf import pretrained_decoder
    from vlm.model.vlm import VLM
    from vlm.tokenizer import train_tokenizer

    tok = train_tokenizer(["a red square", "user\n", "assistant\n"] * 10, vocab_size=100)
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        vision_config=VISION,
        text_config={**TEXT, "vocab_size": tok.vocab_size},
        image_token_id=tok.image_pad_id,
        video_token_id=tok.video_pad_id,
        vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id,
    )
    ref = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path / "in")
    p = str(tmp_path / "in")
    model = VLM(
        pretrained_qwen2vl_vision(p),
        pretrained_qwen2vl_merger(p),
        pretrained_decoder(p, rope="mrope"),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    ).eval()
    processor = MediaProcessor(patch_size=4, merge_size=2, resolution="dynamic", video={"temporal_patch": 2})
    template = ChatTemplate(tok, partial(visual_token_count, merge_size=2), rope="mrope", merge_size=2)
    export_hf(LoadedVLM(model, tok, processor, template, {}), tmp_path / "out", "hf_qwen2vl")
    back = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[13, 14, tok.vision_start_id] + [tok.image_pad_id] * 6 + [tok.vision_end_id, 15, 16]])
    mm = (ids == tok.image_pad_id).long()
    px = torch.randn(24, 3 * 2 * 4 * 4)
    g = torch.tensor([[1, 4, 6]])
    with torch.no_grad():
        a = back(input_ids=ids, mm_token_type_ids=mm, pixel_values=px, image_grid_thw=g).logits
        b = ref(input_ids=ids, mm_token_type_ids=mm, pixel_values=px, image_grid_thw=g).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
