"""`format=hf_qwen2vl` / `hf_llava` folders are servable as written: transformers loads the
tokenizer and the processor from the folder alone (no hub access), its chat template gives our
template's prompt ids (text-only and with images, the processor expanding the image placeholder),
its PIL-based image processor gives our pixel values and grids, generation_config stops where we
stop, and processor settings transformers cannot express are refused with one line."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlm.build.model import stop_ids  # noqa: E402
from vlm.checkpoint.hf_export import ExportError, export_hf  # noqa: E402
from vlm.checkpoint.load import LoadedVLM  # noqa: E402
from vlm.data.media import MediaError  # noqa: E402
from vlm.data.media_processor import MediaProcessor  # noqa: E402
from vlm.data.template import ChatTemplate  # noqa: E402
from vlm.model.geometry import visual_token_count  # noqa: E402
from vlm.model.hf import (  # noqa: E402
    pretrained_decoder,
    pretrained_llava_projector,
    pretrained_qwen2vl_merger,
    pretrained_qwen2vl_vision,
    pretrained_vision_encoder,
)
from vlm.model.vlm import VLM  # noqa: E402
from vlm.tokenizer import train_tokenizer  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXTS = ["a red square", "What color is the circle?", "blue", "user\n", "assistant\n", "system\n"]
# transformers' Qwen2-VL processor defaults: P=14, merge 2, 2-frame temporal patches
QWEN = dict(patch_size=14, merge_size=2, resolution="dynamic", min_pixels=56 * 56, max_pixels=28 * 28 * 256)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 10, vocab_size=400)


@pytest.fixture(scope="module")
def qwen_model(tok, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, temporal_patch_size=2
        ),
        text_config=dict(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
        ),
    )
    path = str(tmp_path_factory.mktemp("qwen") / "in")
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    return VLM(
        pretrained_qwen2vl_vision(path),
        pretrained_qwen2vl_merger(path),
        pretrained_decoder(path, rope="mrope"),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    ).eval()


def qwen_loaded(model, tok, system_prompt=None, **proc) -> LoadedVLM:
    processor = MediaProcessor(**{**QWEN, "mean": CLIP_MEAN, "std": CLIP_STD, **proc}, video={"temporal_patch": 2})
    template = ChatTemplate(
        tok, partial(visual_token_count, merge_size=2), rope="mrope", merge_size=2, system_prompt=system_prompt
    )
    return LoadedVLM(model, tok, processor, template, {"template": {}})


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def window_order(h: int, w: int, m: int = 2) -> torch.Tensor:
    """Row-major patch index of each patch in Qwen2-VL's processor order (m x m windows)."""
    return torch.arange(h * w).view(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)


def ours(messages: list[dict]) -> list[dict]:
    """transformers' message format -> ours (media items numbered in order)."""
    out, n = [], 0
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            items = []
            for it in content:
                if it["type"] in ("image", "video"):
                    items.append({"type": it["type"], "media": n})
                    n += 1
                else:
                    items.append(it)
            content = items
        out.append({"role": m["role"], "content": content})
    return out


CHAT = [
    {"role": "user", "content": [{"type": "text", "text": "What color is the circle?"}]},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "a red square"},
]


@pytest.fixture(scope="module")
def qwen_folder(qwen_model, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_out") / "hf"
    export_hf(qwen_loaded(qwen_model, tok), out, "hf_qwen2vl")
    return out


def pil_processor(out):
    """transformers' processor from the folder alone, with the PIL-based image processor
    (`use_fast=False`, what vLLM is told in docs/serving.md). Qwen2-VL's video processor needs
    torchvision: where it is missing, a bare video processor stands in for it (transformers
    cannot even check its class then) and everything else still comes from the folder."""
    if transformers.utils.is_torchvision_available():
        return transformers.AutoProcessor.from_pretrained(out, local_files_only=True, use_fast=False)
    from transformers.video_processing_utils import BaseVideoProcessor

    check = transformers.ProcessorMixin.check_argument_for_proper_class

    def skip_video(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class", skip_video)
        return transformers.AutoProcessor.from_pretrained(
            out, local_files_only=True, use_fast=False, video_processor=BaseVideoProcessor()
        )


def test_qwen2vl_folder_has_every_file_and_loads_offline(qwen_folder, tok):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "generation_config.json",
    ):
        assert (qwen_folder / name).is_file(), name
    t = transformers.AutoTokenizer.from_pretrained(qwen_folder, local_files_only=True)
    assert (t.eos_token_id, t.pad_token_id, t.bos_token) == (tok.im_end_id, tok.pad_id, None)
    assert t.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]) == [tok.image_pad_id, tok.video_pad_id]
    p = pil_processor(qwen_folder)
    assert type(p).__name__ == "Qwen2VLProcessor"
    assert type(p.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert p.image_token_id == tok.image_pad_id


def test_qwen2vl_config_and_generation_config_carry_our_ids(qwen_folder, tok):
    cfg = transformers.AutoConfig.from_pretrained(qwen_folder, local_files_only=True)
    for c in (cfg, cfg.text_config):
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (tok.eos_id, tok.im_end_id, tok.pad_id)
    assert (cfg.image_token_id, cfg.video_token_id) == (tok.image_pad_id, tok.video_pad_id)
    gen = transformers.GenerationConfig.from_pretrained(qwen_folder, local_files_only=True)
    assert gen.eos_token_id == stop_ids(tok) == [tok.im_end_id, tok.eos_id]
    assert (gen.bos_token_id, gen.pad_token_id, gen.do_sample) == (tok.eos_id, tok.pad_id, False)


def test_qwen2vl_chat_template_gives_our_prompt_ids(qwen_folder, qwen_model, tok):
    template = qwen_loaded(qwen_model, tok).template
    t = transformers.AutoTokenizer.from_pretrained(qwen_folder, local_files_only=True)
    for gen in (True, False):
        got = t.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert got == template.render_messages(ours(CHAT), [], add_generation_prompt=gen).input_ids

    # with images: the processor expands each placeholder to the image's token count
    p = pil_processor(qwen_folder)
    proc = qwen_loaded(qwen_model, tok).processor
    images = [noise(640, 480), noise(333, 517, 1)]
    chat = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}, {"type": "image"}],
        }
    ]
    text = p.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    got = p(text=[text], images=images, return_tensors="pt")
    grids = [proc.process_image(im)[1] for im in images]
    want = template.render_messages(ours(chat), grids, add_generation_prompt=True).input_ids
    assert got["input_ids"][0].tolist() == want
    assert got["image_grid_thw"].tolist() == [list(g) for g in grids]


def test_qwen2vl_system_prompt_is_in_the_template(qwen_model, tok, tmp_path):
    loaded = qwen_loaded(qwen_model, tok, system_prompt='Réponds en un mot 😀\n{{ "quoted" }} \\n')
    export_hf(loaded, tmp_path / "hf", "hf_qwen2vl")
    t = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    got = t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == loaded.template.render_messages(ours(CHAT), [], add_generation_prompt=True).input_ids
    own = [{"role": "system", "content": "blue"}, *CHAT]  # a conversation's own system turn wins
    got = t.apply_chat_template(own, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == loaded.template.render_messages(ours(own), [], add_generation_prompt=True).input_ids


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (20, 2000)])
def test_qwen2vl_image_processor_matches_ours(qwen_folder, qwen_model, tok, size):
    """transformers' PIL-based Qwen2-VL processor, loaded from the export: our pixel values (in its
    window order, the image repeated over the temporal patch) and grid, to float rounding."""
    ip = pil_processor(qwen_folder).image_processor
    proc = qwen_loaded(qwen_model, tok).processor
    image = noise(*size)
    hf = ip(images=[image], return_tensors="pt")
    patches, grid = proc.process_image(image)
    _, h, w = grid
    assert hf["image_grid_thw"].tolist() == [list(grid)]
    torch.testing.assert_close(hf["pixel_values"], patches[window_order(h, w)], atol=1e-6, rtol=0)


def test_qwen2vl_both_processors_refuse_a_1x2000_strip(qwen_folder, qwen_model, tok):
    ip = pil_processor(qwen_folder).image_processor
    proc = qwen_loaded(qwen_model, tok).processor
    for size in ((1, 2000), (2000, 1)):
        with pytest.raises(ValueError, match="aspect ratio"):
            ip(images=[noise(*size)], return_tensors="pt")
        with pytest.raises(MediaError, match="aspect_ratio"):
            proc.process_image(noise(*size))


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("resolution", "fixed", "format=hf_qwen2vl: processor.resolution='fixed': Qwen2-VL's image processor only"),
        ("reducing_gap", 2.0, "format=hf_qwen2vl: processor.reducing_gap=2.0: transformers resizes with the exact"),
        ("max_aspect_ratio", 500.0, "format=hf_qwen2vl: processor.max_aspect_ratio=500.0: Qwen2-VL's image processor"),
    ],
)
def test_settings_transformers_cannot_express_are_refused(qwen_model, tok, tmp_path, setting, value, message):
    extra = {"image_size": 224} if setting == "resolution" else {}
    loaded = qwen_loaded(qwen_model, tok, **{setting: value, **extra})
    with pytest.raises(ExportError) as e:
        export_hf(loaded, tmp_path / "hf", "hf_qwen2vl")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def test_other_interpolations_are_written_as_their_pil_filter(qwen_model, tok, tmp_path):
    loaded = qwen_loaded(qwen_model, tok, interpolation="bilinear")
    export_hf(loaded, tmp_path / "hf", "hf_qwen2vl")
    ip = pil_processor(tmp_path / "hf").image_processor
    image = noise(333, 517)
    patches, (_, h, w) = loaded.processor.process_image(image)
    got = ip(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, patches[window_order(h, w)], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ LLaVA
@pytest.fixture(scope="module")
def llava_loaded(tok, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        image_token_id=tok.image_pad_id,
        vision_feature_layer=-1,
    )
    path = str(tmp_path_factory.mktemp("llava") / "in")
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)
    model = VLM(
        pretrained_vision_encoder(path, feature_layer=-1),
        pretrained_llava_projector(path),
        pretrained_decoder(path),
        media_token_ids=[tok.image_pad_id, tok.video_pad_id],
    ).eval()
    processor = MediaProcessor(patch_size=8, resolution="crop", image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    template = ChatTemplate(tok, partial(visual_token_count, merge_size=1))
    return LoadedVLM(model, tok, processor, template, {"template": {}})


def test_llava_folder_loads_offline_with_our_prompt_ids_and_pixels(llava_loaded, tok, tmp_path):
    out = export_hf(llava_loaded, tmp_path / "hf", "hf_llava")
    for name in (
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    t = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    got = t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == llava_loaded.template.render_messages(ours(CHAT), [], add_generation_prompt=True).input_ids
    p = transformers.AutoProcessor.from_pretrained(out, local_files_only=True, use_fast=False)
    assert type(p.image_processor).__name__ == "CLIPImageProcessorPil"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = p.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    for size in ((640, 480), (333, 517)):
        image = noise(*size)
        got = p(text=[text], images=[image], return_tensors="pt")
        patches, grid = llava_loaded.processor.process_image(image)
        want = llava_loaded.template.render_messages(ours(chat), [grid], add_generation_prompt=True).input_ids
        assert got["input_ids"][0].tolist() == want
        ours_px = patches.reshape(4, 4, 3, 8, 8).permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32)
        torch.testing.assert_close(got["pixel_values"], ours_px, atol=1e-6, rtol=0)
    gen = transformers.GenerationConfig.from_pretrained(out, local_files_only=True)
    assert gen.eos_token_id == stop_ids(tok)
    cfg = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id) == (tok.eos_id, tok.im_end_id)


def test_llava_refuses_dynamic_resolution(llava_loaded, tmp_path):
    dynamic = MediaProcessor(patch_size=8, resolution="dynamic")
    loaded = LoadedVLM(llava_loaded.model, llava_loaded.tokenizer, dynamic, llava_loaded.template, {})
    with pytest.raises(ExportError, match=r"^format=hf_llava: processor.resolution='dynamic': LLaVA's image processor"):
        export_hf(loaded, tmp_path / "hf", "hf_llava")


def test_export_writes_the_serving_files_from_a_checkpoint_folder(qwen_model, tok, tmp_path):
    """`export(ckpt, out, "hf_qwen2vl")` from our export folder: the processor and template the
    checkpoint stores (rebuilt by `load_checkpoint`) are the ones written."""
    from vlm.checkpoint.export import export
    from vlm.checkpoint.load import export_folder

    loaded = qwen_loaded(qwen_model, tok)
    config = {
        "model": qwen_model.spec.to_dict(),
        "processor": loaded.processor.to_config(geometry=False),
        "template": {"max_length": 4096},
    }
    export_folder(qwen_model, tok, config, tmp_path / "ckpt")
    out = export(tmp_path / "ckpt", tmp_path / "hf", "hf_qwen2vl")
    ip = pil_processor(out).image_processor
    image = noise(333, 517)
    patches, (_, h, w) = loaded.processor.process_image(image)
    torch.testing.assert_close(ip(images=[image], return_tensors="pt")["pixel_values"], patches[window_order(h, w)])
    t = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    got = t.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got == loaded.template.render_messages(ours(CHAT), [], add_generation_prompt=True).input_ids


QWEN_JINJA = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_model_with_its_own_jinja_template_exports_that_template(qwen_model, tok, tmp_path):
    from vlm.data.jinja_template import JinjaChatTemplate

    loaded = qwen_loaded(qwen_model, tok)
    loaded.template = JinjaChatTemplate(
        tok, partial(visual_token_count, merge_size=2), jinja=QWEN_JINJA, rope="mrope", merge_size=2
    )
    export_hf(loaded, tmp_path / "hf", "hf_qwen2vl")
    p = pil_processor(tmp_path / "hf")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = p.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    image = noise(333, 517)
    got = p(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    grid = loaded.processor.process_image(image)[1]
    assert got == loaded.template.render_messages(ours(chat), [grid], add_generation_prompt=True).input_ids

    loaded.template.media_markers = {"image": "<image>"}  # a marker the processor does not expand
    with pytest.raises(ExportError, match=r"^format=hf_qwen2vl: template.media_markers.image='<image>'"):
        export_hf(loaded, tmp_path / "bad", "hf_qwen2vl")


def test_qwen2vl_thin_strips_are_the_documented_difference(qwen_folder, qwen_model, tok):
    """A side of at most `patch * merge / 2` pixels: ours keeps it one block and the aspect ratio,
    transformers' rounds it to 0 and rescales to min_pixels (the module docstring of
    vlm.checkpoint.hf_export). Every other size agrees (test_qwen2vl_image_processor_matches_ours)."""
    ip = pil_processor(qwen_folder).image_processor
    proc = qwen_loaded(qwen_model, tok).processor
    image = noise(10, 1000)
    assert ip(images=[image], return_tensors="pt")["image_grid_thw"].tolist() == [[1, 40, 2]]
    assert proc.process_image(image)[1] == (1, 72, 2)


def test_llava_fixed_resolution_is_clip_without_the_crop(llava_loaded, tmp_path):
    fixed = MediaProcessor(patch_size=8, resolution="fixed", image_size=32, interpolation="bilinear")
    loaded = LoadedVLM(llava_loaded.model, llava_loaded.tokenizer, fixed, llava_loaded.template, {})
    out = export_hf(loaded, tmp_path / "hf", "hf_llava")
    ip = transformers.AutoImageProcessor.from_pretrained(out, local_files_only=True, use_fast=False)
    image = noise(333, 517)
    patches, _ = fixed.process_image(image)
    ours_px = patches.reshape(4, 4, 3, 8, 8).permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32)
    torch.testing.assert_close(ip(images=[image], return_tensors="pt")["pixel_values"], ours_px, atol=1e-6, rtol=0)
