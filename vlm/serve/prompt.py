"""A conversation with inline media (`vlm.serve.api`) -> the model's prompt tensors.

The conversation goes through the same `SampleTransform` as training and evaluation samples
(mode="chat": every turn, then the generation prompt), so a served model sees the decoding,
resizing, patching and template it was trained with. What serving adds:

* each media item's content hash (SHA-256 of its bytes and the processor settings): the key of
  the image-embedding cache, and what makes two prompts' media positions "the same token";
* `prefix_keys`: one integer per prompt position, the token id for text and a hash of (media
  hash, index in the span) for a visual token, so the prefix cache can compare prompts that hold
  different images behind identical placeholder ids;
* the context check against the serving engine's `max_context` (prompt + `max_tokens`), instead
  of the template's training `max_length`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch

from vlm.data.collate import collate
from vlm.data.sample import ProcessedSample, SampleError, SampleTransform
from vlm.serve.api import RequestError

ROLES = ("system", "user", "assistant")
MEDIA_KINDS = ("image", "video")


@dataclass
class Prompt:
    """One request's prompt, ready for the model.

    input_ids: `[L]`; position_ids: `[L]` or `[3, L]` (M-RoPE); patches: per media item in span
    order `[n_i, C·T·P·P]`; grids: `(t, h, w)` per item; media_hashes: per item, in span order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    patches: list[torch.Tensor]
    grids: list[tuple[int, int, int]]
    kinds: list[str]
    media_hashes: list[str]
    visual_tokens: int
    prefix_keys: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    def batch(self, pad_id: int) -> dict:
        """A one-row batch (`vlm.data.collate` contract) for `vlm.model.generate.generate`."""
        s = ProcessedSample(
            key="request",
            input_ids=self.input_ids,
            labels=torch.full_like(self.input_ids, -100),
            position_ids=self.position_ids,
            patches=self.patches,
            grids=self.grids,
            kinds=self.kinds,
        )
        return collate([s], pad_id, padding_side="left")


def _media_bytes(item: dict, kind: str, where: str):
    data = item.get(kind)
    if isinstance(data, (bytes, bytearray)) and data:
        return bytes(data)
    if kind == "video" and isinstance(data, list) and data and all(isinstance(f, (bytes, bytearray)) for f in data):
        return [bytes(f) for f in data]
    raise RequestError(f"{where}: a {kind} item needs its encoded bytes under {kind!r}", param="messages")


def to_raw_sample(messages: list[dict]) -> tuple[dict, list]:
    """Our chat messages with inline media -> (a raw shard-style sample, media per index).

    The raw sample is what `SampleTransform` reads: `json` with media referenced by index, and
    `N.png` (or `N.F.png` frames) members. Structure errors are `RequestError`s naming the message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out_msgs: list[dict] = []
    media: list = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} is not an object", param="messages")
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role={role!r} is not one of {', '.join(ROLES)}", param="messages")
        content = msg.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of parts", param="messages")
        parts = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise RequestError(f"{where}.content[{j}] is a text part without a string 'text'", param="messages")
                parts.append({"type": "text", "text": item["text"]})
            elif kind in MEDIA_KINDS:
                if role == "system":
                    raise RequestError(f"{where}: a system message cannot hold media", param="messages")
                media.append(_media_bytes(item, kind, f"{where}.content[{j}]"))
                part = {"type": kind, "media": len(media) - 1}
                if kind == "video" and item.get("fps") is not None:
                    part["fps"] = item["fps"]
                parts.append(part)
            else:
                raise RequestError(f"{where}.content[{j}]: unknown part type {kind!r}", param="messages")
        out_msgs.append({"role": role, "content": parts})
    raw: dict = {"__key__": "request", "json": json.dumps({"messages": out_msgs}).encode()}
    for i, data in enumerate(media):
        if isinstance(data, list):
            for f, frame in enumerate(data):
                raw[f"{i}.{f}.png"] = frame  # the decoder sniffs the real format
        else:
            raw[f"{i}.{'mp4' if _is_video(out_msgs, i) else 'png'}"] = data
    return raw, media


def _is_video(messages: list[dict], index: int) -> bool:
    return any(p.get("type") == "video" and p.get("media") == index for m in messages for p in m["content"])


def media_hash(data, processor_config: dict) -> str:
    """Content hash of one media item under one processor's settings (bytes or a frame list)."""
    h = hashlib.sha256(json.dumps(processor_config, sort_keys=True, default=str).encode())
    for chunk in data if isinstance(data, list) else [data]:
        h.update(struct.pack("<Q", len(chunk)))
        h.update(chunk)
    return h.hexdigest()


def _prefix_keys(input_ids: list[int], media_ids: set[int], hashes: list[str]) -> list[int]:
    """Per position: the token id (text), or a 63-bit hash of (media hash, offset in span)."""
    out, item, offset, inside = [], -1, 0, False
    for t in input_ids:
        if t in media_ids:
            if not inside:
                item, offset, inside = item + 1, 0, True
            digest = hashlib.blake2b(f"{hashes[item]}:{offset}".encode(), digest_size=8).digest()
            out.append(-1 - (int.from_bytes(digest, "little") >> 1))  # negative: never a token id
            offset += 1
        else:
            inside = False
            out.append(int(t))
    return out


class PromptBuilder:
    """Turns conversations into `Prompt`s with one checkpoint's processor and template.

    max_context: the longest sequence the engine runs (prompt + new tokens); the template's
    training `max_length` does not apply. Thread-safe: the serving engine calls it from a pool.
    """

    def __init__(self, processor, template, tokenizer, max_context: int):
        template = copy.copy(template)
        template.max_length = max_context  # checked here against prompt + max_tokens instead
        self.transform = SampleTransform(processor, template, mode="chat")
        self.tokenizer, self.max_context = tokenizer, max_context
        self.processor_config = processor.to_config()
        self.media_ids = {tokenizer.image_pad_id, tokenizer.video_pad_id}

    def __call__(self, messages: list[dict], max_tokens: int = 0) -> Prompt:
        raw, media = to_raw_sample(messages)
        try:
            s = self.transform(raw)
        except SampleError as e:
            reason = e.reason
            if reason == "too_long":
                raise RequestError(
                    f"the prompt does not fit the context of {self.max_context} tokens: {e.message}",
                    param="messages",
                    code="context_length_exceeded",
                ) from None
            code = "invalid_image" if reason.startswith("media_") else "invalid_request"
            raise RequestError(e.message, param="messages", code=code) from None
        n = int(s.input_ids.numel())
        if n + max_tokens > self.max_context:
            raise RequestError(
                f"the prompt is {n} tokens (visual tokens included) and max_tokens is {max_tokens}: "
                f"{n + max_tokens} > the context of {self.max_context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # media are numbered in order of appearance, which is also their span order
        hashes = [media_hash(d, self.processor_config) for d in media]
        ids = s.input_ids.tolist()
        visual = sum(1 for t in ids if t in self.media_ids)
        return Prompt(
            input_ids=s.input_ids,
            position_ids=s.position_ids,
            patches=s.patches,
            grids=list(s.grids),
            kinds=list(s.kinds or []),
            media_hashes=hashes,
            visual_tokens=visual,
            prefix_keys=_prefix_keys(ids, self.media_ids, hashes),
        )
