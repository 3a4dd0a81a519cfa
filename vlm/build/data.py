"""Build the data side of a model from plain config dicts: the media processor and the chat
template (and the tokens that end a generated turn).

Both follow the model's `Geometry` (`vlm.model.geometry`): patch, merge and temporal patch sizes, the token
layout and the rope come from the model's spec, never from their own configs. A checkpoint's
processor and template configs are untrusted (`trusted=False`): every key is checked against the
processor's / template's arguments, no model folder is read and the chat template must be the
template's text, never a path.
"""

from __future__ import annotations

from functools import partial

from vlm.build.checks import check_arguments, check_config_keys, plain
from vlm.data.media_processor import MediaProcessor
from vlm.data.template import ChatTemplate
from vlm.model.fields import check_number, short
from vlm.model.geometry import Geometry
from vlm.model.projector import token_grid, visual_token_count
from vlm.tokenizer import TextTokenizer

# A checkpoint's processor cannot make one image cost more than 8192² pixels (an absurd
# `image_size` would otherwise allocate it at the first prompt).
PROCESSOR_CAPS = {
    "image_size": 8192,
    "min_pixels": 2**26,
    "max_pixels": 2**26,
    "min_tokens": 2**20,
    "max_tokens": 2**20,
}


def build_processor(processor_cfg: dict, trusted: bool = True, geometry: Geometry | None = None) -> MediaProcessor:
    """The image processor config, with the video processor's keys under `video` (optional; see
    :class:`~vlm.data.sample.MediaProcessor`). The result is an `ImageProcessor` whose `.video` is
    the `VideoProcessor` and whose `to_config()` round-trips both. `pretrained: FOLDER` takes the
    folder's `preprocessor_config.json` (`vlm.data.hf_processor`) over the other keys (a training
    config only: a checkpoint records the resolved keys, `trusted=False` refuses it).

    geometry: the model's (`vlm.model.geometry.Geometry`): patch_size, merge_size and video.temporal_patch
    come from it. A `patch_size` / `merge_size` / `video.temporal_patch` in the config (a
    checkpoint's record, a folder's preprocessor_config.json) that disagrees with it is an error
    naming both values. Without it the config's own keys are used (a standalone processor)."""
    cfg = plain(processor_cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"processor is not a mapping (got {type(cfg).__name__})")
    cfg = {k: plain(v) for k, v in cfg.items()}
    if not trusted:
        check_config_keys(cfg, "processor")
        if cfg.get("pretrained") is not None:
            raise ValueError(
                f"processor.pretrained={short(cfg['pretrained'])}: a checkpoint's processor config "
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
            raise ValueError(f"processor.video={short(video)} is not a mapping")
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
            raise ValueError(f"{where}={short(d)} is not a mapping")
        for k in caps & set(d):
            if d[k] is not None and (isinstance(d[k], bool) or not isinstance(d[k], int)):
                raise ValueError(f"{where}.{k}={short(d[k])} is not of type int | None")
            check_number(d[k], k, f"{where}.{k}")
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
    (`vlm.model.geometry.Geometry`): the token layout (`merge_size`, `queries`, `fusion`, see
    `vlm.model.projector.token_grid`) and `rope` come from it; the same keys in the config (older
    checkpoints carry them) must agree with it and are otherwise ignored. Without it the config's
    own layout keys are used (a standalone template).

    `jinja`: the model's own chat template, run in Jinja's sandbox (`vlm.data.jinja_template`). In a
    training config it may be a path (a model folder, a `.jinja` / `.json` file) or the text; a
    checkpoint (`trusted=False`) carries the text itself (`resolve_template_config`), so there it
    must be template text: a path is refused, no file is read."""
    cfg = plain(template_cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"template is not a mapping (got {type(cfg).__name__})")
    cfg = {k: plain(v) for k, v in cfg.items()}
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
            f"template.jinja={short(jinja)} is not a chat template's text: a checkpoint carries the "
            "template itself, never a path to read"
        )
    for key, values in (("specials", (str, type(None))), ("media_markers", (str,))):
        v = cfg.get(key)
        if v is not None and not (
            isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, values) for k, x in v.items())
        ):
            raise ValueError(f"template.{key}={short(v)} is not a mapping of strings")
    ids = cfg.get("stop_token_ids")
    if ids is not None and not (
        isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise ValueError(f"template.stop_token_ids={short(ids)} is not a list of token ids")
    for key, kinds in (
        ("merge_size", (int, type(None))),
        ("queries", (int, type(None))),
        ("fusion", (str, type(None))),
    ):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"template.{key}={short(v)} is not of type {' | '.join(t.__name__ for t in kinds)}")
        check_number(v, key, f"template.{key}")
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
