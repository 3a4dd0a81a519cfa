"""Checkpoints written by an earlier version of the project still load and answer the same.

`tests/fixtures/v1_checkpoint/` holds a tiny model trained for two steps by the version at
commit 8b50fcb: its export folder (format_version 1), its Lightning `.ckpt`, an image, and what
that version computed for one prompt (`expected.json`: the prompt's token ids, the logits at the
last position, the greedy answer). Whatever the code now stores, these files must keep loading
(or be refused with a message saying how to convert them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_infer
from vlm.checkpoint.load import load_checkpoint
from vlm.serve.infer import run
from vlm.serve.local import one_turn
from vlm.serve.prompt import PromptBuilder

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
PROMPT = "What color is the circle?"


@pytest.mark.parametrize("name", ["export", "last.ckpt"])
def test_v1_checkpoint_loads_and_answers_as_before(name, tmp_path, capsys):
    expected = json.loads((FIXTURE / "expected.json").read_text())[name]
    loaded = load_checkpoint(FIXTURE / name)
    png = (FIXTURE / "circle.png").read_bytes()
    # the prompt the engine builds for `infer.py image=… prompt=…`
    prompt = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, 512)(
        one_turn(loaded.template, [png], PROMPT)
    )
    batch = prompt.batch(loaded.tokenizer.pad_id)
    assert batch["input_ids"][0].tolist() == expected["input_ids"]
    keys = ("input_ids", "position_ids", "attention_mask", "pixel_patches", "grid_thw", "media_per_sample", "keys")
    with torch.no_grad():
        logits = loaded.model.logits(loaded.model(*(batch[k] for k in keys)))
    torch.testing.assert_close(logits[0, -1], torch.tensor(expected["last_logits"]), atol=2e-5, rtol=0)
    # the whole command, on each engine, at the precision the expected answer was computed in
    for kind in ("serial", "continuous"):
        overrides = [f"ckpt={FIXTURE / name}", f"image={FIXTURE / 'circle.png'}", f"prompt={PROMPT}"]
        cfg = compose_infer([*overrides, "max_new_tokens=8", "dtype=fp32", f"engine={kind}"], tmp_path, tmp_path)
        assert run(cfg)["answer"] == expected["answer"], kind
        assert capsys.readouterr().out == expected["answer"] + "\n"
