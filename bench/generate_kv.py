"""KV-cache decoding vs full re-forward: time to generate N new tokens, greedy.

    python bench/generate_kv.py                      # the default model config, random weights
    python bench/generate_kv.py --ckpt outputs/…/export --new-tokens 64 --batch 1 8

Prints a table: tokens generated, ms with the cache, ms re-running the whole sequence each step,
and the speed-up. Both paths must produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.model.generate import generate  # noqa: E402
from vlm.model.projector import visual_token_count  # noqa: E402
from vlm.model.vlm import VLM  # noqa: E402

IMG, VID, EOS_NEVER = 400, 401, -1


def default_model() -> VLM:
    """The default `conf/model/tiny.yaml` shapes, random weights (speed does not depend on them)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp", "paths.data_dir=/tmp"])
    m = OmegaConf.to_container(cfg.model, resolve=True)
    from hydra.utils import instantiate

    m["decoder"]["vocab_size"] = 512
    return VLM(instantiate(m["encoder"]), instantiate(m["projector"]), instantiate(m["decoder"]), [IMG, VID]).eval()


def make_batch(model: VLM, batch: int, prompt_text: int) -> dict:
    enc = model.encoder
    grid = (1, 8, 8)
    n_vis = visual_token_count(grid, model.projector.merge_size)
    row = [1] * 3 + [IMG] * n_vis + [5] * prompt_text
    L = len(row)
    return {
        "input_ids": torch.tensor([row] * batch),
        "attention_mask": torch.ones(batch, L, dtype=torch.long),
        "position_ids": torch.arange(L).expand(batch, L).clone(),
        "pixel_patches": torch.randn(batch * 64, 3 * enc.patch_size**2),
        "grid_thw": torch.tensor([grid] * batch),
        "media_per_sample": torch.ones(batch, dtype=torch.long),
    }


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a .ckpt or export folder (default: the default config, random weights)")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-text", type=int, default=16, help="text tokens after the image")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        from vlm.checkpoint.load import load_checkpoint

        model = load_checkpoint(args.ckpt).model
    else:
        model = default_model()
    torch.manual_seed(0)
    print("| batch | prompt tokens | new tokens | KV cache ms | re-forward ms | speed-up | same tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for b in args.batch:
        batch = make_batch(model, b, args.prompt_text)
        for n in args.new_tokens:
            # EOS that never occurs: both paths generate exactly n tokens
            t_kv, out_kv = timed(lambda: generate(model, batch, n, [EOS_NEVER], suppress_ids=[IMG, VID]), args.repeat)
            t_full, out_full = timed(
                lambda: generate(model, batch, n, [EOS_NEVER], suppress_ids=[IMG, VID], use_cache=False), args.repeat
            )
            L = batch["input_ids"].shape[1]
            print(
                f"| {b} | {L} | {n} | {t_kv * 1e3:.0f} | {t_full * 1e3:.0f} | {t_full / t_kv:.1f}x | {out_kv == out_full} |"
            )


if __name__ == "__main__":
    main()
