"""Training throughput and MFU: model sizes x strategies, through the real Trainer and module.

    python bench/train_throughput.py                                   # CPU: tiny + 25m, single/ddp/fsdp
    python bench/train_throughput.py --sizes tiny --strategies single --profile
    python bench/train_throughput.py --device cuda --sizes 0.5b --strategies fsdp --compile
    python bench/train_throughput.py --device cuda --devices 8 --sizes 25m,0.5b --strategies ddp,fsdp --compile

Every cell is a fresh process (torchrun with `--devices` processes for ddp / fsdp) that trains the
`VLMModule` built from the real Hydra config (model size overrides below) with Lightning on a
fixed synthetic batch (random patches and tokens in the synthvqa layout: one image per sample,
visual tokens first, the last `labels` tokens supervised), so data loading is not measured. After
`--warmup` steps it reports the median over `--steps` steps of what `vlm.training.callbacks.Throughput`
logs in training: samples/s, text and image tokens/s (all ranks), achieved model TFLOP/s per
device and MFU against the device peak (table for known GPUs; on CPU a bf16 / fp32 GEMM measured
by each process at start-up, or `--peak-tflops`). On CPU, ddp / fsdp processes share the cores
(threads per process = cores / processes), so their MFU is against a per-process peak measured
under the same sharing.

`--profile` (single strategy) prints the top operators of a few profiled steps: where the time
that is not model FLOPs goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (model overrides on conf/model/tiny.yaml, image px, text tokens / sample, label tokens / sample,
#          per-device batch on cpu, per-device batch on cuda)
SIZES: dict[str, dict] = {
    "tiny": dict(overrides=[], image=64, text=48, labels=12, batch_cpu=16, batch_cuda=128),
    "25m": dict(
        overrides=[
            "model.encoder.dim=256",
            "model.encoder.n_layers=6",
            "model.encoder.n_heads=4",
            "model.encoder.pos_grid=14",
            "model.projector.merge_size=2",
            "model.decoder.dim=512",
            "model.decoder.n_layers=6",
            "model.decoder.n_heads=8",
            "model.decoder.n_kv_heads=4",
        ],
        image=112,
        text=128,
        labels=32,
        batch_cpu=8,
        batch_cuda=64,
    ),
    "0.5b": dict(
        overrides=[
            "model.encoder.dim=768",
            "model.encoder.n_layers=12",
            "model.encoder.n_heads=12",
            "model.encoder.patch_size=14",
            "model.encoder.patch_embed=linear",
            "model.encoder.pos_grid=16",
            "model.projector.merge_size=2",
            "model.decoder.dim=1280",
            "model.decoder.n_layers=24",
            "model.decoder.n_heads=20",
            "model.decoder.n_kv_heads=4",
            "model.decoder.vocab_size=32000",
            "model.decoder.max_seq_len=1024",
        ],
        image=224,
        text=448,
        labels=128,
        batch_cpu=1,
        batch_cuda=16,
    ),
}


# ------------------------------------------------------------------------------------------ a cell
def _tokenizer():
    from vlm.tokenizer import train_tokenizer

    words = [
        "what",
        "color",
        "is",
        "the",
        "shape",
        "circle",
        "square",
        "triangle",
        "red",
        "green",
        "blue",
        "how",
        "many",
        "left",
        "right",
        "of",
        "yes",
        "no",
    ]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    return train_tokenizer(texts, vocab_size=512, min_frequency=1)


def _config(size: str, cell: dict):
    from hydra import compose, initialize_config_dir

    over = [
        f"paths.output_dir={cell['tmp']}",
        f"paths.data_dir={cell['tmp']}",
        "logger=none",
        f"parallel.ac={cell['ac']}",
        f"parallel.compile={str(cell['compile']).lower()}",
        *SIZES[size]["overrides"],
        *cell.get("overrides", []),
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


def _batch(tok, size: str, model_cfg, batch: int):
    import torch

    spec = SIZES[size]
    P, m = model_cfg.encoder.patch_size, model_cfg.projector.merge_size
    side = spec["image"] // P
    n_vis = (side // m) ** 2
    L = n_vis + spec["text"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, tok.vocab_size, (batch, L), generator=g)
    ids[:, 4 : 4 + n_vis] = tok.image_pad_id
    ids[ids == tok.video_pad_id] = 10
    labels = torch.full_like(ids, -100)
    labels[:, -spec["labels"] :] = ids[:, -spec["labels"] :]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(L).expand(batch, L).clone(),
        "pixel_patches": torch.randn(batch * side * side, 3 * P * P, generator=g),
        "grid_thw": torch.tensor([[1, side, side]] * batch),
        "media_per_sample": torch.ones(batch, dtype=torch.long),
        "keys": [f"s{i}" for i in range(batch)],
        "skipped": {},
    }


def build(size: str, cell: dict, batch: int):
    """The `VLMModule` of one size (Hydra config + `cell` options) and its fixed synthetic batch."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vlm.training.module import VLMModule

    cfg = _config(size, cell)
    tok = _tokenizer()
    module = VLMModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        tokenizer_json=tok.to_str(),
        processor={
            "patch_size": cfg.model.encoder.patch_size,
            "merge_size": cfg.model.projector.merge_size,
            "resolution": "fixed",
            "image_size": SIZES[size]["image"],
        },
        template={"max_length": 4096, "rope": "rope", "merge_size": cfg.model.projector.merge_size},
        optimizer=instantiate(cfg.optimizer),
        scheduler=None,
        parallel=OmegaConf.to_container(cfg.parallel, resolve=True),
        numerics=OmegaConf.to_container(cfg.numerics, resolve=True),
    )
    return module, _batch(tok, size, cfg.model, batch)


def run_cell(cell: dict) -> None:
    import lightning as L
    import torch

    from vlm.training.callbacks import Throughput

    world = int(os.environ.get("WORLD_SIZE", 1))
    if cell["device"] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    size = cell["size"]
    L.seed_everything(0)
    module, batch = build(size, cell, cell["batch"])
    n_params = sum(p.numel() for p in module.model.parameters())

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    strategy = "auto"
    if cell["strategy"] == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(broadcast_buffers=False, gradient_as_bucket_view=True)
    elif cell["strategy"] == "fsdp":
        from vlm.training.parallel import FSDP2Strategy

        strategy = FSDP2Strategy()
    thr = Throughput(peak_tflops=cell.get("peak_tflops"), measure_seconds=cell.get("measure_seconds", 2.0))
    steps = cell["warmup"] + cell["steps"]
    trainer = L.Trainer(
        accelerator=cell["device"],
        devices=world if cell["strategy"] != "single" else 1,
        strategy=strategy,
        precision=cell["precision"],
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[thr],
        use_distributed_sampler=False,
        default_root_dir=cell["tmp"],
    )
    prof = None
    if cell.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cell["device"] == "cuda" else [])
        prof = profile(activities=acts)

        class Profile(L.Callback):  # the measured steps only
            def on_train_batch_start(self, trainer, *a):
                if trainer.global_step == cell["warmup"] and not getattr(self, "on", False):
                    self.on = True
                    prof.__enter__()

            def on_train_end(self, *a):
                if getattr(self, "on", False):
                    prof.__exit__(None, None, None)

        trainer.callbacks.append(Profile())
    if cell["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    rows = thr.history[cell["warmup"] :]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "step"}
    res = {
        **{k: cell[k] for k in ("size", "strategy", "precision", "compile", "ac", "batch", "device")},
        "world": world,
        "params": n_params,
        "trainable": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "seq": int(batch["input_ids"].shape[1]),
        "peak_tflops": thr.peak_tflops,
        "peak_source": getattr(thr, "peak_source", "set"),
        "gpu": torch.cuda.get_device_name() if cell["device"] == "cuda" else None,
        "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cell["device"] == "cuda" else None,
        **med,
    }
    if prof is not None and trainer.is_global_zero:
        key = "self_cuda_time_total" if cell["device"] == "cuda" else "self_cpu_time_total"
        res["profile"] = prof.key_averages().table(sort_by=key, row_limit=25)
    if trainer.is_global_zero:
        Path(cell["result"]).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=None, help=f"comma list of {list(SIZES)} (default: tiny,25m on cpu; tiny,25m,0.5b on cuda)"
    )
    ap.add_argument("--strategies", default="single,ddp,fsdp")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--devices", type=int, default=None, help="processes for ddp/fsdp (default: 2 on cpu, all GPUs on cuda)"
    )
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--ac", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: per size and device)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 10 on cuda, 4 on cpu)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unmeasured steps first (default 5 on cuda, 2 on cpu; more with --compile)",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak per process (default: table / measured GEMM)"
    )
    ap.add_argument(
        "--measure-seconds", type=float, default=2.0, help="duration of the start-up GEMM that measures a CPU's peak"
    )
    ap.add_argument(
        "--profile", action="store_true", help="profile the single-strategy cells and print the top operators"
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for every cell (repeatable), e.g. +optimizer.fused=true",
    )
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        run_cell(json.loads(Path(a.cell).read_text()))
        return
    import torch

    cuda = a.device == "cuda"
    sizes = (a.sizes or ("tiny,25m,0.5b" if cuda else "tiny,25m")).split(",")
    if bad := [s for s in sizes if s not in SIZES]:
        raise SystemExit(f"--sizes: unknown {bad}; choose from {list(SIZES)}")
    if bad := [s for s in a.strategies.split(",") if s not in ("single", "ddp", "fsdp")]:
        raise SystemExit(f"--strategies: unknown {bad}; choose from ['single', 'ddp', 'fsdp']")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine (use --device cpu)")
    devices = a.devices or (torch.cuda.device_count() if cuda else 2)
    steps = a.steps or (10 if cuda else 4)
    warmup = a.warmup if a.warmup is not None else ((10 if a.compile else 5) if cuda else 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for strategy in a.strategies.split(","):
                cell = dict(
                    size=size,
                    strategy=strategy,
                    device=a.device,
                    precision=a.precision,
                    compile=a.compile,
                    ac=a.ac,
                    batch=a.batch or SIZES[size]["batch_cuda" if cuda else "batch_cpu"],
                    steps=steps,
                    warmup=warmup,
                    peak_tflops=a.peak_tflops,
                    measure_seconds=a.measure_seconds,
                    overrides=a.override,
                    profile=a.profile and strategy == "single",
                    tmp=tmp,
                    result=str(Path(tmp) / f"{size}-{strategy}.json"),
                )
                spec = Path(tmp) / f"{size}-{strategy}-cell.json"
                spec.write_text(json.dumps(cell))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", str(spec)]
                n = 1 if strategy == "single" else devices
                if n > 1:
                    cmd = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc_per_node={n}",
                        *cmd[1:],
                    ]
                t0 = time.perf_counter()
                env = {
                    **os.environ,
                    "WANDB_MODE": "disabled",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                }
                if not cuda:
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if r.returncode != 0 or not Path(cell["result"]).is_file():
                    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                    print(f"[{size} {strategy}] failed ({r.returncode}): {' | '.join(tail)}", file=sys.stderr)
                    continue
                res = json.loads(Path(cell["result"]).read_text())
                res["wall_s"] = time.perf_counter() - t0
                results.append(res)
                print(f"[{size} {strategy}] done in {res['wall_s']:.0f}s", file=sys.stderr)
                if res.get("profile"):
                    print(
                        f"\nprofile: {size} {strategy} ({a.precision}, {res['batch']}x{res['seq']} tokens)\n{res['profile']}"
                    )
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in results], indent=1))


def print_table(results: list[dict]) -> None:
    if not results:
        return
    r0 = results[0]
    dev = r0["gpu"] or f"cpu ({os.cpu_count()} cores)"
    print(f"\ndevice: {dev}; precision {r0['precision']}; compile {r0['compile']}; activation checkpointing {r0['ac']}")
    head = (
        "| size | params | strategy | procs | batch/dev x seq | step s | samples/s | text tok/s | image tok/s "
        "| TFLOP/s/dev | peak TFLOP/s/dev | MFU |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        peak = f"{r['peak_tflops']:.3g} ({'measured' if r['peak_source'].startswith('measured') else r['peak_source']})"
        mem = f", {r['max_mem_gb']:.1f} GiB" if r.get("max_mem_gb") else ""
        print(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['strategy']} | {r['world']} | {r['batch']}x{r['seq']} "
            f"| {r['train/step_s']:.3f}{mem} | {r['train/samples_s']:.1f} | {r['train/text_tok_s']:.0f} | {r['train/image_tok_s']:.0f} "
            f"| {r['train/tflops']:.3f} | {peak} | {100 * r['train/mfu']:.1f}% |"
        )


if __name__ == "__main__":
    main()
