"""One chunk of records -> one shard ``NAME-%06d.tar`` and its report ``NAME-%06d.json``: every
record built by its converter's builder, each skipped record and each dropped image counted by
reason. Runs in a pool worker (or in-process)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from vlm.convert.common import BUILDERS, BadRecord, Skip, add_example, write_json


def shard_paths(out_dir: Path, name: str, index: int) -> tuple[Path, Path]:
    """The shard and report paths of chunk ``index``."""
    stem = f"{name}-{index:06d}"
    return out_dir / f"{stem}.tar", out_dir / f"{stem}.json"


class _TarSink:
    """Minimal WebDataset tar writer (stdlib :mod:`tarfile`; importing webdataset would pull torch
    into every converter process). Members are written in sample order, mtime 0, read-only."""

    def __init__(self, fileobj, owner: str):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by close()
        self.owner = owner

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = self.owner
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def write_shard(task: tuple) -> dict:
    """Pool task: convert one chunk of records into one shard + its report. Returns the report."""
    kind, index, first_record, records, ctx, out_dir, name, options = task
    build = BUILDERS[kind]
    tar_path, report_path = shard_paths(Path(out_dir), name, index)
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    skipped, dropped, examples = Counter(), Counter(), {}
    samples = images = 0
    with open(tmp, "wb") as f:
        sink = _TarSink(f, name)
        try:
            for i, rec in enumerate(records):
                key = f"{name}-{index:06d}-{i:06d}"
                where = f"record {first_record + i}"
                if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
                    where += f" (id {rec['id']!r:.60})"
                try:
                    if isinstance(rec, BadRecord):
                        raise Skip(rec.reason, rec.message)
                    sample, media, drops = build(rec, key, ctx)
                    try:
                        doc = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise Skip("bad_text", f"text cannot be encoded as UTF-8: {e.reason}") from None
                except Skip as e:
                    skipped[e.reason] += 1
                    add_example(examples, e.reason, where, e.message)
                    continue
                except Exception as e:  # a bug or an input nobody foresaw: count it, keep the other records
                    skipped["internal_error"] += 1
                    add_example(examples, "internal_error", where, f"{type(e).__name__}: {e}")
                    continue
                sink.write(key, [("json", doc), *((f"{m}.{ext}", data) for m, (data, ext) in enumerate(media))])
                samples += 1
                images += len(media)
                for d in drops:
                    dropped[d.reason] += 1
                    add_example(examples, f"dropped_{d.reason}", where, d.message)
        finally:  # also when interrupted: the .tmp is complete tar, just never renamed
            sink.close()
    if samples:
        os.replace(tmp, tar_path)
        nbytes = tar_path.stat().st_size
    else:  # nothing to load: no shard file, the report says why
        tmp.unlink()
        nbytes = 0
    report = {
        "shard": tar_path.name if samples else None,
        "index": index,
        "records": len(records),
        "samples": samples,
        "images": images,
        "bytes": nbytes,
        "skipped": dict(sorted(skipped.items())),
        "dropped_images": dict(sorted(dropped.items())),
        "examples": examples,
        "options": options,
    }
    if options.get("maxsize") and nbytes > options["maxsize"]:
        report["over_maxsize"] = True
    write_json(report_path, report)
    return report
