"""`python -m vlm.cli.lab`: train a grid of small VLMs on synthvqa and write one comparison table.

    python -m vlm.cli.lab                       # the default grid (conf/lab/default.yaml), < 60 min on 2 CPU cores
    python -m vlm.cli.lab grid=quick            # the same rows, 100 steps each, < 10 min
    python -m vlm.cli.lab only=qformer steps=300 seeds=[0,1] out=/tmp/lab.md

Arguments are `key=value` overrides of conf/lab.yaml (a Hydra app, like `train.py`): `grid`, `only`,
`steps`, `seeds`, `eval_samples`, `threads`, `out`.

Each row of the grid is a list of `train.py` overrides. Per row and seed the lab trains with the
real Trainer (`vlm.training.train.run`), then evaluates the export on the held-out split with the generation
code `infer.py` uses. Columns: visual tokens per 64x64 image (what the template gives the decoder)
and per training sample (measured), trainable parameters, training samples/s (mean over the
second half of the run), held-out exact match per question type and their mean, and inference
latency (ms per held-out sample, batched greedy decoding with the KV cache). With several seeds a
cell shows mean ± spread (half the max-min range). The `prune` block then evaluates one row's
export at several keep ratios and methods.

Outputs: the markdown table between `<!-- lab:begin -->` and `<!-- lab:end -->` in `out` (default
`docs/results/lab.md`; the text around the markers is kept), `out` with `.csv` (one line per row and seed),
and, unless `WANDB_MODE=disabled`, one offline W&B run per row and seed in a group named after the
lab run (a report groups them by `axis`), plus a summary run holding the table.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from vlm.cli.app import CONF, CONF_PATH, ROOT, Tool

BEGIN, END = "<!-- lab:begin -->", "<!-- lab:end -->"
log = logging.getLogger("vlm.cli.lab")


# ------------------------------------------------------------------------------------ config


def load_grid(name: str) -> dict:
    """conf/lab/NAME.yaml, with its `defaults` (other grid files) merged underneath."""
    path = CONF / "lab" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF / "lab").glob("*.yaml"))
        raise FileNotFoundError(f"no lab grid {name!r}: choose one of {choices}")
    cfg = OmegaConf.load(path)
    base = OmegaConf.create()
    for d in cfg.pop("defaults", []):
        if d != "_self_":
            base = OmegaConf.merge(base, load_grid(d))
    return OmegaConf.to_container(OmegaConf.merge(base, cfg), resolve=True)


# ------------------------------------------------------------------------------------ one row


def compose_row(row: dict, grid: dict, seed: int, out_dir: Path, extra: list[str] | None = None):
    overrides = [
        *grid.get("base", []),
        *row.get("overrides", []),
        f"trainer.max_steps={row.get('steps', grid['steps'])}",
        f"seed={seed}",
        f"paths.output_dir={out_dir}",
        f"threads={grid.get('threads') or 'null'}",
        *(extra or []),
    ]
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the lab's Hydra app, whose configs are conf/
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def _train_rate(csv_path: Path) -> tuple[float, float]:
    """Mean samples/s and visual tokens per sample over the second half of the logged steps."""
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/samples_s")]
    rows = rows[len(rows) // 2 :] or rows
    sps = [float(r["train/samples_s"]) for r in rows]
    tok = [float(r["train/image_tok_s"]) / float(r["train/samples_s"]) for r in rows if float(r["train/samples_s"]) > 0]
    return (statistics.mean(sps) if sps else float("nan"), statistics.mean(tok) if tok else float("nan"))


def run_row(row: dict, grid: dict, seed: int, out_dir: Path) -> dict:
    from vlm.checkpoint.load import load_checkpoint
    from vlm.serve.infer import evaluate
    from vlm.training.train import run as train_run

    cfg = compose_row(row, grid, seed, out_dir)
    t0 = time.perf_counter()
    train_run(cfg)
    wall = time.perf_counter() - t0
    loaded = load_checkpoint(out_dir / "export")
    model = loaded.model
    freeze = dict(cfg.model.get("freeze") or {})
    trainable = sum(p.numel() for n, p in model.named_parameters() if not freeze.get(n.split(".", 1)[0], False))
    sps, vis_per_sample = _train_rate(next(out_dir.rglob("metrics.csv")))
    res = evaluate(
        loaded,
        cfg.data.val_shards,
        grid.get("eval_batch_size", 128),
        cfg.val_max_new_tokens,
        num_workers=1,
        max_samples=grid.get("eval_samples"),
    )
    canvas = cfg.data.synthetic.canvas if cfg.data.get("synthetic") else 64
    P = cfg.model.encoder.patch_size
    return {
        "name": row["name"],
        "axis": row.get("axis", ""),
        "seed": seed,
        "steps": row.get("steps", grid["steps"]),
        "tokens_per_image": model.token_count((1, canvas // P, canvas // P)),
        "visual_tokens_per_sample": vis_per_sample,
        "trainable_params": trainable,
        "train_samples_s": sps,
        "train_wall_s": wall,
        "latency_ms": 1000 * res["seconds"] / max(res["n"], 1),
        "eval_n": res["n"],
        **{f"acc_{k}": v for k, v in res["metrics"].items()},
        **{f"cer_{k}": v for k, v in res["cer"].items()},
        "export": str(out_dir / "export"),
        "val_shards": cfg.data.val_shards,
        "val_max_new_tokens": cfg.val_max_new_tokens,
    }


def run_prune(base: dict, grid: dict) -> list[dict]:
    from vlm.checkpoint.load import load_checkpoint
    from vlm.serve.infer import evaluate

    spec = grid["prune"]
    loaded = load_checkpoint(base["export"])
    out = []
    for method in spec.get("methods", ["attention"]):
        for keep in spec.get("keep_ratios", [1.0, 0.5, 0.25]):
            if keep >= 1.0 and out and out[0]["keep_ratio"] >= 1.0:
                continue  # keep 1.0 is the same for every method
            res = evaluate(
                loaded,
                base["val_shards"],
                grid.get("eval_batch_size", 128),
                base["val_max_new_tokens"],
                num_workers=1,
                max_samples=grid.get("eval_samples"),
                prune={"keep_ratio": keep, "method": method},
            )
            out.append(
                {
                    "name": f"{base['name']} · keep {keep:.2f}" + ("" if keep >= 1 else f" ({method})"),
                    "axis": "prune",
                    "seed": base["seed"],
                    "keep_ratio": keep,
                    "method": method,
                    "visual_tokens_per_sample": res["visual_tokens"],
                    "latency_ms": 1000 * res["seconds"] / max(res["n"], 1),
                    "eval_n": res["n"],
                    **{f"acc_{k}": v for k, v in res["metrics"].items()},
                }
            )
    return out


# ------------------------------------------------------------------------------------ table


def _cell(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return "–"
    m = statistics.mean(vals)
    if len(vals) == 1:
        return format(m, fmt)
    return f"{format(m, fmt)} ± {format((max(vals) - min(vals)) / 2, fmt)}"


def table(results: list[dict], qtypes: list[str]) -> str:
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    head = [
        "configuration",
        "axis",
        "seeds",
        "tok/img",
        "vis tok/sample",
        "trainable",
        "train samples/s",
        *qtypes,
        "**mean**",
        "latency ms/sample",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|"]
    for name, rs in by_name.items():
        r0 = rs[0]
        acc = [_cell([100 * r.get(f"acc_{q}", float("nan")) for r in rs], ".1f") for q in qtypes]
        tp = r0.get("trainable_params")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    r0["axis"],
                    str(len(rs)),
                    str(r0.get("tokens_per_image", "–")),
                    _cell([r.get("visual_tokens_per_sample") for r in rs], ".1f"),
                    f"{tp / 1e6:.2f}M" if tp else "–",
                    _cell([r.get("train_samples_s") for r in rs], ".0f"),
                    *acc,
                    "**" + _cell([100 * r.get("acc_mean", float("nan")) for r in rs], ".1f") + "**",
                    _cell([r.get("latency_ms") for r in rs], ".1f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_outputs(results: list[dict], qtypes: list[str], out: Path, header: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    block = f"{BEGIN}\n{header}\n\n{table(results, qtypes)}\n{END}"
    old = out.read_text() if out.is_file() else "# The lab\n\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    out.write_text(new)
    keys: list[str] = []
    for r in results:
        keys += [k for k in r if k not in keys]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(results)


def log_wandb(results: list[dict], group: str, md: str) -> None:
    if os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    for r in results:
        run = wandb.init(
            project="vlm-lab",
            group=group,
            name=f"{r['name']} s{r['seed']}",
            job_type=r["axis"],
            config={k: v for k, v in r.items() if not k.startswith("acc_")},
            reinit="finish_previous",
            dir=str(ROOT / "outputs"),
        )
        run.summary.update({k: v for k, v in r.items() if isinstance(v, (int, float))})
        run.finish()
    run = wandb.init(project="vlm-lab", group=group, name="summary", job_type="summary", dir=str(ROOT / "outputs"))
    cols = sorted({k for r in results for k in r})
    run.log(
        {
            "lab": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in results]),
            "table_md": wandb.Html(f"<pre>{md}</pre>"),
        }
    )
    run.finish()
    print(f"W&B: group {group!r} in project vlm-lab (offline; `wandb sync outputs/wandb/offline-run-*`)")


# ------------------------------------------------------------------------------------ main


def run(cfg: DictConfig, argv: list[str] | None = None) -> int:
    """Run the grid the composed config (conf/lab.yaml) selects; `argv` is quoted in the table's header."""
    if argv is None:
        from hydra.core.hydra_config import HydraConfig

        argv = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    grid = load_grid(str(cfg.grid))
    out = Path(cfg.out) if cfg.out else ROOT / "docs" / "results" / "lab.md"
    only = cfg.only
    for k in ("steps", "seeds", "eval_samples", "threads"):
        if cfg[k] is not None:
            grid[k] = OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
    if not isinstance(grid["seeds"], list):
        grid["seeds"] = [grid["seeds"]]
    rows = [r for r in grid["rows"] if not only or str(only).lower() in r["name"].lower()]
    if not rows:
        print(f"error: no row matches only={only!r}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    # the code the grid runs: taken now, not at the end (commits made while it runs are not in it)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "vlm", "conf"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    commit = (commit or "unknown") + (" + uncommitted changes" if dirty else "")
    run_root = ROOT / "outputs" / "lab" / stamp
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    results: list[dict] = []
    for row in rows:
        for seed in grid["seeds"]:
            slug = "".join(c if c.isalnum() else "_" for c in row["name"]).strip("_")[:60]
            print(f"[lab {time.perf_counter() - t0:6.0f}s] {row['name']} seed {seed} …", flush=True)
            results.append(run_row(row, grid, seed, run_root / f"{slug}_s{seed}"))
            r = results[-1]
            print(
                f"[lab {time.perf_counter() - t0:6.0f}s]   mean {100 * r.get('acc_mean', 0):.1f}%, "
                f"{r['train_samples_s']:.0f} samples/s, {r['latency_ms']:.1f} ms/sample",
                flush=True,
            )
    prune = grid.get("prune")
    if prune:
        bases = [r for r in results if r["name"] == prune["row"]]
        for base in bases:
            print(f"[lab {time.perf_counter() - t0:6.0f}s] pruning on {base['name']} seed {base['seed']} …", flush=True)
            results += run_prune(base, grid)
    total = time.perf_counter() - t0
    qtypes: list[str] = []
    for r in results:
        qtypes += [k[4:] for k in r if k.startswith("acc_") and k != "acc_mean" and k[4:] not in qtypes]
    qtypes = [q for q in qtypes if q not in ("other", "overall")]
    cmd = "python -m vlm.cli.lab " + " ".join(argv)
    header = (
        f"Measured {stamp} UTC with `{cmd.strip()}` at commit `{commit}` on {os.cpu_count()} CPU "
        f"threads ({platform.processor() or platform.machine()}, torch {torch.__version__}); "
        f"{len(rows)} rows × {len(grid['seeds'])} seed(s), {grid['steps']} steps each, "
        f"{grid.get('eval_samples') or 'all'} held-out samples per row; whole grid {total / 60:.1f} min. "
        "Accuracy is held-out exact match (%); `–` = that question type is not in the row's data."
    )
    write_outputs(results, qtypes, out, header)
    md = table(results, qtypes)
    print(md)
    print(f"\nwrote {out} and {out.with_suffix('.csv')} ({total / 60:.1f} min)")
    log_wandb(results, f"lab-{stamp}", md)
    return 0


USAGE = "python -m vlm.cli.lab [grid=default|quick] [only=TEXT] [steps=N] [seeds=[0,1]] [out=FILE.md]"
TOOL = Tool("lab", __doc__, text=("grid", "only", "out"))


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="lab")
def app(cfg: DictConfig) -> None:
    TOOL.run(run, cfg, USAGE)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlm.cli.lab KEY=VALUE …` on `argv` (default: the command line); the exit status."""
    return TOOL.main(app, argv)


if __name__ == "__main__":
    sys.exit(main())
