"""The SigLIP + Qwen2.5 recipe of docs/pretrained.md, run as written with tiny stand-ins.

The commands are read from the document's bash blocks (the LLaVA conversions, the two stages as
one `experiment=llava` command, and `infer.py` on its result), so the test follows the document.
Only what cannot run here is substituted: the model folders become tiny random `transformers`
models saved by the test (same layout: config.json, safetensors, tokenizer.json,
tokenizer_config.json), the LLaVA JSON + COCO images become a dozen drawn images, and the GPU
sizes become CPU ones (patch 8 / 32 px, 2 steps per stage, batch 2, `trainer=cpu`). Every other
override (experiment, models, data, shards per stage, …) is the document's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def bash_commands(doc: Path, block: int | None = None) -> list[list[str]]:
    """The `python …` commands of the doc's `block`-th ```bash block (None: of every block, in
    order), continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)
    text = "\n".join(blocks if block is None else [blocks[block]]).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip().startswith("python ")]


def substitute(argv: list[str], paths: dict[str, str], values: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for old, new in paths.items():
            a = a.replace(old, new)
        key = a.split("=", 1)[0]
        out.append(f"{key}={values[key]}" if "=" in a and key in values else a)
    return out


def _run(argv: list[str], cwd: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = argv[1]
    if not script.startswith("-"):
        argv = [sys.executable, str(ROOT / script), *argv[2:]]
    else:
        argv = [sys.executable, *argv[1:]]
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, " ".join(argv) + "\n" + (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


def _stand_ins(tmp: Path, synth_dir: Path) -> tuple[Path, Path]:
    from tests.test_jinja_template import QWEN2VL
    from vlm.tokenizer import TextTokenizer

    torch.manual_seed(0)
    siglip = tmp / "siglip"
    transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(siglip)
    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    qwen = tmp / "qwen"
    transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=tok.vocab_size - 4,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).save_pretrained(qwen)
    shutil.copy(synth_dir / "synthvqa" / "tokenizer.json", qwen / "tokenizer.json")
    (qwen / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2VL, "eos_token": "<|im_end|>"}))
    return siglip, qwen


def _llava_data(tmp: Path) -> None:
    from PIL import Image

    (tmp / "coco" / "train2017").mkdir(parents=True)
    (tmp / "coco" / "val2017").mkdir(parents=True)
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for split, n in (("train2017", 12), ("val2017", 3)):
        recs = []
        for i in range(n):
            name = list(colors)[i % 3]
            Image.new("RGB", (48 + 8 * i, 40), colors[name]).save(tmp / "coco" / split / f"{i}.jpg")
            recs.append(
                {
                    "id": f"{split}-{i}",
                    "image": f"{i}.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat color is the picture?"},
                        {"from": "gpt", "value": name},
                    ],
                }
            )
        (tmp / ("llava_instruct_150k.json" if split == "train2017" else "llava_val.json")).write_text(json.dumps(recs))


def test_siglip_qwen2_stage1_stage2_recipe_runs_as_documented(tmp_path, synth_dir):
    cmds = bash_commands(ROOT / "docs" / "pretrained.md")
    convert = [c for c in cmds if c[1] == "data/convert_llava.py"]
    recipe = [c for c in cmds if c[1] == "train.py" and "experiment=llava" in c]
    infer = [c for c in cmds if c[1] == "infer.py"]
    assert len(convert) == 2 and len(recipe) == 1 and infer, [c[:2] for c in cmds]
    siglip, qwen = _stand_ins(tmp_path, synth_dir)
    _llava_data(tmp_path)
    from PIL import Image

    Image.new("RGB", (40, 30), (30, 200, 30)).save(tmp_path / "photo.jpg")
    run = tmp_path / "llava"
    paths = {
        "/models/siglip-base-patch16-224": str(siglip),
        "/models/Qwen2.5-0.5B-Instruct": str(qwen),
        "outputs/pipelines/llava-seed0": str(run),  # the recipe's run folder: infer.py reads its last stage
    }
    cpu = {
        "data.processor.image_size": "32",
        "trainer": "cpu",
        "--workers": "1",
    }
    run_cfg = [
        "logger=none",
        "recipe.align_steps=2",
        "recipe.finetune_steps=2",
        "data.batch_size=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.shuffle_buffer=4",
        "threads=1",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        f"pipeline.dir={run}",
        f"hydra.run.dir={run}/hydra",
    ]
    for argv in convert:
        _run(substitute(argv, paths, cpu), tmp_path)
    _run([*substitute(recipe[0], paths, cpu), *run_cfg], tmp_path)
    answer = _run(substitute(infer[0], paths, cpu), tmp_path)  # a random tiny LLM: whatever it says, it streamed tokens
    assert len(answer) > 0, "infer.py generated nothing"
    # the align stage trained the projector only; fine-tune started from its weights and trained the LLM too
    from vlm.checkpoint.load import load_checkpoint
    from vlm.model.hf import pretrained_decoder, pretrained_vision_encoder

    s1 = load_checkpoint(run / "01-align" / "export").model
    s2 = load_checkpoint(run / "02-finetune" / "export").model
    enc = pretrained_vision_encoder(str(siglip))
    for k, v in enc.state_dict().items():
        assert torch.equal(s1.encoder.state_dict()[k], v) and torch.equal(s2.encoder.state_dict()[k], v), k
    dec = pretrained_decoder(str(qwen)).state_dict()
    w = "layers.0.mlp.down_proj.weight"
    assert torch.equal(s1.decoder.state_dict()[w], dec[w])  # frozen in the align stage
    assert not torch.equal(s2.decoder.state_dict()[w], dec[w])  # trained in the fine-tune stage
