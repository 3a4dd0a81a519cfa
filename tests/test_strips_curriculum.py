"""The strips curriculum of docs/resolution.md ("Reading long strips"), run as written on a tiny
model: stage 1 (short strips + tower warm-up), stage 2 (long strips, `init_from` stage 1), stage 3
(the whole v1 + v2 mix, another tokenizer, `init_from` stage 2). The commands are read from the
document; only sizes, steps and the STAGE paths are substituted."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import TINY
from tests.test_recipes import _run, bash_commands, substitute

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "resolution.md"


def _curriculum_block() -> int:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return next(i for i, b in enumerate(blocks) if "data=synthvqa_strips" in b)


def test_strips_curriculum_runs_as_documented(tmp_path):
    cmds = bash_commands(DOC, _curriculum_block())
    assert len(cmds) == 3 and all(c[1] == "train.py" for c in cmds)
    small = {"trainer.max_steps": "2", "tower_warmup.steps": "2"}
    tiny = [t for t in TINY if not t.startswith("trainer.max_steps")]
    for i, argv in enumerate(cmds, start=1):
        out = tmp_path / f"stage{i}"
        argv = substitute(argv, {f"outputs/STAGE{j}": str(tmp_path / f"stage{j}") for j in (1, 2)}, small)
        log = _run(
            [
                *argv,
                *tiny,
                "data.synthetic.train_samples=16",
                "data.synthetic.heldout_samples=10",
                "logger=none",
                "trainer.val_check_interval=null",
                "tower_warmup.batch_size=4",
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.output_dir={out}",
                f"hydra.run.dir={out}",
            ],
            ROOT,
        )
        assert (out / "export" / "model.safetensors").is_file(), log[-2000:]
        if i == 1:
            assert "tower warm-up: 2 steps" in log
        if i == 3:  # the mix's data folder trained another tokenizer than the strips'
            assert "rows copied by token string" in log
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "synthvqa_strips_12-20",
        "synthvqa_strips_3-6",
        "synthvqa_v2",
    ]
