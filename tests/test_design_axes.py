"""Every design-axis switch of issue 4: projector kinds, feature layers, cross-attention fusion,
visual-token pruning, and the training-stage freeze specs.

Each switch runs a forward and backward pass on a batch with two images of different sizes and a
video, through the real processor + template + model, and checks that the template's media spans
agree with the model's visual tokens."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_multimodal import WORDS, moving, png
from vlm.build.model import build_model, build_processor, build_template, geometry_of
from vlm.data.collate import collate
from vlm.data.sample import SampleTransform
from vlm.data.template import IGNORE
from vlm.data.video import encode_video
from vlm.model.generate import generate
from vlm.model.projector import token_grid
from vlm.model.prune import prune_visual_tokens
from vlm.tokenizer import train_tokenizer

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 10, vocab_size=300)


def model_cfg(
    projector: dict | None = None, encoder: dict | None = None, fusion="interleave", cross_attn=None, rope="mrope", T=2
) -> dict:
    return {
        "encoder": {
            "_target_": "vlm.model.vision.VisionEncoder",
            "patch_size": 4,
            "dim": 32,
            "n_layers": 3,
            "n_heads": 2,
            "pos_grid": 4,
            "patch_embed": "conv",
            "conv_channels": 8,
            "temporal_patch": T,
            "pos": "rope2d",
            **(encoder or {}),
        },
        "projector": {
            "_target_": "vlm.model.projector.Projector",
            "in_dim": None,
            "out_dim": 32,
            "merge_size": 2,
            **(projector or {}),
        },
        "decoder": {
            "_target_": "vlm.model.decoder.Decoder",
            "dim": 32,
            "n_layers": 4,
            "n_heads": 2,
            "n_kv_heads": 1,
            "rope": rope,
            "max_seq_len": 1024,
        },
        "fusion": fusion,
        "cross_attn": cross_attn or {"every": 2, "media": "all"},
    }


def sample_processor(tok, cfg, mode="train"):
    """Processor and template of the model config `cfg`: its geometry (vlm.model.geometry) gives the patch,
    merge, temporal patch, token layout and rope; the data keys are the rest."""
    geo = geometry_of(cfg)
    proc = build_processor(
        dict(
            resolution="dynamic",
            image_size=32,
            min_pixels=64,
            max_pixels=48 * 48,
            video={"max_frames": 8, "max_video_tokens": 64},
        ),
        geometry=geo,
    )
    # eval mode here builds prompts to generate from (some without an answer), not scored samples
    return SampleTransform(
        proc, build_template({"max_length": 1024}, tok, geometry=geo), mode=mode, require_reference=False
    )


def mixed_sample(tok, sp, key="mix", prompt_only=False):
    """Two images of different sizes, a video, text between them."""
    content = [
        {"type": "image", "media": 0},
        {"type": "text", "text": "and then"},
        {"type": "image", "media": 1},
        {"type": "video", "media": 2},
        {"type": "text", "text": "Which way is the red circle moving?"},
    ]
    msgs = [{"role": "user", "content": content}]
    if not prompt_only:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": "left"}]})
    raw = {
        "__key__": key,
        "json": json.dumps({"messages": msgs}).encode(),
        "0.png": png((32, 32)),
        "1.png": png((48, 16), (30, 160, 50)),
        "2.mp4": encode_video(moving(4)),
    }
    return sp(raw)


VARIANTS = {
    "linear": dict(projector={"kind": "linear", "merge_size": 1}),
    "mlp_merge2": dict(projector={"kind": "mlp", "merge_size": 2}),
    "merge": dict(projector={"kind": "merge", "merge_size": 2}),
    "pixel_shuffle": dict(projector={"kind": "pixel_shuffle", "merge_size": 2}),
    "qformer4": dict(projector={"kind": "qformer", "queries": 4, "merge_size": 1, "blocks": 1}),
    "qformer16": dict(projector={"kind": "qformer", "queries": 16, "merge_size": 2, "blocks": 2}),
    "layer_-2": dict(encoder={"feature_layer": -2}),
    "layers_concat": dict(encoder={"feature_layers": [-1, -3], "feature_combine": "concat"}),
    "layers_mean": dict(encoder={"feature_layers": [0, 1, 2], "feature_combine": "mean"}),
    "cross_attn_all": dict(fusion="cross_attn", cross_attn={"every": 2, "media": "all"}),
    "cross_attn_last": dict(fusion="cross_attn", cross_attn={"every": 1, "media": "last"}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_switch_forward_backward_and_token_counts(tok, name):
    cfg = model_cfg(**VARIANTS[name])
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    sp = sample_processor(tok, cfg)
    geo = geometry_of(cfg)
    for grid in ((1, 4, 8), (2, 8, 4)):  # one source: the spec's layout is the built model's
        assert geo.token_grid(grid) == tuple(model.token_grid(grid)) == tuple(sp.template.token_grid(grid))
    s = mixed_sample(tok, sp)
    b = collate([s, mixed_sample(tok, sp, "mix2")], tok.pad_id)
    # the template's spans hold exactly the model's token count for every media item
    n_slots = int(model.is_media(b["input_ids"][:1]).sum())
    assert n_slots == sum(model.token_count(g) for g in s.grids)
    for g in s.grids:
        t, h, w = model.token_grid(g)
        if "qformer" in name:
            assert (t, h, w) == (1, 1, cfg["projector"]["queries"])
        elif "cross_attn" in name:
            assert (t, h, w) == (1, 1, 1)
        else:
            m = cfg["projector"]["merge_size"]
            assert (t, h, w) == (g[0], g[1] // m, g[2] // m)
    hidden = model(
        b["input_ids"],
        b["position_ids"],
        b["attention_mask"],
        b["pixel_patches"],
        b["grid_thw"],
        b["media_per_sample"],
        b["keys"],
    )
    lab = b["labels"][:, 1:]
    logits = model.logits(hidden[:, :-1][lab != IGNORE])
    loss = torch.nn.functional.cross_entropy(logits.float(), lab[lab != IGNORE])
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    # the encoder and projector learn through the visual tokens (cross_attn: through its gates'
    # path, whose gates start at 0 and get a gradient; the encoder sees it only once a gate opens)
    assert (
        grads[
            "projector.proj.0.weight"
            if "mlp" in name or name == "merge"
            else next(n for n in grads if n.startswith("projector.") and n.endswith("weight"))
        ]
        is not None
    )
    if "cross_attn" in name:
        gates = [g for n, g in grads.items() if n.endswith("_gate")]
        assert gates and all(g is not None and g.abs().sum() > 0 for g in gates)
    else:
        enc = [g for n, g in grads.items() if n.startswith("encoder.blocks.0.")]
        assert all(g is not None for g in enc) and sum(g.abs().sum() for g in enc) > 0


def test_template_and_model_layouts_must_agree(tok):
    cfg = model_cfg(projector={"kind": "qformer", "queries": 8, "merge_size": 1})
    geo = geometry_of(cfg)
    assert (geo.queries, geo.merge_size, geo.fusion, geo.rope) == (8, 1, "interleave", "mrope")
    template = build_template({"max_length": 512}, tok, geometry=geo)
    assert template.token_grid((1, 4, 4)) == build_model(cfg, tok).token_grid((1, 4, 4)) == (1, 1, 8)
    # a stored template key (older checkpoints) that disagrees with the model's geometry: both named
    with pytest.raises(ValueError, match=r"template.queries=None disagrees with the model's model.projector.queries=8"):
        build_template({"max_length": 512, "queries": None}, tok, geometry=geo)
    with pytest.raises(Exception, match="queries is for kind=qformer"):
        build_model(model_cfg(projector={"kind": "mlp", "queries": 8}), tok)
    with pytest.raises(ValueError, match="queries is for kind=qformer"):
        geometry_of(model_cfg(projector={"kind": "mlp", "queries": 8}))
    with pytest.raises(ValueError, match="encoder emits 64"):
        build_model(model_cfg(projector={"in_dim": 32}, encoder={"feature_layers": [-1, -2]}), tok)
    with pytest.raises(Exception, match="feature_layer 5 out of range"):
        build_model(model_cfg(encoder={"feature_layers": [5]}), tok)
    assert token_grid((2, 8, 6), 2) == (2, 4, 3) and token_grid((2, 8, 6), 2, 16) == (1, 1, 16)
    assert token_grid((2, 8, 6), 2, None, "cross_attn") == (1, 1, 1)


def test_qformer_is_per_item_and_grid_independent(tok):
    """N tokens per item whatever the grid; an item's tokens depend on its own features only."""
    from vlm.model.projector import Projector

    torch.manual_seed(0)
    p = Projector(16, 24, kind="qformer", queries=5, blocks=2).eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 6], [2, 2, 2], [1, 4, 4]])
    sizes = grid.prod(-1).tolist()
    x = torch.randn(sum(sizes), 16)
    with torch.no_grad():
        out = p(x, grid)
        assert out.shape == (4 * 5, 24)
        x2 = x.clone()
        x2[:16] += 1  # change item 0
        out2 = p(x2, grid)
    assert not torch.allclose(out[:5], out2[:5]) and torch.equal(out[5:], out2[5:])


def test_feature_layers_concat_and_mean():
    from vlm.model.vision import VisionEncoder

    torch.manual_seed(0)
    kw = dict(patch_size=4, dim=16, n_layers=3, n_heads=2, pos_grid=4)
    full = VisionEncoder(**kw, feature_layers=[0, 1, 2], feature_combine="concat").eval()
    x, grid = torch.randn(16, 48), torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        cat = full(x, grid)
        assert cat.shape == (16, 48)
        for i in range(3):  # each slice is that layer alone (same weights, fewer blocks built)
            one = VisionEncoder(**kw, feature_layer=i).eval()
            one.load_state_dict(full.state_dict(), strict=False)
            torch.testing.assert_close(cat[:, 16 * i : 16 * (i + 1)], one(x, grid))
        mean = VisionEncoder(**kw, feature_layers=[0, 2], feature_combine="mean").eval()
        mean.load_state_dict(full.state_dict(), strict=False)
        torch.testing.assert_close(mean(x, grid), (cat[:, :16] + cat[:, 32:]) / 2)


# --------------------------------------------------------------------------- cross-attention fusion


def _fwd(model, b, **kw):
    return model(
        b["input_ids"],
        b["position_ids"],
        b["attention_mask"],
        b.get("pixel_patches"),
        b.get("grid_thw"),
        b.get("media_per_sample"),
        b.get("keys"),
        **kw,
    )


def test_cross_attn_gate_zero_leaves_the_decoder_unchanged(tok):
    cfg = model_cfg(fusion="cross_attn")
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    b = collate([mixed_sample(tok, sample_processor(tok, cfg))], tok.pad_id)
    with torch.no_grad():
        fused = _fwd(model, b)
        plain = model.decoder(
            model.embed(b["input_ids"], b["pixel_patches"], b["grid_thw"], b["media_per_sample"]), b["position_ids"]
        )
        assert torch.equal(fused, plain)  # gates at 0: exactly the text-only decoder
        for blk in model.cross_attn.blocks:
            blk.attn_gate.fill_(0.7)
            blk.ff_gate.fill_(-0.3)
        opened = _fwd(model, b)
    assert not torch.allclose(opened, plain)


def test_cross_attn_reads_only_preceding_media(tok):
    """`all`: a position reads the media before it; `last`: only the most recent one. Changing
    the first image's pixels changes nothing before its marker; the mask lets each position read
    exactly the allowed items (later positions may still change through self-attention)."""
    for rule in ("all", "last"):
        cfg = model_cfg(fusion="cross_attn", cross_attn={"every": 1, "media": rule})
        torch.manual_seed(0)
        model = build_model(cfg, tok).eval()
        for blk in model.cross_attn.blocks:
            blk.attn_gate.data.fill_(1.0)
            blk.ff_gate.data.fill_(1.0)
        b = collate([mixed_sample(tok, sample_processor(tok, cfg))], tok.pad_id)
        markers = model.is_media(b["input_ids"])[0].nonzero().flatten().tolist()
        assert len(markers) == 3
        b2 = dict(b)
        n0 = int(b["grid_thw"][0].prod())
        b2["pixel_patches"] = b["pixel_patches"].clone()
        b2["pixel_patches"][:n0] += 1.0  # image 0 only
        with torch.no_grad():
            diff = (_fwd(model, b) - _fwd(model, b2)).abs().amax(-1)[0]
        changed = diff > 1e-6
        assert not changed[: markers[0]].any()  # before image 0: nothing to read
        assert changed[markers[0] : markers[1]].all()  # image 0 is the most recent
        assert changed[markers[1] :].all()
        is_marker = model.is_media(b["input_ids"])
        visual = model.encode_media(b["pixel_patches"], b["grid_thw"])
        from vlm.model.cross_attention import pad_media

        media, item = pad_media(visual, [model.projector.token_count(g) for g in b["grid_thw"].tolist()], [3])
        st = model.cross_attn.state(is_marker, media, item, None)
        L = is_marker.shape[1]
        for q in range(L):
            seen = int((torch.tensor(markers) <= q).sum())
            allowed = set(item[0][st.mask[0, 0, q]].tolist()) if seen else set()
            want = set(range(seen)) if rule == "all" else ({seen - 1} if seen else set())
            assert allowed == want, (rule, q)
            assert bool(st.sees_media[0, q, 0]) == (seen > 0)


def test_cross_attn_kv_cache_parity(tok):
    cfg = model_cfg(fusion="cross_attn", cross_attn={"every": 2, "media": "all"})
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    for blk in model.cross_attn.blocks:
        blk.attn_gate.data.fill_(0.5)
        blk.ff_gate.data.fill_(0.5)
    sp = sample_processor(tok, cfg, mode="eval")
    b = collate([mixed_sample(tok, sp, "a", True), mixed_sample(tok, sp, "b", True)], tok.pad_id, padding_side="left")
    eos, suppress = [tok.im_end_id], [tok.image_pad_id, tok.video_pad_id]
    with torch.no_grad():
        cached = generate(model, b, 8, eos, suppress_ids=suppress, use_cache=True)
        full = generate(model, b, 8, eos, suppress_ids=suppress, use_cache=False)
    assert cached == full and all(len(r) for r in cached)
    # logits of the incremental step equal a full forward on the extended sequence
    with torch.no_grad():
        B, L = b["input_ids"].shape
        cache = model.decoder.new_cache(B, L + 1, torch.float32, "cpu")
        _fwd(model, b, cache=cache)
        cache.advance(L)
        nxt = torch.full((B, 1), tok.encode("left")[0])
        pos = b["position_ids"].amax(-1, keepdim=True) + 1
        am = torch.cat([b["attention_mask"], torch.ones(B, 1, dtype=b["attention_mask"].dtype)], 1)
        step = model(nxt, pos, am, cache=cache)
        ext = dict(
            b,
            input_ids=torch.cat([b["input_ids"], nxt], 1),
            attention_mask=am,
            position_ids=torch.cat([b["position_ids"], pos], -1),
        )
        ref = _fwd(model, ext)
    torch.testing.assert_close(step[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("method", ["attention", "norm", "random"])
def test_pruning_keeps_the_best_tokens_and_their_positions(tok, method):
    cfg = model_cfg(projector={"kind": "mlp", "merge_size": 1})
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    sp = sample_processor(tok, cfg, mode="eval")
    b = collate([mixed_sample(tok, sp, "a", True)], tok.pad_id, padding_side="left")
    with torch.no_grad():
        same = prune_visual_tokens(model, b, 1.0, method)
        torch.testing.assert_close(
            model(same["input_ids"], same["position_ids"], same["attention_mask"], inputs_embeds=same["inputs_embeds"]),
            _fwd(model, b),
        )
        half = prune_visual_tokens(model, b, 0.5, method)
    spans = [int(model.token_count(g)) for g in b["grid_thw"].tolist()]
    assert half["visual_total"] == sum(spans) and half["visual_kept"] == sum((n + 1) // 2 for n in spans)
    L, Lp = b["input_ids"].shape[1], half["input_ids"].shape[1]
    assert L - Lp == sum(spans) - half["visual_kept"]
    # text tokens and their positions survive untouched, in order
    text = ~model.is_media(b["input_ids"][0])
    text_p = ~model.is_media(half["input_ids"][0])
    assert torch.equal(b["input_ids"][0][text], half["input_ids"][0][text_p])
    assert torch.equal(b["position_ids"][:, 0][:, text], half["position_ids"][:, 0][:, text_p])
    eos, suppress = [tok.im_end_id], [tok.image_pad_id, tok.video_pad_id]
    with torch.no_grad():
        out = generate(model, b, 6, eos, suppress_ids=suppress, prune={"keep_ratio": 0.25, "method": method})
    assert len(out[0]) > 0
    if method == "norm":  # the kept tokens are the largest-norm ones of each span
        emb = model.embed(b["input_ids"], b["pixel_patches"], b["grid_thw"], b["media_per_sample"])[0]
        slots = model.is_media(b["input_ids"][0]).nonzero().flatten()[: spans[0]]
        norms = emb[slots].norm(dim=-1)
        kept = half["inputs_embeds"][0][model.is_media(half["input_ids"][0])][: (spans[0] + 1) // 2].norm(dim=-1)
        torch.testing.assert_close(kept.sort().values, norms.topk((spans[0] + 1) // 2).values.sort().values)


def test_pruning_refuses_bad_settings(tok):
    cfg = model_cfg(fusion="cross_attn")
    model = build_model(cfg, tok).eval()
    b = collate(
        [mixed_sample(tok, sample_processor(tok, cfg, mode="eval"), "a", True)], tok.pad_id, padding_side="left"
    )
    with pytest.raises(ValueError, match="needs fusion=interleave"):
        prune_visual_tokens(model, b, 0.5)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        prune_visual_tokens(model, b, 0.0)
