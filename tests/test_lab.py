"""`python -m vlm.cli.lab` on a two-row grid of the tiny test model: real training runs, real held-out
evaluation, the pruning block, and the table / CSV / markers it writes."""

from __future__ import annotations

import csv

from tests.conftest import TINY
from vlm.cli.lab import BEGIN, END, TOOL, load_grid, main, run_prune, run_row, table, write_outputs


def test_lab_grid_end_to_end(tmp_path, synth_dir):
    grid = load_grid("default")
    assert grid["steps"] > 0 and any(r["axis"] == "fusion" for r in grid["rows"])
    assert load_grid("quick")["rows"] == grid["rows"] and load_grid("quick")["steps"] < grid["steps"]
    grid.update(
        steps=2,
        eval_samples=16,
        eval_batch_size=8,
        threads=None,
        base=[
            *grid["base"],
            f"paths.data_dir={synth_dir}",
            *[o for o in TINY if "max_steps" not in o and "progress_bar" not in o],
        ],
        prune={"row": "mlp", "keep_ratios": [1.0, 0.5], "methods": ["norm"]},
    )
    rows = [
        {"name": "mlp", "axis": "projector", "overrides": ["model.projector.merge_size=1"]},
        {
            "name": "qformer 4",
            "axis": "projector",
            "overrides": ["model/projector=qformer", "model.projector.queries=4", "model.projector.merge_size=1"],
        },
    ]
    results = [run_row(r, grid, 0, tmp_path / r["name"].replace(" ", "_")) for r in rows]
    assert [r["tokens_per_image"] for r in results] == [64, 4]
    assert all(r["eval_n"] == 16 and r["train_samples_s"] > 0 and r["trainable_params"] > 0 for r in results)
    assert all(abs(r["visual_tokens_per_sample"] - t) < 1e-6 for r, t in zip(results, (64, 4)))
    pruned = run_prune(results[0], grid)
    assert [p["visual_tokens_per_sample"] for p in pruned] == [64, 32]
    results += pruned
    out = tmp_path / "lab.md"
    out.write_text("# notes kept\n\n" + BEGIN + "\nold\n" + END + "\n\nreading kept\n")
    qtypes = ["color", "ocr"]
    write_outputs(results, qtypes, out, "header")
    text = out.read_text()
    assert text.startswith("# notes kept") and text.rstrip().endswith("reading kept") and "old" not in text
    assert "| qformer 4 | projector | 1 | 4 |" in text and "keep 0.50 (norm)" in text
    with open(out.with_suffix(".csv")) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and {"acc_mean", "latency_ms", "train_samples_s"} <= set(lines[0])
    assert "± " in table([results[0], {**results[0], "acc_mean": 0.5}], qtypes)  # two seeds: mean ± spread
    cfg = TOOL.compose(["steps=3", "seeds=[0,1]", "only=mlp, 2x2", "out=/tmp/lab a.md"])
    assert (cfg.steps, list(cfg.seeds), cfg.only, cfg.out, cfg.grid) == (
        3,
        [0, 1],
        "mlp, 2x2",
        "/tmp/lab a.md",
        "default",
    )


def test_lab_usage_errors(capsys):
    """A bad argument, an unknown grid or no matching row: one `error:` line, exit 2, nothing run."""
    assert main(["steps"]) == 2 and main(["stepz=3"]) == 2 and main(["grid=nope"]) == 2 and main(["only=zzz"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [e.split(" (")[0].split(":")[:2] for e in err[:2]] == [
        ["error", " expected key=value, got 'steps'"],
        ["error", " unknown key 'stepz'"],
    ]
    assert err[2:] == [
        "error: no lab grid 'nope': choose one of ['default', 'quick']",
        "error: no row matches only='zzz'",
    ]
