"""WebDataset streaming: shards -> raw samples -> (shuffle) -> processed samples.

- Training resamples shards forever with a seed per (rank, worker), so every rank and worker
  sees its own stream and no epoch boundary stalls the run.
- Evaluation reads each shard once, split explicitly by node (rank) then by worker.
- Shard URLs are untrusted: only local files are opened (webdataset's `pipe:` URLs would run a
  shell command, so they are refused).
- A bad sample is skipped with a warning naming its key and counted by reason; the counts ride on
  the next good sample to the main process (DataLoader workers are separate processes). More than
  `max_consecutive_failures` bad samples in a row stops the run with a clear error.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlm.data.sample import SampleError, SampleProcessor

log = logging.getLogger("vlm.data")


def expand_urls(spec: str | list[str]) -> list[str]:
    """A glob, a brace pattern (`a-{000000..000009}.tar`), a directory or a list of those -> files."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        s = str(s)
        if s.startswith("pipe:") or "://" in s and not s.startswith("file://"):
            raise ValueError(f"refusing shard URL {s!r}: only local files are read")
        s = s.removeprefix("file://")
        for e in braceexpand(s):
            if os.path.isdir(e):
                urls += sorted(glob.glob(os.path.join(e, "*.tar")))
            elif any(c in e for c in "*?["):
                urls += sorted(glob.glob(e))
            else:
                urls.append(e)
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _TarErrors:
    """webdataset handler: count a broken tar member/stream instead of crashing."""

    def __init__(self):
        self.counts = Counter()

    def __call__(self, exn) -> bool:
        self.counts["tar_error"] += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True


class ShardDataset(IterableDataset):
    def __init__(
        self,
        urls: str | list[str],
        processor: SampleProcessor,
        train: bool,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_consecutive_failures: int = 50,
        warn_limit: int = 20,
    ):
        self.urls = expand_urls(urls)
        self.processor, self.train = processor, train
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_consecutive_failures, self.warn_limit = max_consecutive_failures, warn_limit

    def _shards(self, rank: int, world: int, worker: int, n_workers: int) -> Iterator[str]:
        if self.train:
            rng = random.Random(f"{self.seed}-{rank}-{worker}")
            while True:
                yield rng.choice(self.urls)
        else:
            yield from self.urls[rank::world][worker::n_workers]

    def _raw(self, shards: Iterator[str], errors: _TarErrors) -> Iterator[dict]:
        def streams():
            for url in shards:
                with open(url, "rb") as f:
                    yield {"url": url, "stream": f}

        yield from group_by_keys(tar_file_expander(streams(), handler=errors), handler=errors)

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buf: list[dict] = []
        for x in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(x)
                continue
            i = rng.randrange(len(buf))
            buf[i], x = x, buf[i]
            yield x
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        rank, world = rank_world()
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        errors = _TarErrors()
        raw = self._raw(self._shards(rank, world, worker, n_workers), errors)
        if self.train and self.shuffle_buffer > 1:
            raw = self._shuffled(raw, random.Random(f"buffer-{self.seed}-{rank}-{worker}"))
        skipped: Counter = Counter()
        consecutive = 0
        warned = 0
        for item in raw:
            try:
                sample = self.processor(item)
            except SampleError as e:
                skipped[e.reason] += 1
                consecutive += 1
                if warned < self.warn_limit:
                    log.warning("skipping %s", e)
                    warned += 1
                if consecutive > self.max_consecutive_failures:
                    raise RuntimeError(
                        f"{consecutive} bad samples in a row (last: {e}); counts so far {dict(skipped)}. "
                        "The shards look broken; fix them or raise data.max_consecutive_failures."
                    ) from None
                continue
            consecutive = 0
            skipped.update(errors.counts)
            errors.counts.clear()
            sample.skipped = skipped  # travels to the main process with the batch
            skipped = Counter()
            yield sample


def seed_worker(_: int) -> None:
    """DataLoader worker_init_fn: a distinct torch seed per worker (numpy is not used)."""
    info = get_worker_info()
    torch.manual_seed(info.seed % 2**31)
