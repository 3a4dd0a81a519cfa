"""The strips curriculum of docs/resolution.md ("Reading long strips") as the recipe it ships
(`experiment=synthvqa_curriculum`), run by the documented command on a tiny model: a tower warm-up
stage, short strips, long strips, then the whole v1 + v2 mix with another tokenizer. Only sizes
and steps are substituted."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import TINY
from tests.test_recipes import _run, bash_commands

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "resolution.md"
STAGES = ["01-warmup", "02-short_strips", "03-long_strips", "04-mix"]


def _curriculum_block() -> int:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return next(i for i, b in enumerate(blocks) if "experiment=synthvqa_curriculum" in b)


def test_strips_curriculum_runs_as_documented(tmp_path):
    cmds = bash_commands(DOC, _curriculum_block())
    assert cmds[0] == ["python", "train.py", "experiment=synthvqa_curriculum"]
    tiny = [t for t in TINY if not t.startswith(("trainer.max_steps", "pipeline="))]
    run_dir = tmp_path / "run"
    log = _run(
        [
            *cmds[0],
            *tiny,
            "recipe.warmup_steps=2",
            "recipe.short_steps=2",
            "recipe.long_steps=2",
            "recipe.mix_steps=2",
            "data.synthetic.train_samples=16",
            "data.synthetic.heldout_samples=10",
            "logger=none",
            "trainer.val_check_interval=null",
            "tower_warmup.batch_size=4",
            f"paths.data_dir={tmp_path / 'data'}",
            f"pipeline.dir={run_dir}",
            f"hydra.run.dir={run_dir}/hydra",
        ],
        ROOT,
    )
    for stage in STAGES:
        assert (run_dir / stage / "export" / "model.safetensors").is_file(), log[-2000:]
    warm = json.loads((run_dir / "01-warmup" / "done.json").read_text())["metrics"]
    assert warm["tower_warmup/steps"] == 2.0
    assert "tower warm-up: 2 steps" in log
    assert "rows copied by token string" in log  # the mix's data folder trained another tokenizer
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "synthvqa_strips_12-20",
        "synthvqa_strips_3-6",
        "synthvqa_v2",
    ]
