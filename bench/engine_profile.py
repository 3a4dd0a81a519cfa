"""Where the serving engine's step spends its time: `torch.profiler` tables of `Engine.step` on
qwen40m (`bench/serve.py`'s ~41M Qwen2-VL-shaped model), decode at several batch sizes and prefill.

    python bench/engine_profile.py                              # fp32 and bf16, batches 1 4 16 32
    python bench/engine_profile.py --dtypes bf16 --batches 16 --top 25
    python bench/engine_profile.py --engine packed_weights=false  # an EngineConfig field
    python bench/engine_profile.py --ablate --no-prefill        # + GEMMs / attention / the rest

The engine is driven by hand (no engine thread): requests are submitted, `step()` runs until every
row decodes, then `--steps` decode-only steps are timed without the profiler (wall ms, median)
and profiled. Each table lists the top ops by self CPU time per step; the last line splits the
step into op time (the profiler's self CPU total) and the rest (wall minus op time: Python,
the engine's bookkeeping, dispatch), an estimate of the Python overhead. Prefill: the steps that
take four new requests (images 224x224, 448x336, 640x480, 224x224) from admission to their first
token, vision encoding included, with nothing decoding beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import CTX, WORDS, png, qwen40m  # noqa: E402
from vlm.serve.api import ChatRequest, SamplingParams  # noqa: E402
from vlm.serve.engine import Engine, EngineConfig  # noqa: E402
from vlm.tokenizer import train_tokenizer  # noqa: E402

SIZES = [(224, 224), (448, 336), (640, 480)]


def conversation(i: int, size=None) -> list[dict]:
    w, h = size or SIZES[i % len(SIZES)]
    content = [{"type": "image", "image": png(w, h, i)}, {"type": "text", "text": WORDS[i % len(WORDS)]}]
    return [{"role": "user", "content": content}]


def submit(engine: Engine, msgs, max_tokens: int):
    hs = [engine.submit(ChatRequest(m, SamplingParams(max_tokens=max_tokens))) for m in msgs]
    for h in hs:
        h.admitted(600)
    return hs


def table(prof, steps: int, wall_ms: float, top: int, title: str) -> None:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    print(f"\n#### {title}\n")
    print("| op | calls/step | self CPU ms/step | % of op time |")
    print("| --- | ---: | ---: | ---: |")
    for e in events[:top]:
        ms = e.self_cpu_time_total / steps / 1e3
        print(f"| {e.key} | {e.count / steps:.0f} | {ms:.3f} | {100 * ms / total:.1f} |")
    rest = wall_ms - total
    print(
        f"\nstep wall {wall_ms:.2f} ms (median, unprofiled) = op time {total:.2f} ms (profiled) + "
        f"Python/overhead ~{rest:.2f} ms ({100 * rest / wall_ms:.0f}%)"
    )


def ablation(engine: Engine, steps: int) -> None:
    """The decode step's wall time as is, with its GEMMs replaced by zeros of their shape, and with
    its attention too: what is left is norms, rotary, residuals, Python and dispatch."""
    import torch.nn.functional as F

    from vlm.model import packed

    rows = engine.decoding

    def wall() -> float:
        ts = []
        for _ in range(3 * steps):
            t0 = time.perf_counter()
            with torch.no_grad():
                engine._decode_logits(rows)
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    full = wall()
    call, linear, sdpa = packed.PackedGemm.__call__, F.linear, F.scaled_dot_product_attention
    try:
        packed.PackedGemm.__call__ = lambda self, x: x.new_zeros(*x.shape[:-1], self.packed.shape[0])
        F.linear = lambda x, w, b=None: x.new_zeros(*x.shape[:-1], w.shape[0])
        no_gemm = wall()
        F.scaled_dot_product_attention = lambda q, k, v, **kw: torch.zeros_like(q)
        rest = wall()
    finally:
        packed.PackedGemm.__call__, F.linear, F.scaled_dot_product_attention = call, linear, sdpa
    print(
        f"ablation (wall ms, median of {3 * steps}): step {full:.2f} = GEMMs {full - no_gemm:.2f}"
        f" + attention {no_gemm - rest:.2f} + the rest {rest:.2f}"
    )


def decode_profile(loaded, dtype: str, b: int, steps: int, top: int, extra: dict, ablate: bool = False) -> None:
    cfg = EngineConfig(max_context=CTX, dtype=dtype, max_batch=max(b, 1), prefix_cache_mb=0, **extra)
    engine = Engine(loaded, cfg)
    try:
        submit(engine, [conversation(100 * b + i) for i in range(b)], 4 * steps + 64)
        while engine._ready or engine.prefilling or len(engine.decoding) < b:
            engine.step()
        for _ in range(3):  # warm-up
            engine.step()
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            walls.append((time.perf_counter() - t0) * 1e3)
        lengths = [r.length for r in engine.decoding]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        title = f"{dtype} decode, batch {b} (cached positions {min(lengths)}..{max(lengths)})"
        table(prof, steps, statistics.median(walls), top, title)
        if ablate:
            ablation(engine, steps)
    finally:
        engine.close()


def prefill_profile(loaded, dtype: str, top: int, extra: dict) -> None:
    cfg = EngineConfig(max_context=CTX, dtype=dtype, max_batch=4, prefix_cache_mb=0, embed_cache_mb=0, **extra)
    engine = Engine(loaded, cfg)
    sizes = [*SIZES, SIZES[0]]
    try:
        submit(engine, [conversation(7 + i, s) for i, s in enumerate(sizes)], 1)  # warm-up
        while engine._ready or engine.prefilling or engine.decoding:
            engine.step()
        submit(engine, [conversation(50 + i, s) for i, s in enumerate(sizes)], 1)
        t0, n = time.perf_counter(), 0
        while engine._ready or engine.prefilling or engine.decoding:
            engine.step()
            n += 1
        wall = (time.perf_counter() - t0) * 1e3
        submit(engine, [conversation(80 + i, s) for i, s in enumerate(sizes)], 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m = 0
            while engine._ready or engine.prefilling or engine.decoding:
                engine.step()
                m += 1
        tokens = engine.counters["prefill_tokens"] // 3
        table(prof, 1, wall, top, f"{dtype} prefill of 4 requests ({tokens} prompt tokens, {n} steps), per 4 requests")
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="split each decode step: GEMMs, attention, the rest")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--engine", nargs="*", default=[], help="EngineConfig fields, name=value (true/false/ints)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {}
    for kv in args.engine:
        k, v = kv.split("=", 1)
        extra[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    tok = train_tokenizer(WORDS * 20, vocab_size=400)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        loaded, _ = qwen40m(tok, Path(tmp), with_hf=False)
        for dtype in args.dtypes:
            print(f"\n### qwen40m, {dtype}{', ' + ' '.join(args.engine) if args.engine else ''}")
            for b in args.batches:
                decode_profile(loaded, dtype, b, args.steps, args.top, extra, args.ablate)
            if not args.no_prefill:
                prefill_profile(loaded, dtype, args.top, extra)


if __name__ == "__main__":
    main()
