"""vlm.model.config: the typed model spec is the single source of truth for the model."""

from __future__ import annotations

import pytest
import torch

from vlm.build.model import build_model, model_spec
from vlm.build.overrides import check_overrides
from vlm.checkpoint.hf_export import ExportError, check_spec
from vlm.model.config import DecoderConfig, EncoderConfig, ModelSpec, ProjectorConfig
from vlm.model.decoder import Decoder
from vlm.model.fields import SpecError
from vlm.model.vision import VisionEncoder
from vlm.tokenizer import train_tokenizer

MODEL = {
    "encoder": {"patch_size": 4, "dim": 16, "n_layers": 3, "n_heads": 2, "pos_grid": 4, "feature_layers": [-1, -2]},
    "projector": {"kind": "mlp", "merge_size": 2},
    "decoder": {"dim": 24, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a red square", "user\n", "assistant\n"] * 10, vocab_size=120)


def test_derived_fields_are_resolved_once(tok):
    spec, pretrained = model_spec(MODEL, vocab_size=tok.vocab_size)
    assert not pretrained
    assert spec.encoder.out_dim == 32 and spec.encoder.built_layers == 3 and spec.encoder.head_dim == 8
    assert (spec.projector.in_dim, spec.projector.out_dim) == (32, 24)  # null: follow encoder / decoder
    assert spec.decoder.vocab_size == tok.vocab_size and spec.decoder.mlp_width == 64
    geo = spec.geometry
    assert (geo.patch_size, geo.merge_size, geo.rope) == (4, 2, "rope")
    model = build_model(MODEL, tok)
    assert model.spec == spec
    # what a checkpoint stores rebuilds the same spec, `_target_` naming the native classes
    stored = spec.to_dict()
    assert stored["encoder"]["_target_"] == "vlm.model.vision.VisionEncoder"
    assert ModelSpec.from_dict(stored) == spec
    assert build_model(stored, tok, trusted=False).spec == spec


def test_one_line_errors_name_the_key():
    cases = [
        (lambda: EncoderConfig.from_dict({"dimm": 3}), "model.encoder.dimm is not a field of EncoderConfig (known: "),
        (lambda: EncoderConfig(dim="abc"), "model.encoder.dim='abc' is not of type int"),
        (lambda: EncoderConfig(dim=30, n_heads=4), "model.encoder.dim 30 is not divisible by model.encoder.n_heads 4"),
        (lambda: EncoderConfig(n_layers=2, feature_layer=2), "feature_layer 2 out of range for 2 layers"),
        (lambda: DecoderConfig(n_layers=-1), "model.decoder.n_layers=-1 is negative"),
        (lambda: DecoderConfig(n_layers=5000), "model.decoder.n_layers=5000 is out of range"),
        (lambda: DecoderConfig(rope_theta=float("inf")), "model.decoder.rope_theta=inf is not a finite number"),
        (lambda: DecoderConfig(n_heads=4, n_kv_heads=3), "n_heads 4 is not divisible by n_kv_heads 3"),
        (lambda: ProjectorConfig(kind="mlp", queries=4), "model.projector.queries is for kind=qformer only"),
        (
            lambda: ModelSpec(EncoderConfig(), ProjectorConfig(in_dim=7), DecoderConfig()),
            "model.projector.in_dim=7 but the encoder emits 128 wide",
        ),
        (lambda: ModelSpec.from_dict({**MODEL, "fusion": "concat"}), "model.fusion='concat' is not one of"),
    ]
    for make, needle in cases:
        with pytest.raises(SpecError) as e:
            make()
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))


def test_keyword_constructors_and_from_config_agree():
    kw = dict(patch_size=4, dim=16, n_layers=2, n_heads=2, pos_grid=4)
    torch.manual_seed(0)
    a = VisionEncoder(**kw)
    torch.manual_seed(0)
    b = VisionEncoder.from_config(EncoderConfig(**kw))
    assert a.config == b.config and a.out_dim == b.config.out_dim
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_grown_vocabulary_is_in_the_spec():
    dec = Decoder(vocab_size=10, dim=16, n_layers=1, n_heads=2)
    dec.grow_vocab(13)
    assert dec.config.vocab_size == 13 == dec.embed_tokens.weight.shape[0]


def test_command_line_keys_are_checked_against_the_spec():
    assert "model.encoder.dimm is not a field of EncoderConfig" in check_overrides(["model.encoder.dimm=3"])
    assert "model.cross_attn.evry is not a field of CrossAttnConfig" in check_overrides(["model.cross_attn.evry=2"])
    assert "model.foo is not a field of ModelSpec" in check_overrides(["+model.foo=1"])
    ok = ["model.encoder.dim=256", "model.decoder.pretrained=/m", "model.freeze.encoder=true", "model/encoder=siglip"]
    assert check_overrides(ok) is None


def test_hf_export_names_the_spec_field_that_differs(tok):
    spec, _ = model_spec(MODEL, vocab_size=tok.vocab_size)
    with pytest.raises(ExportError, match=r"format=hf_llava: model.encoder.patch_bias=True, the format needs False"):
        check_spec(spec, "hf_llava")
    qwen = spec.encoder.replace(
        pos="rope2d", patch_bias=False, final_norm=False, attention="frame", act="quick_gelu", norm_eps=1e-6
    )
    with pytest.raises(ExportError, match=r"model.projector.kind='mlp', the format needs 'merge'"):
        check_spec(ModelSpec(qwen, ProjectorConfig(kind="mlp", merge_size=2), spec.decoder), "hf_qwen2vl")
