"""Command-line helpers shared by the converters (``python -m vlm.cli.convert_*``): the common options, their
keyword arguments, and the exit status of a run."""

from __future__ import annotations

import sys
from collections.abc import Callable

from vlm.convert.common import ConvertError
from vlm.convert.pipeline import format_report


def add_common_arguments(p) -> None:
    """The options every converter script takes (``data/convert_*.py``)."""
    p.add_argument("--out", required=True, help="output folder for NAME-%%06d.tar, their reports and dataset.json")
    p.add_argument(
        "--name", default=None, help="shard name prefix (letters, digits, - and _; default: the converter's)"
    )
    p.add_argument("--maxcount", type=int, default=1000, help="records per chunk = per shard (default 1000)")
    p.add_argument(
        "--maxsize",
        type=float,
        default=None,
        help="soft byte cap per shard: a bigger shard is kept and reported (lower --maxcount then)",
    )
    p.add_argument("--workers", type=int, default=2, help="writer processes (default 2; 1 = in-process)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="refuse images whose header claims more pixels")
    p.add_argument("--max-image-bytes", type=int, default=64 << 20, help="refuse image files larger than this")
    p.add_argument("--overwrite", action="store_true", help="delete this NAME's shards and reports first")
    p.add_argument("--quiet", action="store_true", help="only the final report")


def common_kwargs(args) -> dict:
    kw = {
        "out_dir": args.out,
        "maxcount": args.maxcount,
        "maxsize": int(args.maxsize) if args.maxsize else None,
        "workers": args.workers,
        "max_pixels": args.max_pixels,
        "max_image_bytes": args.max_image_bytes,
        "overwrite": args.overwrite,
        "verbose": not args.quiet,
    }
    if args.name:
        kw["name"] = args.name
    return kw


def run_cli(fn: Callable[..., dict], kwargs: dict) -> int:
    """Call a converter; exit status 0, 2 on a usage error (bad options or input, options that differ
    from the finished shards), 130 when interrupted (re-run resumes)."""
    try:
        info = fn(**kwargs)
    except (ConvertError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    if kwargs.get("verbose") is False:
        print(format_report(info, kwargs.get("out_dir")))
    return 0
