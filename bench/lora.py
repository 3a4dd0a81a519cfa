"""LoRA vs full fine-tuning on the ~40M Qwen2-VL-shaped model (`qwen40m` in bench/serve.py: its ViT
with 2D RoPE and 2x2 merger, a 12-layer Qwen2 decoder with M-RoPE), built natively with random
weights: trainable parameters, optimizer state (AdamW: two fp32 tensors per trainable parameter,
measured after a step) and the time of one training step (forward + backward + AdamW), fp32.

    python bench/lora.py                       # full, LoRA r=16 on the decoder, LoRA r=16 everywhere
    python bench/lora.py --steps 5 --batch 4 --text 256 --threads 2

Rows:
    full            every parameter trains
    lora_decoder    model.lora.r=16 on decoder.attn + decoder.mlp; encoder frozen, projector trains
    lora_all        model.lora.r=16 on every target (decoder, encoder, projector): only adapters train

Run by hand; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.build.model import build_model  # noqa: E402
from vlm.tokenizer import train_tokenizer  # noqa: E402
from vlm.training.optim import apply_freeze, build_optimizer  # noqa: E402

WORDS = ["a red square", "the blue circle", "user\n", "assistant\n", "what colour is it"]


def qwen40m_config(vocab: int) -> dict:
    """The ~40M Qwen2-VL-shaped model's spec (bench/serve.py's `qwen40m` sizes), native components."""
    return {
        "encoder": dict(
            patch_size=14,
            dim=256,
            n_layers=4,
            n_heads=4,
            mlp_ratio=4.0,
            temporal_patch=2,
            pos="rope2d",
            patch_bias=False,
            final_norm=False,
            attention="frame",
            act="quick_gelu",
            norm_eps=1e-6,
        ),
        "projector": dict(kind="merge", merge_size=2, norm_eps=1e-6),
        "decoder": dict(
            vocab_size=vocab,
            dim=512,
            n_layers=12,
            n_heads=8,
            n_kv_heads=2,
            mlp_hidden=1536,
            rope="mrope",
            mrope_section=[16, 8, 8],
            qkv_bias=True,
            max_seq_len=2048,
        ),
    }


CASES = {
    "full": (None, {}),
    "lora_decoder": ({"r": 16, "alpha": 32.0, "targets": ["decoder.attn", "decoder.mlp"]}, {"encoder": True}),
    "lora_all": (
        {
            "r": 16,
            "alpha": 32.0,
            "targets": ["decoder.attn", "decoder.mlp", "encoder.attn", "encoder.mlp", "projector"],
        },
        {},
    ),
}


def batch(model, tok, b: int, text: int, side: int = 224):
    """`b` rows of `text` text tokens and one `side`x`side` image each; M-RoPE positions (plain ramp)."""
    g = side // 14
    n_img = model.token_count((1, g, g))
    ids = torch.randint(10, tok.vocab_size, (b, text + n_img))
    ids[:, 2 : 2 + n_img] = tok.image_pad_id
    pos = torch.arange(ids.shape[1]).expand(3, b, -1)
    patches = torch.randn(b * g * g, model.encoder.patch_dim)
    return ids, pos, patches, torch.tensor([[1, g, g]] * b), torch.ones(b, dtype=torch.long)


def measure(name: str, tok, steps: int, b: int, text: int) -> dict:
    lora, freeze = CASES[name]
    cfg = qwen40m_config(tok.vocab_size)
    if lora:
        cfg["lora"] = lora
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    apply_freeze(model, freeze)
    model.train()
    opt = build_optimizer(model, partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1))
    ids, pos, patches, grid, per = batch(model, tok, b, text)
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state: not timed
        t = time.perf_counter()
        hidden = model(ids, pos, None, patches, grid, per)
        loss = F.cross_entropy(model.logits(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "case": name,
        "total": total,
        "trainable": trainable,
        "state_mib": state / 2**20,
        "step_s": statistics.median(times[1:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (after one untimed)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text", type=int, default=128, help="text tokens per row (plus a 224x224 image: 64 tokens)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = train_tokenizer(WORDS * 20, vocab_size=400)
    rows = [measure(c, tok, args.steps, args.batch, args.text) for c in args.cases]
    print(
        f"qwen40m, batch {args.batch} x ({args.text} text + 64 image tokens), fp32, {torch.get_num_threads()} threads"
    )
    print(f"| {'case':<13} | {'params':>8} | {'trainable':>10} | {'share':>6} | {'AdamW state':>11} | {'step s':>7} |")
    print(f"|{'-' * 15}|{'-' * 9}:|{'-' * 11}:|{'-' * 7}:|{'-' * 12}:|{'-' * 8}:|")
    for r in rows:
        print(
            f"| {r['case']:<13} | {r['total'] / 1e6:>7.2f}M | {r['trainable'] / 1e6:>9.3f}M | "
            f"{100 * r['trainable'] / r['total']:>5.1f}% | {r['state_mib']:>7.1f} MiB | {r['step_s']:>7.3f} |"
        )


if __name__ == "__main__":
    main()
