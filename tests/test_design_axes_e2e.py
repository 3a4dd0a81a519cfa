"""The design-axis switches as Hydra options through the real `train.py` path (real shards, real
Trainer), the stage freeze specs with `init_from`, and pruning through `infer.py`'s evaluation."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_infer, compose_train
from vlm.checkpoint.load import load_checkpoint


def _train(overrides, tmp_path, synth_dir):
    from vlm.training.train import run

    cfg = compose_train(
        ["logger=none", "trainer.max_steps=2", "trainer.val_check_interval=null", *overrides], tmp_path, synth_dir
    )
    metrics = run(cfg)
    return cfg, metrics


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/projector=merge"],
        ["model/projector=pixel_shuffle"],
        ["model/projector=qformer", "model.projector.queries=8", "model.projector.merge_size=1"],
        ["model.encoder.n_layers=2", "model.encoder.feature_layers=[-1,-2]"],
        ["model.fusion=cross_attn", "model.cross_attn.every=1", "model.cross_attn.media=last"],
    ],
    ids=["merge", "pixel_shuffle", "qformer", "feature_layers", "cross_attn"],
)
def test_switches_train_through_hydra(overrides, tmp_path, synth_dir):
    cfg, metrics = _train(overrides, tmp_path, synth_dir)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    loaded = load_checkpoint(tmp_path / "export")  # the export rebuilds the same layout
    m = loaded.model
    grid = (1, 8, 8)
    assert tuple(loaded.template.token_grid(grid)) == tuple(m.token_grid(grid))
    if "model.fusion=cross_attn" in overrides:
        assert m.fusion == "cross_attn" and m.token_count(grid) == 1 and len(m.cross_attn.blocks) == 1
    if "model/projector=qformer" in overrides:
        assert m.token_count(grid) == 8


ALIGN = ["model.freeze.encoder=true", "model.freeze.decoder=true"]  # experiment=llava's stages
FINETUNE = ["model.freeze.encoder=true"]


def test_stages_freeze_and_init_from(tmp_path, synth_dir):
    """LLaVA's stages as freeze specs: align trains the projector only; fine-tune starts from its
    export with `init_from` (weights equal, a fresh optimizer at step 0) and also trains the decoder."""
    from vlm.training.train import build_module, run  # noqa: F401

    s1 = tmp_path / "s1"
    cfg1, _ = _train(ALIGN, s1, synth_dir)
    ck = torch.load(s1 / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    names = {n for g in ck["optimizer_states"][0]["param_groups"] for n in [g.get("name")]}
    assert names <= {"projector", "projector_no_decay"} and names
    stage1 = load_checkpoint(s1 / "export").model.state_dict()
    init = {k: v for k, v in stage1.items()}

    # the stage-2 run, stopped before its first step, holds exactly stage 1's weights
    from vlm.training.datamodule import build_datamodule
    from vlm.training.train import build_module as bm

    s2 = tmp_path / "s2"
    cfg2 = compose_train(["logger=none", *FINETUNE, f"init_from={s1 / 'export'}"], s2, synth_dir)
    dm = build_datamodule(cfg2)
    dm.setup("fit")
    module = bm(cfg2, dm)
    from vlm.training.train import init_weights

    init_weights(module, cfg2.init_from)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, init[k]), k
    trainable = {n.split(".", 1)[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "decoder"}

    _, metrics = _train([*FINETUNE, f"init_from={s1 / 'export'}"], s2, synth_dir)
    after = load_checkpoint(s2 / "export").model.state_dict()
    assert torch.equal(after["encoder.patch_embed.proj.weight"], init["encoder.patch_embed.proj.weight"])  # frozen
    assert not torch.equal(after["decoder.layers.0.mlp.up_proj.weight"], init["decoder.layers.0.mlp.up_proj.weight"])
    ck2 = torch.load(s2 / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ck2["global_step"] == 2  # a new run, not a resume of stage 1


def test_init_from_a_different_layout_names_the_keys(tmp_path, synth_dir):
    s1 = tmp_path / "s1"
    _train([], s1, synth_dir)
    with pytest.raises(Exception, match="init_from") as e:
        _train(
            ["model/projector=qformer", "model.projector.queries=4", f"init_from={s1 / 'export'}"],
            tmp_path / "s2",
            synth_dir,
        )
    assert "projector." in str(e.value)


def test_init_from_another_tokenizer_copies_rows_by_token(tmp_path, synth_dir):
    """A stage whose data folder trained another tokenizer: every token both vocabularies hold keeps
    its stage-1 embedding row under its new id, new tokens keep their fresh rows, the rest is stage 1's."""
    from vlm.training.datamodule import build_datamodule
    from vlm.training.train import build_module, init_weights

    s1 = tmp_path / "s1"
    _train([], s1, synth_dir)
    cfg2 = compose_train(
        [
            "logger=none",
            "data=synthvqa_strips",
            "model.decoder.qk_norm=true",  # stage 1 ran synthvqa's default experiment, which sets it
            "data.processor.resolution=fixed",
            "data.synthetic.train_samples=16",
            "data.synthetic.heldout_samples=8",
            f"init_from={s1 / 'export'}",
        ],
        tmp_path / "s2",
        tmp_path / "d2",
    )
    dm = build_datamodule(cfg2)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg2, dm)
    fresh = module.model.decoder.embed_tokens.weight.detach().clone()
    init_weights(module, cfg2.init_from)
    stage1 = load_checkpoint(s1 / "export")
    old = stage1.tokenizer.tok.get_vocab(with_added_tokens=True)
    new = module.tokenizer.tok.get_vocab(with_added_tokens=True)
    moved = [t for t in new if t in old and old[t] != new[t]]
    added = [t for t in new if t not in old]
    assert moved and added  # the two vocabularies differ both ways
    emb, emb1 = module.model.decoder.embed_tokens.weight, stage1.model.decoder.embed_tokens.weight
    for t in moved + list(module.tokenizer.special):
        assert torch.equal(emb[new[t]], emb1[old[t]]), t
    for t in added:
        assert torch.equal(emb[new[t]], fresh[new[t]]), t
    state = module.model.state_dict()
    for k, v in stage1.model.state_dict().items():
        if "embed_tokens" not in k and "lm_head" not in k:
            assert torch.equal(state[k], v), k


def test_infer_prunes_visual_tokens(tmp_path, synth_dir, capsys):
    from vlm.serve.infer import run as infer_run

    _train(["model.projector.merge_size=1"], tmp_path, synth_dir)
    res = {}
    for keep in (1.0, 0.5, 0.25):
        cfg = compose_infer(
            [
                f"ckpt={tmp_path / 'export'}",
                "data=synthvqa_heldout",
                f"infer.prune.keep_ratio={keep}",
                "infer.prune.method=norm",
                f"out={tmp_path / 'p.jsonl'}",
            ],
            tmp_path,
            synth_dir,
        )
        res[keep] = infer_run(cfg)
    assert res[1.0]["visual_tokens"] == 64 and res[0.5]["visual_tokens"] == 32 and res[0.25]["visual_tokens"] == 16
    assert all(r["n"] == res[1.0]["n"] > 0 for r in res.values())
