"""Convert Parquet files or an Arrow `datasets.save_to_disk` folder of conversations + images into chat shards.

    python -m vlm.cli.convert_parquet train-00000-of-00004.parquet --out data/shards/mine
    python -m vlm.cli.convert_parquet hf_parquet_folder/ --out data/shards/mine --workers 8
    python -m vlm.cli.convert_parquet saved_dataset/train --out data/shards/mine      # save_to_disk folder
    python -m vlm.cli.convert_parquet rows.parquet --image-root images/ --out data/shards/mine \\
        --map conversations=dialog --map image=picture

Layouts: ShareGPT `conversations` [{from, value}] with <image> markers, `messages` [{role, content}],
The Cauldron `texts` [{user, assistant}] + `images`. Images: {bytes, path} structs (or a list of them),
binary, or paths relative to --image-root. Needs pyarrow (pip install -e '.[parquet]'). See data/README.md.
"""

from __future__ import annotations

import argparse
import sys

from vlm.convert import add_common_arguments, common_kwargs, convert_parquet, run_cli
from vlm.convert.common import ConvertError
from vlm.convert.parquet import parse_column_map


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlm.cli.convert_parquet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="a .parquet or .arrow file, a folder of .parquet files, or a save_to_disk folder")
    p.add_argument(
        "--image-root",
        default=None,
        help="folder that path images are relative to (default: the input folder, or the input file's folder)",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="KEY=COLUMN",
        help="read KEY (conversations, messages, texts, image, id) from COLUMN; repeat or comma-separate; "
        "image= (empty) for text-only rows",
    )
    p.add_argument("--batch-size", type=int, default=64, help="rows read from a file at a time (default 64)")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        column_map = parse_column_map(args.map)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_cli(
        convert_parquet,
        dict(
            input=args.input,
            image_root=args.image_root,
            column_map=column_map,
            batch_size=args.batch_size,
            **common_kwargs(args),
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
