"""Weighted mixtures of shard sources (`data=mix`), each with its task template.

    sources:
      - {name: llava,    shards: shards/llava,    weight: 3, task: chat}
      - {name: laion,    shards: shards/laion,    weight: 1, task: caption, prompts: ["Describe the image."]}
      - {name: obelics,  shards: shards/obelics,  weight: 1, task: document}

Every source is its own resampled `ShardDataset` stream; each training sample is drawn from a
source with probability proportional to its weight (a seeded RNG per rank and worker, so the mix
is reproducible). Samples carry their source's name, and the trainer logs cumulative
`data/source_NAME` counts, so the mix actually seen can be checked against the weights.

Tasks turn a source's raw samples into the chat / document contract before decoding:

- `chat`: as-is (`KEY.json` with `messages`);
- `document`: as-is (`KEY.json` with `document`); a source of documents must hold documents;
- `caption`: image–caption pairs. Either our converter's caption samples (their prompt is re-drawn
  from `prompts` when given) or raw caption shards as img2dataset writes them (`KEY.jpg` /
  `KEY.png` / `KEY.webp` + `KEY.txt`): the user turn is the image and a prompt drawn from
  `prompts` (seeded by the key), the assistant turn the caption.

Resume: a mixture resumes by reseeding every stream and the source choice from the resume step
(no sample repeats in expectation, not bit-identical), which `ShardDataset` documents.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from vlm.data.sample import SampleError, SampleTransform
from vlm.data.webdataset import ShardDataset, rank_world

TASKS = ("chat", "document", "caption")
DEFAULT_PROMPTS = ("Describe the image.", "What is in this picture?", "Write a short caption for this image.")
_IMAGE_EXT = re.compile(r"^(jpg|jpeg|png|webp|gif|bmp|tif|tiff)$")


class CaptionTask:
    """Raw caption sample -> chat sample with a prompt drawn from `prompts` (seeded by the key)."""

    def __init__(self, prompts: list[str] | None = None, seed: int = 0):
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("a caption source needs a non-empty list of prompt strings")
        self.seed = seed

    def _prompt(self, key: str) -> str:
        return self.prompts[random.Random(f"{self.seed}-{key}").randrange(len(self.prompts))]

    def __call__(self, raw: dict) -> dict:
        key = str(raw.get("__key__", "?"))
        if "json" in raw:  # our caption samples: re-draw the prompt
            try:
                obj = json.loads(raw["json"])
            except (UnicodeDecodeError, json.JSONDecodeError):
                return raw  # the processor reports it
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if (
                isinstance(msgs, list)
                and msgs
                and isinstance(msgs[0], dict)
                and isinstance(msgs[0].get("content"), list)
            ):
                for item in msgs[0]["content"]:
                    if isinstance(item, dict) and item.get("type") == "text":
                        item["text"] = self._prompt(key)
                return {**raw, "json": json.dumps(obj).encode()}
            if not ("txt" in raw or "caption" in raw):
                return raw
        text = raw.get("txt", raw.get("caption"))
        images = [k for k in raw if _IMAGE_EXT.match(k)]
        if text is None:
            raise SampleError("no_caption", key, "caption sample without a .txt member")
        if len(images) != 1:
            raise SampleError("bad_media_index", key, f"a caption sample needs exactly one image member, has {images}")
        try:
            caption = (text.decode("utf-8") if isinstance(text, bytes) else str(text)).strip()
        except UnicodeDecodeError:
            raise SampleError("bad_text", key, "caption is not UTF-8") from None
        if not caption:
            raise SampleError("empty_caption", key, "empty caption")
        sample = {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "media": 0}, {"type": "text", "text": self._prompt(key)}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": caption}]},
            ]
        }
        return {"__key__": key, "json": json.dumps(sample).encode(), f"0.{images[0]}": raw[images[0]]}


def make_task(task: str, prompts: list[str] | None = None, seed: int = 0):
    if task not in TASKS:
        raise ValueError(f"data.sources[].task must be one of {TASKS}, got {task!r}")
    return CaptionTask(prompts, seed) if task == "caption" else None


class MixtureDataset(IterableDataset):
    """Training samples drawn from several `ShardDataset` streams by weight.

    resume: a checkpoint's `{"state": …, "step": …}` (as `ShardDataset` takes it): every stream
    and the source choice are reseeded from the step; None: a fresh start."""

    def __init__(
        self,
        sources: list[dict],
        processor: SampleTransform,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_consecutive_failures: int = 50,
        packing: dict | None = None,
        max_bad_fraction: float = 0.5,
        bad_window: int = 1000,
        resume: dict | None = None,
        **limits,
    ):
        if not sources:
            raise ValueError("data.sources is empty")
        names = [str(s.get("name", "")) for s in sources]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"data.sources need distinct, non-empty names, got {names}")
        self.names = names
        self.weights = []
        for s in sources:
            w = s.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"data.sources[{s.get('name')}].weight must be a number >= 0, got {w!r}")
            self.weights.append(float(w))
        if sum(self.weights) <= 0:
            raise ValueError("data.sources: at least one weight must be > 0")
        self.seed, self.tag = seed, ("" if resume is None else f"r{resume['step']}")
        # reseed every stream from the resume step (documented above)
        reseed = None if resume is None else {"state": None, "step": resume["step"]}
        self.datasets = [
            ShardDataset(
                s["shards"],
                processor,
                train=True,
                shuffle_buffer=shuffle_buffer,
                seed=seed + 7919 * i,
                max_consecutive_failures=max_consecutive_failures,
                max_bad_fraction=max_bad_fraction,
                bad_window=bad_window,
                **limits,
                task=make_task(s.get("task", "chat"), s.get("prompts"), seed),
                resume=reseed,
            )
            for i, s in enumerate(sources)
        ]
        self.packing = packing
        self.urls = [u for d in self.datasets for u in d.urls]

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker = info.id if info else 0
        rank, _ = rank_world()
        rng = random.Random(f"mix-{self.seed}-{rank}-{worker}{self.tag}")
        streams = [iter(d) if w > 0 else None for d, w in zip(self.datasets, self.weights)]
        idx = [i for i, w in enumerate(self.weights) if w > 0]
        wts = [self.weights[i] for i in idx]

        def draws():
            while True:
                i = rng.choices(idx, wts)[0]
                sample = next(streams[i])
                sample.source = self.names[i]
                yield sample

        if not self.packing:
            yield from draws()
            return
        from itertools import islice

        from vlm.data.packing import pack

        it = draws()
        while True:
            chunk = list(islice(it, int(self.packing.get("window", 256))))
            yield from pack(chunk, int(self.packing["length"]), self.packing.get("method", "best_fit"))
