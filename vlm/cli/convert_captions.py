"""Convert image–caption pairs into chat shards (see data/README.md).

    python -m vlm.cli.convert_captions photos/ --out data/shards/captions                 # a.jpg + a.txt, ...
    python -m vlm.cli.convert_captions pairs.csv --image-root images/ --out data/shards/captions   # path,caption
    python -m vlm.cli.convert_captions pairs.jsonl --image-root images/ --out data/shards/captions # {"image","caption"}

Each sample: user = the image + a prompt drawn (deterministically, per sample key) from --prompts,
assistant = the caption. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlm.convert import (
    DEFAULT_CAPTION_PROMPTS,
    add_common_arguments,
    common_kwargs,
    convert_captions,
    run_cli,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlm.cli.convert_captions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a folder of images with .txt captions, a CSV (path,caption) or JSONL")
    p.add_argument("--image-root", default=None, help="folder the paths are relative to (default: the input's folder)")
    p.add_argument(
        "--prompts",
        type=json.loads,
        default=list(DEFAULT_CAPTION_PROMPTS),
        help="JSON list of user prompts (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(
        convert_captions,
        dict(input=args.input, image_root=args.image_root, prompts=args.prompts, seed=args.seed, **common_kwargs(args)),
    )


if __name__ == "__main__":
    sys.exit(main())
