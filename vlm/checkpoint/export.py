"""A training checkpoint -> a folder (`python -m vlm.cli.export ckpt=PATH out=DIR [format=…]`).

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
from pathlib import Path

from vlm.checkpoint.load import export_folder, is_sharded_checkpoint, load_checkpoint

log = logging.getLogger("vlm.checkpoint.export")

__all__ = ["export", "is_sharded_checkpoint"]


def export(ckpt: str | Path, out: str | Path, fmt: str = "vlm", merge_adapters: bool = True) -> Path:
    """Write checkpoint `ckpt` (export folder, `.ckpt` or sharded directory: `load_checkpoint`)
    as an export folder (`fmt="vlm"`) or a Hugging Face layout (`hf_qwen2vl`, `hf_llava`), or its
    adapters alone (`peft_adapter`: `vlm.checkpoint.adapters`). A model with adapters is written
    with them folded into its weights (`merge_adapters`), or as the base without them."""
    loaded = load_checkpoint(ckpt)
    if fmt == "peft_adapter":
        from vlm.checkpoint.adapters import export_adapter

        return export_adapter(loaded, out)
    if loaded.model.lora is not None:
        from vlm.checkpoint.adapters import without_adapters

        loaded = without_adapters(loaded, merge=merge_adapters)
    if fmt != "vlm":
        from vlm.checkpoint.hf_export import export_hf

        return export_hf(loaded, out, fmt)
    return export_folder(loaded.model, loaded.tokenizer, loaded.config, out)


if __name__ == "__main__":  # the command is one of the package's entry points
    import sys

    print("error: run `python -m vlm.cli.export ckpt=… out=… [format=vlm|hf_qwen2vl|hf_llava]`", file=sys.stderr)
    sys.exit(2)
