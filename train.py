"""Train a VLM: `python train.py [hydra overrides]` (see README).

An experiment with a `pipeline` block (`python train.py experiment=NAME`) runs its stages in
order, and the same command resumes it after an interruption (vlm/training/pipeline.py)."""

import hydra
from omegaconf import DictConfig

import vlm  # noqa: F401 - registers the config resolvers (`${vlm.cpu_precision:}`)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from vlm.errors import user_errors

    with user_errors():
        if cfg.get("pipeline"):
            from vlm.training.pipeline import run_pipeline

            metrics = run_pipeline(cfg, list(HydraConfig.get().overrides.task))
        else:
            from vlm.training.train import run

            metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))


if __name__ == "__main__":
    import sys

    from vlm.build.overrides import check_overrides

    problem = check_overrides(sys.argv[1:])
    if problem:  # before Hydra, whose "Key 'patch_size' is not in struct" does not say where it went
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
