"""Model components: shapes, block-diagonal vision attention, token-count checks, masks,
RoPE / M-RoPE, and KV-cache parity of greedy decoding."""

import pytest
import torch

from vlm.model.attention import causal_mask
from vlm.model.decoder import Decoder
from vlm.model.generate import generate, sample_next
from vlm.model.projector import Projector, spatial_merge, visual_token_count
from vlm.model.rope import inv_frequencies, rope_cos_sin
from vlm.model.vision import VisionEncoder
from vlm.model.vlm import VLM, VisualTokenMismatch, media_span_ids

PAD, IMG, VID = 0, 60, 61


def tiny_vlm(merge=1, image_attention="causal", rope="rope", patch_embed="linear", seed=0):
    torch.manual_seed(seed)
    enc = VisionEncoder(patch_size=4, dim=32, n_layers=2, n_heads=2, pos_grid=4, patch_embed=patch_embed)
    proj = Projector(32, 48, "mlp", merge_size=merge)
    dec = Decoder(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, rope=rope, max_seq_len=128)
    return VLM(enc, proj, dec, media_token_ids=[IMG, VID], image_attention=image_attention).eval()


def sample_ids(prefix, n_img, suffix):
    return [*prefix, *([IMG] * n_img), *suffix]


@pytest.mark.parametrize("patch_embed", ["linear", "conv", "conv_image"])
def test_vision_encoder_shapes_and_grids(patch_embed):
    enc = VisionEncoder(patch_size=4, dim=32, n_layers=2, n_heads=2, pos_grid=4, patch_embed=patch_embed)
    grid = torch.tensor([[1, 4, 4], [1, 2, 8], [1, 3, 5], [2, 2, 2]])
    n = int(grid.prod(-1).sum())
    out = enc(torch.randn(n, 3 * 16), grid)
    assert out.shape == (n, 32)
    with pytest.raises(ValueError, match="covers"):
        enc(torch.randn(n + 1, 48), grid)


@pytest.mark.parametrize("patch_embed", ["linear", "conv_image"])
def test_vision_attention_is_block_diagonal(patch_embed):
    """Changing one image's pixels leaves every other image's features unchanged."""
    enc = VisionEncoder(patch_size=4, dim=32, n_layers=2, n_heads=2, pos_grid=4, patch_embed=patch_embed).eval()
    grid = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 2, 8], [1, 3, 3]])
    sizes = grid.prod(-1).tolist()
    x = torch.randn(sum(sizes), 48)
    base = enc(x, grid)
    x2 = x.clone()
    x2[sizes[0] : sizes[0] + sizes[1]] += 1.0  # image 1 only
    changed = enc(x2, grid)
    s = torch.tensor([0] + sizes).cumsum(0)
    for i in range(4):
        same = torch.allclose(base[s[i] : s[i + 1]], changed[s[i] : s[i + 1]], atol=1e-6)
        assert same == (i != 1)
    # and the packed result equals encoding each image alone
    for i in range(4):
        alone = enc(x[s[i] : s[i + 1]], grid[i : i + 1])
        torch.testing.assert_close(alone, base[s[i] : s[i + 1]], atol=1e-5, rtol=1e-5)


def test_conv_image_stem_is_the_conv_over_the_whole_image():
    """`conv_image` = the patch CNN run over the reassembled image, cut back into patches."""
    from vlm.data.processor import patchify

    torch.manual_seed(0)
    enc = VisionEncoder(patch_size=4, dim=32, n_layers=1, n_heads=2, patch_embed="conv_image")
    img = torch.randn(3, 16, 12)
    y = enc.patch_embed.conv(img[None])  # [1, c, 8, 6]
    c = y.shape[1]
    expected = y.view(c, 4, 2, 3, 2).permute(1, 3, 0, 2, 4).reshape(12, c * 4)
    got = enc.patch_embed._conv_images(patchify(img, 4), [(1, 4, 3)])
    torch.testing.assert_close(got, expected)


def test_feature_layer_and_range():
    enc = VisionEncoder(patch_size=4, dim=32, n_layers=4, n_heads=2, feature_layer=-2)
    assert len(enc.blocks) == 3  # blocks after the feature layer are never built
    with pytest.raises(ValueError, match="feature_layer"):
        VisionEncoder(n_layers=2, feature_layer=2)


def test_projector_merge_counts_and_layout():
    grid = torch.tensor([[1, 4, 6]])
    assert visual_token_count((1, 4, 6), 1) == 24
    assert visual_token_count((1, 4, 6), 2) == 6
    assert visual_token_count((2, 4, 4), 2) == 8
    with pytest.raises(ValueError, match="divisible"):
        visual_token_count((1, 3, 4), 2)
    f = torch.arange(24.0).view(24, 1)  # feature = patch index, row-major 4x6
    merged = spatial_merge(f, grid, 2)
    assert merged.shape == (6, 4)
    assert merged[0].tolist() == [0, 1, 6, 7]  # top-left 2x2 block
    assert merged[1].tolist() == [2, 3, 8, 9]
    p = Projector(8, 16, "linear", merge_size=2)
    assert p(torch.randn(24, 8), grid).shape == (6, 16)


def test_decoder_shapes_gqa_and_tied_head():
    dec = Decoder(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2)
    h = dec(torch.randn(2, 7, 48), torch.arange(7).expand(2, 7))
    assert h.shape == (2, 7, 48)
    assert dec.lm_head.weight is dec.embed_tokens.weight
    assert dec.layers[0].self_attn.k_proj.out_features == 2 * 12


def test_mrope_equals_rope_on_text():
    inv = inv_frequencies(16, 10000.0)
    pos = torch.arange(9).view(1, 9)
    c1, s1 = rope_cos_sin(pos, inv)
    c3, s3 = rope_cos_sin(pos.unsqueeze(0).expand(3, 1, 9), inv, [4, 2, 2])
    torch.testing.assert_close(c1, c3)
    torch.testing.assert_close(s1, s3)
    # with distinct components, each frequency pair reads its own component
    pos3 = torch.stack([torch.zeros(1, 9), torch.arange(9).view(1, 9), torch.zeros(1, 9)]).long()
    c, _ = rope_cos_sin(pos3, inv, [4, 2, 2])
    assert torch.all(c[0, :, :4] == 1) and not torch.all(c[0, :, 4:6] == 1)


def test_media_span_ids_and_bidirectional_mask():
    is_media = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]]).bool()
    spans = media_span_ids(is_media)
    assert spans.tolist() == [[0, 1, 1, 0, 2, 2, 2, 0]]
    m = causal_mask(8, 8, span_ids_q=spans, span_ids_k=spans)[0, 0]
    assert m[1, 2] and m[4, 6] and not m[2, 4] and not m[0, 1] and not m[3, 4]
    assert m[7].all()


def test_visual_token_mismatch_names_the_sample():
    m = tiny_vlm()
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    patches = torch.randn(32, 48)
    good = sample_ids([1, 2], 16, [3])
    bad = sample_ids([1, 2], 15, [3, 4])
    ids = torch.tensor([good, bad])
    with pytest.raises(VisualTokenMismatch, match=r"sample 'bad-one': 15 media placeholders .* 16 visual tokens"):
        m(
            ids,
            torch.arange(ids.shape[1]).expand(2, -1),
            pixel_patches=patches,
            grid_thw=grid,
            media_per_sample=torch.tensor([1, 1]),
            keys=["good-one", "bad-one"],
        )
    with pytest.raises(VisualTokenMismatch, match="no media"):
        m(torch.tensor([good]), torch.arange(len(good))[None])


def _prompt_batch(merge=1, rope="rope"):
    """Two left-padded prompts with images of different sizes (one has two images)."""
    n1 = visual_token_count((1, 4, 4), merge)
    n2, n3 = visual_token_count((1, 2, 4), merge), visual_token_count((1, 4, 2), merge)
    rows = [sample_ids([1, 2, 3], n1, [4, 5]), [7, *([IMG] * n2), 8, *([IMG] * n3), 9, 10, 11]]
    L = max(map(len, rows))
    ids = torch.full((2, L), PAD)
    am = torch.zeros(2, L, dtype=torch.long)
    pos = torch.zeros(2, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :] = torch.tensor(r)
        am[b, L - len(r) :] = 1
        pos[b, L - len(r) :] = torch.arange(len(r))
    if rope == "mrope":
        pos = pos.unsqueeze(0).expand(3, -1, -1).clone()
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 2]])
    return {
        "input_ids": ids,
        "attention_mask": am,
        "position_ids": pos,
        "pixel_patches": torch.randn(32, 48),
        "grid_thw": grid,
        "media_per_sample": torch.tensor([1, 2]),
        "keys": ["a", "b"],
    }


@pytest.mark.parametrize("image_attention,rope,merge", [("causal", "rope", 1), ("bidirectional", "mrope", 2)])
def test_kv_cache_greedy_equals_full_reforward(image_attention, rope, merge):
    m = tiny_vlm(merge=merge, image_attention=image_attention, rope=rope, seed=1)
    batch = _prompt_batch(merge, rope)
    with_cache = generate(m, batch, 20, eos_ids=[63], suppress_ids=[PAD, IMG, VID], use_cache=True)
    without = generate(m, batch, 20, eos_ids=[63], suppress_ids=[PAD, IMG, VID], use_cache=False)
    assert with_cache == without
    assert all(len(o) > 0 for o in with_cache)
    # left padding does not change a row's answer: row 1 alone gives the same tokens
    single = {
        k: (v[1:] if torch.is_tensor(v) and k not in ("pixel_patches", "grid_thw", "position_ids") else v)
        for k, v in batch.items()
    }
    n_first = int(batch["grid_thw"][0].prod())
    single["pixel_patches"], single["grid_thw"] = batch["pixel_patches"][n_first:], batch["grid_thw"][1:]
    single["position_ids"], single["keys"] = batch["position_ids"][..., 1:, :], ["b"]
    keep = single["attention_mask"][0].bool()
    for k in ("input_ids", "attention_mask"):
        single[k] = single[k][:, keep]
    single["position_ids"] = single["position_ids"][..., keep]
    alone = generate(m, single, 20, eos_ids=[63], suppress_ids=[PAD, IMG, VID])
    assert alone[0] == with_cache[1]


def test_padding_does_not_change_hidden_states():
    """Right padding (training) and left padding (generation) both leave real tokens unchanged."""
    m = tiny_vlm(seed=2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    h = m(ids, torch.arange(5)[None])
    right = m(
        torch.tensor([[1, 2, 3, 4, 5, 0, 0]]), torch.tensor([[0, 1, 2, 3, 4, 0, 0]]), torch.tensor([[1] * 5 + [0, 0]])
    )
    left = m(
        torch.tensor([[0, 0, 1, 2, 3, 4, 5]]), torch.tensor([[0, 0, 0, 1, 2, 3, 4]]), torch.tensor([[0, 0] + [1] * 5])
    )
    torch.testing.assert_close(right[:, :5], h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[:, 2:], h, atol=1e-5, rtol=1e-5)


def test_sampling_top_p_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 4.9, -10.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert draws == {1}  # token 1 alone reaches half the mass
    draws = {int(sample_next(logits, 1.0, 0.99, g)) for _ in range(200)}
    assert draws == {1, 2}


def test_from_scratch_vit_keeps_the_image_in_its_residual_stream():
    """The default tiny ViT at initialisation: what the blocks add is small next to the embedded
    patches, so two images give different features. With PyTorch's default init the blocks added
    an O(0.3) near-uniform vector to an O(0.01) patch signal and a from-scratch ViT could not learn
    to tell characters apart (docs/results/default_recipe.md)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train")
    torch.manual_seed(0)
    enc = instantiate(cfg.model.encoder)
    grid = torch.tensor([[1, 8, 8]])
    x = torch.rand(64, enc.patch_dim) * 2 - 1
    stream = enc.pre_norm(enc.patch_embed(x) + enc.position_embedding(1, 8, 8))[None]
    out = stream
    for block in enc.blocks:
        out = block(out)
    added = (out - stream).std() / stream.std()
    assert added < 0.5, f"the blocks add {added:.2f}x the patch signal at init"
    # the features of a token follow its own patch: correlation with the embedded input stays high
    corr = torch.corrcoef(torch.stack([out.flatten(), stream.flatten()]))[0, 1]
    assert corr > 0.8, corr
    y = torch.rand(64, enc.patch_dim) * 2 - 1
    f1, f2 = enc(x, grid), enc(y, grid)
    assert (f1 - f2).std() > 0.5 * f1.std()


@pytest.mark.parametrize("kind", ["causal", "mask", "gqa", "empty_row", "long"])
def test_attend_equals_sdpa(kind):
    """`attend` (the CPU matmul path for short sequences) gives SDPA's result, gradients included."""
    import torch.nn.functional as F

    from vlm.model.attention import attend

    torch.manual_seed(0)
    L = 200 if kind == "long" else 24  # long: above EAGER_CPU_MAX, SDPA itself
    hk = 2 if kind == "gqa" else 4
    q = torch.randn(3, 4, L, 16, requires_grad=True)
    k, v = (torch.randn(3, hk, L, 16, requires_grad=True) for _ in range(2))
    mask = None
    if kind in ("mask", "empty_row"):
        mask = torch.rand(3, 1, L, L) > 0.5
        mask[..., torch.arange(L), torch.arange(L)] = True
        if kind == "empty_row":
            mask[1, 0, 5] = False
    causal = kind in ("causal", "gqa", "long")
    ours = attend(q, k, v, mask, causal)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hk != 4)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(ours, (q, k, v), g)
    gb = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_attend_in_bf16_matches_fp32_within_bf16_rounding(masked):
    """The matmul path keeps bf16 scores and probabilities (no fp32 round trip): its output and
    gradients stay within bf16 rounding of the fp32 computation, as close as SDPA's own bf16 result."""
    import torch.nn.functional as F

    from vlm.model.attention import attend

    torch.manual_seed(1)
    q32, k32, v32 = (torch.randn(4, 4, 48, 32) for _ in range(3))
    mask = None
    if masked:
        mask = torch.rand(4, 1, 48, 48) > 0.3
        mask[1, 0, 7] = False  # a row with nothing to attend to: zeros
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=not masked)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q32, k32, v32))
    ours = attend(q, k, v, mask, not masked)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
    assert ours.dtype == torch.bfloat16
    err_ours, err_sdpa = (ours.float() - ref).abs().max(), (sdpa.float() - ref).abs().max()
    assert err_ours < 0.05 and err_ours <= 2 * err_sdpa + 1e-3, (err_ours, err_sdpa)
    if masked:
        assert ours[1, :, 7].eq(0).all()
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(ours, (q, k, v), g.bfloat16())
    q32.requires_grad_(), k32.requires_grad_(), v32.requires_grad_()
    gr = torch.autograd.grad(
        F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=not masked), (q32, k32, v32), g
    )
    for a, b in zip(ga, gr):
        assert (a.float() - b).abs().max() < 0.05 * b.abs().max() + 0.02


def test_attend_bf16_full_attention_in_query_chunks():
    """bf16 inference, every query against every key (an image's patches): `attend` runs matmuls
    over chunks of queries; the result stays within bf16 rounding of fp32 SDPA, as SDPA's own bf16."""
    import torch.nn.functional as F

    from vlm.model import attention
    from vlm.model.attention import attend

    torch.manual_seed(2)
    L = attention.QUERY_CHUNK + 37  # two chunks, a ragged last one
    q32, k32, v32 = (torch.randn(1, 2, L, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    q, k, v = (t.bfloat16() for t in (q32, k32, v32))
    with torch.no_grad():
        ours = attend(q, k, v)
        sdpa = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    err_ours, err_sdpa = (ours.float() - ref).abs().max(), (sdpa.float() - ref).abs().max()
    assert err_ours < 0.05 and err_ours <= 2 * err_sdpa + 1e-3, (err_ours, err_sdpa)


def test_query_chunks_size_from_the_scores_bytes_and_same_bits(monkeypatch):
    """`_query_chunks` sizes its chunks so a chunk's scores fit `QUERY_CHUNK_BYTES` (an image's
    patches: more patches, fewer query rows per chunk, never below `QUERY_CHUNK_MIN`), and a query
    row's result is the same bits however the queries are chunked."""
    from vlm.model import attention

    def rows(B, H, L):
        return attention.query_chunk_rows(torch.empty(B, H, L, 64, dtype=torch.bfloat16), L)

    assert (rows(1, 4, 256), rows(1, 4, 768), rows(1, 4, 1564), rows(1, 4, 4096)) == (512, 256, 128, 64)
    assert rows(4, 4, 1564) == attention.QUERY_CHUNK_MIN  # four images of that size in one group
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 300, 16).bfloat16() for _ in range(3))
    with torch.no_grad():
        whole = attention._query_chunks(q, k, v)  # 300 rows fit: one chunk
        monkeypatch.setattr(attention, "QUERY_CHUNK_BYTES", 1)
        monkeypatch.setattr(attention, "QUERY_CHUNK_MIN", 64)  # chunks of 64: four, a ragged last one
        chunked = attention._query_chunks(q, k, v)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("cached", [0, 70])
def test_causal_chunks_match_sdpa(cached):
    """`causal_chunks` (a prefill chunk's causal attention as folded-GQA matmuls over query chunks):
    queries are the last L of S positions; in fp32 it equals SDPA with the causal mask within
    rounding, across a ragged last chunk; in bf16 it stays within bf16 rounding of that."""
    import torch.nn.functional as F

    from vlm.model import attention
    from vlm.model.attention import causal_chunks, causal_mask, fast_causal

    torch.manual_seed(3)
    L = 2 * attention.CAUSAL_CHUNK + 29
    S = cached + L
    q = torch.randn(1, 8, L, 16)
    k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    mask = causal_mask(L, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with torch.no_grad():
        got = causal_chunks(q, k, v)
        got16 = causal_chunks(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert fast_causal(q.bfloat16()) and not fast_causal(q) and not fast_causal(q[:, :, :1].bfloat16())
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5
    assert got16.dtype == torch.bfloat16 and (got16.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", ["rope", "mrope"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_one_token_step_is_the_general_forward_bit_for_bit(dtype, rope, fused, kv_heads, qk_norm, monkeypatch):
    """A decode step (one new token per row after a cached past) takes the decoder's lean path
    (`Decoder._forward_one`); it gives the same bits as the general layer forward, with rows at
    different positions (a boolean key mask, as the serving engine's ragged rows), with fused
    and packed projections, with and without grouped-query heads and QK-norm, in fp32 and bf16;
    forwards with grad on keep the general path."""
    from vlm.model.attention import KVCache
    from vlm.model.packed import pack_linears

    torch.manual_seed(0)
    dec = Decoder(
        vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, rope=rope, max_seq_len=64, qk_norm=qk_norm
    ).eval()
    if qk_norm:  # non-trivial norm weights, so a skipped or misplaced norm shows
        for layer in dec.layers:
            torch.nn.init.uniform_(layer.self_attn.q_norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(layer.self_attn.k_norm.weight, 0.5, 1.5)
    dec.to(dtype)
    pack_linears(dec)
    for layer in dec.layers:
        layer.self_attn.fuse_projections(fused)
        layer.mlp.fuse_projections(fused)
    B, past = 3, 9
    x0 = torch.randn(B, past, 64).to(dtype)
    pos0 = torch.arange(past).expand(B, past)
    x1 = torch.randn(B, 1, 64).to(dtype)
    pos1 = torch.tensor([[past], [past - 2], [past - 5]])  # rows at different positions
    valid = torch.ones(B, past + 1, dtype=torch.bool)
    valid[1, past - 2 : past], valid[2, past - 5 : past] = False, False  # their keys past their own length
    if rope == "mrope":
        pos0, pos1 = pos0[None].expand(3, B, past), torch.stack([pos1, pos1 + 1, pos1 + 2])

    def step():
        cache = KVCache(2, B, kv_heads, 64, 16, dtype, "cpu")
        with torch.no_grad():
            dec(x0, pos0, cache=cache)
            cache.advance(past)
            out = dec(x1, pos1, valid[:, None, None, :], cache=cache)
        return out, cache.k[0][:, :, past].clone(), cache.v[1][:, :, past].clone()

    calls, lean_step = [], Decoder._forward_one
    monkeypatch.setattr(Decoder, "_forward_one", lambda self, *a: calls.append(1) or lean_step(self, *a))
    lean = step()
    monkeypatch.setattr(Decoder, "_one_token_path", lambda self, *a: False)
    general = step()
    assert calls == [1]  # the first run took the one-token path (once: the prefill did not)
    for a, b in zip(lean, general):
        assert a.dtype == dtype and torch.equal(a, b)
    monkeypatch.undo()
    with torch.no_grad():
        assert dec._one_token_path(None, KVCache(1, 1, 2, 8, 16, torch.float32, "cpu"))
    assert not dec._one_token_path(None, KVCache(1, 1, 2, 8, 16, torch.float32, "cpu"))  # grad on: general
