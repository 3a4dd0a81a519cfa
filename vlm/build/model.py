"""Build the model from a plain config dict: config -> `ModelSpec` -> modules.

The same function serves training (config from Hydra) and inference (config read back from a
checkpoint). Nothing is imported or called by name: a component's `_target_` is looked up in an
explicit registry, and every component first becomes its typed config (`vlm.model.config`),
which checks each field (known name, type, range) and the combinations before any module is
built. A wrong key gives one line: `model.encoder.dimm is not a field of EncoderConfig (known: …)`.

A training config (the user's own Hydra config, `trusted=True`) may name the native component
classes (or leave `_target_` out: the native class) and the pretrained loaders of
`vlm.model.hf`, whose folder's `config.json` resolves to a native config before building; the
folder's weights are then loaded into the native module. A checkpoint's config is untrusted
(`trusted=False`: `vlm.checkpoint.load.load_checkpoint`,
`init_from`): every component must name its native class (`NATIVE_COMPONENTS`, what
`ModelSpec.to_dict` writes), no folder is read. Hydra's special keys (`_args_`, `_partial_`,
`_recursive_`, `_convert_`, …) and a `_target_` anywhere other than a component's top level are
refused in both.

The processor and the template are built in `vlm.build.data` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm.build.checks import HYDRA_KEYS, check_config_keys, plain
from vlm.build.data import (
    PROCESSOR_CAPS,
    build_processor,
    build_template,
    resolve_template_config,
    stop_ids,
)
from vlm.model import hf
from vlm.model.config import COMPONENTS, ModelSpec
from vlm.model.decoder import Decoder
from vlm.model.fields import Fields, SpecError, short
from vlm.model.geometry import Geometry
from vlm.model.projector import Projector
from vlm.model.vision import VisionEncoder
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

__all__ = [
    "HYDRA_KEYS",
    "NATIVE_COMPONENTS",
    "PRETRAINED_LOADERS",
    "PROCESSOR_CAPS",
    "Pretrained",
    "build_model",
    "build_processor",
    "build_template",
    "check_model_config",
    "component",
    "geometry_of",
    "model_spec",
    "resolve_template_config",
    "stop_ids",
]

# What a checkpoint may build: the native classes, the only ones `ModelSpec.to_dict` records.
NATIVE_COMPONENTS: dict[str, dict[str, type]] = {
    "encoder": {"vlm.model.vision.VisionEncoder": VisionEncoder},
    "projector": {"vlm.model.projector.Projector": Projector},
    "decoder": {"vlm.model.decoder.Decoder": Decoder},
}
# What a training config may name besides: the loaders that read a pretrained local folder.
PRETRAINED_LOADERS: dict[str, dict[str, hf.Loader]] = {
    part: {f"vlm.model.hf.{name}": loader for name, loader in hf.LOADERS.items() if loader.part == part}
    for part in NATIVE_COMPONENTS
}


def registry(part: str, trusted: bool) -> dict[str, Any]:
    """`_target_` string -> class (or pretrained loader) that `part` may name."""
    return {**NATIVE_COMPONENTS[part], **(PRETRAINED_LOADERS[part] if trusted else {})}


def component(part: str, cfg: Any, trusted: bool, where: str = "model") -> tuple[Any, dict]:
    """(the registered class or loader, its keyword arguments) for `model.<part>`. Refuses a
    `_target_` that is not registered for `part` (see `registry`) and Hydra's special keys. A
    training config may leave `_target_` out: the native class."""
    path = f"{where}.{part}"
    cfg = plain(cfg)
    if not isinstance(cfg, dict):
        raise SpecError(f"{path} is not a mapping (got {type(cfg).__name__})")
    allowed = registry(part, trusted)
    target = cfg.get("_target_", next(iter(NATIVE_COMPONENTS[part])) if trusted else None)
    if not isinstance(target, str) or target not in allowed:
        if target is None:
            raise SpecError(f"refusing to build {path}: no _target_ (allowed: {', '.join(allowed)})")
        why = (
            "a pretrained loader, which only a training config may name (a checkpoint records the native class)"
            if not trusted and isinstance(target, str) and target in PRETRAINED_LOADERS[part]
            else "not a registered class"
        )
        raise SpecError(f"refusing to build {path}._target_={short(target)}: {why} (allowed: {', '.join(allowed)})")
    check_config_keys(cfg, path, targets=(path,))
    return allowed[target], {k: v for k, v in cfg.items() if k != "_target_"}


def check_model_config(model_cfg: Any, trusted: bool = False, where: str = "model") -> None:
    """The checks `build_model` makes before building anything: the mapping's shape, each
    component's `_target_` (registry), Hydra's keys anywhere and, for a checkpoint's config
    (which reads no folder), every field of the spec."""
    model_cfg = plain(model_cfg)
    if not isinstance(model_cfg, dict):
        raise SpecError(f"{where} is not a mapping (got {type(model_cfg).__name__})")
    for part in COMPONENTS:
        if part not in model_cfg:
            raise SpecError(f"{where}.{part} is missing")
        component(part, model_cfg[part], trusted, where)
    check_config_keys(model_cfg, where, targets=tuple(f"{where}.{p}" for p in COMPONENTS))
    if not trusted:
        model_spec(model_cfg, trusted=False)


@dataclass(frozen=True)
class Pretrained:
    """A part whose weights come from a folder: its loader, the folder, and the folder's own spec."""

    loader: hf.Loader
    folder: str
    spec: Fields


# Older configs wrote "auto" for "follow the tokenizer / encoder / decoder"; None says it now.
_AUTO = ("vocab_size", "in_dim", "out_dim")


def _part_spec(part: str, fn: Any, kw: dict) -> tuple[Fields, Pretrained | None]:
    cfg_cls = COMPONENTS[part]
    kw = {k: (None if k in _AUTO and v == "auto" else v) for k, v in kw.items()}
    if not isinstance(fn, hf.Loader):
        return cfg_cls.from_dict(kw), None
    cfg_cls.check_keys(kw, extra=("pretrained",))
    folder = kw.pop("pretrained", None)
    if not isinstance(folder, str) or not folder:
        raise SpecError(f"model.{part}.pretrained={short(folder)} is not a model folder")
    spec = fn.spec(folder, **kw)
    return spec, Pretrained(fn, folder, spec)


def model_spec(
    model_cfg: Any, trusted: bool = True, vocab_size: int | None = None
) -> tuple[ModelSpec, dict[str, Pretrained]]:
    """The spec `model_cfg` describes, and its pretrained parts (a training config's: their
    folders' `config.json` is read, never their weights). vocab_size: the tokenizer's; a decoder's
    `vocab_size: null` follows it, and a pretrained decoder grows to it."""
    cfg = plain(model_cfg)
    if not isinstance(cfg, dict):
        raise SpecError(f"model is not a mapping (got {type(cfg).__name__})")
    cfg = {k: plain(v) for k, v in cfg.items()}  # a plain dict may still hold OmegaConf values
    parts, pretrained = {}, {}
    for part in COMPONENTS:
        if part not in cfg:
            raise SpecError(f"model.{part} is missing")
        fn, kw = component(part, cfg[part], trusted)
        parts[part], p = _part_spec(part, fn, kw)
        if p is not None:
            pretrained[part] = p
    dec = parts["decoder"]
    if vocab_size is not None:
        if dec.vocab_size is None or "decoder" in pretrained:
            dec = dec.replace(vocab_size=max(dec.vocab_size or 0, vocab_size))
        elif dec.vocab_size < vocab_size:
            raise SpecError(f"decoder.vocab_size {dec.vocab_size} < tokenizer vocabulary {vocab_size}")
    parts["decoder"] = dec
    return ModelSpec.from_dict(cfg, parts), pretrained


def geometry_of(model_cfg: Any, trusted: bool = True) -> Geometry:
    """The media geometry of the model `model_cfg` describes: `ModelSpec.geometry` of its spec
    (every field checked). trusted: a training config, whose pretrained parts may leave
    `patch_size` / `temporal_patch` / `merge_size` / `rope` to their folder's `config.json` (read
    here, config only). False for a checkpoint's config: native components only, no file is read."""
    return model_spec(model_cfg, trusted)[0].geometry


def build_model(model_cfg: Any, tokenizer: TextTokenizer, trusted: bool = True) -> VLM:
    """model_cfg: {encoder, projector, decoder: {_target_, …}, image_attention, fusion, …}.

    trusted: the user's own training config (native classes and pretrained loaders). False for a
    checkpoint's config: native classes only, every field checked first (module docstring)."""
    spec, pretrained = model_spec(model_cfg, trusted, tokenizer.vocab_size if tokenizer is not None else None)
    modules = {}
    for part in COMPONENTS:
        p = pretrained.get(part)
        if p is None:
            modules[part] = NATIVE_COMPONENTS[part][getattr(spec, part).TARGET](getattr(spec, part))
        elif part == "decoder":  # built as the folder has it, then grown for added tokens
            modules[part] = p.loader.build(p.folder, p.spec)
            modules[part].grow_vocab(spec.decoder.vocab_size)
        else:  # the folder's spec with the dims the model resolved (equal: ModelSpec checked them)
            modules[part] = p.loader.build(p.folder, getattr(spec, part))
    model = VLM(
        modules["encoder"],
        modules["projector"],
        modules["decoder"],
        media_token_ids=[tokenizer.image_pad_id, tokenizer.video_pad_id],
        image_attention=spec.image_attention,
        fusion=spec.fusion,
        cross_attn=spec.cross_attn,
        packed_attention=spec.packed_attention,
        freeze=spec.freeze,
    )
    if spec.lora is not None:  # adapters are part of the model: a checkpoint's spec rebuilds them
        from vlm.model.lora import apply_lora

        apply_lora(model, spec.lora)
    return model
