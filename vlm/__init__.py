"""vlm: train and serve vision-language models (PyTorch Lightning + Hydra)."""

from vlm.precision import register_resolvers

register_resolvers()  # `${vlm.cpu_precision:}` in conf/trainer/cpu.yaml resolves wherever vlm is imported
