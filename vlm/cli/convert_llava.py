"""Convert LLaVA / ShareGPT conversation JSON + an image folder into chat shards (see data/README.md).

    python -m vlm.cli.convert_llava llava_instruct.json --image-root images/ --out data/shards/llava
    python -m vlm.cli.convert_llava conversations.jsonl --image-root images/ --out data/shards/llava --workers 8

Streams the input (a .json array or JSON Lines), writes OUT/llava-%06d.tar + a report per shard and
OUT/dataset.json. Re-running the same command resumes (finished shards are skipped).
"""

from __future__ import annotations

import argparse
import sys

from vlm.convert import add_common_arguments, common_kwargs, convert_llava, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlm.cli.convert_llava",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="LLaVA JSON array or JSONL of {id, image, conversations}")
    p.add_argument("--image-root", required=True, help="folder the records' image paths are relative to")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(convert_llava, dict(input=args.input, image_root=args.image_root, **common_kwargs(args)))


if __name__ == "__main__":
    sys.exit(main())
