"""Convert interleaved image–text documents (MMC4 / OBELICS style JSONL) into document shards.

    python -m vlm.cli.convert_interleaved docs.jsonl --image-root images/ --out data/shards/web

Records: {"texts": [...], "images": [...]} (OBELICS), {"items": [{"type": "text"|"image", ...}]}, or
MMC4 {"text_list": [...], "image_info": [{"image_name", "matched_text_index"}]}. Images that cannot be
used are dropped from their document and counted; documents without text are skipped. See data/README.md.
"""

from __future__ import annotations

import argparse
import sys

from vlm.convert import (
    add_common_arguments,
    common_kwargs,
    convert_interleaved,
    run_cli,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vlm.cli.convert_interleaved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="JSONL (or a JSON array) of documents")
    p.add_argument("--image-root", required=True, help="folder the documents' image paths are relative to")
    p.add_argument("--text-joiner", default="\n\n", help="joins adjacent text items (default: a blank line)")
    p.add_argument("--max-images", type=int, default=None, help="keep at most this many images per document")
    add_common_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(
        convert_interleaved,
        dict(
            input=args.input,
            image_root=args.image_root,
            text_joiner=args.text_joiner,
            max_images=args.max_images,
            **common_kwargs(args),
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
