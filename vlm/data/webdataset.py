"""WebDataset streaming: shards -> raw samples -> (shuffle) -> processed samples.

- Training resamples shards forever with a seed per (rank, worker), so every rank and worker
  sees its own stream and no epoch boundary stalls the run.
- Exact resume: a worker's training stream reads whole shards in the order its seeded RNG picks
  them, and is cut into *blocks* of `block_samples` raw samples; each block is shuffled with its
  own buffer (seeded by the block number) that starts empty. A position is (block, index in the
  block, and where the block started: shard number in the pick order, sample offset in that
  shard), so a resumed worker re-draws the shard order (no I/O), opens the block's first shard,
  and re-reads at most one block of raw bytes (no decoding) to be exactly where it was. Workers
  report positions through a small shared-memory ring (`positions`); the main process
  (`StreamTracker`, owned by `VLMDataModule`) turns the batches the *model* has consumed into
  one resume point per stream for the checkpoint, and a resumed dataset gets those points as
  its `resume` argument. Resuming with a different world size, number of workers, shards or
  seed cannot continue the old streams: they are then reseeded from the resume step (no data
  repeats, but not bit-identical to an uninterrupted run).
- Sequence packing (`packing`, training only): each worker packs every `window` good samples into
  rows (`vlm.data.packing`); a row's resume point is its window's first sample plus the number of
  the window's rows already emitted, so a resumed worker re-reads one window and drops those rows.
- Evaluation reads each shard once, split explicitly by node (rank) then by worker.
- Shard URLs are untrusted: only local files are opened (webdataset's `pipe:` URLs would run a
  shell command, so they are refused).
- Shards are read by `vlm.data.tar_reader`, which checks every tar header before reading a byte
  of the member (size caps, regular files only) and skips repeated keys.
- A bad sample, whatever is wrong with it, is skipped with a warning naming its key and counted
  by reason; the counts ride on the next good sample to the main process (DataLoader workers are
  separate processes). More than `max_consecutive_failures` bad samples in a row, or too large a
  share of a window, stops the run with a clear `DataError`. So does a training stream in which
  no shard yields a sample (every shard empty, not a tar, or without `KEY.EXT` members): a shard
  that yielded nothing once is not read again, and when that is true of every shard the error
  names them.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Iterator
from itertools import chain, islice

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from vlm.data.sample import SampleError, SampleTransform, skip_report
from vlm.data.tar_reader import ShardErrors, read_samples
from vlm.errors import DataError

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


MAX_MEMBER_BYTES = 128 * 2**20  # one tar member (an image, a video, the json)
MAX_SAMPLE_BYTES = 512 * 2**20  # all members of one sample


RING = 4096  # positions remembered per worker: more than a worker runs ahead (batch x (prefetch + 2))
MAX_WORKERS = 16  # training DataLoader workers per rank (the ring is 16 x 4096 x 6 int64 = 3.1 MB of shared memory)


class ShardDataset(IterableDataset):
    def __init__(
        self,
        urls: str | list[str],
        processor: SampleTransform,
        train: bool,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_consecutive_failures: int = 50,
        warn_limit: int = 20,
        block_samples: int | None = None,
        packing: dict | None = None,
        task=None,
        max_bad_fraction: float = 0.5,
        bad_window: int = 1000,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
        resume: dict | None = None,
    ):
        """resume (training only): where the streams continue, `{"state": StreamTracker.state(…)
        or None, "step": the checkpoint's global step}` (`VLMDataModule.load_state_dict`); a
        state that is None or does not fit this dataset reseeds the streams from the step. None:
        a fresh start."""
        self.urls = expand_urls(urls)
        if int(max_member_bytes) < 1 or int(max_sample_bytes) < 1:
            raise ValueError(
                f"data.max_member_bytes and data.max_sample_bytes must be >= 1, got "
                f"{max_member_bytes}, {max_sample_bytes}"
            )
        self.max_member_bytes, self.max_sample_bytes = int(max_member_bytes), int(max_sample_bytes)
        self.processor, self.train = processor, train
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.max_consecutive_failures, self.warn_limit = max_consecutive_failures, warn_limit
        # Raw samples per stream block: the most a resume re-reads (without decoding); several
        # shuffle buffers long, since each block's buffer starts empty.
        self.block_samples = int(block_samples or max(8192, 4 * shuffle_buffer))
        self.rank, self.world = rank_world()
        if not 0.0 < max_bad_fraction <= 1.0 or bad_window < 1:
            raise ValueError(
                f"data.max_bad_fraction must be in (0, 1] and data.bad_window >= 1, got "
                f"{max_bad_fraction}, {bad_window}"
            )
        self.max_bad_fraction, self.bad_window = float(max_bad_fraction), int(bad_window)
        self.task = task  # raw sample -> raw sample before decoding (vlm.data.mixture tasks), or None
        self.packing = dict(packing) if packing and train else None
        if self.packing:
            from vlm.data.packing import METHODS

            if self.packing.get("method", "best_fit") not in METHODS:
                raise ValueError(f"data.pack_method must be one of {METHODS}, got {self.packing.get('method')!r}")
            if int(self.packing.get("window", 1)) < 1 or int(self.packing.get("length", 0)) < 1:
                raise ValueError(f"data.pack_length and data.pack_window must be >= 1, got {self.packing}")
        self.positions: torch.Tensor | None = None
        self.resume: dict | None = None
        if train:
            # per worker, per yielded sample (or packed row) k: (k, block, index in block, block's
            # shard, offset, packed rows of the window already emitted); shared with workers
            self.positions = torch.full((MAX_WORKERS, RING, 6), -1, dtype=torch.long).share_memory_()
            self.resume = resume

    def fingerprint(self) -> str:
        """What a resume point is valid for: same shards, seed and block size."""
        pk = (
            ""
            if not self.packing
            else f"pack-{self.packing.get('length')}-{self.packing.get('method', 'best_fit')}-{self.packing.get('window')}"
        )
        h = hashlib.sha1("\n".join([str(self.seed), str(self.block_samples), pk, *self.urls]).encode())
        return h.hexdigest()[:16]

    def _start(self, worker: int, n_workers: int) -> tuple[int, list[int], str]:
        """(stream, [block, index, shard, offset, rows], tag) where this worker's training stream
        starts (`rows`: packed rows of the first window already consumed).

        A resumed DataLoader hands its first batch to worker 0 again, while the interrupted one
        would have asked worker `batches mod W` next; so worker w continues stream
        `(w + offset) mod W`, which keeps the batch order identical."""
        if self.resume is None:
            return worker, [0, 0, 0, 0, 0], ""
        st, step = self.resume["state"], self.resume["step"]
        if st is not None and st.get("num_workers") == n_workers and st.get("fingerprint") == self.fingerprint():
            stream = (worker + int(st.get("offset", 0))) % n_workers
            point = [int(v) for v in st["points"][stream]]
            return stream, (point + [0])[:5], st.get("tag", "")
        if worker == 0:
            log.warning(
                "training streams reseeded from step %d (the checkpoint's data layout differs: "
                "world size, num_workers, shards, seed or packing)",
                step,
            )
        return worker, [0, 0, 0, 0, 0], f"r{step}"

    def _shards(self, rank: int, world: int, worker: int, n_workers: int) -> Iterator[str]:
        yield from self.urls[rank::world][worker::n_workers]

    def _read(self, url: str, errors: ShardErrors) -> Iterator[dict]:
        return read_samples(url, errors, self.max_member_bytes, self.max_sample_bytes)

    def _cursor(
        self, stream: int, tag: str, shard: int, offset: int, errors: ShardErrors
    ) -> Iterator[tuple[int, int, dict]]:
        """(shard number, offset in shard, raw sample) of a training stream from (shard, offset) on.

        A shard that yields no sample is remembered and not read again (its pick still counts, so
        the pick order, and with it exact resume, is unchanged); when every shard is such a one,
        the stream stops with a `DataError` instead of spinning forever."""
        rng = random.Random(f"{self.seed}-{self.rank}-{stream}{tag}")
        for _ in range(shard):  # the pick order is replayed without reading anything
            rng.choice(self.urls)
        empty: dict[str, str] = {}  # url -> why it yielded nothing
        distinct = set(self.urls)
        while True:
            url = rng.choice(self.urls)
            if url not in empty:
                before = Counter(errors.counts)
                n = 0
                for o, item in enumerate(self._read(url, errors)):
                    n += 1
                    if o >= offset:
                        yield shard, o, item
                if n == 0:
                    empty[url] = ", ".join(sorted(errors.counts - before)) or "no samples"
                    if len(empty) == len(distinct):
                        names = ", ".join(f"{u} ({why})" for u, why in list(empty.items())[:5])
                        raise DataError(
                            f"no training shard yields a sample: all {len(distinct)} are empty or "
                            f"unreadable: {names}{' …' if len(empty) > 5 else ''}; counts {dict(errors.counts)}"
                        )
            shard, offset = shard + 1, 0

    def _train_stream(self, start: tuple, errors: ShardErrors) -> Iterator[tuple[list[int], dict]]:
        """([block, index, shard, offset of the block start], raw sample) forever, from `start`
        (`_start`'s answer). Samples before the resume point are read, not decoded."""
        stream, (block, skip, shard, offset, _), tag = start
        raw = self._cursor(stream, tag, shard, offset, errors)
        while True:
            first = next(raw)
            start = first[:2]
            items = (x[2] for x in chain([first], islice(raw, self.block_samples - 1)))
            if self.shuffle_buffer > 1:
                items = self._shuffled(items, random.Random(f"buffer-{self.seed}-{self.rank}-{stream}-{block}{tag}"))
            for j, item in enumerate(items):
                if j >= skip:
                    yield [block, j, *start], item
            block, skip = block + 1, 0

    def _raw(self, shards: Iterator[str], errors: ShardErrors) -> Iterator[dict]:
        for url in shards:
            yield from self._read(url, errors)

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
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        errors = ShardErrors(self.warn_limit)
        skip_rows = 0
        if self.train:
            if worker >= MAX_WORKERS:
                raise ValueError(f"at most {MAX_WORKERS} DataLoader workers per rank are supported for training")
            start = self._start(worker, n_workers)
            skip_rows = start[1][4]
            stream = self._train_stream(start, errors)
            ring = self.positions[worker]
        else:
            rank, world = rank_world()
            stream = ((None, item) for item in self._raw(self._shards(rank, world, worker, n_workers), errors))
            ring = None
        good = self._processed(stream, errors)
        if self.packing:
            good = self._packed(good, skip_rows)
        k = 0
        for pos, sample in good:
            if ring is not None and pos is not None:
                ring[k % RING] = torch.tensor([k, *pos])
                k += 1
            yield sample

    def _processed(self, stream, errors: ShardErrors) -> Iterator[tuple[list[int] | None, object]]:
        """(position + [0], processed sample) of the good samples; bad ones skipped and counted."""
        skipped: Counter = Counter()
        consecutive = 0
        warned = 0
        window: deque = deque(maxlen=self.bad_window)  # 1 = failed, over the last `bad_window` samples
        window_reasons: deque = deque(maxlen=self.bad_window)
        n_bad = 0
        for pos, item in stream:
            try:
                sample = self.processor(self.task(item) if self.task is not None else item)
            except Exception as exc:  # noqa: BLE001 - whatever one sample provokes, it is that sample's fault
                e = (
                    exc
                    if isinstance(exc, SampleError)
                    else SampleError(
                        f"error_{type(exc).__name__}", str(item.get("__key__", "?")), " ".join(str(exc).split())[:300]
                    )
                )
                skipped[e.reason] += 1
                consecutive += 1
                n_bad += 1 - (window[0] if len(window) == self.bad_window else 0)
                window.append(1)
                window_reasons.append(e.reason)
                if len(window) == self.bad_window and n_bad > self.max_bad_fraction * self.bad_window:
                    reasons = Counter(r for r in window_reasons if r)
                    raise DataError(
                        f"{n_bad} of the last {self.bad_window} samples failed (more than data.max_bad_fraction="
                        f"{self.max_bad_fraction}); reasons {dict(reasons.most_common())}, last: {e}. "
                        "The shards look broken; fix them or raise data.max_bad_fraction."
                    ) from None
                if warned < self.warn_limit:
                    log.warning("skipping %s", e)
                    warned += 1
                if consecutive > self.max_consecutive_failures:
                    raise DataError(
                        f"{consecutive} bad samples in a row (last: {e}); counts so far {dict(skipped)}. "
                        "The shards look broken; fix them or raise data.max_consecutive_failures."
                    ) from None
                continue
            consecutive = 0
            n_bad -= window[0] if len(window) == self.bad_window else 0
            window.append(0)
            window_reasons.append(None)
            skipped.update(errors.counts)
            errors.counts.clear()
            sample.skipped = skipped  # travels to the main process with the batch
            skipped = Counter()
            yield (None if pos is None else [*pos, 0]), sample
        skipped.update(errors.counts)
        if skipped:  # bad samples after the last good one (a finite stream): report them anyway
            yield None, skip_report(skipped)

    def _packed(self, good, skip_rows: int) -> Iterator[tuple[list[int], object]]:
        """Pack every `window` good samples into rows; a row's position is its window's first
        sample's, with the index moved back by one (the tracker resumes *after* a position) and
        the number of the window's rows emitted so far including this one."""
        from vlm.data.packing import pack

        length, method = int(self.packing["length"]), self.packing.get("method", "best_fit")
        window = int(self.packing.get("window", 64))
        while True:
            chunk = list(islice(good, window))
            if not chunk:
                return
            b, j, shard, offset, _ = chunk[0][0]
            rows = pack([s for _, s in chunk], length, method)
            for i, row in enumerate(rows):
                if i >= skip_rows:
                    yield [b, j - 1, shard, offset, i + 1], row
            skip_rows = 0


class StreamTracker:
    """Main-process side of exact resume.

    The DataLoader hands out batches from its workers in strict round-robin order (batch i comes
    from worker i mod W, each a run of consecutive samples of that worker's stream). Counting the
    samples the *model* has consumed per worker (prefetched batches are not consumed) and looking
    up the stream position of the last one in the dataset's shared ring gives, per worker, the
    point its stream must continue from.
    """

    def __init__(self):
        self.loader_id: int | None = None
        self.batches = 0
        self.consumed: list[int] = []

    def on_batch(self, loader, batch_size: int) -> None:
        ds = getattr(loader, "dataset", None)
        if not isinstance(ds, ShardDataset) or not ds.train:
            return
        if id(loader) != self.loader_id:
            self.loader_id, self.batches = id(loader), 0
            self.consumed = [0] * max(1, loader.num_workers)
        self.consumed[self.batches % len(self.consumed)] += batch_size
        self.batches += 1

    def state(self, loader) -> dict | None:
        ds = loader.dataset
        if not isinstance(ds, ShardDataset):  # a mixture: resumed by reseeding from the step
            return None
        n_workers = max(1, loader.num_workers)
        mine = self.loader_id == id(loader)
        consumed = self.consumed if mine else [0] * n_workers
        points: list[list[int]] = [[0, 0, 0, 0, 0]] * n_workers
        tag = ""
        for w in range(n_workers):
            stream, point, tag = ds._start(w, n_workers)
            if consumed[w]:
                k = consumed[w] - 1
                row = ds.positions[w, k % RING].tolist()
                if row[0] != k:
                    raise RuntimeError(
                        f"data position of worker {w} sample {k} is no longer known (ring holds sample {row[0]}): "
                        f"the worker ran more than {RING} samples ahead; lower prefetch_factor or batch size"
                    )
                point = [row[1], row[2] + 1, row[3], row[4], row[5]]
            points[stream] = point
        offset = ds._start(0, n_workers)[0] + (self.batches if mine else 0)
        return {
            "num_workers": n_workers,
            "fingerprint": ds.fingerprint(),
            "tag": tag,
            "points": points,
            "offset": offset % n_workers,
            "rank": ds.rank,
            "world": ds.world,
        }


def seed_worker(_: int) -> None:
    """DataLoader worker_init_fn: a distinct torch seed per worker (numpy is not used)."""
    info = get_worker_info()
    torch.manual_seed(info.seed % 2**31)
