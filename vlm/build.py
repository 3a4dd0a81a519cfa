"""Build the model, media processor and template from plain config dicts.

The same functions serve training (config from Hydra) and inference (config read back from a
checkpoint). Nothing is imported or called by name: a component's `_target_` is looked up in an
explicit registry of this project's classes and the class is called with the config's keys.

A training config (the user's own Hydra config, `trusted=True`) may name the native component
classes and the pretrained loaders of `vlm.model.hf`, which read local model folders. A
checkpoint's config is untrusted input (`trusted=False`: `vlm.checkpoint.load_checkpoint`,
`vlm.export.load_training_checkpoint`, `init_from`): it may only name the native classes
(`NATIVE_COMPONENTS`, what `self_contained_config` records), every argument is checked against
the class's signature (known name, type, range) before anything is built, its processor config
may not point at a model folder, and its chat template must be the template's text, never a path.
Hydra's special keys (`_args_`, `_partial_`, `_recursive_`, `_convert_`, …) and a `_target_`
anywhere other than a component's top level are refused in both.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from functools import partial
from typing import Any

from vlm.data.media_processor import MediaProcessor
from vlm.data.template import ChatTemplate
from vlm.model import hf
from vlm.model.cross_attention import CrossAttentionFusion
from vlm.model.decoder import Decoder
from vlm.model.projector import Projector, token_grid, visual_token_count
from vlm.model.vision import VisionEncoder
from vlm.model.vlm import VLM
from vlm.spec import Geometry
from vlm.tokenizer import TextTokenizer

COMPONENTS = ("encoder", "projector", "decoder")
# What a checkpoint may build: the native classes, the only ones self-contained configs record
# (`self_contained_config`, `vlm.model.hf._build`'s `native_config`).
NATIVE_COMPONENTS: dict[str, dict[str, type]] = {
    "encoder": {"vlm.model.vision.VisionEncoder": VisionEncoder},
    "projector": {"vlm.model.projector.Projector": Projector},
    "decoder": {"vlm.model.decoder.Decoder": Decoder},
}
# What a training config may name besides: the loaders that read a pretrained local folder.
PRETRAINED_LOADERS: dict[str, dict[str, Any]] = {
    "encoder": {
        "vlm.model.hf.pretrained_vision_encoder": hf.pretrained_vision_encoder,
        "vlm.model.hf.pretrained_qwen2vl_vision": hf.pretrained_qwen2vl_vision,
    },
    "projector": {
        "vlm.model.hf.pretrained_qwen2vl_merger": hf.pretrained_qwen2vl_merger,
        "vlm.model.hf.pretrained_llava_projector": hf.pretrained_llava_projector,
    },
    "decoder": {"vlm.model.hf.pretrained_decoder": hf.pretrained_decoder},
}
# Hydra's instantiate keys; any other `_name_` key is refused as well.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
# Checked arguments of untrusted configs: ints are >= 0 (these may be negative: layer indices),
# module counts are capped (building is linear in them, even on the meta device), every int is
# bounded, every float finite.
NEGATIVE_OK = frozenset({"feature_layer", "feature_layers"})
MODULE_COUNTS = frozenset({"n_layers", "blocks"})
MAX_MODULE_COUNT = 1024
MAX_INT = 2**31 - 1
# A checkpoint's processor cannot make one image cost more than 8192² pixels (an absurd
# `image_size` would otherwise allocate it at the first prompt).
PROCESSOR_CAPS = {
    "image_size": 8192,
    "min_pixels": 2**26,
    "max_pixels": 2**26,
    "min_tokens": 2**20,
    "max_tokens": 2**20,
}
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32


def registry(part: str, trusted: bool) -> dict[str, Any]:
    """`_target_` string -> class (or pretrained loader) that `part` may name."""
    return {**NATIVE_COMPONENTS[part], **(PRETRAINED_LOADERS[part] if trusted else {})}


def _plain(v: Any) -> Any:
    """OmegaConf containers (a composed config handed over as is) -> plain dicts and lists."""
    if type(v).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(v, resolve=True)
    return v


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def check_config_keys(cfg: Any, where: str, targets: tuple[str, ...] = ()) -> None:
    """Refuse Hydra's special keys (`_args_`, `_partial_`, …, any `_name_` key) anywhere in `cfg`,
    and `_target_` except at the paths in `targets` (e.g. "model.encoder"). Also bounds the size
    and depth of the structure (a checkpoint's hyper_parameters may share one list many times)."""
    budget = [MAX_CONFIG_NODES]

    def walk(node: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"{where}: more than {MAX_CONFIG_NODES} values: not a config")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a config")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ValueError(f"{path}: key {_short(k)} is not a string")
                if k.startswith("_") and k.endswith("_") and len(k) > 1:
                    if k == "_target_" and path in targets:
                        continue
                    if k == "_target_":
                        raise ValueError(
                            f"refusing to build {path}._target_={_short(v)}: a _target_ is only accepted "
                            f"as {', '.join(t + '._target_' for t in targets) or 'nothing here'}"
                        )
                    raise ValueError(
                        f"refusing to build {path}.{k}: Hydra's special keys ({', '.join(HYDRA_KEYS[1:])}, "
                        "any _name_ key) are not accepted"
                    )
                walk(v, f"{path}.{k}", depth + 1)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", depth + 1)

    walk(cfg, where, 0)


def _type_ok(v: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return v is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, h) for h in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(v, (list, tuple)) and (not args or all(any(_type_ok(x, a) for a in args) for x in v))
    if origin is dict or hint is dict:
        return isinstance(v, dict)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    return isinstance(hint, type) and isinstance(v, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check_number(v: Any, key: str, path: str) -> None:
    items = v if isinstance(v, (list, tuple)) else [v]
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{path}={_short(v)} is not a finite number")
        if isinstance(x, int):
            if x < 0 and key not in NEGATIVE_OK:
                raise ValueError(f"{path}={_short(v)} is negative")
            if abs(x) > MAX_INT or (key in MODULE_COUNTS and x > MAX_MODULE_COUNT):
                raise ValueError(
                    f"{path}={_short(v)} is out of range (at most "
                    f"{MAX_MODULE_COUNT if key in MODULE_COUNTS else MAX_INT})"
                )


def check_arguments(fn: Any, kwargs: dict, where: str, skip: tuple[str, ...] = (), name: str | None = None) -> None:
    """Every key of `kwargs` is an argument of `fn` (not one in `skip`, which the caller passes
    itself) of the annotated type, within range (`_check_number`); required arguments are there.
    One line naming the config key otherwise."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    name = name or getattr(fn, "__qualname__", str(fn))
    params = {
        k: p
        for k, p in sig.parameters.items()
        if k != "self" and k not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for k, v in kwargs.items():
        if k not in params:
            raise ValueError(f"{where}.{k} is not an argument of {name} (known: {', '.join(params)})")
        hint = hints.get(k, Any)
        if not _type_ok(v, hint):
            raise ValueError(f"{where}.{k}={_short(v)} is not of type {_type_name(hint)}")
        _check_number(v, k, f"{where}.{k}")
    required = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if required:
        raise ValueError(f"{where}.{required[0]} is missing (required by {name})")


def component(part: str, cfg: Any, trusted: bool, where: str = "model") -> tuple[Any, dict]:
    """(the registered class or loader, its keyword arguments) for `model.<part>`. Refuses a
    `_target_` that is not registered for `part` (see `registry`) and Hydra's special keys."""
    path = f"{where}.{part}"
    cfg = _plain(cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a mapping (got {type(cfg).__name__})")
    target = cfg.get("_target_")
    allowed = registry(part, trusted)
    if not isinstance(target, str) or target not in allowed:
        if target is None:
            raise ValueError(f"refusing to build {path}: no _target_ (allowed: {', '.join(allowed)})")
        why = (
            "a pretrained loader, which only a training config may name (a checkpoint records the native class)"
            if not trusted and isinstance(target, str) and target in PRETRAINED_LOADERS[part]
            else "not a registered class"
        )
        raise ValueError(f"refusing to build {path}._target_={_short(target)}: {why} (allowed: {', '.join(allowed)})")
    check_config_keys(cfg, path, targets=(path,))
    return allowed[target], {k: v for k, v in cfg.items() if k != "_target_"}


def _make(part: str, fn: Any, kwargs: dict, trusted: bool, where: str):
    if not trusted:  # a native class: check every argument before calling it
        check_arguments(fn, kwargs, f"{where}.{part}", name=f"{fn.__module__}.{fn.__qualname__}")
    return fn(**kwargs)


def check_model_config(model_cfg: Any, trusted: bool = False, where: str = "model") -> None:
    """The checks `build_model` makes before building anything: the mapping's shape, each
    component's `_target_` (registry), Hydra's keys anywhere, and (untrusted) the top-level keys' types."""
    model_cfg = _plain(model_cfg)
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{where} is not a mapping (got {type(model_cfg).__name__})")
    for part in COMPONENTS:
        if part not in model_cfg:
            raise ValueError(f"{where}.{part} is missing")
        component(part, model_cfg[part], trusted, where)
    check_config_keys(model_cfg, where, targets=tuple(f"{where}.{p}" for p in COMPONENTS))
    if not trusted:
        for key, kinds in (
            ("image_attention", (str,)),
            ("fusion", (str, type(None))),
            ("packed_attention", (str, type(None))),
            ("cross_attn", (dict, type(None))),
            ("freeze", (dict, type(None))),
        ):
            if key in model_cfg and not isinstance(model_cfg[key], kinds):
                raise ValueError(
                    f"{where}.{key}={_short(model_cfg[key])} is not of type {' | '.join(t.__name__ for t in kinds)}"
                )
        if model_cfg.get("fusion") == "cross_attn":
            check_arguments(
                CrossAttentionFusion,
                dict(model_cfg.get("cross_attn") or {}),
                f"{where}.cross_attn",
                skip=("dim", "n_heads", "n_kv_heads", "mlp_hidden", "n_layers"),
                name="cross_attn",
            )


def build_model(model_cfg: dict, tokenizer: TextTokenizer, trusted: bool = True) -> VLM:
    """model_cfg: {encoder, projector, decoder: {_target_, …}, image_attention, freeze?}.

    trusted: the user's own training config (native classes and pretrained loaders). False for a
    checkpoint's config: native classes only, every argument checked first (module docstring)."""
    model_cfg = _plain(model_cfg)
    check_model_config(model_cfg, trusted)
    enc_fn, enc_kw = component("encoder", model_cfg["encoder"], trusted)
    dec_fn, dec = component("decoder", model_cfg["decoder"], trusted)
    proj_fn, proj = component("projector", model_cfg["projector"], trusted)
    pretrained = bool(dec.get("pretrained"))
    if pretrained:
        dec.pop("vocab_size", None)  # the folder's config says it; grown below if tokens were added
    elif dec.get("vocab_size") in (None, "auto"):
        dec["vocab_size"] = tokenizer.vocab_size
    elif not isinstance(dec["vocab_size"], int) or isinstance(dec["vocab_size"], bool):
        raise ValueError(f"model.decoder.vocab_size={_short(dec['vocab_size'])} is not of type int")
    elif dec["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"decoder.vocab_size {dec['vocab_size']} < tokenizer vocabulary {tokenizer.vocab_size}")
    encoder = _make("encoder", enc_fn, enc_kw, trusted, "model")
    decoder = _make("decoder", dec_fn, dec, trusted, "model")
    if pretrained and tokenizer.vocab_size > decoder.vocab_size:
        decoder.grow_vocab(tokenizer.vocab_size)
    # The projector reads what the encoder emits (k·dim with several concatenated feature layers)
    # and writes the decoder's width.
    for key, have, what in (
        ("in_dim", encoder.out_dim, "the encoder emits"),
        ("out_dim", decoder.dim, "the decoder is"),
    ):
        if proj.get(key) in (None, "auto"):
            proj[key] = have
        elif isinstance(proj[key], bool) or not isinstance(proj[key], int):
            raise ValueError(f"model.projector.{key}={_short(proj[key])} is not of type int")
        elif int(proj[key]) != have:
            raise ValueError(
                f"projector.{key}={proj[key]} but {what} {have} wide (set projector.{key}=null to follow it)"
            )
    projector = _make("projector", proj_fn, proj, trusted, "model")
    fusion = model_cfg.get("fusion") or "interleave"
    return VLM(
        encoder,
        projector,
        decoder,
        media_token_ids=[tokenizer.image_pad_id, tokenizer.video_pad_id],
        image_attention=model_cfg.get("image_attention", "causal"),
        fusion=fusion,
        cross_attn=dict(model_cfg.get("cross_attn") or {}) if fusion == "cross_attn" else None,
        packed_attention=model_cfg.get("packed_attention") or "sdpa",
    )


def self_contained_config(model_cfg: dict, model: VLM) -> dict:
    """The model config with every part that was read from a pretrained folder replaced by its
    native class and arguments (`native_config`, set by `vlm.model.hf`), so checkpoints and export
    folders rebuild without the original folders; a grown vocabulary is recorded too."""
    out = dict(model_cfg)
    for part in ("encoder", "projector", "decoder"):
        native = getattr(getattr(model, part), "native_config", None)
        if native is not None:
            native = dict(native)
            if part == "decoder":
                native["vocab_size"] = model.decoder.vocab_size
            out[part] = native
    return out


def build_processor(processor_cfg: dict, trusted: bool = True, geometry: Geometry | None = None) -> MediaProcessor:
    """The image processor config, with the video processor's keys under `video` (optional; see
    :class:`~vlm.data.sample.MediaProcessor`). The result is an `ImageProcessor` whose `.video` is
    the `VideoProcessor` and whose `to_config()` round-trips both. `pretrained: FOLDER` takes the
    folder's `preprocessor_config.json` (`vlm.data.hf_processor`) over the other keys (a training
    config only: a checkpoint records the resolved keys, `trusted=False` refuses it).

    geometry: the model's (`vlm.spec.Geometry`): patch_size, merge_size and video.temporal_patch
    come from it. A `patch_size` / `merge_size` / `video.temporal_patch` in the config (a
    checkpoint's record, a folder's preprocessor_config.json) that disagrees with it is an error
    naming both values. Without it the config's own keys are used (a standalone processor)."""
    cfg = _plain(processor_cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"processor is not a mapping (got {type(cfg).__name__})")
    cfg = {k: _plain(v) for k, v in cfg.items()}
    if not trusted:
        check_config_keys(cfg, "processor")
        if cfg.get("pretrained") is not None:
            raise ValueError(
                f"processor.pretrained={_short(cfg['pretrained'])}: a checkpoint's processor config "
                "may not read a model folder (it records the resolved keys)"
            )
        _check_untrusted_processor(cfg)
    pretrained = cfg.pop("pretrained", None)
    if pretrained:
        from vlm.data.hf_processor import processor_config_from_hf

        hf_cfg = processor_config_from_hf(pretrained)
        if geometry is not None:
            geometry.check_stored(hf_cfg, None, where=f"{pretrained}/preprocessor_config.json: ")
        video = {**dict(cfg.get("video") or {}), **hf_cfg.pop("video", {})}
        cfg.update(hf_cfg)
        if video:
            cfg["video"] = video
        for k in ("min_tokens", "max_tokens"):  # the folder gives pixel caps
            if "min_pixels" in hf_cfg:
                cfg[k] = None
    if geometry is not None:
        geometry.check_stored(cfg, None)
        video = cfg.get("video")
        if video is not None and not isinstance(video, dict):
            raise ValueError(f"processor.video={_short(video)} is not a mapping")
        cfg.update(patch_size=geometry.patch_size, merge_size=geometry.merge_size)
        cfg["video"] = {**dict(video or {}), "temporal_patch": geometry.temporal_patch}
    return MediaProcessor.from_config(cfg)


def _check_untrusted_processor(cfg: dict) -> None:
    """A checkpoint's processor keys: each an argument of the image (video) processor, of its type."""
    from vlm.data.processor import ImageProcessor
    from vlm.data.video import VideoProcessor

    caps = {"min_tokens", "max_tokens"}  # MediaProcessor's, here and under `video`
    for where, d, cls in (("processor", cfg, ImageProcessor), ("processor.video", cfg.get("video"), VideoProcessor)):
        if d is None and where == "processor.video":
            continue
        if not isinstance(d, dict):
            raise ValueError(f"{where}={_short(d)} is not a mapping")
        for k in caps & set(d):
            if d[k] is not None and (isinstance(d[k], bool) or not isinstance(d[k], int)):
                raise ValueError(f"{where}.{k}={_short(d[k])} is not of type int | None")
            _check_number(d[k], k, f"{where}.{k}")
        rest = {k: v for k, v in d.items() if k not in caps | {"video", "pretrained"}}
        check_arguments(
            cls.__init__, rest, where, name=f"the {'video' if cls is VideoProcessor else 'image'} processor"
        )
        for k, cap in PROCESSOR_CAPS.items():
            if isinstance(d.get(k), int) and d[k] > cap:
                raise ValueError(f"{where}.{k}={d[k]} is out of range (at most {cap})")


def build_template(
    template_cfg: dict, tokenizer: TextTokenizer, trusted: bool = True, geometry: Geometry | None = None
) -> ChatTemplate:
    """template_cfg: ChatTemplate kwargs (max_length, image_position, …). geometry: the model's
    (`vlm.spec.Geometry`): the token layout (`merge_size`, `queries`, `fusion`, see
    `vlm.model.projector.token_grid`) and `rope` come from it; the same keys in the config (older
    checkpoints carry them) must agree with it and are otherwise ignored. Without it the config's
    own layout keys are used (a standalone template).

    `jinja`: the model's own chat template, run in Jinja's sandbox (`vlm.data.jinja_template`). In a
    training config it may be a path (a model folder, a `.jinja` / `.json` file) or the text; a
    checkpoint (`trusted=False`) carries the text itself (`resolve_template_config`), so there it
    must be template text: a path is refused, no file is read."""
    cfg = _plain(template_cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"template is not a mapping (got {type(cfg).__name__})")
    cfg = {k: _plain(v) for k, v in cfg.items()}
    if not trusted:
        _check_untrusted_template(cfg)
    if geometry is not None:
        geometry.check_stored(None, cfg)
        for k in ("merge_size", "queries", "fusion", "rope"):
            cfg.pop(k, None)
        layout = geometry.layout
        cfg["rope"] = geometry.rope
    else:
        layout = dict(
            merge_size=int(cfg.pop("merge_size", 1) or 1),
            queries=cfg.pop("queries", None),
            fusion=cfg.pop("fusion", None) or "interleave",
        )
    jinja = cfg.pop("jinja", None)
    specials = cfg.pop("specials", None)
    markers = cfg.pop("media_markers", None)
    cfg.pop("stop_token_ids", None)  # read by `stop_ids`, not the template
    kw = dict(merge_size=layout["merge_size"], token_grid=partial(token_grid, **layout), **cfg)
    if jinja:  # the model's own chat template (vlm.data.jinja_template)
        from vlm.data.jinja_template import JinjaChatTemplate, load_chat_template

        text, found = load_chat_template(str(jinja))
        return JinjaChatTemplate(
            tokenizer,
            partial(visual_token_count, **layout),
            jinja=text,
            specials={**found, **dict(specials or {})},
            media_markers=markers,
            **kw,
        )
    return ChatTemplate(tokenizer, partial(visual_token_count, **layout), **kw)


def _is_template_text(s: str) -> bool:
    return "{%" in s or "{{" in s  # what `load_chat_template` takes as the text itself


def _check_untrusted_template(cfg: dict) -> None:
    """A checkpoint's template keys: the Jinja template as text only, every other key of its type."""
    check_config_keys(cfg, "template")
    jinja = cfg.get("jinja")
    if jinja is not None and jinja != "" and (not isinstance(jinja, str) or not _is_template_text(jinja)):
        raise ValueError(
            f"template.jinja={_short(jinja)} is not a chat template's text: a checkpoint carries the "
            "template itself, never a path to read"
        )
    for key, values in (("specials", (str, type(None))), ("media_markers", (str,))):
        v = cfg.get(key)
        if v is not None and not (
            isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, values) for k, x in v.items())
        ):
            raise ValueError(f"template.{key}={_short(v)} is not a mapping of strings")
    ids = cfg.get("stop_token_ids")
    if ids is not None and not (
        isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise ValueError(f"template.stop_token_ids={_short(ids)} is not a list of token ids")
    for key, kinds in (
        ("merge_size", (int, type(None))),
        ("queries", (int, type(None))),
        ("fusion", (str, type(None))),
    ):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"template.{key}={_short(v)} is not of type {' | '.join(t.__name__ for t in kinds)}")
        _check_number(v, key, f"template.{key}")
    rest = {
        k: v
        for k, v in cfg.items()
        if k not in ("jinja", "specials", "media_markers", "stop_token_ids", "merge_size", "queries", "fusion")
    }
    check_arguments(
        ChatTemplate.__init__,
        rest,
        "template",
        skip=("tokenizer", "token_count", "token_grid", "merge_size"),
        name="the chat template",
    )


def resolve_template_config(template_cfg: dict) -> dict:
    """The template config with a `jinja` path replaced by the template text and its special-token
    strings, so checkpoints carry the template itself."""
    cfg = dict(template_cfg)
    if cfg.get("jinja"):
        from vlm.data.jinja_template import generation_stop_ids, load_chat_template

        source = str(cfg["jinja"])
        text, found = load_chat_template(source)
        cfg["jinja"], cfg["specials"] = text, {**found, **dict(cfg.get("specials") or {})}
        if not cfg.get("stop_token_ids"):
            cfg["stop_token_ids"] = generation_stop_ids(source)
    return cfg


def stop_ids(tokenizer: TextTokenizer, template_cfg: dict | None = None) -> list[int]:
    """Tokens that end a generated turn: ours (`<|im_end|>`, `<|endoftext|>`), the `eos_token` of a
    model's own chat template when it is one token, and the `eos_token_id`s of its
    `generation_config.json` (`template.stop_token_ids`, filled by `resolve_template_config`; Llama
    3's `<|eot_id|>`). Ids outside the tokenizer's vocabulary are an error: the folder's
    generation_config does not belong to this tokenizer."""
    cfg = template_cfg or {}
    ids = [tokenizer.im_end_id, tokenizer.eos_id]
    eos = (cfg.get("specials") or {}).get("eos_token")
    if eos:
        t = tokenizer.tok.token_to_id(eos)
        if t is not None and t not in ids:
            ids.append(t)
    for t in cfg.get("stop_token_ids") or []:
        if tokenizer.tok.id_to_token(int(t)) is None:
            raise ValueError(
                f"generation_config.json stop token id {t} is not in the tokenizer "
                f"(vocabulary {tokenizer.vocab_size}): is data.template.jinja the tokenizer's own folder?"
            )
        if int(t) not in ids:
            ids.append(int(t))
    return ids
