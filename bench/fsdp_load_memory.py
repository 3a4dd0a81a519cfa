"""Peak memory per rank when FSDP starts from a pretrained decoder: `parallel.init=rank0` vs `all_ranks`.

    python bench/fsdp_load_memory.py                      # ~0.2B Llama-layout decoder, 2 CPU ranks
    python bench/fsdp_load_memory.py --layers 16 --dim 1536

The script writes a random Llama-layout folder with `transformers` (config.json + safetensors), then
for each init mode runs `vlm.training.train.run` (the code path of `python train.py trainer=fsdp …`) under
torchrun with 2 processes for one step, and prints each rank's peak resident memory (ru_maxrss)
when training starts (model built, loaded and sharded) and after the step.
With `rank0`, rank 1 builds a meta skeleton and receives only its shards, so its peak stays near
the sharded size; with `all_ranks` every rank builds the whole model first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakAtStart:
    """A callback: this rank's peak RSS when training starts (model built, loaded and sharded)."""

    def __new__(cls, out: str):
        import lightning as L

        class _Cb(L.Callback):
            def on_train_start(self, trainer, pl_module):
                rank = int(os.environ.get("RANK", 0))
                peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                (Path(out) / f"start{rank}.json").write_text(json.dumps({"peak_mb": peak_mb}))

        return _Cb()


def worker(spec_path: str) -> None:
    """One rank: compose the training config and run one step; write this rank's peak RSS."""
    import torch
    from hydra import compose, initialize_config_dir

    from vlm.training.train import run

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=spec["overrides"])
    run(cfg)
    rank = int(os.environ.get("RANK", 0))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak_mb}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix="fsdp_load_"))
    folder = tmp / "llama"
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=int(2.75 * args.dim),
        num_hidden_layers=args.layers,
        num_attention_heads=args.dim // 64,
        num_key_value_heads=max(1, args.dim // 256),
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    data = tmp / "data"
    rows = []
    for mode in ("rank0", "all_ranks"):
        out = tmp / mode
        out.mkdir()
        overrides = [
            f"paths.output_dir={out}",
            f"paths.data_dir={data}",
            "logger=none",
            "model/decoder=llama",
            f"model.decoder.pretrained={folder}",
            "model.encoder.dim=64",
            "model.encoder.n_layers=1",
            "data.synthetic.train_samples=64",
            "data.synthetic.heldout_samples=16",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.val_num_workers=0",
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_steps=1",
            "+callbacks.peak._target_=bench.fsdp_load_memory.PeakAtStart",
            f"+callbacks.peak.out={out}",
            "trainer.limit_val_batches=0",
            "trainer.precision=32-true",
            "callbacks.model_checkpoint.monitor=null",
            "~callbacks.export",
            "~callbacks.model_checkpoint",
            f"parallel.init={mode}",
            "model.freeze.decoder=true",
        ]
        spec = tmp / f"{mode}.json"
        spec.write_text(json.dumps({"overrides": overrides, "out": str(out)}))
        # glibc: return every large free to the OS at once, so ru_maxrss is the real high-water mark
        env = {
            **os.environ,
            "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "MALLOC_MMAP_THRESHOLD_": "1048576",
        }
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--worker",
                str(spec),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode:
            sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
        peaks = [
            json.loads((out / f"{what}{i}.json").read_text())["peak_mb"] for what in ("start", "rank") for i in range(2)
        ]
        rows.append((mode, *peaks))
    size_mb = n_params * 4 / 2**20
    print(f"\ndecoder: {n_params / 1e6:.0f}M parameters, {size_mb:.0f} MB in fp32 (safetensors folder {folder})\n")
    print(
        "peak resident memory per rank (MB): after building, loading and sharding (training starts), and after one step"
    )
    print("| parallel.init | rank 0 at start | rank 1 at start | rank 0 after a step | rank 1 after a step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, *peaks in rows:
        print(f"| {mode} | " + " | ".join(f"{x:.0f}" for x in peaks) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
