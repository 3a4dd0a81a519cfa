"""Low-rank adapters (`model.lora`, peft) end to end on tiny models:

- the spec: unknown keys and bad values refused in one line, `r: 0` / no key = no adapters;
- training touches only the adapters (and what the freeze settings leave trainable), the loss falls;
- a real training run with adapters resumes bit-identically; `init_from` a plain checkpoint;
- the merged export computes what the adapted model does (fp32, 1e-5), the base export plus the
  adapter folder too (`infer.py adapter=`), and 2-rank CPU FSDP with activation checkpointing
  trains and exports;
- a Qwen2-VL-shaped model's adapter folder, loaded with peft onto transformers' Qwen2-VL read from
  our `hf_qwen2vl` export of the base, gives our logits;
- malformed adapter folders are refused with one line each.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from tests.conftest import TINY, compose_train  # noqa: E402
from vlm.errors import CheckpointError  # noqa: E402
from vlm.model.config import LoraConfig, ModelSpec  # noqa: E402
from vlm.model.fields import SpecError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL = "[decoder.attn,decoder.mlp,encoder.attn,encoder.mlp,projector]"


def _tok():
    from vlm.tokenizer import train_tokenizer

    return train_tokenizer(["a red square", "user\n", "assistant\n"] * 10, vocab_size=100)


def _model_cfg(**lora) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in TINY if o.startswith("model.")])
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m["lora"] = {**m["lora"], **lora}
    return m


def _batch(model, tok, seed=0):
    """Two rows of text with one 16x16 image each (positions 0..L-1)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.token_count((1, 2, 2))
    text = tok.encode("a red square a red square")
    ids = [text[:2] + [tok.image_pad_id] * n_img + text] * 2
    ids = torch.tensor(ids)
    pos = torch.arange(ids.shape[1]).expand(2, -1)
    patches = torch.randn(8, model.encoder.patch_dim, generator=g)
    return ids, pos, patches, torch.tensor([[1, 2, 2], [1, 2, 2]]), torch.tensor([1, 1])


def _logits(model, batch):
    ids, pos, patches, grid, per = batch
    with torch.no_grad():
        return model.logits(model(ids, pos, None, patches, grid, per)).float()


def _nudge(model, seed=1):
    """Non-zero adapters (B starts at zero), so an export that dropped them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---- the spec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": 4, "rank": 2}, "model.lora.rank is not a field of LoraConfig"),
        ({"r": -1}, "model.lora.r=-1 is negative"),
        ({"r": 4, "alpha": "x"}, "model.lora.alpha='x' is not of type float"),
        ({"r": 4, "dropout": 1.5}, "model.lora.dropout=1.5 must be in [0, 1)"),
        (
            {"r": 4, "targets": ["decoder.attention"]},
            "model.lora.targets=['decoder.attention'] names 'decoder.attention'",
        ),
        ({"r": 4, "targets": []}, "model.lora.targets=[] is empty"),
        ({"r": 4, "use_dora": "yes"}, "model.lora.use_dora='yes' is not of type bool"),
        ({"r": 0, "typo": 1}, "model.lora.typo is not a field"),
    ],
)
def test_lora_spec_refuses_bad_settings(lora, message):
    d = ModelSpec(*(c() for c in _parts())).to_dict()
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({**d, "lora": lora})
    assert message in str(e.value) and "\n" not in str(e.value)


def _parts():
    from vlm.model.config import DecoderConfig, EncoderConfig, ProjectorConfig

    return EncoderConfig, ProjectorConfig, lambda: DecoderConfig(vocab_size=64)


def test_lora_spec_round_trips_and_r0_is_off():
    d = ModelSpec(*(c() for c in _parts())).to_dict()
    assert "lora" not in d  # no adapters: no key (older checkpoints have none)
    assert ModelSpec.from_dict({**d, "lora": {"r": 0}}).lora is None
    spec = ModelSpec.from_dict({**d, "lora": {"r": 16, "alpha": 32, "targets": ["decoder.attn", "projector"]}})
    assert spec.lora == LoraConfig(r=16, alpha=32, targets=["decoder.attn", "projector"])
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.lora.scale == 2.0 and LoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0


# ---- training: what changes, the loss ----------------------------------------------------------------
def test_only_adapters_and_chosen_parts_train_and_the_loss_falls():
    from functools import partial

    import torch.nn.functional as F

    from vlm.build.model import build_model
    from vlm.training.optim import apply_freeze, build_optimizer

    tok = _tok()
    torch.manual_seed(0)
    # adapters in the decoder (attention + MLP); the projector left trainable; the encoder frozen
    model = build_model(_model_cfg(r=4, alpha=8, targets=["decoder.attn", "decoder.mlp"]), tok)
    apply_freeze(model, {"encoder": True, "projector": False})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    assert not any(n.startswith(("encoder.", "decoder.")) and ".lora_" not in n for n in trainable)
    opt = build_optimizer(model, partial(torch.optim.AdamW, lr=2e-2))
    state_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert state_params == {id(p) for n, p in model.named_parameters() if n in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(model, tok)
    ids = batch[0]
    losses = []
    for _ in range(30):
        hidden = model(*batch[:2], None, *batch[2:])
        loss = F.cross_entropy(model.logits(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(".lora_B" in n for n in changed)


# ---- a real run: resume, merged export, base + adapter folder -----------------------------------------
LORA_RUN = ["model.lora.r=4", "model.lora.alpha=8", f"model.lora.targets={ALL}", "model.lora.dropout=0.1"]


def _losses(out: Path) -> dict[int, str]:
    losses = {}
    for f in sorted(out.rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = row["train/loss"]
    return losses


def _run(out: Path, synth_dir: Path, steps: int, extra=()) -> dict[int, str]:
    from vlm.training.train import run

    overrides = [
        "logger=csv",
        f"trainer.max_steps={steps}",
        "scheduler.total_steps=6",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.model_checkpoint.every_n_train_steps=3",
        "~callbacks.export",
        "parallel.ac=full",
        *LORA_RUN,
        *extra,
    ]
    run(compose_train(overrides, out, synth_dir))
    return _losses(out)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synth_dir):
    out = tmp_path_factory.mktemp("lora_straight")
    losses = _run(out, synth_dir, 6)
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]
    return out, losses


def test_resume_with_adapters_is_bit_identical(tmp_path, synth_dir, lora_run):
    _, straight = lora_run
    _run(tmp_path / "first", synth_dir, 3)
    ckpt = tmp_path / "first" / "checkpoints" / "step000003.ckpt"
    assert ckpt.is_file()
    resumed = _run(tmp_path / "second", synth_dir, 6, [f"ckpt_path={ckpt}"])
    assert {k: v for k, v in resumed.items() if k >= 3} == {k: straight[k] for k in (3, 4, 5)}


def test_merged_export_and_base_plus_adapter_equal_the_adapted_model(tmp_path, lora_run):
    from vlm.checkpoint.adapters import merge_adapter
    from vlm.checkpoint.load import load_checkpoint
    from vlm.cli.export import main as export_main

    out, _ = lora_run
    ckpt = out / "checkpoints" / "step000006.ckpt"
    adapted = load_checkpoint(ckpt)
    assert adapted.model.lora is not None and adapted.model.lora.r == 4
    _nudge(adapted.model)  # a few steps leave B small: make the adapters' share plain
    torch.save(
        {
            **torch.load(ckpt, weights_only=True),
            "state_dict": {f"model.{k}": v for k, v in adapted.model.state_dict().items()},
        },
        tmp_path / "nudged.ckpt",
    )
    ck = tmp_path / "nudged.ckpt"
    batch = _batch(adapted.model, adapted.tokenizer)
    want = _logits(adapted.model, batch)
    assert export_main([f"ckpt={ck}", f"out={tmp_path / 'merged'}"]) == 0
    assert export_main([f"ckpt={ck}", f"out={tmp_path / 'base'}", "merge_adapters=false"]) == 0
    assert export_main([f"ckpt={ck}", f"out={tmp_path / 'adapter'}", "format=peft_adapter"]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    assert merged.model.lora is None and not any(".lora_" in k for k in merged.model.state_dict())
    torch.testing.assert_close(_logits(merged.model, batch), want, atol=1e-5, rtol=1e-5)
    base = load_checkpoint(tmp_path / "base")
    assert (_logits(base.model, batch) - want).abs().max() > 1e-3  # the adapters matter
    info = merge_adapter(base.model, tmp_path / "adapter")
    assert info["layout"] == "vlm"
    torch.testing.assert_close(_logits(base.model, batch), want, atol=1e-5, rtol=1e-5)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    # init_from: a plain checkpoint's weights are the base of an adapted model (fresh adapters)
    from vlm.build.model import build_model
    from vlm.training.train import init_weights

    module = SimpleNamespace(
        model=build_model(adapted.config["model"], adapted.tokenizer, trusted=False), tokenizer=adapted.tokenizer
    )
    init_weights(module, str(tmp_path / "base"))
    assert module.model.lora is not None
    torch.testing.assert_close(_logits(module.model, batch), _logits(load_checkpoint(tmp_path / "base").model, batch))
    # and the other way: an adapted checkpoint initialises a plain model with its adapters merged
    plain = SimpleNamespace(
        model=build_model(merged.config["model"], merged.tokenizer, trusted=False), tokenizer=merged.tokenizer
    )
    init_weights(plain, str(ck))
    assert plain.model.lora is None
    torch.testing.assert_close(_logits(plain.model, batch), want, atol=1e-5, rtol=1e-5)
    # format=peft_adapter of a model without adapters, and a checkpoint with adapters but no peft: one line
    assert export_main([f"ckpt={tmp_path / 'merged'}", f"out={tmp_path / 'none'}", "format=peft_adapter"]) == 2
    import sys as _sys

    saved = _sys.modules.get("peft")
    _sys.modules["peft"] = None
    try:
        with pytest.raises(CheckpointError, match=r"model.lora needs peft: pip install -e \.\[lora\]"):
            load_checkpoint(ck)
    finally:
        _sys.modules["peft"] = saved


def test_infer_with_adapter(tmp_path, lora_run, synth_dir, capsys):
    from tests.conftest import compose_infer
    from vlm.cli.export import main as export_main
    from vlm.serve.infer import run

    out, _ = lora_run
    ckpt = out / "checkpoints" / "step000006.ckpt"
    assert export_main([f"ckpt={ckpt}", f"out={tmp_path / 'base'}", "merge_adapters=false"]) == 0
    assert export_main([f"ckpt={ckpt}", f"out={tmp_path / 'adapter'}", "format=peft_adapter"]) == 0
    from PIL import Image

    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    cfg = compose_infer(
        [
            f"ckpt={tmp_path / 'base'}",
            f"adapter={tmp_path / 'adapter'}",
            f"image={img}",
            "prompt=What?",
            "max_new_tokens=2",
        ],
        tmp_path,
        synth_dir,
    )
    run(cfg)
    bad = compose_infer(
        [f"ckpt={tmp_path / 'base'}", f"adapter={tmp_path}", f"image={img}", "prompt=What?"], tmp_path, synth_dir
    )
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        run(bad)


def test_serve_with_adapter_serves_the_merged_model(tmp_path, lora_run, monkeypatch):
    from hydra import compose, initialize_config_dir

    import vlm.serve.engines as engines
    from vlm.checkpoint.load import load_checkpoint
    from vlm.cli.export import main as export_main
    from vlm.serve import server

    out, _ = lora_run
    ckpt = out / "checkpoints" / "step000006.ckpt"
    for name, args in (("base", ["merge_adapters=false"]), ("adapter", ["format=peft_adapter"]), ("merged", [])):
        assert export_main([f"ckpt={ckpt}", f"out={tmp_path / name}", *args]) == 0
    seen = {}

    class Stop(Exception):
        pass

    def spy(loaded, *a, **kw):
        seen["loaded"] = loaded
        raise Stop

    monkeypatch.setattr(engines, "build_engine", spy)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt={tmp_path / 'base'}", f"adapter={tmp_path / 'adapter'}"])
    with pytest.raises(Stop):
        server.run(cfg)
    merged = load_checkpoint(tmp_path / "merged")
    batch = _batch(merged.model, merged.tokenizer)
    torch.testing.assert_close(_logits(seen["loaded"].model, batch), _logits(merged.model, batch), atol=1e-5, rtol=1e-5)
    # a checkpoint trained with adapters is served with them merged (plain Linear layers)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt={ckpt}"])
    with pytest.raises(Stop):
        server.run(cfg)
    assert seen["loaded"].model.lora is None and "lora" not in seen["loaded"].config["model"]
    assert not any(".lora_" in k for k in seen["loaded"].model.state_dict())


# ---- Qwen2-VL: peft on transformers' model reads our adapter folder ---------------------------------------
def _window_order(t, h, w, m=2):
    idx = torch.arange(t * h * w).view(t, h // m, m, w // m, m)
    return idx.permute(0, 1, 3, 2, 4).reshape(-1)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_on_transformers_qwen2vl_matches_our_adapted_model(tmp_path, dora):
    transformers = pytest.importorskip("transformers")
    from functools import partial

    from peft import PeftModel

    from tests.test_hf_qwen2vl import TEXT, VISION
    from vlm.checkpoint.adapters import export_adapter, merge_adapter, without_adapters
    from vlm.checkpoint.hf_export import export_hf
    from vlm.checkpoint.load import LoadedVLM
    from vlm.data.media_processor import MediaProcessor
    from vlm.data.template import ChatTemplate
    from vlm.model.geometry import visual_token_count
    from vlm.model.hf import pretrained_decoder, pretrained_qwen2vl_merger, pretrained_qwen2vl_vision
    from vlm.model.lora import apply_lora
    from vlm.model.vlm import VLM

    tok = _tok()
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2VLConfig(
        vision_config=VISION,
        text_config={**TEXT, "vocab_size": tok.vocab_size},
        image_token_id=tok.image_pad_id,
        video_token_id=tok.video_pad_id,
        vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id,
    )
    transformers.Qwen2VLForConditionalGeneration(hf_cfg).save_pretrained(tmp_path / "in")
    p = str(tmp_path / "in")
    model = VLM(
        pretrained_qwen2vl_vision(p),
        pretrained_qwen2vl_merger(p),
        pretrained_decoder(p, rope="mrope"),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    )
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=list(LORA_TARGETS_ALL), use_dora=dora))
    _nudge(model)
    model.eval()
    processor = MediaProcessor(patch_size=4, merge_size=2, resolution="dynamic", video={"temporal_patch": 2})
    template = ChatTemplate(tok, partial(visual_token_count, merge_size=2), rope="mrope", merge_size=2)
    adapter = export_adapter(LoadedVLM(model, tok, processor, template, {}), tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and "model.visual.blocks.0.attn.qkv" in cfg["target_modules"]
    base = without_adapters(LoadedVLM(copy.deepcopy(model), tok, processor, template, {}), merge=False)
    export_hf(base, tmp_path / "hf", "hf_qwen2vl")

    grid = (1, 4, 6)
    ids = [13, 14, tok.vision_start_id] + [tok.image_pad_id] * 6 + [tok.vision_end_id, 15, 16]
    pos = template.position_ids(ids, [grid])[:, None]
    ids_t = torch.tensor([ids])
    px = torch.randn(24, 3 * 2 * 4 * 4)
    g = torch.tensor([grid])
    with torch.no_grad():
        ours = model.logits(model(ids_t, pos, None, px, g, torch.tensor([1])))
        hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
        plain = hf(
            input_ids=ids_t,
            mm_token_type_ids=(ids_t == tok.image_pad_id).long(),
            pixel_values=px[_window_order(*grid)],
            image_grid_thw=g,
        ).logits
        peft_model = PeftModel.from_pretrained(hf, adapter).eval()
        theirs = peft_model(
            input_ids=ids_t,
            mm_token_type_ids=(ids_t == tok.image_pad_id).long(),
            pixel_values=px[_window_order(*grid)],
            image_grid_thw=g,
        ).logits
    assert (plain - ours).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # our own loader reads the HF-named folder onto the plain base: the same logits
    merged = base.model
    assert merge_adapter(merged, adapter)["layout"] == "qwen2vl"
    with torch.no_grad():
        again = merged.logits(merged(ids_t, pos, None, px, g, torch.tensor([1])))
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-5)


LORA_TARGETS_ALL = ("decoder.attn", "decoder.mlp", "encoder.attn", "encoder.mlp", "projector")


def test_peft_on_transformers_llava_matches_our_adapted_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from functools import partial

    from peft import PeftModel

    from tests.test_hf_llava import tiny_llava_config
    from vlm.checkpoint.adapters import export_adapter, without_adapters
    from vlm.checkpoint.hf_export import export_hf
    from vlm.checkpoint.load import LoadedVLM
    from vlm.data.media_processor import MediaProcessor
    from vlm.data.processor import patchify
    from vlm.data.template import ChatTemplate
    from vlm.model.geometry import visual_token_count
    from vlm.model.hf import pretrained_decoder, pretrained_llava_projector, pretrained_vision_encoder
    from vlm.model.lora import apply_lora
    from vlm.model.vlm import VLM

    tok = _tok()
    torch.manual_seed(0)
    cfg = tiny_llava_config(tok.vocab_size, tok.image_pad_id)
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path / "in")
    p = str(tmp_path / "in")
    model = VLM(
        pretrained_vision_encoder(p, feature_layer=-2),
        pretrained_llava_projector(p),
        pretrained_decoder(p),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    )
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=list(LORA_TARGETS_ALL), use_rslora=True))
    _nudge(model)
    model.eval()
    processor = MediaProcessor(patch_size=8, resolution="crop", image_size=32)
    template = ChatTemplate(tok, partial(visual_token_count, merge_size=1))
    adapter = export_adapter(LoadedVLM(model, tok, processor, template, {}), tmp_path / "adapter")
    base = without_adapters(LoadedVLM(copy.deepcopy(model), tok, processor, template, {}), merge=False)
    export_hf(base, tmp_path / "hf", "hf_llava")
    ids = torch.tensor([[13, 14, 15] + [tok.image_pad_id] * 16 + [16, 17]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.logits(
            model(
                ids,
                torch.arange(ids.shape[1])[None],
                None,
                patchify(px[0], 8),
                torch.tensor([[1, 4, 4]]),
                torch.tensor([1]),
            )
        )
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
        plain = hf(input_ids=ids, pixel_values=px).logits
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids, pixel_values=px).logits
    assert (plain - ours).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ---- malformed adapter folders ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """(a plain tiny model, an adapter folder for it in our own names)."""
    from vlm.build.model import build_model
    from vlm.checkpoint.adapters import export_adapter
    from vlm.checkpoint.load import LoadedVLM

    tok = _tok()
    torch.manual_seed(0)
    model = build_model(_model_cfg(r=4, targets=["decoder.attn"]), tok)
    _nudge(model)
    out = export_adapter(LoadedVLM(model, tok, None, None, {}), tmp_path_factory.mktemp("ad") / "adapter")
    plain = build_model(_model_cfg(r=0), tok)
    return plain, out


def _edit(src: Path, dst: Path, config=None, tensors=None, drop=()):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    if config:
        cfg.update(config)
    sd = load_file(src / "adapter_model.safetensors")
    if tensors:
        sd = tensors(sd)
    if "adapter_config.json" not in drop:
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if "adapter_model.safetensors" not in drop:
        save_file(sd, dst / "adapter_model.safetensors")
    return dst


def _rename(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


@pytest.mark.parametrize(
    "case, config, tensors, drop, message",
    [
        ("no_config", None, None, ("adapter_config.json",), "not an adapter folder (adapter_config.json is missing)"),
        ("no_weights", None, None, ("adapter_model.safetensors",), "adapter_model.safetensors is missing"),
        ("wrong_r", {"r": 16}, None, (), "lora_A is [4, 32] but adapter_config.json says r=16"),
        ("not_lora", {"peft_type": "IA3"}, None, (), "peft_type='IA3': only LORA adapters are supported"),
        (
            "unknown_module",
            None,
            lambda sd: _rename(sd, "layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj"),
            (),
            "module 'decoder.layers.7.self_attn.q_proj' is not a Linear layer of the base model",
        ),
        (
            "shape",
            None,
            lambda sd: {k: (v[:, :16].contiguous() if "q_proj.lora_A" in k else v) for k, v in sd.items()},
            (),
            "decoder.layers.0.self_attn.q_proj: lora_A [4, 16] / lora_B [32, 4] do not fit the layer (need [4, 32] / [32, 4])",
        ),
        (
            "not_lora_tensor",
            None,
            lambda sd: {**sd, "base_model.model.decoder.norm.weight": torch.ones(32)},
            (),
            "not a LoRA tensor",
        ),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}, None, (), "modules_to_save=['lm_head'] is not supported"),
    ],
)
def test_malformed_adapter_folders_are_refused_in_one_line(
    tmp_path, tiny_adapter, case, config, tensors, drop, message
):
    from vlm.checkpoint.adapters import merge_adapter

    plain, src = tiny_adapter
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    folder = _edit(src, tmp_path / case, config, tensors, drop)
    with pytest.raises(CheckpointError) as e:
        merge_adapter(plain, folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # nothing changed


def test_missing_peft_names_the_extra(monkeypatch):
    import vlm.model.lora as lora

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[lora\]"):
        lora.require_peft()


# ---- 2-rank CPU FSDP -----------------------------------------------------------------------------------
def test_fsdp_two_ranks_train_and_export_with_adapters(tmp_path, synth_dir):
    from vlm.checkpoint.load import load_checkpoint
    from vlm.cli.export import main as export_main

    out = tmp_path / "fsdp"
    args = [
        f"paths.output_dir={out}",
        f"paths.data_dir={synth_dir}",
        *TINY,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=0",
        "logger=csv",
        "callbacks.model_checkpoint.monitor=null",
        "parallel.ac=full",
        *LORA_RUN,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert len(_losses(out)) == 3
    shards = sorted((p for p in (out / "checkpoints").iterdir() if (p / "meta.pt").is_file()), key=os.path.getmtime)
    assert shards, list((out / "checkpoints").iterdir())
    adapted = load_checkpoint(shards[-1])
    assert adapted.model.lora is not None
    assert "MEMBER: 2/2" in r.stdout + r.stderr  # two ranks
    b = [v for k, v in adapted.model.state_dict().items() if ".lora_B." in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # every adapter trained (B starts at zero)
    assert export_main([f"ckpt={shards[-1]}", f"out={tmp_path / 'merged'}"]) == 0
    assert export_main([f"ckpt={shards[-1]}", f"out={tmp_path / 'adapter'}", "format=peft_adapter"]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    batch = _batch(adapted.model, adapted.tokenizer)
    torch.testing.assert_close(_logits(merged.model, batch), _logits(adapted.model, batch), atol=1e-5, rtol=1e-5)
    end = load_checkpoint(out / "export")  # the end-of-training export: merged
    assert end.model.lora is None
    torch.testing.assert_close(_logits(end.model, batch), _logits(adapted.model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["serial", "continuous"])
def test_serve_routes_requests_to_adapters_by_model_name(tmp_path, lora_run, kind):
    from fastapi.testclient import TestClient

    from vlm.checkpoint.load import load_checkpoint
    from vlm.cli.export import main as export_main
    from vlm.errors import ServeConfigError
    from vlm.serve.engines import build_engine
    from vlm.serve.named import adapter_copies, adapter_engines
    from vlm.serve.server import create_app

    out, _ = lora_run
    ckpt = out / "checkpoints" / "step000006.ckpt"
    for name, args in (("base", ["merge_adapters=false"]), ("adapter", ["format=peft_adapter"]), ("merged", [])):
        assert export_main([f"ckpt={ckpt}", f"out={tmp_path / name}", *args]) == 0
    base, merged = load_checkpoint(tmp_path / "base"), load_checkpoint(tmp_path / "merged")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    copies = adapter_copies(base, {"task": str(tmp_path / "adapter")})
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())  # the base is untouched

    def build(loaded, name):
        return build_engine(loaded, {"kind": kind}, dtype="fp32", model_name=name)

    with pytest.raises(ServeConfigError, match="'task' is the base model's name"):
        adapter_engines(build(load_checkpoint(tmp_path / "base"), "task"), copies, build)
    engine = adapter_engines(build(base, "base"), copies, build)
    want = merged.model.state_dict()
    for k, v in engine.engines["task"].model.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-6)
    ref = build(merged, "merged")
    body = {"messages": [{"role": "user", "content": "a red square"}], "max_tokens": 4, "temperature": 0}
    with engine, ref, TestClient(create_app(engine)) as client, TestClient(create_app(ref)) as ref_client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "task"]
        got = client.post("/v1/chat/completions", json={**body, "model": "task"}).json()
        assert got["model"] == "task"
        expected = ref_client.post("/v1/chat/completions", json=body).json()
        assert got["choices"][0]["message"] == expected["choices"][0]["message"]
        assert client.post("/v1/chat/completions", json=body).json()["model"] == "base"
        r = client.post("/v1/chat/completions", json={**body, "model": "other"})
        assert r.status_code == 404 and "this server serves 'base', 'task'" in r.json()["error"]["message"]
