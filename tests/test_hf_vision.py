"""Pretrained SigLIP vision towers from Hugging Face folders: features equal `transformers`' on
the native grid and on other grids (interpolated positions), the key map at full size on the meta
device, and unused keys (the pooling head, the text tower, layers after `feature_layer`)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm.data.processor import patchify  # noqa: E402
from vlm.model.hf import PretrainedError, pretrained_vision_encoder  # noqa: E402

TINY = dict(
    hidden_size=32,
    intermediate_size=52,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
)


def _siglip(tmp_path, full=False):
    torch.manual_seed(0)
    if full:
        cfg = transformers.SiglipConfig(
            vision_config=TINY,
            text_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
            ),
        )
        model = transformers.SiglipModel(cfg)
        vision = model.vision_model
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
        vision = getattr(model, "vision_model", model)  # transformers 5 saves the tower without the prefix
    with torch.no_grad():
        for n, p in vision.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / ("siglip_full" if full else "siglip_vision")
    model.save_pretrained(path)
    return vision.eval(), path


def _ours(enc, pixels):
    grids, patches = [], []
    for img in pixels:
        _, H, W = img.shape
        grids.append((1, H // 8, W // 8))
        patches.append(patchify(img, 8))
    return enc(torch.cat(patches), torch.tensor(grids))


@pytest.mark.parametrize("full", [False, True], ids=["vision_model", "full_siglip"])
def test_siglip_features_match_transformers(tmp_path, full):
    ref, path = _siglip(tmp_path, full)
    enc = pretrained_vision_encoder(str(path)).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=px).last_hidden_state  # [2, 16, 32], post_layernorm applied
        got = _ours(enc, px).view(2, 16, -1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # another grid: positions interpolated (bicubic) like HF's interpolate_pos_encoding
    px2 = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        want2 = ref(pixel_values=px2, interpolate_pos_encoding=True).last_hidden_state
        got2 = _ours(enc, px2).view(1, 48, -1)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)


def test_feature_layer_drops_later_layers(tmp_path):
    ref, path = _siglip(tmp_path)
    enc = pretrained_vision_encoder(str(path), feature_layer=-2).eval()
    assert len(enc.blocks) == 2
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs = ref(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        want = ref.post_layernorm(hs)
        torch.testing.assert_close(_ours(enc, px).view(1, 16, -1), want, atol=1e-4, rtol=1e-4)


def test_siglip_so400m_key_map_on_meta(tmp_path):
    cfg = transformers.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    enc = pretrained_vision_encoder(str(tmp_path), device="meta")
    assert all(p.is_meta for p in enc.parameters())
    with torch.device("meta"):
        ref = transformers.SiglipVisionModel(cfg)
    n_ref = sum(v.numel() for k, v in ref.state_dict().items() if not k.startswith("head.") and ".head." not in k)
    assert sum(p.numel() for p in enc.parameters()) == n_ref
    assert enc.pos_embed.shape == (27, 27, 1152) and enc.blocks[0].mlp.fc1.out_features == 4304


def test_broken_vision_checkpoints_are_named(tmp_path):
    from safetensors.torch import save_file

    ref, path = _siglip(tmp_path)
    sd = {f"vision_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    sd.pop("vision_model.encoder.layers.2.mlp.fc2.bias")
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(PretrainedError, match="missing in the checkpoint: vision_model.encoder.layers.2.mlp.fc2.bias"):
        pretrained_vision_encoder(str(path))
    (path / "config.json").write_text('{"model_type": "dinov2"}')
    with pytest.raises(PretrainedError, match="not a supported vision tower"):
        pretrained_vision_encoder(str(path))


def _clip(tmp_path, full=False):
    torch.manual_seed(0)
    kw = dict(
        hidden_size=32, intermediate_size=52, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    if full:
        cfg = transformers.CLIPConfig(
            vision_config=kw,
            text_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
            ),
            projection_dim=8,
        )
        model = transformers.CLIPModel(cfg)
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
    vision = getattr(model, "vision_model", model)
    with torch.no_grad():
        for n, p in vision.named_parameters():
            if "norm" in n or n.endswith("bias") or "class_embedding" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / ("clip_full" if full else "clip_vision")
    model.save_pretrained(path)
    return vision.eval(), path


@pytest.mark.parametrize("full", [False, True], ids=["vision_model", "full_clip"])
def test_clip_features_match_transformers_llava_style(tmp_path, full):
    """LLaVA's read of CLIP: hidden_states[-2] without the CLS token (and without a final norm)."""
    ref, path = _clip(tmp_path, full)
    for layer, pick in ((-2, lambda o: o.hidden_states[-2]), (-1, lambda o: o.last_hidden_state)):
        enc = pretrained_vision_encoder(str(path), feature_layer=layer).eval()
        px = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want = pick(ref(pixel_values=px, output_hidden_states=True))[:, 1:]
            got = _ours(enc, px).view(2, 16, -1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    px2 = torch.randn(1, 3, 48, 40)  # another grid: interpolated patch positions, CLS position kept
    with torch.no_grad():
        want2 = ref(pixel_values=px2, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        got2 = _ours(enc, px2).view(1, 30, -1)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)


def test_clip_vit_l_336_key_map_on_meta(tmp_path):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    enc = pretrained_vision_encoder(str(tmp_path), device="meta")
    with torch.device("meta"):
        ref = transformers.CLIPVisionModel(cfg)
    n_ref = sum(
        v.numel() for k, v in ref.state_dict().items() if not k.endswith("position_ids") and "post_layernorm" not in k
    )  # post_layernorm: the pooled CLS only
    assert sum(p.numel() for p in enc.parameters()) == n_ref  # every weight of the tower has a place
    assert enc.pos_embed.shape == (24, 24, 1024)
