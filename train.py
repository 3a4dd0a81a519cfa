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
    main()
