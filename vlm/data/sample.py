"""One raw shard sample (json + media bytes) -> one model-ready sample, or a `SampleError`.

Used by the training loader, the evaluation loader and (for a single image) inference, so
preprocessing cannot drift between them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from vlm.data.media import MediaError, decode_image
from vlm.data.processor import ImageProcessor
from vlm.data.template import ChatTemplate, SampleTooLong, TemplateError

_MEDIA_MEMBER = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp|gif|bmp|tif|tiff)$")


class SampleError(ValueError):
    """A sample that cannot be used. `reason` is a short code for counting."""

    def __init__(self, reason: str, key: str, message: str):
        super().__init__(f"sample {key!r}: {reason}: {message}")
        self.reason, self.key = reason, key


@dataclass
class ProcessedSample:
    key: str
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, -100 = no loss
    position_ids: torch.Tensor  # [L] or [3, L]
    patches: list[torch.Tensor]  # per media item in span order: [n_i, C·P·P]
    grids: list[tuple[int, int, int]]  # per media item in span order
    qtype: str | None = None  # eval mode: the question type (from meta)
    answer: str | None = None  # eval mode: the reference answer
    prompt: str | None = None  # eval mode: the question text
    skipped: dict | None = None  # bad samples (reason -> count) skipped just before this one


def first_turn(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The messages up to the first assistant turn, and that turn's text (the reference).
    Without an assistant turn (a bare prompt): all messages and None."""
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
            return messages[:i], str(content)
    return messages, None


def question_text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c["text"] for c in content if isinstance(c, dict) and c.get("type") == "text"]
    return " ".join(parts)


class SampleProcessor:
    """Decode, check and render one raw sample.

    mode="train": the whole conversation with labels. mode="eval": the conversation up to the
    first assistant turn plus the generation prompt; the reference answer and qtype are kept.
    """

    def __init__(self, image_processor: ImageProcessor, template: ChatTemplate, mode: str = "train", max_pixels: int = 50_000_000):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.image_processor, self.template, self.mode, self.max_pixels = image_processor, template, mode, max_pixels

    def __call__(self, raw: dict) -> ProcessedSample:
        key = str(raw.get("__key__", "?"))
        if "json" not in raw:
            raise SampleError("no_json", key, "sample has no .json member")
        try:
            obj = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("bad_json", key, str(e)) from None
        if not isinstance(obj, dict) or not ("messages" in obj or "document" in obj):
            raise SampleError("bad_json", key, "json is not an object with 'messages' or 'document'")
        media = {}
        for name, value in raw.items():
            m = _MEDIA_MEMBER.match(name)
            if m:
                media[int(m.group(1))] = value
        if sorted(media) != list(range(len(media))):
            raise SampleError("bad_media_index", key, f"media members {sorted(media)} are not numbered 0..n-1")

        answer = qtype = prompt = None
        sample = obj
        if self.mode == "eval":
            if "messages" not in obj:
                raise SampleError("bad_json", key, "evaluation needs a 'messages' sample")
            try:
                msgs, answer = first_turn(obj["messages"])
            except TemplateError as e:
                raise SampleError("template", key, str(e)) from None
            sample = {"messages": msgs}
            prompt = question_text(msgs)
            qtypes = (obj.get("meta") or {}).get("qtypes") or [None]
            qtype = qtypes[0]
            # Only the media the prompt references are needed.
            used = {c.get("media") for m in msgs for c in (m.get("content") if isinstance(m.get("content"), list) else []) if isinstance(c, dict)}
            media = {i: b for i, b in media.items() if i in used}
            if sorted(media) != list(range(len(media))):
                raise SampleError("bad_media_index", key, "the first turn references media out of order")

        processed = []
        for i in range(len(media)):
            try:
                processed.append(self.image_processor(decode_image(media[i], max_pixels=self.max_pixels, key=key)))
            except MediaError as e:
                raise SampleError(f"media_{e.reason}", key, f"media {i}: {e}") from None
        grids = [p.grid for p in processed]
        try:
            r = self.template.render(sample, grids, add_generation_prompt=self.mode == "eval")
        except SampleTooLong as e:
            raise SampleError("too_long", key, str(e)) from None
        except TemplateError as e:
            raise SampleError("template", key, str(e)) from None
        ordered = [processed[i] for i in r.media_order]
        grids_in_order = [p.grid for p in ordered]
        return ProcessedSample(
            key=key,
            input_ids=torch.tensor(r.input_ids, dtype=torch.long),
            labels=torch.tensor(r.labels, dtype=torch.long),
            position_ids=self.template.position_ids(r.input_ids, grids_in_order),
            patches=[p.patches for p in ordered],
            grids=grids_in_order,
            qtype=qtype,
            answer=answer,
            prompt=prompt,
        )
