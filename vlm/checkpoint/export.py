"""`python -m vlm.checkpoint.export ckpt=PATH out=DIR [format=vlm|hf_qwen2vl|hf_llava]`: a checkpoint -> a folder.

`format=vlm` (default) writes our export folder; `hf_qwen2vl` / `hf_llava` write a Hugging Face
layout (`vlm.checkpoint.hf_export`) that transformers and serving engines load, when the model's architecture
is that family's (e.g. trained from `model=qwen2vl` or `model=llava`).

`ckpt` is a sharded (DCP) checkpoint directory written by `trainer=fsdp` (`*.distcp` files plus
`meta.pt`) or a Lightning `.ckpt` file. The shards are read on one process, whatever the number
of ranks that wrote them, and consolidated into `config.yaml` + `model.safetensors` +
`tokenizer.json` (`vlm.checkpoint.load.export_folder`), which `infer.py` loads.

Only tensors and plain containers are read (`weights_only=True`); the checkpoint's config builds
only registered native classes and its tensors are checked against them before they are read
(see `vlm.checkpoint.load`). A sharded checkpoint's `.metadata` pickle is read by a restricted
unpickler that admits only torch.distributed.checkpoint's own metadata classes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from vlm.checkpoint.dcp import safe_dcp_reader
from vlm.checkpoint.files import one_line, read_torch_file
from vlm.checkpoint.load import (
    CheckpointError,
    build_checked,
    checkpoint_hparams,
    export_folder,
    read_lightning_checkpoint,
)

log = logging.getLogger("vlm.checkpoint.export")
META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META).is_file()


def load_training_checkpoint(path: str | Path):
    """(VLM with the checkpoint's weights, tokenizer, hparams) from a sharded dir or a `.ckpt`.

    Both are untrusted: the config goes through `vlm.checkpoint.load.build_checked` (registered native
    classes only, every argument checked, the stored tensors' names and shapes against the model
    before anything is read), a `.ckpt` and `meta.pt` through `torch.load(weights_only=True)`, and a
    sharded checkpoint's pickled `.metadata` through a restricted unpickler (`safe_dcp_reader`)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    sharded = is_sharded_checkpoint(p)
    if not sharded and p.is_dir():
        raise CheckpointError(f"{p} is a directory but not a sharded checkpoint (no {META})")
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = read_torch_file(p / META)
        hp = meta.get("hyper_parameters") if isinstance(meta, dict) else None
        if hp is None:
            raise CheckpointError(f"{p} is not a vlm training checkpoint (no hyper_parameters in {META})")
        config, tokenizer = checkpoint_hparams(hp, p / META)
        reader = safe_dcp_reader(p)
        stored = reader.read_metadata().state_dict_metadata
        prefix = "state_dict.model."
        found = {
            k.removeprefix(prefix): tuple(v.size)
            for k, v in stored.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
        }
        loaded = build_checked(config, tokenizer, f"checkpoint config {p / META} (hyper_parameters)", found, str(p))
        model = loaded.model
        target = model.state_dict()
        want = {k: v for k, v in target.items() if k in found}
        state = {"state_dict": {f"model.{k}": v for k, v in want.items()}}
        try:
            dcp.load(state, storage_reader=reader, no_dist=True)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged shard
            raise CheckpointError(f"{p}: cannot read the shards ({one_line(e, 200)})") from None
        model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=False)
    else:
        sd, config, tokenizer, hp = read_lightning_checkpoint(p)
        loaded = build_checked(
            config,
            tokenizer,
            f"checkpoint config {p} (hyper_parameters)",
            {k: tuple(v.shape) for k, v in sd.items()},
            str(p),
        )
        model = loaded.model
        model.load_state_dict(sd, strict=False)  # every key checked above
    model.eval()
    return model, tokenizer, hp


def export(ckpt: str | Path, out: str | Path, fmt: str = "vlm") -> Path:
    if fmt != "vlm":
        from vlm.checkpoint.hf_export import export_hf

        if Path(ckpt).is_dir() and not is_sharded_checkpoint(ckpt):  # our export folder
            from vlm.checkpoint.load import load_checkpoint

            loaded = load_checkpoint(ckpt)
            return export_hf(loaded.model, loaded.tokenizer, out, fmt)
        model, tokenizer, _ = load_training_checkpoint(ckpt)
        return export_hf(model, tokenizer, out, fmt)
    model, tokenizer, hp = load_training_checkpoint(ckpt)
    return export_folder(model, tokenizer, dict(hp), out)


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    extra = [a for a in argv if "=" not in a] + sorted(set(args) - {"ckpt", "out", "format"})
    if extra or "ckpt" not in args or "out" not in args:
        print(
            "usage: python -m vlm.checkpoint.export ckpt=CHECKPOINT out=EXPORT_DIR [format=vlm|hf_qwen2vl|hf_llava]",
            file=sys.stderr,
        )
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
