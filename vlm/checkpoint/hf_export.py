"""Our VLM -> a Hugging Face-layout folder (`python -m vlm.cli.export ckpt=… out=… format=hf_qwen2vl|hf_llava`).

The inverse of `vlm.model.hf`: the same key tables, read backwards, with the fused / reshaped
tensors put back together (q, k, v -> `qkv`; our linear patch embedding -> the Conv2d / Conv3d
weight; the learned position table -> the flat embedding, CLIP's CLS position first). The folder
holds `config.json`, `model.safetensors` (the hub checkpoints' key layout, which transformers 4
and 5 and serving engines read) and `tokenizer.json`, so a model trained here can be served by
any engine that reads those layouts.

Only a model whose architecture *is* the target's can be written. The model's spec
(`VLM.spec`, `vlm.model.config`) is compared with what the format requires (`REQUIRES`: spec field
-> value); the first field that differs is an error naming it and both values
(`format=hf_qwen2vl: model.encoder.pos='learned', the format needs 'rope2d'`), never a silently
different model.

The folder is servable as written: besides the weights it holds every file transformers'
`AutoProcessor` / `AutoTokenizer` and vLLM read (`serving_files`):

* `tokenizer_config.json` (+ `chat_template.jinja`): `PreTrainedTokenizerFast` over our
  `tokenizer.json` (read as is), our special tokens (eos `<|im_end|>`, pad `<|pad|>`, no bos is
  prepended; `image_token` / `video_token` for the processors) and a Jinja chat template that renders
  a conversation to the same prompt ids as our `ChatTemplate` (`chat_template_jinja`; a model trained
  with its own Jinja template gets that template). The processor expands each `<|image_pad|>` to the
  image's token count, as our template does.
* `preprocessor_config.json` (and for Qwen2-VL `video_preprocessor_config.json`; LLaVA a
  `processor_config.json`): the image processor with our geometry, pixel budget, resampling filter
  and normalisation.
* `generation_config.json`: eos = our stop ids (`vlm.build.model.stop_ids`), bos = `<|endoftext|>`
  (never prepended; Qwen's convention), pad = `<|pad|>`, greedy decoding.
* `config.json` carries those ids too (top level and `text_config`), never the defaults of the hub
  models (Qwen's 151643 / 151645, Llama's 1 / 2).

Which image processor. The export targets transformers' PIL-based image processor
(`Qwen2VLImageProcessorPil` / `CLIPImageProcessorPil` in transformers 5, chosen with
`backend="pil"` or `use_fast=False`; the default "slow" `Qwen2VLImageProcessor` of transformers 4):
it resizes with `PIL.Image.resize(size, resample)`, the call our `ImageProcessor` makes, so the pixel
values agree to float rounding (tests/test_hf_export_files.py: 640x480, 333x517, 20x2000, within
1e-6). The "fast" torchvision processor resizes tensors with torchvision's antialiased bicubic,
which differs from PIL's by up to a few grey levels; transformers 5 picks it whenever torchvision is
installed and vLLM asks for it by default, so pass `use_fast=False` (docs/serving.md, vLLM).

What transformers cannot express is refused with one line naming the setting (`ExportError`):
Qwen2-VL's processor only resizes dynamically (`processor.resolution` must be `dynamic`), LLaVA's
gives every image the tower's one size (`crop` or `fixed` at the position table's size); no
`processor.reducing_gap` (transformers resizes with the exact filter); Qwen2-VL refuses images more
elongated than 200:1, so a larger `processor.max_aspect_ratio` is refused. Two differences remain
and are documented rather than refused: our `smart_resize` keeps every side at least one
`patch * merge` block and caps the pixel count hard, where transformers' rounds a side shorter than
half a block to 0 before its min-pixels rescale (only images with a side under `patch * merge / 2`
pixels, e.g. 10x1000 at 28: ours 28x1008, transformers' 28x560); `processor.jpeg_draft` decodes
JPEGs at a reduced scale before the resize, where a caller of transformers hands over the full
decoded image (logged at export). Videos: the per-frame resize, layout and normalisation are written;
our frame sampling and `max_video_tokens` budget are not transformers' (it samples at `fps` when
`do_sample_frames`, and caps pixels per frame only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from vlm.model.config import DecoderConfig, ModelSpec
from vlm.model.hf import LLAMA_LAYER, QKV_BIAS, QWEN2VL_BLOCK, QWEN2VL_MERGER, SIGLIP_LAYER, expand
from vlm.model.vlm import VLM
from vlm.tokenizer import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    TextTokenizer,
)

if TYPE_CHECKING:
    from vlm.checkpoint.load import LoadedVLM
    from vlm.data.media_processor import MediaProcessor
    from vlm.data.template import ChatTemplate

log = logging.getLogger("vlm.checkpoint.hf_export")

FORMATS = ("hf_qwen2vl", "hf_llava")


class ExportError(ValueError):
    """The model's architecture does not fit the requested format."""


def _num(x: float):
    return int(x) if float(x).is_integer() else x


# What each format requires of the spec: "part.field" (or a model-level field) -> value.
_COMMON = {"fusion": "interleave", "encoder.patch_embed": "linear", "decoder.qk_norm": False}
REQUIRES: dict[str, dict[str, Any]] = {
    "hf_qwen2vl": {
        **_COMMON,
        "encoder.pos": "rope2d",
        "encoder.patch_bias": False,
        "encoder.cls_token": False,
        "encoder.pre_norm": False,
        "encoder.final_norm": False,
        "encoder.attention": "frame",
        "encoder.act": "quick_gelu",
        "encoder.norm_eps": 1e-6,
        "projector.kind": "merge",
        "projector.merge_size": 2,
        "projector.norm_eps": 1e-6,
        "decoder.rope": "mrope",
        "decoder.qkv_bias": True,
    },
    "hf_llava": {
        **_COMMON,
        "encoder.pos": "learned",
        "encoder.patch_bias": False,
        "encoder.cls_token": True,
        "encoder.pre_norm": True,
        "encoder.final_norm": False,
        "encoder.temporal_patch": 1,
        "encoder.act": "quick_gelu",
        "projector.kind": "mlp",
        "projector.merge_size": 1,
        "decoder.rope": "rope",
        "decoder.qkv_bias": False,
    },
}
# the presets that give each part the format's layout, for the message
PRESETS = {
    "hf_qwen2vl": {"encoder": "model/encoder=qwen2vl_vit", "projector": "model/projector=merge", "decoder": "qwen2"},
    "hf_llava": {"encoder": "model/encoder=clip_vit", "projector": "model/projector=mlp", "decoder": "llama"},
}


def check_spec(spec: ModelSpec, fmt: str) -> None:
    """ExportError naming the first spec field whose value is not what `fmt` requires."""
    for key, want in REQUIRES[fmt].items():
        part, _, name = key.rpartition(".")
        have = getattr(getattr(spec, part), name) if part else getattr(spec, name)
        if have != want:
            hint = f" ({PRESETS[fmt][part]})" if part else ""
            raise ExportError(f"format={fmt}: model.{key}={have!r}, the format needs {want!r}{hint}")
    enc, proj = spec.encoder, spec.projector
    if len(enc.feature_indices) != 1:
        raise ExportError(f"format={fmt}: model.encoder.feature_layers={enc.feature_layers!r}, the format reads one")
    default = proj.merged_dim if proj.kind == "merge" else proj.out_dim  # the format's hidden width
    if proj.hidden not in (None, default):
        raise ExportError(f"format={fmt}: model.projector.hidden={proj.hidden!r}, the format needs {default}")


def _decoder_state(dec, body: str, head: str) -> dict[str, torch.Tensor]:
    table = expand(
        {**LLAMA_LAYER, **(QKV_BIAS if dec.config.qkv_bias else {})},
        dec.n_layers,
        {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"},
    )
    sd = dec.state_dict()
    out = {body + k[len("model.") :]: sd[v] for k, v in table.items()}
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    if not tied:
        out[head + "lm_head.weight"] = sd["lm_head.weight"]
    return out


def special_ids(tok: TextTokenizer) -> dict[str, int]:
    """The special-token ids every config of the folder names: bos `<|endoftext|>` (what a
    generation with no prompt starts from; never prepended), eos `<|im_end|>` (the end of a turn),
    pad `<|pad|>`."""
    return {"bos_token_id": tok.eos_id, "eos_token_id": tok.im_end_id, "pad_token_id": tok.pad_id}


def _text_config(c: DecoderConfig, tied: bool, tok: TextTokenizer) -> dict:
    return {
        **special_ids(tok),
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.mlp_width,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "rope_theta": c.rope_theta,
    }


def qwen2vl_state_and_config(model: VLM, tok: TextTokenizer) -> tuple[dict, dict]:
    check_spec(model.spec, "hf_qwen2vl")
    enc, proj, dec = model.encoder, model.projector, model.decoder
    D = enc.dim
    sd = {}
    es = enc.state_dict()
    for k, v in QWEN2VL_BLOCK.items():
        for i in range(len(enc.blocks)):
            sd["visual." + k.format(i)] = es[v.format(i)]
    for i in range(len(enc.blocks)):
        for part in ("weight", "bias"):
            sd[f"visual.blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [es[f"blocks.{i}.attn.{p}_proj.{part}"] for p in "qkv"]
            )
    T, P, C = enc.temporal_patch, enc.patch_size, enc.channels
    sd["visual.patch_embed.proj.weight"] = es["patch_embed.proj.weight"].reshape(D, C, T, P, P)
    ps = proj.state_dict()
    for k, v in QWEN2VL_MERGER.items():
        sd["visual." + k] = ps[v]
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    sd.update(_decoder_state(dec, "model.", ""))
    text = {
        **_text_config(dec.config, tied, tok),
        "model_type": "qwen2_vl_text",
        "rope_scaling": {"type": "mrope", "mrope_section": list(dec.mrope_section)},
    }
    vision = {
        "model_type": "qwen2_vl",
        "depth": len(enc.blocks),
        "embed_dim": D,
        "hidden_size": dec.dim,
        "num_heads": enc.config.n_heads,
        "mlp_ratio": _num(enc.config.mlp_width / D),
        "patch_size": P,
        "spatial_merge_size": 2,
        "temporal_patch_size": T,
        "in_channels": C,
        "hidden_act": "quick_gelu",
    }
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **{k: v for k, v in text.items() if k != "model_type"},
        "text_config": text,
        "vision_config": vision,
        "image_token_id": tok.image_pad_id,
        "video_token_id": tok.video_pad_id,
        "vision_start_token_id": tok.vision_start_id,
        "vision_end_token_id": tok.vision_end_id,
        **special_ids(tok),
    }
    return sd, cfg


def llava_state_and_config(model: VLM, tok: TextTokenizer) -> tuple[dict, dict]:
    check_spec(model.spec, "hf_llava")
    enc, proj, dec = model.encoder, model.projector, model.decoder
    D, P, C = enc.dim, enc.patch_size, enc.channels
    n = len(enc.blocks)  # the features are the last built layer's: written as the tower's last layer
    es = enc.state_dict()
    pre = "vision_tower.vision_model."
    sd = {pre + k.removeprefix("vision_model."): es[v] for k, v in expand(SIGLIP_LAYER, n, {}).items()}
    sd[pre + "embeddings.patch_embedding.weight"] = es["patch_embed.proj.weight"].reshape(D, C, P, P)
    sd[pre + "embeddings.class_embedding"] = es["cls"]
    g = enc.pos_embed.shape[0]
    sd[pre + "embeddings.position_embedding.weight"] = torch.cat(
        [es["cls_pos"][None], es["pos_embed"].reshape(g * g, D)]
    )
    sd[pre + "pre_layrnorm.weight"], sd[pre + "pre_layrnorm.bias"] = es["pre_norm.weight"], es["pre_norm.bias"]
    # post_layernorm only touches the pooled CLS, which LLaVA never reads: identity
    sd[pre + "post_layernorm.weight"], sd[pre + "post_layernorm.bias"] = torch.ones(D), torch.zeros(D)
    ps = proj.state_dict()
    for i, j in ((1, 0), (2, 2)):
        for p in ("weight", "bias"):
            sd[f"multi_modal_projector.linear_{i}.{p}"] = ps[f"proj.{j}.{p}"]
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    sd.update(_decoder_state(dec, "language_model.model.", "language_model."))
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": D,
        "intermediate_size": enc.config.mlp_width,
        "num_hidden_layers": n,
        "num_attention_heads": enc.config.n_heads,
        "image_size": g * P,
        "patch_size": P,
        "num_channels": C,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": enc.config.norm_eps,
    }
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": {**_text_config(dec.config, tied, tok), "model_type": "llama"},
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "image_token_index": tok.image_pad_id,
        "image_token_id": tok.image_pad_id,
        "tie_word_embeddings": tied,
        "image_seq_length": g * g,
        **special_ids(tok),
    }
    return sd, cfg


# ---------------------------------------------------------------------------------- serving files
# PIL resampling codes (transformers' `resample`): every filter our processor offers has one
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4}
HF_MAX_ASPECT_RATIO = 200.0  # transformers' smart_resize refuses images more elongated than this


def _refuse(fmt: str, setting: str, value: Any, why: str) -> ExportError:
    return ExportError(f"format={fmt}: processor.{setting}={value!r}: {why}")


def _image_settings(proc: MediaProcessor) -> dict:
    """The keys every transformers image processor reads: filter, rescale, normalisation."""
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": _RESAMPLE[proc.interpolation],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(proc.mean),
        "image_std": list(proc.std),
    }


def check_processor(proc: MediaProcessor, model: VLM, fmt: str) -> None:
    """ExportError naming the first processor setting the format's transformers processor cannot
    reproduce (module docstring); logs the ones it approximates."""
    if proc.reducing_gap is not None:
        raise _refuse(fmt, "reducing_gap", proc.reducing_gap, "transformers resizes with the exact filter (needs null)")
    if proc.patch_size != model.encoder.patch_size:
        raise _refuse(fmt, "patch_size", proc.patch_size, f"the encoder's patches are {model.encoder.patch_size}")
    if fmt == "hf_qwen2vl":
        if proc.resolution != "dynamic":
            raise _refuse(fmt, "resolution", proc.resolution, "Qwen2-VL's image processor only resizes dynamically")
        if proc.max_aspect_ratio > HF_MAX_ASPECT_RATIO:
            raise _refuse(
                fmt, "max_aspect_ratio", proc.max_aspect_ratio, "Qwen2-VL's image processor refuses beyond 200"
            )
        if proc.merge_size != model.projector.merge_size:
            raise _refuse(fmt, "merge_size", proc.merge_size, f"the projector merges {model.projector.merge_size}")
        if proc.temporal_patch != model.encoder.temporal_patch:
            raise _refuse(
                fmt, "video.temporal_patch", proc.temporal_patch, f"the encoder's is {model.encoder.temporal_patch}"
            )
        if proc.video.resolution != "dynamic" or proc.video.image.reducing_gap is not None:
            raise _refuse(fmt, "video", proc.video.to_config(), "video frames must resize as images do")
    else:
        side = model.encoder.pos_embed.shape[0] * model.encoder.patch_size
        if proc.resolution not in ("crop", "fixed"):
            raise _refuse(fmt, "resolution", proc.resolution, "LLaVA's image processor gives every image one size")
        if proc.image_size != side:
            raise _refuse(fmt, "image_size", proc.image_size, f"the vision tower's position table is {side}px")
    if proc.max_aspect_ratio < HF_MAX_ASPECT_RATIO and fmt == "hf_qwen2vl":
        log.warning(
            "processor.max_aspect_ratio=%g: transformers also takes images up to 200:1, which this model never saw",
            proc.max_aspect_ratio,
        )
    if proc.jpeg_draft:
        log.warning(
            "processor.jpeg_draft=true: served images are decoded at full size before the resize, "
            "so JPEG inputs differ slightly from what the model was trained on"
        )


def qwen2vl_processor_configs(proc: MediaProcessor) -> dict[str, dict]:
    """preprocessor_config.json and video_preprocessor_config.json for Qwen2-VL."""
    geometry = {
        "patch_size": proc.patch_size,
        "temporal_patch_size": proc.temporal_patch,
        "merge_size": proc.merge_size,
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        **_image_settings(proc),
        **geometry,
        "min_pixels": proc.min_pixels,
        "max_pixels": proc.max_pixels,
        "size": {"shortest_edge": proc.min_pixels, "longest_edge": proc.max_pixels},
    }
    v = proc.video
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2VLProcessor",
        **_image_settings(v.image),
        **geometry,
        "min_pixels": v.image.min_pixels,
        "max_pixels": v.image.max_pixels,
        "size": {"shortest_edge": v.image.min_pixels, "longest_edge": v.image.max_pixels},
        "do_sample_frames": False,  # the caller samples the frames (vLLM does)
        "min_frames": v.temporal_patch,
        "max_frames": v.max_frames,
    }
    if v.target_fps is not None:
        video["fps"] = v.target_fps
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def llava_processor_configs(proc: MediaProcessor, model: VLM) -> dict[str, dict]:
    """preprocessor_config.json (CLIP's processor) and processor_config.json for LLaVA."""
    s = proc.image_size
    size = {"shortest_edge": s} if proc.resolution == "crop" else {"height": s, "width": s}
    image = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        **_image_settings(proc),
        "size": size,
        "do_center_crop": proc.resolution == "crop",
        "crop_size": {"height": s, "width": s},
    }
    processor = {
        "processor_class": "LlavaProcessor",
        "patch_size": model.encoder.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # CLS, which "default" drops again
        "image_token": IMAGE_PAD,
    }
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def _jinja_str(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads Python's escapes; non-ASCII stays as is)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template_jinja(template: ChatTemplate, fmt: str) -> str:
    """A Jinja chat template that renders conversations (`{"role", "content"}` with text, image
    and video items, as transformers and vLLM pass them) to the text whose tokens are our
    `ChatTemplate`'s prompt ids: `<|im_start|>ROLE\\n`, the items in order (an image as
    `<|vision_start|><|image_pad|><|vision_end|>`, which the processor expands to the image's token
    count), `<|im_end|>\\n`; the template's `system_prompt` when the conversation has none. A model
    trained with its own Jinja template (`JinjaChatTemplate`) gets that template."""
    from vlm.data.jinja_template import JinjaChatTemplate

    system = ""
    if template.system_prompt:
        system = (
            "{%- if not (messages and messages[0]['role'] == 'system') %}\n"
            "{%- set messages = [{'role': 'system', 'content': "
            + _jinja_str(template.system_prompt)
            + "}] + messages %}\n"
            "{%- endif %}\n"
        )
    if isinstance(template, JinjaChatTemplate):
        markers = template.media_markers
        want = {"image": IMAGE_PAD, "video": VIDEO_PAD}
        for kind, marker in markers.items():
            if marker != want.get(kind):
                raise ExportError(
                    f"format={fmt}: template.media_markers.{kind}={marker!r}: the processor expands {want.get(kind)!r}"
                )
        return system + template.jinja_text
    video = (
        "{{- '" + VISION_START + VIDEO_PAD + VISION_END + "' }}"
        if fmt == "hf_qwen2vl"
        else "{{- raise_exception('this model takes images, not videos') }}"
    )
    return (
        system + "{%- for message in messages %}\n"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{- raise_exception('unknown role ' + message['role']) }}{%- endif %}\n"
        "{{- '" + IM_START + "' + message['role'] + '\\n' }}\n"
        "{%- if message['content'] is string %}{{- message['content'] }}\n"
        "{%- else %}{%- for item in message['content'] %}\n"
        "{%- if item['type'] == 'text' %}{{- item['text'] }}\n"
        "{%- elif item['type'] in ['image', 'image_url'] %}{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' }}\n"
        "{%- elif item['type'] in ['video', 'video_url'] %}" + video + "\n"
        "{%- else %}{{- raise_exception('unknown content item type ' + item['type']) }}{%- endif %}\n"
        "{%- endfor %}{%- endif %}\n"
        "{{- '" + IM_END + "\\n' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}\n"
    )


def tokenizer_config(tok: TextTokenizer, template: ChatTemplate, fmt: str, max_length: int) -> dict:
    """tokenizer_config.json: our tokenizer.json as is, its special tokens, the chat template."""
    from vlm.data.jinja_template import JinjaChatTemplate

    specials = template.specials if isinstance(template, JinjaChatTemplate) else {}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.get("bos_token"),
        "eos_token": specials.get("eos_token", IM_END),
        "pad_token": PAD,
        "unk_token": None,
        "extra_special_tokens": {
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_start_token": VISION_START,
            "vision_end_token": VISION_END,
        },
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "processor_class": "Qwen2VLProcessor" if fmt == "hf_qwen2vl" else "LlavaProcessor",
        "chat_template": chat_template_jinja(template, fmt),
    }


def generation_config(tok: TextTokenizer, stop: list[int]) -> dict:
    """generation_config.json: stop at our stop ids, greedy."""
    return {**special_ids(tok), "eos_token_id": list(stop), "do_sample": False}


def serving_files(loaded: LoadedVLM, fmt: str) -> dict[str, dict | str]:
    """Every file besides the weights, config.json and tokenizer.json: name -> JSON object (or the
    chat template's text). Checks the processor and template first (ExportError)."""
    from vlm.build.model import stop_ids

    model, tok, proc, template = loaded.model, loaded.tokenizer, loaded.processor, loaded.template
    check_processor(proc, model, fmt)
    files: dict[str, dict | str] = {}
    tcfg = tokenizer_config(tok, template, fmt, model.decoder.config.max_seq_len)
    files["tokenizer_config.json"] = tcfg
    files["chat_template.jinja"] = tcfg["chat_template"]
    if fmt == "hf_qwen2vl":
        files.update(qwen2vl_processor_configs(proc))
    else:
        files.update(llava_processor_configs(proc, model))
    files["generation_config.json"] = generation_config(tok, stop_ids(tok, (loaded.config or {}).get("template")))
    return files


def export_hf(loaded: LoadedVLM, out: str | Path, fmt: str) -> Path:
    """Write `loaded` (model, tokenizer, processor, template: `load_checkpoint`) to `out` in the
    format's hub layout, with every file transformers and vLLM read (module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    model, tok = loaded.model, loaded.tokenizer
    sd, cfg = (qwen2vl_state_and_config if fmt == "hf_qwen2vl" else llava_state_and_config)(model, tok)
    files = serving_files(loaded, fmt)  # every refusal before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in sd.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(out / "tokenizer.json")
    for name, content in files.items():
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return out
