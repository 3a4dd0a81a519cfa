"""Pretrained decoders from Hugging Face-layout folders: parity with `transformers` (a test-only
dependency) on tiny random models it saves, key maps at full size on the meta device, and clear
errors for what does not fit. No downloads: every model is built here."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlm.model.hf import PretrainedError, check_and_load, decoder_key_map, pretrained_decoder  # noqa: E402

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def _save(tmp_path, family: str, tied: bool, **kw):
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, **kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**TINY, tie_word_embeddings=tied, sliding_window=None, **kw)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases so a wrong map cannot pass by accident
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"{family}_{'tied' if tied else 'untied'}"
    model.save_pretrained(path)
    return model.eval(), path


@pytest.mark.parametrize(
    "family,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False), ("mistral", False)]
)
def test_decoder_logits_match_transformers(tmp_path, family, tied):
    ref, path = (
        _save(tmp_path, family, tied, rope_theta=5000.0) if family != "mistral" else _save(tmp_path, family, tied)
    )
    ours = pretrained_decoder(str(path)).eval()
    assert ours.tie_embeddings if hasattr(ours, "tie_embeddings") else True
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    pos = torch.arange(17).expand(2, -1)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours.lm_head(ours(ours.embed_tokens(ids), pos))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if family == "qwen2":
        assert ours.layers[0].self_attn.q_proj.bias is not None


def test_sharded_checkpoint_loads(tmp_path):
    ref, _ = _save(tmp_path, "llama", False)
    path = tmp_path / "sharded"
    ref.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ours = pretrained_decoder(str(path)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            ours.lm_head(ours(ours.embed_tokens(ids), torch.arange(9)[None])),
            ref(input_ids=ids).logits,
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize(
    "name,cfg_cls,model_cls,kw",
    [
        (
            "Llama-3-8B",
            "LlamaConfig",
            "LlamaForCausalLM",
            dict(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                rope_theta=500000.0,
                max_position_embeddings=8192,
                tie_word_embeddings=False,
            ),
        ),
        (
            "Qwen2-7B",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                rope_theta=1000000.0,
                max_position_embeddings=32768,
                tie_word_embeddings=False,
            ),
        ),
        (
            "Qwen2.5-0.5B",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            dict(
                vocab_size=151936,
                hidden_size=896,
                intermediate_size=4864,
                num_hidden_layers=24,
                num_attention_heads=14,
                num_key_value_heads=2,
                rope_theta=1000000.0,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
            ),
        ),
    ],
)
def test_full_size_key_maps_on_the_meta_device(tmp_path, name, cfg_cls, model_cls, kw):
    """Every key of the real architecture maps, with the right shape, without allocating memory."""
    cfg = getattr(transformers, cfg_cls)(**kw)
    with torch.device("meta"):
        ref = getattr(transformers, model_cls)(cfg)
    source = {k: v for k, v in ref.state_dict().items()}
    if cfg.tie_word_embeddings:
        source.pop("lm_head.weight", None)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    ours = pretrained_decoder(str(tmp_path), device="meta")
    assert all(p.is_meta for p in ours.parameters())
    hf_cfg = json.loads(cfg.to_json_string())
    check_and_load(ours, source, decoder_key_map(hf_cfg), where=name)
    n = sum(p.numel() for p in ours.parameters())
    assert abs(n - sum(v.numel() for v in source.values())) == 0, name


def test_mismatches_are_named(tmp_path):
    ref, path = _save(tmp_path, "llama", False)
    sd = {k: v for k, v in ref.state_dict().items()}
    from safetensors.torch import save_file

    broken = dict(sd)
    broken.pop("model.layers.1.mlp.up_proj.weight")
    broken["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in broken.items()}, str(path / "model.safetensors"))
    with pytest.raises(PretrainedError) as e:
        pretrained_decoder(str(path))
    msg = str(e.value)
    assert "missing in the checkpoint: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected in the checkpoint: model.layers.0.extra.weight" in msg
    wrong = dict(sd)
    wrong["model.norm.weight"] = torch.ones(7)
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(path / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"shape mismatch: model.norm.weight \(7,\) -> norm.weight \(32,\)"):
        pretrained_decoder(str(path))
    cfg = json.loads((path / "config.json").read_text())
    for patch, match in (
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
        ({"model_type": "gpt2"}, "not a supported decoder family"),
        ({"head_dim": 16}, "head_dim 16"),
        ({"hidden_act": "gelu"}, "SiLU only"),
    ):
        (path / "config.json").write_text(json.dumps({**cfg, **patch}))
        with pytest.raises(PretrainedError, match=match):
            pretrained_decoder(str(path))
    with pytest.raises(PretrainedError, match="no config.json"):
        pretrained_decoder(str(tmp_path / "nowhere"))
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="contradicts"):
        pretrained_decoder(str(path), dim=64)


def test_pretrained_decoder_trains_through_hydra_with_a_grown_vocabulary(tmp_path, synth_dir):
    """model/decoder=qwen2 pretrained=FOLDER: the folder's tokenizer lacks some of our tokens, the
    embedding grows (new rows = mean of the old), and the VLM trains and reloads from its export."""
    import shutil

    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    from tests.conftest import TINY as TINY_RUN
    from vlm.checkpoint.load import load_checkpoint
    from vlm.tokenizer import TextTokenizer
    from vlm.training.train import run

    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**{**TINY, "vocab_size": tok.vocab_size - 4}, tie_word_embeddings=True)
    ref = transformers.Qwen2ForCausalLM(cfg)
    folder = tmp_path / "qwen2_tiny"
    ref.save_pretrained(folder)
    shutil.copy(synth_dir / "synthvqa" / "tokenizer.json", folder / "tokenizer.json")
    from tests.test_jinja_template import QWEN2VL

    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2VL, "eos_token": "<|im_end|>"}))
    old = ref.model.embed_tokens.weight.detach().clone()
    overrides = [o for o in TINY_RUN if not o.startswith("model.decoder.")] + [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.data_dir={synth_dir}",
        "logger=none",
        "model/decoder=qwen2",
        f"model.decoder.pretrained={folder}",
        f"data.tokenizer={folder}",
        f"data.template.jinja={folder}",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "optimizer.lr=1e-9",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        run(compose("train", overrides=overrides))
    shutil.rmtree(folder)  # the export is self-contained: the pretrained folder is no longer needed
    loaded = load_checkpoint(tmp_path / "run" / "export")
    assert (
        type(loaded.template).__name__ == "JinjaChatTemplate"
        and "You are a helpful assistant." in loaded.template.jinja_text
    )
    m = loaded.model
    emb = m.decoder.embed_tokens.weight.detach()
    assert (
        emb.shape == (tok.vocab_size, TINY["hidden_size"]) and m.decoder.lm_head.weight is m.decoder.embed_tokens.weight
    )
    torch.testing.assert_close(emb[: old.shape[0]], old, atol=1e-6, rtol=0)  # lr 1e-9: one step moves nothing visible
    torch.testing.assert_close(emb[old.shape[0] :], old.mean(0).expand(4, -1), atol=1e-6, rtol=0)
    assert m.decoder.layers[0].self_attn.q_proj.bias is not None


def test_tokenizer_from_a_pretrained_folder_gains_the_missing_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vlm.tokenizer import IM_START, TextTokenizer

    t = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2, IM_START: 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([IM_START])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path)
    assert tok.im_start_id == 3 and tok.image_pad_id >= 4 and tok.vocab_size == 4 + 7
    assert tok.encode("hello <|image_pad|>") != [0, tok.image_pad_id]  # text stays text
    with pytest.raises(ValueError, match="lacks the special tokens"):
        TextTokenizer.from_file(tmp_path, add_missing=False)


def test_fsdp_reads_the_pretrained_folder_on_rank_0_only(tmp_path, synth_dir):
    """`python train.py trainer=fsdp … devices=2` with a pretrained decoder, as a user runs it
    (Lightning's own launcher): rank 1 builds a meta skeleton and never reads the safetensors,
    rank 0 broadcasts the weights into both ranks' shards (parallel.init=rank0), and the trained
    export still holds the pretrained weights (lr 1e-9) with the grown rows at the old mean."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.conftest import TINY as TINY_RUN
    from tests.test_jinja_template import QWEN2VL
    from vlm.checkpoint.load import load_checkpoint
    from vlm.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{**TINY, "vocab_size": tok.vocab_size - 4}, tie_word_embeddings=True)
    )
    folder = tmp_path / "qwen2_tiny"
    ref.save_pretrained(folder)
    shutil.copy(synth_dir / "synthvqa" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2VL, "eos_token": "<|im_end|>"}))
    overrides = [o for o in TINY_RUN if not o.startswith("model.decoder.")] + [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.data_dir={synth_dir}",
        "logger=none",
        "model/decoder=qwen2",
        f"model.decoder.pretrained={folder}",
        f"data.tokenizer={folder}",
        f"data.template.jinja={folder}",
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "optimizer.lr=1e-9",
        "threads=1",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert out.count("model built on the meta device") == 1, out[-4000:]  # rank 1 only
    m = load_checkpoint(tmp_path / "run" / "export").model
    old = ref.model.embed_tokens.weight.detach()
    emb = m.decoder.embed_tokens.weight.detach()
    torch.testing.assert_close(emb[: old.shape[0]], old, atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[old.shape[0] :], old.mean(0).expand(4, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        m.decoder.layers[1].mlp.down_proj.weight.detach(),
        ref.model.layers[1].mlp.down_proj.weight.detach(),
        atol=1e-6,
        rtol=0,
    )
