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

from vlm.checkpoint.load import load_checkpoint
from vlm.serve.infer import answer, prompt_batch

FIXTURE = Path(__file__).parent / "fixtures" / "v1_checkpoint"
PROMPT = "What color is the circle?"


@pytest.mark.parametrize("name", ["export", "last.ckpt"])
def test_v1_checkpoint_loads_and_answers_as_before(name):
    expected = json.loads((FIXTURE / "expected.json").read_text())[name]
    loaded = load_checkpoint(FIXTURE / name)
    png = (FIXTURE / "circle.png").read_bytes()
    batch = prompt_batch(loaded, [png], PROMPT)
    assert batch["input_ids"][0].tolist() == expected["input_ids"]
    keys = ("input_ids", "position_ids", "attention_mask", "pixel_patches", "grid_thw", "media_per_sample", "keys")
    with torch.no_grad():
        logits = loaded.model.logits(loaded.model(*(batch[k] for k in keys)))
    torch.testing.assert_close(logits[0, -1], torch.tensor(expected["last_logits"]), atol=2e-5, rtol=0)
    assert answer(loaded, [str(FIXTURE / "circle.png")], PROMPT, max_new_tokens=8, stream=None) == expected["answer"]
