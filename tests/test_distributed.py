"""Two processes on CPU (gloo), launched with torchrun like a user would:

- ddp and fsdp (FSDP2) train a few steps with the same losses and first-step gradient as one
  process on the combined batch (loss normalised by the step's global label tokens);
- the non-finite guard stops the step on every rank when only one rank sees a NaN;
- fsdp saves sharded (DCP) checkpoints that resume on 2 ranks (bit-identical losses) and on 1
  rank (the same losses within tolerance), and `python -m vlm.cli.export` consolidates them into the
  export folder that `load_checkpoint` reads.

The file is also the worker script (`python tests/test_distributed.py SPEC.json`). Batches are
fixed, uneven lists of real synthvqa samples, so every layout sees exactly the same data per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# per optimizer step: SAMPLES_PER_STEP samples split into world·accum uneven micro-batches
SAMPLES_PER_STEP = 8
GROUP_SIZES = {1: [8], 2: [3, 5], 4: [1, 3, 2, 2]}


# ---------------------------------------------------------------- shared helpers (also used in-process)
def fixed_samples(dm, n: int):
    """The first n training samples of the shards, in shard order (no shuffling)."""
    from vlm.data.sample import SampleTransform
    from vlm.data.tar_reader import ShardErrors
    from vlm.data.webdataset import ShardDataset

    proc = SampleTransform(dm.media_processor, dm.template, mode="train")
    ds = ShardDataset(dm.cfg["train_shards"], proc, train=False)
    out = []
    for raw in ds._raw(iter(ds.urls), ShardErrors()):  # every rank reads the same samples
        out.append(proc(raw))
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} samples")


def micro_batches(
    samples, step: int, world: int, accum: int, rank: int, pad_id: int, nan_step: int = -1, nan_rank: int = -1
):
    """The `accum` micro-batches of `rank` for optimizer step `step` (0-based)."""
    from vlm.data.collate import collate

    chunk = samples[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]
    sizes = GROUP_SIZES[world * accum]
    groups, o = [], 0
    for n in sizes:
        groups.append(chunk[o : o + n])
        o += n
    out = []
    for a in range(accum):
        b = collate(groups[rank * accum + a], pad_id, "right")
        if step == nan_step and rank == nan_rank:
            b["pixel_patches"] = torch.full_like(b["pixel_patches"], float("nan"))
        out.append(b)
    return out


class StepStream(torch.utils.data.IterableDataset):
    """Micro-batches from the trainer's current step on (so a resumed run continues the data)."""

    def __init__(self, samples, world, accum, rank, pad_id, steps, start_step=lambda: 0, nan_step=-1, nan_rank=-1):
        self.args = (samples, world, accum, rank, pad_id)
        self.steps, self.start_step, self.nan = steps, start_step, (nan_step, nan_rank)

    def __iter__(self):
        samples, world, accum, rank, pad_id = self.args
        for s in range(self.start_step(), self.steps):
            yield from micro_batches(samples, s, world, accum, rank, pad_id, *self.nan)


def tiny_module(out: Path, data_dir: Path, overrides=(), meta_init: bool = False):
    from tests.conftest import compose_train
    from vlm.training.datamodule import build_datamodule
    from vlm.training.train import build_module

    cfg = compose_train(["logger=none", *overrides], out, data_dir)
    import lightning as L

    L.seed_everything(0, workers=True)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return cfg, dm, build_module(cfg, dm, meta_init=meta_init)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Recorder(L.Callback):
    """Per step: the step loss, the parameters after the update; the first step's gradients
    (as the optimizer sees them: normalised and clipped)."""

    def __init__(self):
        self.losses, self.params, self.grads, self.skipped = {}, {}, None, {}
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step
        names = {id(p): n for n, p in pl_module.named_parameters()}

        def hook(opt, args, kwargs):
            if self.grads is None:
                self.grads = {
                    names[id(p)]: _full(p.grad).detach().clone()
                    for g in opt.param_groups
                    for p in g["params"]
                    if p.grad is not None
                }

        trainer.optimizers[0].register_step_post_hook(hook)  # grads are final (normalised, clipped) and still set

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        self._last = trainer.global_step
        st = pl_module.gradient_step.last.stats
        self.losses[trainer.global_step] = st["loss_sum"] / max(st["label_tokens"], 1)
        self.skipped[trainer.global_step] = pl_module.gradient_step.skipped_steps
        self.params[trainer.global_step] = torch.cat(
            [_full(p).detach().flatten().clone() for p in pl_module.parameters()]
        )


def train_fixed(spec: dict) -> dict:
    """One training run on fixed batches. spec: strategy, devices, accum, steps, out, data_dir,
    resume, ckpt_every, nan_step, nan_rank, on_nonfinite, save_full, export."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlm.training.callbacks import ExportCallback

    out, data_dir = Path(spec["out"]), Path(spec["data_dir"])
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"numerics.on_nonfinite={spec.get('on_nonfinite', 'skip')}"]
    rank = int(os.environ.get("RANK", 0))
    # parallel.init=rank0 as train.py does it: ranks other than 0 build a meta skeleton
    cfg, dm, module = tiny_module(out, data_dir, overrides, meta_init=bool(spec.get("meta_init")) and rank != 0)
    if spec.get("meta_init") and rank != 0:
        assert all(p.is_meta for p in module.parameters())
    world = spec.get("devices", 1) if spec.get("strategy", "single") != "single" else 1
    accum = spec.get("accum", 1)
    samples = fixed_samples(dm, SAMPLES_PER_STEP * spec["steps"])
    strategy = {"single": "auto", "ddp": "ddp"}.get(spec.get("strategy", "single"))
    if spec.get("strategy") == "fsdp":
        from vlm.training.parallel import FSDP2Strategy

        strategy = FSDP2Strategy()
    rec = Recorder()
    callbacks = [rec]
    if spec.get("ckpt_every"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt",
                filename="step{step}",
                every_n_train_steps=spec["ckpt_every"],
                save_top_k=-1,
                auto_insert_metric_name=False,
            )
        )
    if spec.get("export"):
        callbacks.append(ExportCallback(str(out / "export")))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=spec.get("devices", 1),
        strategy=strategy,
        max_steps=spec["steps"],
        accumulate_grad_batches=accum,
        precision=spec.get("precision", "32-true"),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=bool(spec.get("ckpt_every")),
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    stream = StepStream(
        samples,
        world,
        accum,
        rank,
        dm.tokenizer.pad_id,
        spec["steps"],
        lambda: trainer.global_step,
        spec.get("nan_step", -1),
        spec.get("nan_rank", -1),
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=spec.get("resume"))
    res = {"losses": {int(k): v for k, v in rec.losses.items()}, "skipped": rec.skipped}
    if trainer.is_global_zero:
        torch.save({"grads": rec.grads, "params": rec.params}, out / "tensors.pt")
    if spec.get("save_full"):
        from vlm.training.parallel import full_state_dict

        sd = full_state_dict(module.model)  # collective
        if trainer.is_global_zero:
            torch.save(sd, out / "full_state.pt")
    if trainer.is_global_zero:
        (out / "result.json").write_text(json.dumps(res))
    return res


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    for spec in json.loads(Path(spec_path).read_text()):
        train_fixed(spec)
    # Tear the process group down before the interpreter exits: a gloo thread still alive at exit
    # can abort the process ("terminate called without an active exception"), seen once in CI.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- tests
def _torchrun(specs: list[dict], tmp: Path, nproc: int) -> None:
    path = tmp / f"spec{len(list(tmp.glob('spec*.json')))}.json"
    path.write_text(json.dumps(specs))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(__file__)),
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def _result(d: Path):
    return json.loads((d / "result.json").read_text()), torch.load(d / "tensors.pt", weights_only=True)


def _losses(res) -> list[float]:
    return [res["losses"][k] for k in sorted(res["losses"], key=int)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_dir):
    """One process, one batch per step holding every sample of the step."""
    out = tmp_path_factory.mktemp("ref")
    train_fixed({"strategy": "single", "steps": 4, "accum": 1, "out": str(out), "data_dir": str(synth_dir)})
    return _result(out)


def _assert_grads_close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_ddp_matches_one_process_and_guards_nan_on_every_rank(reference, synth_dir, tmp_path):
    out = tmp_path / "ddp"
    spec = {
        "strategy": "ddp",
        "devices": 2,
        "accum": 2,
        "steps": 5,
        "out": str(out),
        "data_dir": str(synth_dir),
        "nan_step": 3,
        "nan_rank": 1,
    }
    # step 3 has a NaN image on rank 1 only; steps 0..2 must equal the single-process reference
    _torchrun([spec], tmp_path, 2)
    res, t = _result(out)
    ref, rt = reference
    _assert_grads_close(t["grads"], rt["grads"])
    torch.testing.assert_close(_losses(res)[:3], _losses(ref)[:3], rtol=1e-5, atol=1e-6)
    # the NaN step: loss non-finite, no update on any rank (rank 0 holds the same params: DDP), run goes on
    assert not torch.isfinite(torch.tensor(res["losses"]["4"]))
    assert torch.equal(t["params"][4], t["params"][3])
    assert res["skipped"]["4"] == 1 and torch.isfinite(torch.tensor(res["losses"]["5"]))
    assert not torch.equal(t["params"][5], t["params"][4])


def test_fsdp_matches_one_process_saves_resumes_and_exports(reference, synth_dir, tmp_path):
    from vlm.checkpoint.load import load_checkpoint
    from vlm.cli.export import main as export_main

    a, b, c = tmp_path / "fsdp", tmp_path / "resume2", tmp_path / "resume1"
    common = {"strategy": "fsdp", "steps": 4, "data_dir": str(synth_dir)}
    ck = str(a / "ckpt" / "step2.ckpt")
    _torchrun(
        [
            {
                **common,
                "devices": 2,
                "accum": 2,
                "out": str(a),
                "ckpt_every": 2,
                "save_full": True,
                "export": True,
                "meta_init": True,
            },  # rank 1 starts from a meta skeleton and receives rank 0's weights
            {**common, "devices": 2, "accum": 2, "out": str(b), "resume": ck},
        ],
        tmp_path,
        2,
    )
    _torchrun([{**common, "devices": 1, "accum": 1, "out": str(c), "resume": ck}], tmp_path, 1)
    res, t = _result(a)
    ref, rt = reference
    # 1. two sharded ranks == one process on the combined batch
    _assert_grads_close(t["grads"], rt["grads"])
    torch.testing.assert_close(_losses(res), _losses(ref), rtol=1e-4, atol=1e-5)
    assert (a / "ckpt" / "step2.ckpt" / "meta.pt").is_file() and list((a / "ckpt" / "step2.ckpt").glob("*.distcp"))
    # 2. resume on 2 ranks: bit-identical continuation; on 1 rank: same losses within tolerance
    r2, _ = _result(b)
    assert _losses(r2) == _losses(res)[2:]
    r1, _ = _result(c)
    torch.testing.assert_close(_losses(r1), _losses(res)[2:], rtol=1e-4, atol=1e-5)
    # 3. consolidation: the export folder holds exactly the trained weights, and infer's loader reads it
    full = torch.load(a / "full_state.pt", weights_only=True)
    assert export_main([f"ckpt={a / 'ckpt' / 'step4.ckpt'}", f"out={tmp_path / 'export'}"]) == 0
    for folder in (
        tmp_path / "export",
        a / "export",
    ):  # `python -m vlm.cli.export`, and the end-of-training export
        loaded = load_checkpoint(folder)
        sd = loaded.model.state_dict()
        for k, v in full.items():
            assert torch.equal(sd[k], v), k


if __name__ == "__main__":
    main(sys.argv[1])
