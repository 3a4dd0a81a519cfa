"""`python -m vlm.cli.export ckpt=PATH out=DIR [format=vlm|hf_qwen2vl|hf_llava]`: a checkpoint -> a folder.

`ckpt` is a sharded (DCP) checkpoint directory written by `trainer=fsdp`, a Lightning `.ckpt` file
or an export folder; `format=vlm` (default) writes an export folder (`config.yaml` +
`model.safetensors` + `tokenizer.json`, what `infer.py` loads), `hf_qwen2vl` / `hf_llava` a Hugging
Face layout when the model's architecture is that family's; a model with adapters (`model.lora`) is
written merged (`merge_adapters=true`, default) or as its base (`false`), and `peft_adapter` writes
the adapters alone (peft's folder, docs/adapters.md). The checkpoint is untrusted: see
`vlm.checkpoint.export` and `vlm.checkpoint.load`. Config: conf/export.yaml.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from vlm.cli.app import CONF_PATH, Tool

USAGE = "python -m vlm.cli.export ckpt=CHECKPOINT out=EXPORT_DIR [format=vlm|hf_qwen2vl|hf_llava|peft_adapter] [merge_adapters=true|false]"
TOOL = Tool("export", __doc__, text=("ckpt", "out", "format"))


def run(cfg: DictConfig) -> int:
    """Export `cfg.ckpt` to `cfg.out`; 0, or 2 with one `error:` line."""
    from vlm.checkpoint.export import export
    from vlm.errors import CheckpointError

    try:
        out = export(cfg.ckpt, cfg.out, cfg.format, bool(cfg.get("merge_adapters", True)))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {cfg.ckpt} to {out}")
    return 0


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
def app(cfg: DictConfig) -> None:
    TOOL.run(run, cfg, USAGE)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlm.cli.export KEY=VALUE …` on `argv` (default: the command line); the exit status."""
    return TOOL.main(app, argv)


if __name__ == "__main__":
    sys.exit(main())
