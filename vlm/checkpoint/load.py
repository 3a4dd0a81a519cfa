"""Checkpoints: the export folder, and loading either it or a Lightning `.ckpt` for inference.

Export folder (what `infer.py` and other engines read):
    config.yaml         resolved model + processor + template configs, format version; the
                        processor config holds the video processor's keys under `processor.video`
    model.safetensors   the VLM's weights (no pickle)
    tokenizer.json      the tokenizer

A checkpoint is untrusted input. Loading one runs no code it names and reads nothing it points at:

* config.yaml and tokenizer.json are read only when they are regular files (a FIFO, a device or a
  directory is refused without blocking) of at most 64 MiB; the YAML must be UTF-8, may not use
  aliases and is not interpolated (`${…}` stays text); it must be a mapping with `model`,
  `processor` and `template` mappings.
* The model is built through `vlm.build.model`'s registry of native classes with every argument checked
  (`trusted=False`): no other `_target_`, no Hydra special keys, no pretrained folders, the chat
  template only as text (rendered in Jinja's sandbox).
* The weights are checked before any of them is read: the safetensors header (its length, JSON,
  dtypes, shapes and offsets against the file's size), then every tensor name and shape against
  the model the config describes, built first on the meta device (`weight_mismatch`, the one
  key + shape check). Only then is the model built for real and the weights loaded.
* A `.ckpt` is read with `torch.load(weights_only=True)` (tensors and plain containers only: a
  pickled object is refused, never run) after checking it is a regular file and an uncompressed
  torch zip whose members fit in the file; its `hyper_parameters` go through the same checks.

Every refusal is a `CheckpointError` whose one-line message names the file (and the config key).
The files are read by `vlm.checkpoint.files`; a sharded checkpoint's metadata by `vlm.checkpoint.dcp`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from vlm.build.checks import check_config_keys
from vlm.build.model import build_model, build_processor, build_template, check_model_config, geometry_of, stop_ids
from vlm.checkpoint.dcp import read_dcp_metadata, safe_dcp_reader
from vlm.checkpoint.files import (
    CheckpointError,
    one_line,
    read_config_file,
    read_safetensors_header,
    read_tokenizer_file,
    read_torch_file,
    tokenizer_from_text,
)
from vlm.data.media_processor import MediaProcessor
from vlm.data.template import ChatTemplate
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

FORMAT_VERSION = 1
MAX_EXTRA_BUFFER_ELEMENTS = 1 << 26  # non-persistent buffers (rotary tables): not in the file
META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint
RESUME_KEYWORDS = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself
log = logging.getLogger("vlm.checkpoint.load")


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


# ---- the one key + shape check ---------------------------------------------------------------------
def _few(xs: list[str], n: int = 6) -> str:
    return ", ".join(xs[:n]) + (f" … (+{len(xs) - n})" if len(xs) > n else "")


def expected_weights(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """(state_dict name -> shape, groups of names that are one tensor: the tied embedding and LM
    head). Works on a model built on the meta device: nothing is allocated."""
    sd = model.state_dict(keep_vars=True)
    groups: dict[int, set[str]] = {}
    for k, v in sd.items():
        groups.setdefault(id(v), set()).add(k)
    return {k: tuple(v.shape) for k, v in sd.items()}, [g for g in groups.values() if len(g) > 1]


def weight_mismatch(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    tied: list[set[str]] = (),
    rows: set[str] = frozenset(),
) -> str | None:
    """Why the tensors `found` (name -> shape) do not fit the model's `expected` ones, or None.
    A name of a `tied` group may be absent when another of the group is there (a safetensors file
    holds a shared tensor once); the names in `rows` (tensors indexed by token id) may differ in
    their first dimension only."""
    present = set(found)
    optional = {k for g in tied if g & present for k in g}
    missing = sorted(k for k in expected if k not in present and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    shapes = sorted(
        f"{k} {tuple(found[k])} vs {tuple(expected[k])}"
        for k in present & set(expected)
        if tuple(found[k]) != tuple(expected[k]) and not (k in rows and tuple(found[k])[1:] == tuple(expected[k])[1:])
    )
    parts = [
        f"missing {_few(missing)}" if missing else "",
        f"unexpected {_few(unexpected)}" if unexpected else "",
        f"shape mismatch {_few(shapes)}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p) or None


def check_weights(model: torch.nn.Module, found: dict[str, tuple[int, ...]], where: str) -> None:
    """CheckpointError naming `where` unless `found` (name -> shape) fits `model` exactly."""
    expected, tied = expected_weights(model)
    problem = weight_mismatch(expected, found, tied)
    if problem:
        raise CheckpointError(f"{where}: weights do not fit the config ({problem})")


# ---- building from an untrusted config -------------------------------------------------------------
def _build_error(where: str, e: Exception) -> CheckpointError:
    """Whatever building from an untrusted config raised, as one line naming the config."""
    if isinstance(e, CheckpointError):
        return e
    kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
    return CheckpointError(f"{where}: {kind}{one_line(e)}")


def check_checkpoint_config(config: Any, where: str) -> None:
    """The shape every checkpoint config has: a mapping with `model`, `processor` and `template`
    mappings (and `val_qtypes`, a list of strings, or nothing), no Hydra special keys anywhere,
    `_target_` only on the model's components and there only a registered native class
    (`vlm.build.model.check_model_config`). Nothing is built or called."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a mapping (got {type(config).__name__})")
    for key in ("model", "processor", "template"):
        if key not in config:
            raise CheckpointError(f"{where}: `{key}` is missing")
        if not isinstance(config[key], dict):
            raise CheckpointError(f"{where}: {key} is not a mapping (got {type(config[key]).__name__})")
    q = config.get("val_qtypes")
    if q is not None and not (isinstance(q, list) and all(isinstance(x, str) for x in q)):
        raise CheckpointError(f"{where}: val_qtypes is not a list of strings")
    try:
        check_model_config(config["model"], trusted=False)  # the registry, before anything else is read
        for key in ("processor", "template"):
            check_config_keys(config[key], key)
    except ValueError as e:
        raise CheckpointError(f"{where}: {one_line(e)}") from None


def build_checked(
    config: dict, tokenizer: TextTokenizer, where: str, weights: dict[str, tuple[int, ...]], weights_where: str
) -> LoadedVLM:
    """Model (fresh weights), processor and template from an untrusted checkpoint config, after
    checking the config (`where` names it in errors) and that the stored tensors `weights` (name
    -> shape, from `weights_where`) fit the model it describes, on a meta-device copy first."""
    check_checkpoint_config(config, where)
    try:
        with torch.device("meta"):
            skeleton = build_model(config["model"], tokenizer, trusted=False)
        # Processor and template follow the model's geometry; keys they still carry (older
        # checkpoints wrote them) must agree with it.
        geometry = geometry_of(config["model"], trusted=False)
        processor = build_processor(config["processor"], trusted=False, geometry=geometry)
        template = build_template(config["template"], tokenizer, trusted=False, geometry=geometry)
        stop_ids(tokenizer, config["template"])  # the stop tokens are the tokenizer's
    except Exception as e:  # noqa: BLE001 (a hostile config may make any constructor fail)
        raise _build_error(where, e) from None
    check_weights(skeleton, weights, weights_where)
    stored = set(skeleton.state_dict())
    extra = sum(b.numel() for n, b in skeleton.named_buffers() if n not in stored)
    if extra > MAX_EXTRA_BUFFER_ELEMENTS:
        raise CheckpointError(f"{where}: the model's tables would take {extra} elements beyond its weights")
    try:
        model = build_model(config["model"], tokenizer, trusted=False)
    except Exception as e:  # noqa: BLE001
        raise _build_error(where, e) from None
    return LoadedVLM(model, tokenizer, processor, template, config)


def read_lightning_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[dict, dict, TextTokenizer, dict]:
    """(model state dict with the `model.` prefix removed, config {model, processor, template,
    val_qtypes}, tokenizer, hyper_parameters) of a `.ckpt`, every part checked (one-line CheckpointError)."""
    p = Path(path)
    ckpt = read_torch_file(p, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{p} is not a vlm Lightning checkpoint (no state_dict / hyper_parameters)")
    hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]
    config, tokenizer = checkpoint_hparams(hp, p)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: state_dict is not a mapping (got {type(sd).__name__})")
    state = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{p}: state_dict key {one_line(repr(k), 80)} is not a string")
        if not k.startswith("model."):
            continue
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.is_meta:
            raise CheckpointError(f"{p}: state_dict[{k!r}] is not a dense tensor")
        state[k.removeprefix("model.")] = v
    return state, config, tokenizer, hp


def checkpoint_hparams(hp: Any, p: Path) -> tuple[dict, TextTokenizer]:
    """(config, tokenizer) from a training checkpoint's `hyper_parameters`, checked."""
    if not isinstance(hp, dict):
        raise CheckpointError(f"{p}: hyper_parameters is not a mapping (got {type(hp).__name__})")
    for key in ("model", "processor", "template", "tokenizer_json"):
        if key not in hp:
            raise CheckpointError(f"{p} is not a vlm training checkpoint (hyper_parameters.{key} is missing)")
    config = {k: hp[k] for k in ("model", "processor", "template")}
    config["val_qtypes"] = hp.get("val_qtypes")
    check_checkpoint_config(config, f"checkpoint config {p} (hyper_parameters)")
    tokenizer = tokenizer_from_text(hp["tokenizer_json"], f"{p} (hyper_parameters.tokenizer_json)")
    return config, tokenizer


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A sharded (DCP) checkpoint directory: `*.distcp` shards plus Lightning's `meta.pt`."""
    p = Path(path)
    return p.is_dir() and (p / META).is_file()


def _load_export_folder(p: Path, map_location: str) -> LoadedVLM:
    cfg_file, weights, tok_file = p / "config.yaml", p / "model.safetensors", p / "tokenizer.json"
    for f in (cfg_file, weights, tok_file):
        if not f.exists() and not f.is_symlink():
            raise CheckpointError(f"{p} is not an export folder: {f.name} is missing")
    config = read_config_file(cfg_file)
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format_version {one_line(repr(config.get('format_version')), 60)} (expected {FORMAT_VERSION})"
        )
    where = f"checkpoint config {cfg_file}"
    check_checkpoint_config(config, where)  # refuses a hostile config before the other files are read
    tokenizer = read_tokenizer_file(tok_file)
    header = read_safetensors_header(weights)
    loaded = build_checked(config, tokenizer, where, {k: shape for k, (_, shape) in header.items()}, str(weights))
    try:
        load_model(loaded.model, str(weights), strict=False, device=map_location)
    except Exception as e:  # the file changed under us, or the library refuses what we checked
        raise CheckpointError(f"{weights}: cannot load the weights ({one_line(e, 200)})") from None
    return loaded


def _load_lightning_file(p: Path, map_location: str) -> LoadedVLM:
    state, config, tokenizer, _ = read_lightning_checkpoint(p, map_location)
    where = f"checkpoint config {p} (hyper_parameters)"
    loaded = build_checked(config, tokenizer, where, {k: tuple(v.shape) for k, v in state.items()}, str(p))
    loaded.model.load_state_dict(state, strict=False)  # every key checked above
    return loaded


def _load_sharded(p: Path) -> LoadedVLM:
    """A DCP directory, read on one process whatever the number of ranks that wrote it. `meta.pt`
    goes through `torch.load(weights_only=True)`, the pickled `.metadata` through a restricted
    unpickler (`safe_dcp_reader`)."""
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
    want = {k: v for k, v in loaded.model.state_dict().items() if k in found}
    state = {"state_dict": {f"model.{k}": v for k, v in want.items()}}
    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # a damaged shard
        raise CheckpointError(f"{p}: cannot read the shards ({one_line(e, 200)})") from None
    loaded.model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=False)
    return loaded


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedVLM:
    """Rebuild model, tokenizer, media processor (image + video) and template from a checkpoint alone.

    `path` is an export folder (with config.yaml), a Lightning `.ckpt` file or a sharded (DCP)
    checkpoint directory written by `trainer=fsdp`; each is checked before anything is built or
    any weight read (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if is_sharded_checkpoint(p):
        loaded = _load_sharded(p)
    elif p.is_dir():
        loaded = _load_export_folder(p, map_location)
    else:
        loaded = _load_lightning_file(p, map_location)
    loaded.model.eval()
    return loaded


def check_resume_checkpoint(path) -> None:
    """`ckpt_path=PATH` (exact resume): refuse, with one line naming the file, anything that is not a
    loadable checkpoint before Lightning reads it. A `.ckpt` must pass `torch.load(weights_only=True)`
    (memory-mapped here: the tensors are not read), so a pickled object is refused, never run; a
    sharded (DCP) directory's `meta.pt` likewise, and its `.metadata` pickle must hold only DCP's
    own classes (`vlm.checkpoint.dcp.read_dcp_metadata`: Lightning then unpickles it with plain pickle)."""
    if str(path) in RESUME_KEYWORDS or "://" in str(path) or str(path).startswith("registry:"):
        return  # resolved by Lightning, then read with weights_only=True (`vlm.training.train.run`)
    p = Path(str(path))
    if not p.exists():
        raise CheckpointError(f"ckpt_path={p}: checkpoint not found")
    if p.is_dir():
        if not (p / META).is_file():
            raise CheckpointError(f"ckpt_path={p}: a directory but not a sharded checkpoint (no {META})")
        read_dcp_metadata(p)
        meta = read_torch_file(p / META, mmap=True)
        if not isinstance(meta, dict):
            raise CheckpointError(f"ckpt_path={p / META}: not a Lightning checkpoint's metadata")
    else:
        ckpt = read_torch_file(p, mmap=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"ckpt_path={p}: not a Lightning checkpoint (no state_dict)")
