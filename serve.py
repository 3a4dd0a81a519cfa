"""Serve a trained VLM over an OpenAI-compatible HTTP API: `python serve.py ckpt=PATH` (see README)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from vlm.errors import user_errors

    try:
        from vlm.serve.server import run
    except ModuleNotFoundError as e:  # the server's packages are an extra
        raise SystemExit(f"error: {e}; install the server's packages with: pip install -e '.[serve]'") from None

    with user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
