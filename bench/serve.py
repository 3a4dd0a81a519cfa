"""The serving engine against one-at-a-time `generate()` and transformers, on this machine.

    python bench/serve.py                          # defaults: a few minutes on a 2-core CPU
    python bench/serve.py --clients 1 4 16 64 --requests 1000 --models tiny qwen40m --new-tokens 32
    python bench/serve.py --load --clients 1 4 16 32 --new-tokens 64 --dtype bf16   # the load table only

Models (random weights: speed does not depend on them): `tiny`, the default config; `qwen40m`, a
~40M Qwen2-VL-shaped model (its ViT with 2D RoPE and 2x2 merger, a Qwen2 decoder with M-RoPE)
built from a random transformers Qwen2-VL, loaded into our modules, exported with
`format=hf_qwen2vl` and loaded back by `Qwen2VLForConditionalGeneration.from_pretrained`, so both
sides run the same weights. End tokens are made unreachable: every system generates exactly
`--new-tokens` per request.

`--load`: only the engine under a closed-loop load on qwen40m (one new image per request, cycling
224x224, 448x336 and 640x480, a short question, greedy, `--new-tokens` each, `--dtype`): generated
tokens/s, inter-token p50 (the gaps between a request's streamed tokens) and TTFT p50 / p95 per
client count.

Tables: throughput and time to first token at 1..64 concurrent clients (threads calling
`submit`, closed loop) vs `generate()` one request at a time vs transformers `generate` one at a
time; decode ms/step at batch 1/8/64; turn-2 TTFT about a ~1024-visual-token image with the caches
on vs off; pruning's TTFT effect; resident cache bytes and evictions over `--requests` requests.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.build.model import build_model, build_processor, build_template, geometry_of, stop_ids  # noqa: E402
from vlm.checkpoint.load import LoadedVLM  # noqa: E402
from vlm.model.generate import generate  # noqa: E402
from vlm.serve.api import ChatRequest, Delta, SamplingParams  # noqa: E402
from vlm.serve.engine import Engine, EngineConfig  # noqa: E402
from vlm.serve.prompt import PromptBuilder  # noqa: E402
from vlm.tokenizer import train_tokenizer  # noqa: E402

WORDS = ["What is shown in the picture?", "How many shapes are there?", "left", "right", "a red square"]
SIZES = [(224, 224), (336, 224), (448, 336), (280, 448)]  # mixed image sizes
CTX = 2048


def png(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _finish(model, tok, model_cfg, pcfg) -> LoadedVLM:
    geo = geometry_of(model_cfg)
    tcfg = {"max_length": CTX}
    with torch.no_grad():  # end tokens unreachable: every system generates exactly --new-tokens
        for t in stop_ids(tok, tcfg):
            model.decoder.lm_head.weight[t] = 0
    proc = build_processor(pcfg, geometry=geo)
    return LoadedVLM(model.eval(), tok, proc, build_template(tcfg, tok, geometry=geo), {"template": tcfg})


def tiny_model(tok) -> LoadedVLM:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp", "paths.data_dir=/tmp"])
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m["decoder"]["max_seq_len"] = CTX
    torch.manual_seed(0)
    pcfg = dict(resolution="dynamic", image_size=64, min_pixels=32 * 32, max_pixels=128 * 128)
    return _finish(build_model(m, tok), tok, m, pcfg)


def qwen40m(tok, folder: Path, with_hf: bool = True):
    """(our LoadedVLM, transformers model) with the same ~40M random weights (with_hf=False: no
    transformers model, None in its place)."""
    import transformers

    from vlm.checkpoint.hf_export import export_hf

    vision = dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14)
    vision.update(spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=tok.vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=12)
    text.update(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=CTX, tie_word_embeddings=True)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 8, 8]}
    ids = dict(image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id)
    ids.update(vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id)
    torch.manual_seed(0)
    ref = transformers.Qwen2VLForConditionalGeneration(
        transformers.Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)
    )
    ref.save_pretrained(folder / "random")
    p = str(folder / "random")
    m = {
        "encoder": {"_target_": "vlm.model.hf.pretrained_qwen2vl_vision", "pretrained": p, "patch_size": 14},
        "projector": {"_target_": "vlm.model.hf.pretrained_qwen2vl_merger", "pretrained": p, "merge_size": 2},
        "decoder": {"_target_": "vlm.model.hf.pretrained_decoder", "pretrained": p, "rope": "mrope"},
        "fusion": "interleave",
    }
    pcfg = dict(resolution="dynamic", image_size=224, min_pixels=56 * 56, max_pixels=896 * 896)
    pcfg.update(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
    loaded = _finish(build_model(m, tok), tok, m, pcfg)
    if not with_hf:
        return loaded, None
    export_hf(loaded, folder / "hf", "hf_qwen2vl")
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    return loaded, hf


def conversation(i: int, big: bool = False) -> list[dict]:
    w, h = (896, 896) if big else SIZES[i % len(SIZES)]
    content = [{"type": "image", "image": png(w, h, i)}, {"type": "text", "text": WORDS[i % len(WORDS)]}]
    return [{"role": "user", "content": content}]


# ---- the systems ---------------------------------------------------------------------------------
def run_engine(loaded, msgs, clients: int, new: int, **cfg) -> dict:
    """`clients` threads, each submitting its next request when the previous one finished."""
    ecfg = EngineConfig(max_context=CTX, dtype="fp32", **{"max_batch": max(clients, 1), **cfg})
    ttft, lock, nxt = [], threading.Lock(), iter(range(len(msgs)))
    with Engine(loaded, ecfg) as engine:

        def client():
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                h = engine.submit(ChatRequest(msgs[i], SamplingParams(max_tokens=new)))
                h.result(600)
                ttft.append(h.first_token_at - t0)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        stats = engine.stats()
    return {"tok_s": len(msgs) * new / wall, "ttft": ttft, "stats": stats, "wall": wall}


LOAD_SIZES = [(224, 224), (448, 336), (640, 480)]


def load_conversation(i: int) -> list[dict]:
    w, h = LOAD_SIZES[i % len(LOAD_SIZES)]
    content = [{"type": "image", "image": png(w, h, 9000 + i)}, {"type": "text", "text": WORDS[i % len(WORDS)]}]
    return [{"role": "user", "content": content}]


def run_load(loaded, clients: int, n: int, new: int, dtype: str, **cfg) -> dict:
    """`clients` threads in a closed loop over `n` requests, each streaming its answer: tokens/s,
    TTFTs and the gaps between consecutive streamed tokens (a delta of k tokens counts k gaps)."""
    msgs = [load_conversation(i) for i in range(n)]
    ecfg = EngineConfig(max_context=CTX, dtype=dtype, **{"max_batch": max(clients, 1), **cfg})
    ttft, gaps, lock, nxt = [], [], threading.Lock(), iter(range(n))
    with Engine(loaded, ecfg) as engine:
        engine.submit(ChatRequest(load_conversation(n), SamplingParams(max_tokens=2))).result(600)  # warm-up

        def client():
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                h = engine.submit(ChatRequest(msgs[i], SamplingParams(max_tokens=new)))
                last, mine = None, []
                for ev in h.events(600):
                    now = time.perf_counter()
                    k = len(ev.token_ids) if isinstance(ev, Delta) else 0
                    if last is not None and k:
                        mine += [(now - last) / k] * k
                    if k:
                        last = now
                ttft.append(h.first_token_at - t0)
                gaps.extend(mine)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
    return {"tok_s": n * new / wall, "ttft": ttft, "gaps": gaps}


def load_table(loaded, clients, new: int, dtype: str) -> None:
    print(f"\n### qwen40m under load, {dtype}, {new} new tokens, images cycling 224x224 / 448x336 / 640x480\n")
    print("| clients | requests | tokens/s | inter-token p50 ms | TTFT p50 ms | TTFT p95 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in clients:
        n = max(2 * c, 8)
        r = run_load(loaded, c, n, new, dtype)
        print(
            f"| {c} | {n} | {r['tok_s']:.1f} | {pct(r['gaps'], 50):.1f} | {pct(r['ttft'], 50):.0f} | {pct(r['ttft'], 95):.0f} |",
            flush=True,
        )


def run_generate(loaded, msgs, new: int) -> dict:
    b = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)
    ttft, t0 = [], time.perf_counter()
    for m in msgs:
        s = time.perf_counter()
        first = []
        batch = b(m, new).batch(loaded.tokenizer.pad_id)
        generate(loaded.model, batch, new, [], on_token=lambda t: first or first.append(time.perf_counter()))
        ttft.append(first[0] - s)
    return {"tok_s": len(msgs) * new / (time.perf_counter() - t0), "ttft": ttft}


def hf_inputs(loaded, m, new):
    from tests.test_hf_qwen2vl import window_order

    p = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, CTX)(m, new)
    ids = p.input_ids[None]
    px = torch.cat([x[window_order(*g)] for x, g in zip(p.patches, p.grids)])
    mm = (ids == loaded.tokenizer.image_pad_id).long()
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=px,
        image_grid_thw=torch.tensor(p.grids),
        mm_token_type_ids=mm,
    )


def run_hf(hf, loaded, msgs, new: int) -> dict:
    ttft, t0, out = [], time.perf_counter(), []
    for m in msgs:
        s = time.perf_counter()
        inp = hf_inputs(loaded, m, new)
        streamer = _FirstToken()
        with torch.no_grad():
            g = hf.generate(**inp, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer)
        out.append(g[0, inp["input_ids"].shape[1] :].tolist())
        ttft.append(streamer.at - s)
    return {"tok_s": len(msgs) * new / (time.perf_counter() - t0), "ttft": ttft, "tokens": out}


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrived."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first put is the prompt
            self.at = time.perf_counter()

    def end(self):
        self.at = self.at or time.perf_counter()


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def throughput_table(name, loaded, hf, clients, new, n_base):
    print(f"\n### {name}: generated tokens/s and TTFT (ms), {new} new tokens per request, mixed image sizes\n")
    print("| system | clients | requests | tokens/s | TTFT p50 | TTFT p95 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base_msgs = [conversation(1000 + i) for i in range(n_base)]
    g = run_generate(loaded, base_msgs, new)
    print(
        f"| generate() one at a time | 1 | {n_base} | {g['tok_s']:.1f} | {pct(g['ttft'], 50):.0f} | {pct(g['ttft'], 95):.0f} |"
    )
    if hf is not None:
        h = run_hf(hf, loaded, base_msgs, new)
        print(
            f"| transformers generate one at a time | 1 | {n_base} | {h['tok_s']:.1f} | {pct(h['ttft'], 50):.0f} | {pct(h['ttft'], 95):.0f} |"
        )
    for c in clients:
        msgs = [conversation(2000 + i) for i in range(max(2 * c, 8))]
        r = run_engine(loaded, msgs, c, new)
        print(
            f"| engine | {c} | {len(msgs)} | {r['tok_s']:.1f} | {pct(r['ttft'], 50):.0f} | {pct(r['ttft'], 95):.0f} |"
        )


def decode_table(name, loaded, hf, batches, ctx_len=300, steps=8, rounds=4):
    """ms per decode step over `ctx_len` cached positions: the engine's step vs transformers'."""
    from vlm.serve.kv_slots import DecodeCache, KVSlots

    model, dec = loaded.model, loaded.model.decoder
    print(f"\n### {name}: decode step (ms), {ctx_len} cached positions per row\n")
    print("| batch | engine step | transformers step |")
    print("| ---: | ---: | ---: |")
    for b in batches:
        slots = KVSlots(dec.n_layers, b, dec.n_kv_heads, ctx_len + steps + 1, dec.head_dim, torch.float32, "cpu")
        slots.k.normal_(), slots.v.normal_()
        tok = torch.full((b, 1), 5)
        pos0 = torch.full((b,), ctx_len)
        pos0[0] -= 7  # rows of different lengths

        def ours_step(s):
            c = DecodeCache(slots, pos0 + s)
            p = (pos0 + s)[None, :, None].expand(3, b, 1) if dec.rope == "mrope" else (pos0 + s)[:, None]
            model.logits(model(tok, p, c.key_valid(), cache=c)[:, -1])

        hf_step = _hf_decoder_step(hf, b, ctx_len) if hf is not None else None
        best_ours, best_hf = [], []
        with torch.no_grad():
            for _ in range(rounds):  # alternate: a burst of other load on the machine hits both
                best_ours.append(_median_ms(ours_step, steps))
                if hf_step is not None:
                    best_hf.append(_median_ms(hf_step, steps))
        ours, theirs = min(best_ours), min(best_hf) if best_hf else float("nan")
        print(f"| {b} | {ours:.2f} | {theirs:.2f} |")


def _median_ms(fn, steps) -> float:
    ts = []
    for s in range(steps):
        t0 = time.perf_counter()
        fn(s)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _hf_decoder_step(hf, b, ctx_len):
    """transformers' decode step on the same weights: its language model + head, a DynamicCache
    holding `ctx_len` positions (text-only rows; the step does not depend on what they were)."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        hf.model.language_model(input_ids=torch.full((b, ctx_len), 5), past_key_values=cache, use_cache=True)
    tok = torch.full((b, 1), 5)
    state = {"n": 0}

    def step(_s):
        state["n"] += 1
        pos = torch.full((3, b, 1), ctx_len + state["n"])
        h = hf.model.language_model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos)
        hf.lm_head(h.last_hidden_state[:, -1])

    return step


def multiturn_table(name, loaded, new):
    print(f"\n### {name}: turn-2 TTFT about one 896x896 image (~1024 visual tokens)\n")
    print("| caches | turn-1 TTFT ms | turn-2 TTFT ms | turn-2 cached tokens | prompt tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for on in (False, True):
        cfg = dict(embed_cache_mb=256 if on else 0, prefix_cache_mb=1024 if on else 0, max_batch=2)
        with Engine(loaded, EngineConfig(max_context=CTX, dtype="fp32", **cfg)) as engine:
            t1 = conversation(7, big=True)
            s = time.perf_counter()
            h = engine.submit(ChatRequest(t1, SamplingParams(max_tokens=new)))
            h.result(600)
            first1 = h.first_token_at - s
            turn2 = [*t1, {"role": "assistant", "content": h.finished.text}, {"role": "user", "content": WORDS[1]}]
            s = time.perf_counter()
            h2 = engine.submit(ChatRequest(turn2, SamplingParams(max_tokens=new)))
            u = h2.admitted(600)
            h2.result(600)
            first2 = h2.first_token_at - s
        print(
            f"| {'on' if on else 'off'} | {first1 * 1e3:.0f} | {first2 * 1e3:.0f} | {u.cached_tokens} | {u.prompt_tokens} |"
        )


def prune_table(name, loaded, new):
    print(f"\n### {name}: visual-token pruning, TTFT of one 896x896 image request (caches off)\n")
    print("| keep ratio | prompt tokens | TTFT ms |")
    print("| ---: | ---: | ---: |")
    for keep in (1.0, 0.5, 0.25):
        cfg = EngineConfig(max_context=CTX, dtype="fp32", prune_keep_ratio=keep, embed_cache_mb=0, prefix_cache_mb=0)
        with Engine(loaded, cfg) as engine:
            ts = []
            for i in range(2):
                s = time.perf_counter()
                h = engine.submit(ChatRequest(conversation(30 + i, big=True), SamplingParams(max_tokens=new)))
                u = h.admitted(600)
                h.result(600)
                ts.append(h.first_token_at - s)
        print(
            f"| {keep} | {u.prompt_tokens} (kept of them visual: ~{int(u.visual_tokens * keep)}) | {min(ts) * 1e3:.0f} |"
        )


def memory_table(name, loaded, n, new):
    print(f"\n### {name}: {n} requests (half repeat an earlier image), 4 clients, small cache budgets\n")
    msgs = [conversation(5000 + (i if i % 2 else i // 4)) for i in range(n)]
    ecfg = dict(embed_cache_mb=2, prefix_cache_mb=8, max_batch=4)
    peak = {"embed": 0, "prefix": 0}
    stop = threading.Event()
    box = {}

    def watch():
        while not stop.is_set():
            e = box.get("engine")
            if e is not None:
                s = e.stats()
                peak["embed"] = max(peak["embed"], s["embed_cache"]["bytes"])
                peak["prefix"] = max(peak["prefix"], s["prefix_cache"]["bytes"])
            time.sleep(0.01)

    orig = Engine.__enter__

    def enter(self):
        box["engine"] = self
        return orig(self)

    Engine.__enter__ = enter
    w = threading.Thread(target=watch)
    w.start()
    try:
        r = run_engine(loaded, msgs, 4, new, **ecfg)
    finally:
        stop.set()
        w.join()
        Engine.__enter__ = orig
    s = r["stats"]
    print("| cache | budget MiB | peak resident MiB | entries | hits | evictions |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, label in (("embed_cache", "embed"), ("prefix_cache", "prefix")):
        c = s[key]
        print(
            f"| {key} | {c['budget_bytes'] / 2**20:.0f} | {peak[label] / 2**20:.2f} | {c['entries']} | {c['hits']} | {c['evictions']} |"
        )
    print(f"\nKV slots (fixed): {s['kv_slots_bytes'] / 2**20:.1f} MiB; {r['tok_s']:.1f} tokens/s over {n} requests")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen40m"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--baseline-requests", type=int, default=6)
    ap.add_argument("--requests", type=int, default=200, help="requests of the memory run")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--load", action="store_true", help="only the load table (qwen40m)")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], help="dtypes of the load table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = train_tokenizer(WORDS * 20, vocab_size=400)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    if args.load:
        with tempfile.TemporaryDirectory() as tmp:
            loaded, _ = qwen40m(tok, Path(tmp), with_hf=False)
            for dtype in args.dtype:
                load_table(loaded, args.clients, args.new_tokens, dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            hf = None
            if name == "tiny":
                loaded = tiny_model(tok)
            else:
                loaded, hf = qwen40m(tok, Path(tmp))
            n_params = sum(p.numel() for p in loaded.model.parameters())
            print(f"\n## {name}: {n_params / 1e6:.1f}M parameters")
            if hf is not None:
                msgs = [conversation(1000 + i) for i in range(2)]
                same = run_hf(hf, loaded, msgs, 8)["tokens"]
                ours = [h.token_ids for h in _engine_answers(loaded, msgs, 8)]
                print(f"\nsame greedy tokens as transformers on the exported weights: {same == ours}")
            throughput_table(name, loaded, hf, args.clients, args.new_tokens, args.baseline_requests)
            decode_table(name, loaded, hf, args.decode_batches)
            if name != "tiny":
                multiturn_table(name, loaded, args.new_tokens)
                prune_table(name, loaded, args.new_tokens)
            memory_table(name, loaded, args.requests, 4)


def _engine_answers(loaded, msgs, new):
    with Engine(loaded, EngineConfig(max_context=CTX, dtype="fp32")) as engine:
        return [h.result(600) for h in [engine.submit(ChatRequest(m, SamplingParams(max_tokens=new))) for m in msgs]]


if __name__ == "__main__":
    main()
