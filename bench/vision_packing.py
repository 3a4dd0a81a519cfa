"""Vision encoder on a batch of mixed-size images: packed (no padding) vs padded to the largest.

    python bench/vision_packing.py [--scenario photos|synth] [--batch 16] [--repeat 3] [--device cpu]

Images get dynamic-resolution grids (``ImageProcessor(resolution="dynamic")``: aspect ratio kept,
sides multiples of patch*merge, pixels within the caps); the patches are random (speed does not
depend on pixel values). Rows:

``packed``      the project's ``VisionEncoder(patches, grid_thw)``: all patches in one sequence,
                items grouped by patch count, each group one dense batch -- exactly block-diagonal
                attention, no padding token anywhere.
``pad-seq``     every item's token sequence padded to the longest one, one ``[B, n_max, D]`` batch
                with a key-padding mask (built from the encoder's own modules; its outputs on the
                real tokens must equal ``packed`` -- checked and printed as ``max|diff|``).
``pad-grid``    every image padded (zero patches, bottom/right) to the largest ``h_max x w_max``
                grid and run through ``VisionEncoder`` as equal-size images: the classic "pad the
                image batch" baseline (padding is attended to, so outputs differ; cost only).
``blockmask``   (``--blockmask``) one sequence of all patches with a dense ``[N, N]``
                block-diagonal mask: no padding tokens, but quadratic attention over the batch.

Prints tokens per batch (real vs processed), padding share, and milliseconds per batch (median of
``--repeat`` after a warm-up).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.processor import ImageProcessor
from vlm.model.vision import VisionEncoder


def scenario_sizes(name: str, batch: int, gen: torch.Generator) -> tuple[list[tuple[int, int]], dict]:
    """(W, H) pixel sizes and the processor settings of a scenario."""
    if name == "photos":  # photos and documents of any shape, Qwen2-VL-like caps at patch 14
        proc = dict(patch_size=14, merge_size=2, min_pixels=4 * 28 * 28, max_pixels=512 * 28 * 28)
        sizes = [
            (int(torch.randint(112, 1200, (1,), generator=gen)), int(torch.randint(112, 1200, (1,), generator=gen)))
            for _ in range(batch)
        ]
        return sizes, proc
    if name == "synth":  # a synthvqa v1+v2 batch at patch 8: 64x64 scenes, some 512x64 text strips
        proc = dict(patch_size=8, merge_size=1, min_pixels=64, max_pixels=64 * 64 * 4)
        sizes = [(512, 64) if i % 8 == 0 else (64, 64) for i in range(batch)]
        return sizes, proc
    raise ValueError(f"unknown scenario {name!r}")


@torch.inference_mode()
def forward_padded_masked(enc: VisionEncoder, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """Pad every item's token sequence to the longest, run one masked batch; return the real tokens
    packed back in order ``[N, D]``. Uses the encoder's modules, so it measures the same math."""
    sizes = [t * h * w for t, h, w in grids]
    n_max, B = max(sizes), len(sizes)
    x = enc.patch_embed(patches) + torch.cat([enc.position_embedding(*g) for g in grids]).to(patches.dtype)
    xb = x.new_zeros(B, n_max, x.shape[-1])
    valid = torch.zeros(B, n_max, dtype=torch.bool, device=x.device)
    for i, chunk in enumerate(torch.split(x, sizes)):
        xb[i, : sizes[i]] = chunk
        valid[i, : sizes[i]] = True
    mask = valid[:, None, None, :]  # keys: True = may attend
    for blk in enc.blocks:
        a = blk.attn
        hN = blk.norm1(xb)
        q = a.q_proj(hN).view(B, n_max, a.n_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(hN).view(B, n_max, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(hN).view(B, n_max, a.n_kv_heads, a.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        xb = xb + a.o_proj(o.transpose(1, 2).reshape(B, n_max, -1))
        xb = xb + blk.mlp(blk.norm2(xb))
    xb = enc.norm(xb)
    return xb[valid]


@torch.inference_mode()
def forward_blockmask(enc: VisionEncoder, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    sizes = [t * h * w for t, h, w in grids]
    x = (enc.patch_embed(patches) + torch.cat([enc.position_embedding(*g) for g in grids]).to(patches.dtype))[None]
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), torch.tensor(sizes, device=x.device))
    mask = (seg[:, None] == seg[None, :])[None, None]
    for blk in enc.blocks:
        a, L = blk.attn, x.shape[1]
        hN = blk.norm1(x)
        q = a.q_proj(hN).view(1, L, a.n_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(hN).view(1, L, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(hN).view(1, L, a.n_kv_heads, a.head_dim).transpose(1, 2)
        x = x + a.o_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, L, -1))
        x = x + blk.mlp(blk.norm2(x))
    return enc.norm(x)[0]


def pad_to_grid(patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ``[h*w, D]`` patches placed top-left in a zero ``[h_max, w_max]`` grid."""
    h_max, w_max = max(g[1] for g in grids), max(g[2] for g in grids)
    out = []
    for chunk, (_, h, w) in zip(torch.split(patches, [t * h * w for t, h, w in grids]), grids):
        canvas = patches.new_zeros(h_max, w_max, patches.shape[-1])
        canvas[:h, :w] = chunk.view(h, w, -1)
        out.append(canvas.view(h_max * w_max, -1))
    return torch.cat(out), torch.tensor([[1, h_max, w_max]] * len(grids))


def timed(fns: list, repeat: int, device: str) -> list[float]:
    """Median ms of each function; runs are interleaved (round-robin) so a noisy machine slows
    every mode alike."""

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns:  # warm-up
        fn()
    sync()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            ts[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in ts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="photos", choices=["photos", "synth"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--blockmask", action="store_true", help="also time one sequence with a dense block-diagonal mask")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    gen = torch.Generator().manual_seed(args.seed)

    sizes, proc_kw = scenario_sizes(args.scenario, args.batch, gen)
    proc = ImageProcessor(resolution="dynamic", **proc_kw)
    grids = [proc.grid_for(h, w) for w, h in sizes]
    P = proc.patch_size
    n = [t * h * w for t, h, w in grids]
    patches = torch.randn(sum(n), 3 * P * P, generator=gen).to(args.device, dtype)
    grid_thw = torch.tensor(grids)
    enc = (
        VisionEncoder(patch_size=P, dim=args.dim, n_layers=args.layers, n_heads=args.heads)
        .to(args.device, dtype)
        .eval()
    )
    grid_patches, grid_grid = pad_to_grid(patches, grids)

    print(
        f"# vision_packing: scenario {args.scenario}, batch {args.batch}, encoder dim {args.dim} x {args.layers} layers "
        f"({args.heads} heads), patch {P}, {args.device} {dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}"
    )
    print(f"# grids (h, w): {', '.join(f'{h}x{w}' for _, h, w in grids)}")
    print(f"# distinct patch counts (packed groups): {len(set(n))}")

    with torch.inference_mode():
        ref = enc(patches, grid_thw)
        diff = (forward_padded_masked(enc, patches, grids) - ref).abs().max().item()
        rows = [
            ("packed", sum(n), lambda: enc(patches, grid_thw), "0"),
            ("pad-seq", len(n) * max(n), lambda: forward_padded_masked(enc, patches, grids), f"{diff:.1e}"),
            ("pad-grid", grid_patches.shape[0], lambda: enc(grid_patches, grid_grid), "n/a (pads attended)"),
        ]
        if args.blockmask:
            bdiff = (forward_blockmask(enc, patches, grids) - ref).abs().max().item()
            rows.append(("blockmask", sum(n), lambda: forward_blockmask(enc, patches, grids), f"{bdiff:.1e}"))
        real = sum(n)
        print(
            f"{'mode':<10} {'tokens':>8} {'real':>7} {'padding':>8} {'ms/batch':>9} {'vs packed':>9}  max|diff| vs packed"
        )
        times = timed([r[2] for r in rows], args.repeat, args.device)
        base = times[0]
        for (name, tokens, _, d), ms in zip(rows, times):
            print(
                f"{name:<10} {tokens:>8} {real:>7} {100 * (tokens - real) / tokens:>7.1f}% {ms:>9.1f} {ms / base:>8.2f}x  {d}"
            )


if __name__ == "__main__":
    main()
