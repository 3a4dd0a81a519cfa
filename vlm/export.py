"""`python -m vlm.export ckpt=PATH out=DIR [format=vlm|hf_qwen2vl|hf_llava]`: a checkpoint -> a folder.

`format=vlm` (default) writes our export folder; `hf_qwen2vl` / `hf_llava` write a Hugging Face
layout (`vlm.hf_export`) that transformers and serving engines load, when the model's architecture
is that family's (e.g. trained from `model=qwen2vl` or `model=llava`).

`ckpt` is a sharded (DCP) checkpoint directory written by `trainer=fsdp` (`*.distcp` files plus
`meta.pt`) or a Lightning `.ckpt` file. The shards are read on one process, whatever the number
of ranks that wrote them, and consolidated into `config.yaml` + `model.safetensors` +
`tokenizer.json` (`vlm.checkpoint.export_folder`), which `infer.py` loads.

Only tensors and plain containers are read (`weights_only=True`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from vlm.checkpoint import CheckpointError, ExportCallback, export_folder

log = logging.getLogger("vlm.export")
META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META).is_file()


def load_training_checkpoint(path: str | Path):
    """(VLM with the checkpoint's weights, tokenizer, hparams) from a sharded dir or a `.ckpt`."""
    from vlm.build import build_model
    from vlm.tokenizer import TextTokenizer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    sharded = is_sharded_checkpoint(p)
    if not sharded and p.is_dir():
        raise CheckpointError(f"{p} is a directory but not a sharded checkpoint (no {META})")
    try:
        meta = torch.load(p / META if sharded else p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    hp = meta.get("hyper_parameters") if isinstance(meta, dict) else None
    if not hp or "tokenizer_json" not in hp:
        raise CheckpointError(f"{p} is not a vlm training checkpoint (no hyper_parameters)")
    tokenizer = TextTokenizer.from_str(hp["tokenizer_json"])
    model = build_model(hp["model"], tokenizer)
    target = model.state_dict()
    if sharded:
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(str(p))
        stored = reader.read_metadata().state_dict_metadata
        want = {k: v for k, v in target.items() if f"state_dict.model.{k}" in stored}
        missing = sorted(set(target) - set(want) - {"decoder.lm_head.weight"})
        if missing:
            raise CheckpointError(f"{p}: weights do not fit the config (missing {missing[:5]})")
        state = {"state_dict": {f"model.{k}": v for k, v in want.items()}}
        dcp.load(state, storage_reader=reader, no_dist=True)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=False)
    else:
        sd = {k.removeprefix("model."): v for k, v in meta["state_dict"].items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "decoder.lm_head.weight"]
        if missing or unexpected:
            raise CheckpointError(f"{p}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model, tokenizer, hp


def export(ckpt: str | Path, out: str | Path, fmt: str = "vlm") -> Path:
    if fmt != "vlm":
        from vlm.hf_export import export_hf

        if Path(ckpt).is_dir() and not is_sharded_checkpoint(ckpt):  # our export folder
            from vlm.checkpoint import load_checkpoint

            loaded = load_checkpoint(ckpt)
            return export_hf(loaded.model, loaded.tokenizer, out, fmt)
        model, tokenizer, _ = load_training_checkpoint(ckpt)
        return export_hf(model, tokenizer, out, fmt)
    model, tokenizer, hp = load_training_checkpoint(ckpt)
    return export_folder(model, tokenizer, dict(hp), out)


class ShardedExportCallback(ExportCallback):
    """`ExportCallback` for a sharded (FSDP2) model: every rank takes part in gathering the full
    weights, rank 0 writes the export folder. `VLMModule.configure_callbacks` swaps it in."""

    def on_train_end(self, trainer, pl_module) -> None:
        from vlm.build import build_model
        from vlm.parallel import full_state_dict

        state = full_state_dict(pl_module.model)  # collective
        if trainer.is_global_zero:
            model = build_model(pl_module.hparams["model"], pl_module.tokenizer)
            model.load_state_dict(state, strict=False)
            out = export_folder(model, pl_module.tokenizer, dict(pl_module.hparams), self.out_dir)
            log.info("exported model to %s", out)
            print(f"exported model to {out}")
        trainer.strategy.barrier("export")


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    extra = [a for a in argv if "=" not in a] + sorted(set(args) - {"ckpt", "out", "format"})
    if extra or "ckpt" not in args or "out" not in args:
        print("usage: python -m vlm.export ckpt=CHECKPOINT out=EXPORT_DIR [format=vlm|hf_qwen2vl|hf_llava]", file=sys.stderr)
        return 2
    try:
        out = export(args["ckpt"], args["out"], args.get("format", "vlm"))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args['ckpt']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
