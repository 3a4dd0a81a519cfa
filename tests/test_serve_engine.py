"""The serving engine (`vlm.serve.engine`): greedy answers equal `vlm.model.generate.generate` run on each
request alone, whatever the arrival schedule, concurrency, cache state and mix of images, videos
and text; plus seeded sampling, cancel, back-pressure, refusals, cache budgets and multi-turn reuse.

Tiny random models built from configs (as the design-axes tests do), fp32, 2 decoder layers."""

from __future__ import annotations

import io
import random
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.build.model import build_model, build_processor, build_template, geometry_of, stop_ids
from vlm.checkpoint.load import LoadedVLM
from vlm.model.generate import generate
from vlm.serve.api import ChatRequest, Delta, Finished, Overloaded, RequestError, SamplingParams
from vlm.serve.engine import Engine, EngineConfig
from vlm.serve.prompt import PromptBuilder
from vlm.tokenizer import train_tokenizer

WORDS = [
    "What is shown?",
    "Which image has more shapes, the first or the second?",
    "first",
    "second",
    "Which way is the red circle moving?",
    "left",
    "right",
    "and then",
    "a red square",
    "Describe the picture in detail, then count the shapes.",
    "user\n",
    "assistant\n",
    "system\n",
]
CTX = 512


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 10, vocab_size=300)


def png(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def tiny(tok, fusion="interleave", rope="mrope", image_attention="causal", projector=None) -> LoadedVLM:
    cfg = {
        "encoder": {
            "_target_": "vlm.model.vision.VisionEncoder",
            "patch_size": 4,
            "dim": 32,
            "n_layers": 1,
            "n_heads": 2,
            "pos_grid": 4,
            "patch_embed": "conv",
            "conv_channels": 8,
            "temporal_patch": 2,
            "pos": "rope2d",
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
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "rope": rope,
            "max_seq_len": CTX,
        },
        "fusion": fusion,
        "cross_attn": {"every": 1, "media": "all"},
        "image_attention": image_attention,
    }
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_gate"):
                p.fill_(0.5)  # open the cross-attention gates so the media matter
        model.decoder.lm_head.weight.mul_(20)  # sharper logits: answers depend on the input, few near-ties
    geo = geometry_of(cfg)
    pcfg = dict(
        resolution="dynamic",
        image_size=32,
        min_pixels=64,
        max_pixels=48 * 48,
        video={"max_frames": 8, "max_video_tokens": 64},
    )
    tcfg = {"max_length": CTX}
    proc = build_processor(pcfg, geometry=geo)
    return LoadedVLM(model, tok, proc, build_template(tcfg, tok, geometry=geo), {"template": tcfg})


def conversation(i: int, video: bool = True) -> list[dict]:
    """Mixed requests: image sizes, two images, a video (frames), text only; images repeat."""
    kind = i % 5
    q = {"type": "text", "text": WORDS[i % 10]}
    if kind == 0:
        content = [{"type": "image", "image": png(16 + 8 * (i % 4), 32, i % 3)}, q]
    elif kind == 1:
        content = [{"type": "image", "image": png(32, 16, 7)}, q, {"type": "image", "image": png(40, 24, i)}]
    elif kind == 2 and video:
        frames = [png(32, 24, 50 + f) for f in range(4)]
        content = [{"type": "video", "video": frames}, q]
    elif kind == 3:
        content = [q]
    else:
        content = [{"type": "image", "image": png(48, 48, i)}, q]
    return [{"role": "user", "content": content}]


def reference(loaded: LoadedVLM, messages, max_tokens: int, prune=None) -> list[int]:
    p = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)(messages, max_tokens)
    eos = stop_ids(loaded.tokenizer, loaded.config["template"])
    batch = p.batch(loaded.tokenizer.pad_id)
    return generate(loaded.model, batch, max_tokens, eos, suppress_ids=loaded.tokenizer.structural_ids, prune=prune)[0]


def submit_randomly(engine: Engine, requests: list[ChatRequest], seed: int, threads: int = 3) -> list:
    """Submit from several threads with random delays; returns the handles in request order."""
    handles: list = [None] * len(requests)
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    parts = [order[t::threads] for t in range(threads)]

    def worker(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        for i in parts[t]:
            time.sleep(rng.uniform(0, 0.03))
            handles[i] = engine.submit(requests[i])

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return handles


VARIANTS = {
    "interleave_mrope_video": dict(),
    "cross_attn": dict(fusion="cross_attn"),
    "bidirectional": dict(image_attention="bidirectional"),
    "rope1d_qformer": dict(rope="rope", projector={"kind": "qformer", "queries": 4, "merge_size": 1, "blocks": 1}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_equals_generate_under_random_arrivals(tok, name):
    loaded = tiny(tok, **VARIANTS[name])
    n = 12
    lengths = [4 + (7 * i) % 9 for i in range(n)]
    msgs = [conversation(i) for i in range(n)]
    want = [reference(loaded, m, k) for m, k in zip(msgs, lengths)]
    for seed, cfg in enumerate(
        [
            EngineConfig(max_batch=3, prefill_chunk=16, max_context=CTX, dtype="fp32"),
            EngineConfig(max_batch=8, prefill_chunk=7, max_context=CTX, dtype="fp32", preprocess_workers=3),
        ]
    ):
        reqs = [ChatRequest(m, SamplingParams(max_tokens=k)) for m, k in zip(msgs, lengths)]
        with Engine(loaded, cfg) as engine:
            got = [h.result(120) for h in submit_randomly(engine, reqs, seed)]
            again = [h.result(120) for h in submit_randomly(engine, reqs, seed + 10)]  # warm caches
            stats = engine.stats()
        for i in range(n):
            assert got[i].token_ids == want[i], (name, seed, i)
            assert again[i].token_ids == want[i], (name, seed, i, "cached")
            assert got[i].usage.completion_tokens == len(want[i])
        assert stats["embed_cache"]["hits"] > 0
        assert stats["prefix_cache"]["hits"] > 0
        # several rows' prefill chunks in one forward where attention is causal and self-only
        assert (stats["packed_prefills"] > 0) == (name in ("interleave_mrope_video", "rope1d_qformer")), stats
        assert stats["running"] == stats["prefilling"] == stats["queue_depth"] == 0
        assert stats["free_slots"] == cfg.max_batch


@pytest.mark.parametrize("name", ["interleave_mrope_video", "cross_attn", "rope1d_qformer"])
def test_fused_and_packed_projections_give_the_same_greedy_answers(tok, name, monkeypatch):
    """The engine fuses q/k/v and gate/up into one GEMM each and runs its Linear layers as packed
    oneDNN GEMMs (`vlm.model.packed`, here for every layer size); the answers must still equal
    `generate()` on each request alone with plain `F.linear` (same weights, views of one buffer)."""
    from vlm.model import packed

    monkeypatch.setattr(packed, "SMALL", 0)
    loaded = tiny(tok, **VARIANTS[name])
    msgs = [conversation(i) for i in range(4)]
    want = [reference(loaded, m, 6) for m in msgs]
    with Engine(loaded, EngineConfig(max_batch=3, prefill_chunk=16, max_context=CTX, dtype="fp32")) as engine:
        assert engine.model.fuse_projections(True) > 0
        assert not packed.available(torch.float32) or any(
            type(m) is packed.PackedLinear for m in engine.model.modules()
        )
        try:
            got = [
                h.result(120)
                for h in submit_randomly(engine, [ChatRequest(m, SamplingParams(max_tokens=6)) for m in msgs], 3)
            ]
        finally:
            assert engine.model.fuse_projections(False) == 0
    assert [g.token_ids for g in got] == want


def test_events_stream_text_then_finished(tok):
    loaded = tiny(tok)
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="fp32")) as engine:
        h = engine.submit(ChatRequest(conversation(0), SamplingParams(max_tokens=10)))
        usage = h.admitted(30)
        events = list(h)
    assert usage.prompt_tokens > usage.visual_tokens > 0 and usage.cached_tokens == 0
    fin = events[-1]
    assert isinstance(fin, Finished) and all(isinstance(e, Delta) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == fin.text
    assert fin.finish_reason in ("stop", "length") and fin.usage.completion_tokens == len(fin.token_ids)


def test_seeded_sampling_is_reproducible_whatever_runs_beside(tok):
    loaded = tiny(tok)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    p = PromptBuilder(loaded.processor, loaded.template, tok, CTX)(conversation(1), 12)
    eos = stop_ids(tok, loaded.config["template"])
    want = generate(
        loaded.model,
        p.batch(tok.pad_id),
        12,
        eos,
        1.0,
        0.9,
        tok.structural_ids,
        generator=torch.Generator().manual_seed(1234),
    )[0]
    with Engine(loaded, EngineConfig(max_batch=6, prefill_chunk=16, max_context=CTX, dtype="fp32")) as engine:
        alone = engine.submit(ChatRequest(conversation(1), sp)).result(60)
        crowd = [ChatRequest(conversation(i), SamplingParams(max_tokens=9, temperature=0.8)) for i in range(8)]
        hs = submit_randomly(engine, [*crowd[:4], ChatRequest(conversation(1), sp), *crowd[4:]], seed=3)
        beside = hs[4].result(60)
        for h in hs[:4] + hs[5:]:
            h.result(60)
    assert alone.token_ids == beside.token_ids == want


def test_cancel_frees_the_slot(tok):
    loaded = tiny(tok)
    eos = set(stop_ids(tok, {}))
    with torch.no_grad():  # never end on its own
        loaded.model.decoder.lm_head.weight[sorted(eos)] = 0
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="fp32")) as engine:
        h = engine.submit(ChatRequest(conversation(3), SamplingParams(max_tokens=400)))
        h.admitted(30)
        for _ in range(60):
            if engine.stats()["running"] == 1:
                break
            time.sleep(0.05)
        assert engine.stats()["running"] == 1 and engine.stats()["free_slots"] == 1
        h.cancel()
        fin = h.result(30)
        for _ in range(60):
            if engine.stats()["free_slots"] == 2:
                break
            time.sleep(0.05)
        stats = engine.stats()
    assert fin.finish_reason == "cancelled" and len(fin.token_ids) < 400
    assert stats["running"] == 0 and stats["free_slots"] == 2 and stats["cancelled"] == 1
    assert stats["prefix_cache"]["pinned"] == 0


def test_full_queue_is_overloaded_and_long_prompts_are_refused(tok):
    loaded = tiny(tok)
    engine = Engine(loaded, EngineConfig(max_batch=1, max_queue=2, max_context=CTX, dtype="fp32"))
    a = engine.submit(ChatRequest(conversation(3)))
    engine.submit(ChatRequest(conversation(3)))
    with pytest.raises(Overloaded):
        engine.submit(ChatRequest(conversation(3)))  # not started: nothing leaves the queue
    a.admitted(30)
    engine.start()
    assert a.result(60).finish_reason in ("stop", "length")
    too_long = engine.submit(ChatRequest(conversation(0), SamplingParams(max_tokens=CTX)))
    with pytest.raises(RequestError) as e:
        too_long.admitted(30)
    assert e.value.code == "context_length_exceeded"
    assert too_long.result(5).finish_reason == "error"
    bad = engine.submit(ChatRequest(conversation(3), SamplingParams(max_tokens=0)))
    with pytest.raises(RequestError):
        bad.admitted(30)
    engine.close()


def test_cache_budgets_hold_and_evictions_are_counted(tok):
    loaded = tiny(tok)
    cfg = EngineConfig(max_batch=4, max_context=CTX, dtype="fp32", embed_cache_mb=0.02, prefix_cache_mb=0.1)
    budgets = (int(0.02 * (1 << 20)), int(0.1 * (1 << 20)))
    msgs = [
        [{"role": "user", "content": [{"type": "image", "image": png(48, 48, 1000 + i)}, WORDS[0]]}] for i in range(30)
    ]
    for m in msgs:
        m[0]["content"][1] = {"type": "text", "text": WORDS[0]}
    with Engine(loaded, cfg) as engine:
        peak = [0, 0]
        for h in [engine.submit(ChatRequest(m, SamplingParams(max_tokens=6))) for m in msgs]:
            h.result(60)
            s = engine.stats()
            peak = [max(peak[0], s["embed_cache"]["bytes"]), max(peak[1], s["prefix_cache"]["bytes"])]
        stats = engine.stats()
    assert peak[0] <= budgets[0] and peak[1] <= budgets[1]
    assert stats["embed_cache"]["evictions"] > 0 and stats["prefix_cache"]["evictions"] > 0


def test_repeated_image_hits_the_embedding_cache(tok):
    loaded = tiny(tok)
    img = png(40, 32, 9)
    ask = [
        [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": w}]}] for w in WORDS[:3]
    ]
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="fp32", prefix_cache_mb=0)) as engine:
        got = [engine.submit(ChatRequest(m, SamplingParams(max_tokens=6))).result(60) for m in ask]
        stats = engine.stats()["embed_cache"]
    assert stats["misses"] == 1 and stats["hits"] == 2
    assert [g.token_ids for g in got] == [reference(loaded, m, 6) for m in ask]


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_second_chat_turn_reuses_the_first_turns_kv(tok, attention):
    loaded = tiny(tok, image_attention=attention)
    turn1 = [
        {"role": "user", "content": [{"type": "image", "image": png(48, 40, 5)}, {"type": "text", "text": WORDS[1]}]}
    ]
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="fp32", prefill_chunk=32)) as engine:
        first = engine.submit(ChatRequest(turn1, SamplingParams(max_tokens=8))).result(60)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": [{"type": "text", "text": first.text or "left"}]},
            {"role": "user", "content": [{"type": "text", "text": WORDS[4]}]},
        ]
        h = engine.submit(ChatRequest(turn2, SamplingParams(max_tokens=8)))
        usage = h.admitted(30)
        second = h.result(60)
    assert usage.cached_tokens > usage.visual_tokens > 0
    assert first.token_ids == reference(loaded, turn1, 8)
    assert second.token_ids == reference(loaded, turn2, 8)


def test_pruning_equals_generate_with_pruning(tok):
    loaded = tiny(tok)
    prune = {"keep_ratio": 0.5, "method": "attention"}
    msgs = [conversation(i, video=False) for i in (0, 1, 4)]
    cfg = EngineConfig(max_batch=3, max_context=CTX, dtype="fp32", prune_keep_ratio=0.5, prefill_chunk=8)
    with Engine(loaded, cfg) as engine:
        got = [h.result(60) for h in [engine.submit(ChatRequest(m, SamplingParams(max_tokens=8))) for m in msgs]]
    assert [g.token_ids for g in got] == [reference(loaded, m, 8, prune) for m in msgs]


def test_stop_strings_cut_the_answer(tok):
    loaded = tiny(tok)
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="fp32")) as engine:
        full = engine.submit(ChatRequest(conversation(0), SamplingParams(max_tokens=12))).result(60)
        stop = full.text[3:5] if len(full.text) > 5 else None
        if stop:
            cut = engine.submit(ChatRequest(conversation(0), SamplingParams(max_tokens=12, stop=[stop]))).result(60)
            assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_generate_never_emits_media_tokens_and_bf16_answers(tok):
    loaded = tiny(tok)
    p = PromptBuilder(loaded.processor, loaded.template, tok, CTX)(conversation(0), 8)
    with torch.no_grad():  # a model whose top token is <|image_pad|> everywhere
        loaded.model.decoder.lm_head.weight[tok.image_pad_id] = loaded.model.decoder.norm.weight * 50
    out = generate(loaded.model, p.batch(tok.pad_id), 8, [])[0]  # no suppress_ids given
    assert tok.image_pad_id not in out and tok.video_pad_id not in out
    loaded.model.to(torch.bfloat16)
    out16 = generate(loaded.model, p.batch(tok.pad_id), 8, [])[0]  # fp32 patches into a bf16 model
    assert len(out16) == 8
    with Engine(loaded, EngineConfig(max_batch=2, max_context=CTX, dtype="bf16")) as engine:
        fin = engine.submit(ChatRequest(conversation(0), SamplingParams(max_tokens=8))).result(60)
    assert len(fin.token_ids) >= 1 and tok.image_pad_id not in fin.token_ids


# ---- one config, one dtype rule, one sampling check for both engines --------------------------------
@pytest.mark.parametrize("fast_bf16", [False, True])
def test_serial_and_continuous_engines_pick_the_same_default_dtype(tok, monkeypatch, fast_bf16):
    from vlm.serve import engine_config
    from vlm.serve.engines import KINDS, build_engine

    monkeypatch.setattr(engine_config, "fast_bf16_cpu", lambda: fast_bf16)
    want = engine_config.default_dtype("cpu")
    assert want == ("bf16" if fast_bf16 else "fp32")
    answers = {}
    for kind in KINDS:
        engine = build_engine(tiny(tok), {"kind": kind, "device": "cpu", "max_context": CTX})
        assert engine.dtype_name == want and engine.stats()["dtype"] == want, kind
        assert next(engine.model.parameters()).dtype == engine_config.DTYPES[want], kind
        with engine:
            handles = [engine.submit(ChatRequest(conversation(i), SamplingParams(max_tokens=6))) for i in range(4)]
            answers[kind] = [h.result(60).token_ids for h in handles]
            assert all(h.first_token_at is not None for h in handles), kind  # the handle's own metric
    if not fast_bf16:  # fp32: the reference and the batching engine give the same greedy answers
        assert answers["serial"] == answers["continuous"]


def test_serial_engine_refuses_batching_options_and_both_check_sampling_alike(tok):
    from vlm.errors import ServeConfigError
    from vlm.serve.engines import build_engine
    from vlm.serve.serial import SerialEngine

    with pytest.raises(ServeConfigError, match="max_batch not known to engine=serial"):
        build_engine(tiny(tok), {"kind": "serial", "max_batch": 4})
    with pytest.raises(ValueError, match="serial engine does not use max_batch=4"):
        SerialEngine(tiny(tok), EngineConfig(max_batch=4))
    bad = [
        SamplingParams(max_tokens=True),
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=float("nan")),
        SamplingParams(top_p=0.0),
    ]
    for engine in (
        SerialEngine(tiny(tok), EngineConfig(max_context=CTX, device="cpu", dtype="fp32")),
        Engine(tiny(tok), EngineConfig(max_context=CTX, device="cpu", dtype="fp32")),
    ):
        with engine:
            for sp in bad:
                fin = engine.submit(ChatRequest(conversation(3), sp)).result(60)
                assert fin.finish_reason == "error" and fin.error.param in ("max_tokens", "temperature", "top_p")


MIXED_OPTIONS = [
    dict(),
    dict(repetition_penalty=1.5, frequency_penalty=0.8, presence_penalty=0.4),
    dict(temperature=1.0, top_k=4, seed=1),
    dict(temperature=0.8, min_p=0.2, top_p=0.95, presence_penalty=1.0, seed=2),
    dict(temperature=1.0, repetition_penalty=1.3, top_k=8, min_p=0.05, seed=3, logprobs=True, top_logprobs=2),
    dict(temperature=1.2, seed=4, n=2),
]


@pytest.mark.parametrize("name", ["interleave_mrope_video", "cross_attn"])
def test_mixed_sampling_options_equal_generate_under_random_arrivals(tok, name):
    """Greedy and seeded requests with penalties, top_k, min_p, logprobs and n > 1 decode in one
    batch; each choice equals `generate` on its request alone (choice i seeded with seed + i)."""
    loaded = tiny(tok, **VARIANTS[name])
    with torch.no_grad():
        loaded.model.decoder.lm_head.weight.div_(10)  # softer logits: the options change the answers
    reqs = [
        ChatRequest(conversation(i), SamplingParams(max_tokens=6 + i % 4, **MIXED_OPTIONS[i % len(MIXED_OPTIONS)]))
        for i in range(12)
    ]
    eos = stop_ids(loaded.tokenizer, loaded.config["template"])

    def want(r: ChatRequest, index: int) -> list[int]:
        sp = r.sampling
        p = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)(r.messages, sp.max_tokens)
        seed = sp.choice_seed(index)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        batch = p.batch(loaded.tokenizer.pad_id)
        kw = dict(suppress_ids=loaded.tokenizer.structural_ids, generator=gen, sampler=sp.sampler())
        return generate(loaded.model, batch, sp.max_tokens, eos, **kw)[0]

    expected = [[want(r, i) for i in range(r.sampling.n)] for r in reqs]
    cfg = EngineConfig(max_batch=4, prefill_chunk=16, max_context=CTX, dtype="fp32")
    with Engine(loaded, cfg) as engine:
        for seed in (0, 1):
            got = [h.result(120) for h in submit_randomly(engine, reqs, seed)]
            for r, fin, exp in zip(reqs, got, expected, strict=True):
                answers = [c.token_ids for c in fin.choices] if fin.choices else [fin.token_ids]
                assert answers == exp, (name, seed, r.sampling)
                if r.sampling.logprobs:
                    assert len(fin.logprobs) == len([t for t in fin.token_ids if t not in eos])
        stats = engine.stats()
    assert stats["running"] == stats["prefilling"] == stats["queue_depth"] == 0
    assert stats["free_slots"] == cfg.max_batch


def test_a_burst_of_requests_gets_first_tokens_in_groups(tok):
    """prefill_groups=2: of four requests admitted together, a step prefills half of those still
    waiting (2, then 1, then 1; the first ones decode meanwhile); prefill_groups=1 takes all four at once;
    prefill_group_min sets the smallest group (4 groups of at least 2: 2, then 2; at least 4: all
    at once). Answers are the same every way; a group count or minimum under 1 is refused."""
    loaded = tiny(tok)
    msgs = [[{"role": "user", "content": f"say {w}"}] for w in WORDS[:4]]

    def first_steps(groups: int, least: int = 1) -> tuple[list[int], list[str]]:
        cfg = EngineConfig(max_batch=4, max_context=CTX, dtype="fp32", prefill_groups=groups, prefill_group_min=least)
        engine = Engine(loaded, cfg)
        try:
            hs = [engine.submit(ChatRequest(m, SamplingParams(max_tokens=4))) for m in msgs]
            for h in hs:
                h.admitted(60)
            waiting = []  # requests still waiting for their prefill after each step
            while engine._ready or engine.prefilling:
                engine.step()
                waiting.append(len(engine.prefilling))
            while engine.decoding:
                engine.step()
            return waiting, [h.result(60).text for h in hs]
        finally:
            engine.close()

    grouped, answers = first_steps(2)
    at_once, same = first_steps(1)
    pairs, same_pairs = first_steps(4, least=2)
    whole, same_whole = first_steps(4, least=4)
    assert grouped == [2, 1, 0] and at_once == [0] and pairs == [2, 0] and whole == [0]
    assert answers == same == same_pairs == same_whole
    with pytest.raises(ValueError, match="prefill_groups"):
        Engine(loaded, EngineConfig(max_context=CTX, prefill_groups=0))
    with pytest.raises(ValueError, match="prefill_group_min"):
        Engine(loaded, EngineConfig(max_context=CTX, prefill_group_min=0))
