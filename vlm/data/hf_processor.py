"""A model folder's published preprocessing (`preprocessor_config.json`) as our processor config.

    data.processor.pretrained=/models/clip-vit-large-patch14-336

`build_processor` merges what this returns over the data config's processor keys (the folder's
values win for every key it sets), so training and inference preprocess exactly as the model was
pretrained; the checkpoint stores the resolved config. Supported: CLIP (shortest-edge resize +
centre crop -> `resolution=crop`), SigLIP (square resize -> `fixed`), Qwen2-VL (smart resize
between min/max pixels -> `dynamic`, patch / merge / temporal patch sizes). Options we cannot
reproduce (a crop size different from the resize size, no normalisation, …) are refused with the
option named.
"""

from __future__ import annotations

import json
from pathlib import Path

# PIL resampling codes used by transformers' configs
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ProcessorConfigError(ValueError):
    pass


def _get(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def processor_config_from_hf(folder: str | Path) -> dict:
    path = Path(folder)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json at {path}")
    cfg = json.loads(path.read_text())
    kind = str(cfg.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    out: dict = {}
    if cfg.get("do_normalize", True) is False or cfg.get("do_rescale", True) is False:
        raise ProcessorConfigError(f"{path}: do_rescale / do_normalize false is not supported")
    if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ProcessorConfigError(f"{path}: rescale_factor {cfg.get('rescale_factor')} is not 1/255")
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE or _RESAMPLE[resample] == "hamming":
        raise ProcessorConfigError(f"{path}: resample {resample!r} is not supported")
    out["interpolation"] = _RESAMPLE[resample]
    out["mean"], out["std"] = list(cfg["image_mean"]), list(cfg["image_std"])
    size = cfg.get("size") or {}
    if kind == "CLIPImageProcessor":
        edge = size.get("shortest_edge")
        crop = cfg.get("crop_size") or {}
        if not cfg.get("do_center_crop", True) or edge is None:
            raise ProcessorConfigError(f"{path}: CLIP preprocessing without a shortest-edge resize + centre crop")
        if crop.get("height", edge) != edge or crop.get("width", edge) != edge:
            raise ProcessorConfigError(f"{path}: crop_size {crop} differs from the resize size {edge}")
        out.update(resolution="crop", image_size=int(edge))
    elif kind == "SiglipImageProcessor":
        h, w = size.get("height"), size.get("width")
        if h is None or h != w:
            raise ProcessorConfigError(f"{path}: SigLIP size {size} is not a square")
        out.update(resolution="fixed", image_size=int(h))
    elif kind == "Qwen2VLImageProcessor":
        out.update(
            resolution="dynamic",
            min_pixels=int(_get(cfg, "min_pixels", default=_get(size, "shortest_edge", default=56 * 56))),
            max_pixels=int(_get(cfg, "max_pixels", default=_get(size, "longest_edge", default=28 * 28 * 1280))),
            patch_size=int(cfg.get("patch_size", 14)),
            merge_size=int(cfg.get("merge_size", 2)),
            video={"temporal_patch": int(cfg.get("temporal_patch_size", 2))},
        )
    else:
        raise ProcessorConfigError(
            f"{path}: image_processor_type {cfg.get('image_processor_type')!r} is not supported "
            "(CLIP, SigLIP, Qwen2-VL)"
        )
    return out
