"""Train a VLM: `python train.py [hydra overrides]` (see README)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vlm.errors import user_errors
    from vlm.train import run

    with user_errors():
        metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))


if __name__ == "__main__":
    import sys

    from vlm.spec import check_overrides

    problem = check_overrides(sys.argv[1:])
    if problem:  # before Hydra, whose "Key 'patch_size' is not in struct" does not say where it went
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
