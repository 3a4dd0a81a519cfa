"""Pretrained parts from Hugging Face-layout folders (`config.json` + `*.safetensors`).

A pretrained part is read in two steps: its folder's `config.json` becomes our native config
(`specs`), which builds our native module, which is then filled with the folder's weights
(`loaders`, through the key tables of `keys`; `folder` reads the files). The module's config is
therefore what a checkpoint stores: it rebuilds without the folder.
"""

from vlm.model.hf.folder import PretrainedError, SafetensorsFolder, check_and_load, read_config
from vlm.model.hf.keys import (
    LLAMA_LAYER,
    QKV_BIAS,
    QWEN2VL_BLOCK,
    QWEN2VL_MERGER,
    SIGLIP_LAYER,
    decoder_key_map,
    expand,
)
from vlm.model.hf.loaders import (
    LOADERS,
    Loader,
    pretrained_decoder,
    pretrained_llava_projector,
    pretrained_qwen2vl_merger,
    pretrained_qwen2vl_vision,
    pretrained_vision_encoder,
    reads_no_weights,
    skeleton,
)

__all__ = [
    "LLAMA_LAYER",
    "LOADERS",
    "QKV_BIAS",
    "QWEN2VL_BLOCK",
    "QWEN2VL_MERGER",
    "SIGLIP_LAYER",
    "Loader",
    "PretrainedError",
    "SafetensorsFolder",
    "check_and_load",
    "decoder_key_map",
    "expand",
    "pretrained_decoder",
    "pretrained_llava_projector",
    "pretrained_qwen2vl_merger",
    "pretrained_qwen2vl_vision",
    "pretrained_vision_encoder",
    "read_config",
    "reads_no_weights",
    "skeleton",
]
