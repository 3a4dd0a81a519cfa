"""vlm.model.geometry: the model's media geometry has one source, the model config; the data side follows it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, ROOT, TINY
from vlm.build.model import build_model, build_processor, build_template, geometry_of
from vlm.build.overrides import check_overrides
from vlm.checkpoint.load import CheckpointError, load_checkpoint
from vlm.model.geometry import Geometry
from vlm.tokenizer import train_tokenizer
from vlm.training.datamodule import VLMDataModule

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a red circle and a blue square"] * 10, vocab_size=300)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], dict(patch_size=8, temporal_patch=1, merge_size=2, queries=None, fusion="interleave", rope="rope")),
        (["model.projector.merge_size=1"], dict(merge_size=1)),
        (["model/encoder=vit_tiny_rope2d"], dict(temporal_patch=2)),
        (["model.fusion=cross_attn"], dict(fusion="cross_attn")),
        (["model/projector=qformer"], dict(queries=16)),
        (["model.decoder.rope=mrope"], dict(rope="mrope")),
        (["data=synthvqa_v2", "model.decoder.rope=mrope"], dict(rope="mrope")),
        (["data=mix"], dict(merge_size=2)),
        (["data=shards"], dict(patch_size=8)),
        (["experiment=synthvqa_v2_dynamic"], dict(temporal_patch=2, rope="mrope")),
        (["experiment=synthvqa_v2_fixed"], dict(rope="rope")),
    ],
)
def test_overrides_compose_and_both_sides_follow_the_model(overrides, expected, tok, tmp_path):
    from hydra import compose, initialize_config_dir

    tiny = [t for t in TINY if not t.startswith("data.synthetic")]  # data=shards has no synthetic
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}", *tiny, *overrides]
        )
    geo = geometry_of(cfg.model)
    for k, v in expected.items():
        assert getattr(geo, k) == v, (k, geo)
    data = {k: cfg.data[k] for k in ("processor", "template")}
    for key in ("patch_size", "merge_size"):
        assert key not in data["processor"]
    assert not {"merge_size", "queries", "fusion", "rope"} & set(data["template"])
    proc = build_processor(dict(data["processor"]), geometry=geo)
    template = build_template(dict(data["template"]), tok, geometry=geo)
    model = build_model(cfg.model, tok)
    assert (proc.patch_size, proc.temporal_patch, proc.merge_size) == (
        model.encoder.patch_size,
        model.encoder.temporal_patch,
        model.projector.merge_size,
    )
    assert template.rope == model.decoder.rope
    for grid in ((1, 4, 8), (2, 8, 4)):
        assert geo.token_grid(grid) == tuple(template.token_grid(grid)) == tuple(model.token_grid(grid))
        assert geo.token_count(grid) == template.token_count(grid) == model.token_count(grid)


def test_geometry_is_checked_in_one_place():
    with pytest.raises(ValueError, match=r"model.encoder.patch_size=0 is not a positive int"):
        Geometry(patch_size=0)
    with pytest.raises(ValueError, match=r"model.projector.merge_size=True is not a positive int"):
        Geometry(patch_size=8, merge_size=True)
    with pytest.raises(ValueError, match=r"model.fusion='concat' is not one of interleave, cross_attn"):
        Geometry(patch_size=8, fusion="concat")
    with pytest.raises(ValueError, match=r"model.decoder.rope='alibi'"):
        Geometry(patch_size=8, rope="alibi")
    with pytest.raises(ValueError, match=r"model.projector.queries=-1"):
        Geometry(patch_size=8, queries=-1)
    enc = {"_target_": "vlm.model.vision.VisionEncoder", "patch_size": 4}
    dec = {"_target_": "vlm.model.decoder.Decoder"}
    bad = {"encoder": enc, "projector": {"kind": "mlp", "queries": 4}, "decoder": dec}
    with pytest.raises(ValueError, match="queries is for kind=qformer only"):
        geometry_of(bad)
    # a native class's defaults fill what its config leaves out
    g = geometry_of({"encoder": {"_target_": "vlm.model.vision.VisionEncoder"}, "projector": {}, "decoder": dec})
    assert (g.patch_size, g.temporal_patch, g.merge_size, g.rope) == (8, 1, 1, "rope")


def test_a_pretrained_tower_gives_its_patch_size_from_its_config_json(tmp_path):
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "siglip_vision_model",
                "patch_size": 16,
                "image_size": 224,
                "hidden_size": 32,
                "num_attention_heads": 4,
            }
        )
    )
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={tmp_path}",
                "model/encoder=siglip",
                f"model.encoder.pretrained={folder}",
                "model.projector.merge_size=1",
            ],
        )
    assert cfg.model.encoder.patch_size is None  # "follow the checkpoint"
    geo = geometry_of(cfg.model)
    assert (geo.patch_size, geo.temporal_patch, geo.merge_size) == (16, 1, 1)
    assert build_processor(dict(cfg.data.processor), geometry=geo).patch_size == 16
    # a checkpoint's config is read as it is: no folder, so no pretrained loader
    with pytest.raises(ValueError, match="model.encoder._target_=.*a pretrained loader"):
        geometry_of(cfg.model, trusted=False)


def test_the_data_config_may_not_repeat_the_geometry(tmp_path, synth_dir):
    msg = check_overrides(["trainer=cpu", "data.processor.patch_size=8"])
    assert msg and "model.encoder.patch_size" in msg
    assert "model.projector.merge_size" in check_overrides(["+data.template.merge_size=2"])
    assert "model.encoder.temporal_patch" in check_overrides(["++data.processor.video.temporal_patch=2"])
    assert check_overrides(["data.processor.image_size=32", "model.encoder.patch_size=4"]) is None
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data.processor.patch_size=8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "set model.encoder.patch_size instead" in r.stderr, r.stderr
    dm = VLMDataModule(
        str(synth_dir / "synthvqa" / "train"),
        str(synth_dir / "synthvqa" / "heldout"),
        str(synth_dir / "synthvqa" / "tokenizer.json"),
        {"patch_size": 8, "image_size": 64},
        {"max_length": 256},
    )
    with pytest.raises(ValueError, match=r"data.processor.patch_size=8: .* set model.encoder.patch_size"):
        dm.attach(Geometry(patch_size=8))
    dm = VLMDataModule(
        str(synth_dir / "synthvqa" / "train"),
        str(synth_dir / "synthvqa" / "heldout"),
        str(synth_dir / "synthvqa" / "tokenizer.json"),
        {"image_size": 64},
        {"max_length": 256},
        geometry={"patch_size": 4, "merge_size": 2, "rope": "mrope"},
    )
    dm.setup()
    assert (dm.media_processor.patch_size, dm.media_processor.merge_size, dm.template.rope) == (4, 2, "mrope")


@pytest.mark.parametrize(
    "section,key,value,model_key",
    [
        ("processor", "patch_size", 16, "model.encoder.patch_size=8"),
        ("template", "merge_size", 1, "model.projector.merge_size=2"),
        ("template", "rope", "mrope", "model.decoder.rope='rope'"),
    ],
)
def test_an_old_checkpoint_whose_stored_geometry_disagrees_is_refused(tmp_path, section, key, value, model_key):
    folder = tmp_path / "export"
    shutil.copytree(FIXTURE / "export", folder)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg[section][key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    msg = str(e.value)
    assert "\n" not in msg and f"{section}.{key}={value!r}" in msg and model_key in msg, msg
