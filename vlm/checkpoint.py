"""Checkpoints: the export folder, and loading either it or a Lightning `.ckpt` for inference.

Export folder (what `infer.py` and other engines read):
    config.yaml         resolved model + processor + template configs, format version; the
                        processor config holds the video processor's keys under `processor.video`
    model.safetensors   the VLM's weights (no pickle)
    tokenizer.json      the tokenizer

A `.ckpt` is read with `torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from vlm.build import build_model, build_processor, build_template, check_processor_fits, check_template_fits
from vlm.data.sample import MediaProcessor
from vlm.data.template import ChatTemplate
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

FORMAT_VERSION = 1
log = logging.getLogger("vlm.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint path that is missing, not a checkpoint, or does not fit its config."""


@dataclass
class LoadedVLM:
    model: VLM
    tokenizer: TextTokenizer
    processor: MediaProcessor  # an ImageProcessor; `.video` is its VideoProcessor
    template: ChatTemplate
    config: dict


def export_folder(model: VLM, tokenizer: TextTokenizer, config: dict, out_dir: str | Path) -> Path:
    """Write config.yaml, model.safetensors and tokenizer.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"format_version": FORMAT_VERSION, **{k: config[k] for k in ("model", "processor", "template")}}
    if config.get("val_qtypes"):
        cfg["val_qtypes"] = list(config["val_qtypes"])
    OmegaConf.save(OmegaConf.create(cfg), out / "config.yaml")
    save_model(model, str(out / "model.safetensors"))  # handles the tied embedding / head
    tokenizer.save(out / "tokenizer.json")
    return out


def _build(config: dict, tokenizer: TextTokenizer) -> LoadedVLM:
    model = build_model(config["model"], tokenizer)
    processor = build_processor(config["processor"])
    template = build_template(config["template"], tokenizer)
    try:
        check_processor_fits(model, processor)
        check_template_fits(model, template)
    except ValueError as e:
        raise CheckpointError(f"checkpoint config: {e}") from None
    return LoadedVLM(model, tokenizer, processor, template, config)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedVLM:
    """Rebuild model, tokenizer, media processor (image + video) and template from a checkpoint alone.

    `path` is an export folder (with config.yaml) or a Lightning `.ckpt` file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        cfg_file, weights, tok_file = p / "config.yaml", p / "model.safetensors", p / "tokenizer.json"
        for f in (cfg_file, weights, tok_file):
            if not f.is_file():
                raise CheckpointError(f"{p} is not an export folder: {f.name} is missing")
        config = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        if config.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{cfg_file}: format_version {config.get('format_version')} (expected {FORMAT_VERSION})")
        tokenizer = TextTokenizer.from_file(tok_file)
        loaded = _build(config, tokenizer)
        missing, unexpected = load_model(loaded.model, str(weights), strict=False, device=map_location)
        _check_keys(missing, unexpected, p)
    else:
        try:
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # not a torch file, or it holds pickled objects we refuse to run
            raise CheckpointError(f"{p} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise CheckpointError(f"{p} is not a vlm Lightning checkpoint (no state_dict / hyper_parameters)")
        hp = ckpt["hyper_parameters"]
        tokenizer = TextTokenizer.from_str(hp["tokenizer_json"])
        config = {k: hp[k] for k in ("model", "processor", "template")}
        config["val_qtypes"] = hp.get("val_qtypes")
        loaded = _build(config, tokenizer)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        missing, unexpected = loaded.model.load_state_dict(state, strict=False)
        _check_keys(missing, unexpected, p)
    loaded.model.eval()
    return loaded


def _check_keys(missing, unexpected, path) -> None:
    # The tied LM head is saved once; it is not missing when it shares the embedding.
    missing = [k for k in missing if k != "decoder.lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {list(unexpected)[:5]})")


class ExportCallback(L.Callback):
    """Write the export folder at the end of training (rank 0)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            out = export_folder(pl_module.model, pl_module.tokenizer, dict(pl_module.hparams), self.out_dir)
            log.info("exported model to %s", out)
            print(f"exported model to {out}")
