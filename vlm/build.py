"""Build the model, media processor and template from plain config dicts.

The same functions serve training (config from Hydra) and inference (config read back from a
checkpoint). A checkpoint's config is untrusted input: `safe_instantiate` only builds classes
under the `vlm.` package, so a doctored `config.yaml` cannot name `os.system`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from hydra.utils import instantiate

from vlm.data.sample import MediaProcessor
from vlm.data.template import ChatTemplate
from vlm.model.projector import token_grid, visual_token_count
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

ALLOWED_TARGET_PREFIX = "vlm."


def _check_targets(cfg: Any, where: str = "model") -> None:
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == "_target_" and not str(v).startswith(ALLOWED_TARGET_PREFIX):
                raise ValueError(f"refusing to build {where}._target_={v!r}: only classes under {ALLOWED_TARGET_PREFIX!r} are allowed")
            _check_targets(v, f"{where}.{k}")
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            _check_targets(v, f"{where}[{i}]")


def safe_instantiate(cfg: dict, where: str, **kwargs):
    _check_targets(cfg, where)
    return instantiate(cfg, **kwargs)


def build_model(model_cfg: dict, tokenizer: TextTokenizer) -> VLM:
    """model_cfg: {encoder, projector, decoder: {_target_, …}, image_attention, freeze?}."""
    dec = dict(model_cfg["decoder"])
    pretrained = bool(dec.get("pretrained"))
    if pretrained:
        dec.pop("vocab_size", None)  # the folder's config says it; grown below if tokens were added
    elif dec.get("vocab_size") in (None, "auto"):
        dec["vocab_size"] = tokenizer.vocab_size
    elif dec["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"decoder.vocab_size {dec['vocab_size']} < tokenizer vocabulary {tokenizer.vocab_size}")
    encoder = safe_instantiate(dict(model_cfg["encoder"]), "encoder")
    decoder = safe_instantiate(dec, "decoder")
    if pretrained and tokenizer.vocab_size > decoder.vocab_size:
        decoder.grow_vocab(tokenizer.vocab_size)
    proj = dict(model_cfg["projector"])
    # The projector reads what the encoder emits (k·dim with several concatenated feature layers)
    # and writes the decoder's width.
    for key, have, what in (("in_dim", encoder.out_dim, "the encoder emits"), ("out_dim", decoder.dim, "the decoder is")):
        if proj.get(key) in (None, "auto"):
            proj[key] = have
        elif int(proj[key]) != have:
            raise ValueError(f"projector.{key}={proj[key]} but {what} {have} wide "
                             f"(set projector.{key}=null to follow it)")
    projector = safe_instantiate(proj, "projector")
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


def build_processor(processor_cfg: dict) -> MediaProcessor:
    """The image processor config, with the video processor's keys under `video` (optional; see
    :class:`~vlm.data.sample.MediaProcessor`). The result is an `ImageProcessor` whose `.video` is
    the `VideoProcessor` and whose `to_config()` round-trips both. `pretrained: FOLDER` takes the
    folder's `preprocessor_config.json` (`vlm.data.hf_processor`) over the other keys."""
    cfg = dict(processor_cfg)
    pretrained = cfg.pop("pretrained", None)
    if pretrained:
        from vlm.data.hf_processor import processor_config_from_hf

        hf = processor_config_from_hf(pretrained)
        video = {**dict(cfg.get("video") or {}), **hf.pop("video", {})}
        cfg.update(hf)
        if video:
            cfg["video"] = video
        for k in ("min_tokens", "max_tokens"):  # the folder gives pixel caps
            if "min_pixels" in hf:
                cfg[k] = None
    return MediaProcessor.from_config(cfg)


def check_processor_fits(model: VLM, processor) -> None:
    """Fail early, with both config keys named, when the processor's patches cannot feed the
    model's vision encoder (patch size or temporal patch) or its merge differs from the projector's."""
    enc = model.encoder
    T = getattr(processor, "temporal_patch", 1)
    if processor.patch_size != enc.patch_size or T != getattr(enc, "temporal_patch", 1):
        raise ValueError(
            f"processor patch_size={processor.patch_size}, temporal_patch={T} do not fit the vision encoder "
            f"(patch_size={enc.patch_size}, temporal_patch={getattr(enc, 'temporal_patch', 1)}); "
            "set data.processor.patch_size / data.processor.video.temporal_patch to the encoder's"
        )
    if processor.merge_size != model.projector.merge_size:
        raise ValueError(
            f"processor merge_size={processor.merge_size} differs from the projector's {model.projector.merge_size}: "
            "placeholder spans would not match the visual tokens"
        )


def build_template(template_cfg: dict, tokenizer: TextTokenizer) -> ChatTemplate:
    """template_cfg: ChatTemplate kwargs plus the token layout keys `merge_size`, `queries`
    (qformer) and `fusion` (see `vlm.model.projector.token_grid`)."""
    cfg = dict(template_cfg)
    layout = dict(merge_size=int(cfg.pop("merge_size", 1) or 1), queries=cfg.pop("queries", None),
                  fusion=cfg.pop("fusion", None) or "interleave")
    jinja = cfg.pop("jinja", None)
    specials = cfg.pop("specials", None)
    markers = cfg.pop("media_markers", None)
    cfg.pop("stop_token_ids", None)  # read by `stop_ids`, not the template
    kw = dict(merge_size=layout["merge_size"], token_grid=partial(token_grid, **layout), **cfg)
    if jinja:  # the model's own chat template (vlm.data.jinja_template)
        from vlm.data.jinja_template import JinjaChatTemplate, load_chat_template

        text, found = load_chat_template(str(jinja))
        return JinjaChatTemplate(tokenizer, partial(visual_token_count, **layout), jinja=text,
                                 specials={**found, **dict(specials or {})}, media_markers=markers, **kw)
    return ChatTemplate(tokenizer, partial(visual_token_count, **layout), **kw)


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


def check_template_fits(model: VLM, template: ChatTemplate) -> None:
    """Fail early when the template's media spans would not match the model's visual tokens
    (projector kind / merge / queries or fusion differ between the data and model configs)."""
    m = model.projector.merge_size
    for grid in ((1, 2 * m, 4 * m), (2, 4 * m, 2 * m)):
        ours, theirs = template.token_grid(grid), model.token_grid(grid)
        if tuple(ours) != tuple(theirs):
            raise ValueError(
                f"the template lays out a {grid} media item as tokens {tuple(ours)} but the model as {tuple(theirs)}: "
                "data.template.merge_size / queries / fusion must follow model.projector and model.fusion"
            )


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
            raise ValueError(f"generation_config.json stop token id {t} is not in the tokenizer "
                             f"(vocabulary {tokenizer.vocab_size}): is data.template.jinja the tokenizer's own folder?")
        if int(t) not in ids:
            ids.append(int(t))
    return ids
