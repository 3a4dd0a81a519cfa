"""``convert()``: run one converter over a stream of records. Chunks of ``maxcount`` records go to
a bounded process pool (one chunk = one shard), finished shards with the same options are reused,
and the per-shard reports are summed into ``dataset.json`` (see the package docstring)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vlm.convert.common import BUILDERS, VERSION, ConvertError, add_example, write_json
from vlm.convert.shards import shard_paths, write_shard

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _chunks(records: Iterable[Any], size: int) -> Iterator[list]:
    chunk: list = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_report(path: Path, options: dict) -> dict | None:
    """A finished shard's report, None when the shard must be (re)written."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged report: rewrite the shard
    if report.get("options") != options:
        raise ConvertError(
            f"{path} was written with other options ({_diff(report.get('options'), options)}); "
            "use another output folder or overwrite=True (--overwrite)"
        )
    if report.get("shard") and not (path.parent / report["shard"]).is_file():
        return None  # the report survived, the shard did not
    return report


def _diff(a: Any, b: dict) -> str:
    if not isinstance(a, dict):
        return "unreadable options"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def _clear(out_dir: Path, name: str) -> None:
    """Remove what a previous run for ``name`` wrote (only files this module writes)."""
    pat = re.compile(rf"^{re.escape(name)}-\d{{6}}\.(tar|json)(\.tmp)?$")
    for p in out_dir.iterdir():
        if pat.match(p.name):
            p.unlink()
    (out_dir / "dataset.json").unlink(missing_ok=True)


def _peak_rss_mb() -> dict:
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def convert(
    kind: str,
    records: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    name: str,
    options: dict,
    ctx: dict,
    maxcount: int = 1000,
    maxsize: int | None = None,
    workers: int = 2,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Run converter ``kind`` over ``records`` (an iterator, consumed once) into ``out_dir``.

    ``options`` are recorded in every report and in ``dataset.json`` (and decide whether an earlier
    run's shards can be reused); ``ctx`` is what the record builder needs. Returns the report that
    is also written to ``out_dir/dataset.json``."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown converter {kind!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"name must be letters, digits, '-' or '_' (no dots), got {name!r}")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out, name)
    (out / "dataset.json").unlink(missing_ok=True)
    options = {
        "converter": kind,
        "version": VERSION,
        "name": name,
        "maxcount": int(maxcount),
        "maxsize": int(maxsize) if maxsize else None,
        **options,
    }
    options = json.loads(json.dumps(options))  # what a report read back will compare equal to

    t0 = time.perf_counter()
    reports: dict[int, dict] = {}
    reused = written = 0
    say = print if verbose else (lambda *a, **k: None)

    def finished(rep: dict) -> None:
        nonlocal written
        written += 1
        reports[rep["index"]] = rep
        if rep.get("over_maxsize"):
            say(
                f"[convert {name}] warning: {rep['shard']} is {rep['bytes']} bytes > maxsize={maxsize}; lower maxcount",
                flush=True,
            )
        say(
            f"[convert {name}] shard {rep['index']:06d}: {rep['samples']}/{rep['records']} samples "
            f"({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )

    pool = None
    if workers > 1:
        # fork: workers inherit the imported modules (no re-import of the caller's script, as spawn
        # would do). ProcessPoolExecutor, not multiprocessing.Pool: a writer killed by the OS (OOM)
        # raises BrokenProcessPool here instead of leaving the run waiting forever.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    pending: deque = deque()
    try:
        for index, chunk in enumerate(_chunks(records, maxcount)):
            rep = _load_report(shard_paths(out, name, index)[1], options)
            if rep is not None:
                reports[index] = rep
                reused += 1
                continue
            task = (kind, index, index * maxcount, chunk, ctx, str(out), name, options)
            if pool is None:
                finished(write_shard(task))
                continue
            pending.append(pool.submit(write_shard, task))
            while len(pending) >= 2 * workers:  # bounded: the reader never runs far ahead
                finished(pending.popleft().result())
        while pending:
            finished(pending.popleft().result())
    except BaseException:
        if pool is not None:  # interrupted or failed: stop the writers now (finished shards stay)
            for f in pending:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

    # Stray shards past the end of this input (a previous, longer input) would be mixed in silently.
    n = len(reports)
    extra = sorted(
        p.name
        for p in out.glob(f"{name}-*.tar")
        if re.fullmatch(rf"{re.escape(name)}-(\d{{6}})\.tar", p.name)
        and int(p.name[len(name) + 1 : len(name) + 7]) >= n
    )
    if extra:
        raise ConvertError(f"{out} holds shards beyond this input's {n} chunks ({extra[:3]}…); use overwrite=True")

    ordered = [reports[i] for i in range(n)]
    skipped, dropped, examples = Counter(), Counter(), {}
    for r in ordered:
        skipped.update(r["skipped"])
        dropped.update(r["dropped_images"])
        for reason, lst in r["examples"].items():
            for ex in lst:
                add_example(examples, reason, f"{r['index']:06d}", ex)
    info = {
        "name": name,
        "converter": kind,
        "records": sum(r["records"] for r in ordered),
        "samples": sum(r["samples"] for r in ordered),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "images": sum(r["images"] for r in ordered),
        "dropped_images": dict(sorted(dropped.items())),
        "shards": [r["shard"] for r in ordered if r["shard"]],
        "shard_samples": [r["samples"] for r in ordered if r["shard"]],
        "bytes": sum(r["bytes"] for r in ordered),
        "over_maxsize": [r["shard"] for r in ordered if r.get("over_maxsize")],
        "examples": examples,
        "options": options,
        "run": {
            "seconds": round(time.perf_counter() - t0, 2),
            "shards_written": written,
            "shards_reused": reused,
            "workers": workers,
            "peak_rss_mb": _peak_rss_mb(),
        },
    }
    write_json(out / "dataset.json", info)
    say(format_report(info, out), flush=True)
    return info


def format_report(info: dict, out_dir: str | os.PathLike | None = None) -> str:
    """A few human lines from a ``dataset.json`` dict."""
    run = info.get("run", {})
    lines = [
        f"[convert {info['name']}] {info['converter']}: {info['samples']} samples written of {info['records']} records, "
        f"{len(info['shards'])} shards, {info['bytes'] / 1e6:.1f} MB, {info['images']} images"
        + (f" -> {out_dir}" if out_dir is not None else ""),
        f"  skipped {info['skipped_total']}: " + (", ".join(f"{k}={v}" for k, v in info["skipped"].items()) or "none"),
    ]
    if info["dropped_images"]:
        lines.append(
            "  images dropped from kept documents: " + ", ".join(f"{k}={v}" for k, v in info["dropped_images"].items())
        )
    for reason, exs in info["examples"].items():
        lines.append(f"  e.g. {reason}: {exs[0]}")
    if info["over_maxsize"]:
        lines.append(f"  over maxsize: {info['over_maxsize'][:5]}")
    if run:
        lines.append(
            f"  {run['seconds']}s, {run['shards_written']} shards written, {run['shards_reused']} reused, "
            f"peak RSS {run['peak_rss_mb']['main']} MB (workers {run['peak_rss_mb']['workers']} MB)"
        )
    return "\n".join(lines)
