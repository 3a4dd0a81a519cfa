"""model=llava: a LLaVA-1.5-layout checkpoint (CLIP tower read at layer -2 without CLS, 2-layer MLP
projector, Llama decoder) as our modules; logits equal `transformers`' LlavaForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm.data.processor import patchify  # noqa: E402
from vlm.model.hf import pretrained_decoder, pretrained_llava_projector, pretrained_vision_encoder  # noqa: E402
from vlm.model.vlm import VLM  # noqa: E402

IMG = 95


def tiny_llava_config(vocab_size: int, image_token_id: int, rope_theta: float = 10000.0, **kw):
    """A tiny LLaVA: a 3-layer CLIP tower (32 px images, 8 px patches) and a 2-layer Llama."""
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=52,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=rope_theta,
        ),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        **kw,
    )


def test_llava_logits_match_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_llava_config(100, IMG, vision_feature_select_strategy="default")
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias") or "class_embedding" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "llava"
    ref.save_pretrained(path)
    enc = pretrained_vision_encoder(str(path), feature_layer=-2)
    model = VLM(
        enc, pretrained_llava_projector(str(path)), pretrained_decoder(str(path)), media_token_ids=[IMG, 96]
    ).eval()
    px = torch.randn(2, 3, 32, 32)
    ids = []
    for _ in range(2):  # two images in one sequence, text around them
        ids += torch.randint(0, 90, (4,)).tolist() + [IMG] * 16
    ids += torch.randint(0, 90, (3,)).tolist()
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        want = ref(input_ids=ids_t, pixel_values=px).logits
        patches = torch.cat([patchify(x, 8) for x in px])
        got = model.logits(
            model(ids_t, torch.arange(len(ids))[None], None, patches, torch.tensor([[1, 4, 4]] * 2), torch.tensor([2]))
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_llava_1_5_7b_key_maps_on_meta(tmp_path):
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    )
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    enc = pretrained_vision_encoder(str(tmp_path), feature_layer=-2, device="meta")
    proj = pretrained_llava_projector(str(tmp_path), device="meta")
    dec = pretrained_decoder(str(tmp_path), device="meta")
    with torch.device("meta"):
        ref = transformers.LlavaForConditionalGeneration(cfg)
    sd = ref.state_dict()
    last = "encoder.layers.23."  # LLaVA reads layer -2: the last CLIP layer is never run
    n_ref = sum(
        v.numel() for k, v in sd.items() if last not in k and "post_layernorm" not in k and "position_ids" not in k
    )
    n_ours = sum(p.numel() for m in (enc, proj, dec) for p in m.parameters())
    assert n_ours == n_ref and len(enc.blocks) == 23 and dec.vocab_size == 32064


def test_export_round_trips_through_transformers(tmp_path):
    """HF LLaVA -> our modules -> `format=hf_llava` -> transformers: the same logits."""
    from functools import partial

    from vlm.checkpoint.hf_export import ExportError, export_hf
    from vlm.checkpoint.load import LoadedVLM
    from vlm.data.media_processor import MediaProcessor
    from vlm.data.template import ChatTemplate
    from vlm.model.geometry import visual_token_count
    from vlm.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["a red square", "user\n", "assistant\n"] * 10, vocab_size=100)
    cfg = tiny_llava_config(tok.vocab_size, tok.image_pad_id, rope_theta=5000.0)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path / "in")
    model = VLM(
        pretrained_vision_encoder(str(tmp_path / "in"), feature_layer=-2),
        pretrained_llava_projector(str(tmp_path / "in")),
        pretrained_decoder(str(tmp_path / "in")),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    ).eval()
    processor = MediaProcessor(patch_size=8, resolution="crop", image_size=32)
    loaded = LoadedVLM(model, tok, processor, ChatTemplate(tok, partial(visual_token_count, merge_size=1)), {})
    export_hf(loaded, tmp_path / "out", "hf_llava")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[13, 14, 15] + [tok.image_pad_id] * 16 + [16, 17]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids, pixel_values=px).logits,
            ref(input_ids=ids, pixel_values=px).logits,
            atol=1e-4,
            rtol=1e-4,
        )
    with pytest.raises(ExportError, match="format=hf_qwen2vl: model.encoder.pos=.learned., the format needs .rope2d."):
        export_hf(loaded, tmp_path / "bad", "hf_qwen2vl")
