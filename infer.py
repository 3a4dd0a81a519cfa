"""Run a trained VLM: `python infer.py ckpt=PATH image=PATH prompt="…"` (see README)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from vlm.errors import user_errors
    from vlm.serve.infer import run

    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
