"""Chat template: messages (or an interleaved document) + media grids -> ids, labels, positions.

Rendering (ChatML-style; structural tokens are inserted by id, never parsed from text):

    <|im_start|>user\\n<|vision_start|><|image_pad|>×N<|vision_end|>What color is the circle?<|im_end|>\\n
    <|im_start|>assistant\\nred<|im_end|>\\n

Labels are -100 everywhere except the assistant content and its `<|im_end|>`. A media item's
placeholder span holds exactly `token_count(grid)` pad tokens, the same function the model checks
against. A `{"document": [...]}` sample trains on all its text (labels on text, -100 on media),
followed by `<|endoftext|>`.

Position ids are computed here, per sample, so they survive batching and packing; the decoder's
`rope` kind selects 1D positions `[L]` or M-RoPE positions `[3, L]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vlm.tokenizer import TextTokenizer

IGNORE = -100


class TemplateError(ValueError):
    """The sample's structure is wrong (unknown role, media index out of range, …)."""


class SampleTooLong(ValueError):
    """The rendered sample exceeds `max_length`; it is dropped whole, never cut inside a media span."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    media_order: list[int]  # media indices in the order their spans appear
    media_kinds: list[str] = field(default_factory=list)


class ChatTemplate:
    """Render chat or document samples for a tokenizer and a visual-token-count function.

    token_count: grid (t, h, w) -> number of LLM tokens (`visual_token_count` with the projector's
    layout). token_grid: grid -> the LLM-side token grid `(t, h, w)` that M-RoPE lays positions
    on (`vlm.model.projector.token_grid`); default `(t, h/m, w/m)` with `merge_size` m.
    rope: "rope" (1D positions) or "mrope" (3D positions, Qwen2-VL rule).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        token_count: Callable[[Sequence[int]], int],
        max_length: int = 512,
        rope: str = "rope",
        merge_size: int = 1,
        system_prompt: str | None = None,
        image_position: str = "first",
        token_grid: Callable[[Sequence[int]], Sequence[int]] | None = None,
    ):
        if image_position not in ("first", "last"):
            raise ValueError(f"template.image_position must be 'first' or 'last', got {image_position!r}")
        self.tok = tokenizer
        self.image_position = image_position
        self.token_count = token_count
        self.max_length = max_length
        self.rope = rope
        self.merge_size = merge_size
        self.token_grid = token_grid or self._merged_grid
        self.system_prompt = system_prompt
        self._role_prefix = {
            r: [tokenizer.im_start_id, *tokenizer.encode(f"{r}\n")] for r in ("system", "user", "assistant")
        }
        self._turn_end = [tokenizer.im_end_id, *tokenizer.encode("\n")]

    def prompt_messages(self, n_images: int, text: str, n_videos: int = 0) -> list[dict]:
        """A one-turn user prompt with `n_images` images (media 0..n_images-1) then `n_videos`
        videos (the next indices), placed as the model was trained (`image_position`): used by
        inference to build the same layout as the training data."""
        images = [{"type": "image", "media": i} for i in range(n_images)]
        images += [{"type": "video", "media": n_images + j} for j in range(n_videos)]
        content = (
            [*images, {"type": "text", "text": text}]
            if self.image_position == "first"
            else [{"type": "text", "text": text}, *images]
        )
        return [{"role": "user", "content": content}]

    # ---- rendering ---------------------------------------------------------------------------
    def _content(
        self,
        content,
        grids: Sequence[Sequence[int]],
        media_kinds: Sequence[str] | None,
        out_ids,
        out_labels,
        train: bool,
        order,
        kinds,
    ):
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise TemplateError(f"message content must be a string or a list, got {type(content).__name__}")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            kind = kind if isinstance(kind, str) else None
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise TemplateError("text item without a string 'text'")
                ids = self.tok.encode(text)
                out_ids += ids
                out_labels += ids if train else [IGNORE] * len(ids)
            elif kind in ("image", "video"):
                idx = item.get("media")
                if not isinstance(idx, int) or not 0 <= idx < len(grids):
                    raise TemplateError(f"{kind} item references media {idx!r}, the sample has {len(grids)}")
                n = self.token_count(grids[idx])
                media_kind = media_kinds[idx] if media_kinds else kind  # the item's type unless told
                if media_kind != kind:
                    raise TemplateError(f"{kind} item references media {idx}, which is a {media_kind}")
                pad = self.tok.video_pad_id if media_kind == "video" else self.tok.image_pad_id
                span = [self.tok.vision_start_id, *([pad] * n), self.tok.vision_end_id]
                out_ids += span
                out_labels += [IGNORE] * len(span)
                order.append(idx)
                kinds.append(kind)
            else:
                raise TemplateError(f"unknown content item type {kind!r}")

    def render_messages(
        self,
        messages: list[dict],
        grids: Sequence[Sequence[int]],
        media_kinds: Sequence[str] | None = None,
        add_generation_prompt: bool = False,
    ) -> Rendered:
        ids: list[int] = []
        labels: list[int] = []
        order: list[int] = []
        kinds: list[str] = []
        if not isinstance(messages, list):
            raise TemplateError(f"'messages' must be a list, got {type(messages).__name__}")
        if self.system_prompt and not (
            messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"
        ):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        for msg in messages:
            role = msg.get("role") if isinstance(msg, dict) else None
            if not isinstance(role, str) or role not in self._role_prefix:
                raise TemplateError(f"unknown role {role!r}")
            prefix = self._role_prefix[role]
            ids += prefix
            labels += [IGNORE] * len(prefix)
            train = role == "assistant"
            self._content(msg.get("content"), grids, media_kinds, ids, labels, train, order, kinds)
            ids += self._turn_end
            # The model must learn to end its turn: <|im_end|> is a label, the newline is not.
            labels += [self.tok.im_end_id if train else IGNORE, IGNORE]
        if add_generation_prompt:
            prefix = self._role_prefix["assistant"]
            ids += prefix
            labels += [IGNORE] * len(prefix)
        return Rendered(ids, labels, order, kinds)

    def render_document(self, document: list[dict], grids, media_kinds=None) -> Rendered:
        ids: list[int] = []
        labels: list[int] = []
        order: list[int] = []
        kinds: list[str] = []
        self._content(document, grids, media_kinds, ids, labels, True, order, kinds)
        ids.append(self.tok.eos_id)
        labels.append(self.tok.eos_id)
        return Rendered(ids, labels, order, kinds)

    def render(self, sample: dict, grids, media_kinds=None, add_generation_prompt: bool = False) -> Rendered:
        """Render a chat (`messages`) or document (`document`) sample and enforce `max_length`."""
        if "messages" in sample:
            r = self.render_messages(sample["messages"], grids, media_kinds, add_generation_prompt)
        elif "document" in sample:
            r = self.render_document(sample["document"], grids, media_kinds)
        else:
            raise TemplateError("sample has neither 'messages' nor 'document'")
        if len(r.input_ids) > self.max_length:
            raise SampleTooLong(f"{len(r.input_ids)} tokens > max_length {self.max_length}")
        if sorted(r.media_order) != list(range(len(grids))):
            raise TemplateError(f"media referenced {r.media_order} but the sample has {len(grids)} item(s)")
        return r

    # ---- positions ---------------------------------------------------------------------------
    def _merged_grid(self, grid: Sequence[int]) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in grid)
        return t, h // self.merge_size, w // self.merge_size

    def position_ids(self, input_ids: Sequence[int], grids_in_order: Sequence[Sequence[int]]) -> torch.Tensor:
        """`[L]` for 1D RoPE, `[3, L]` for M-RoPE.

        M-RoPE rule (Qwen2-VL): text tokens carry (p, p, p). A media span's tokens carry
        (p0 + t, p0 + h, p0 + w) on the LLM-side token grid (`token_grid`), where p0 is the position after the preceding
        text; the text after the span resumes at one past the largest position the span used.
        """
        L = len(input_ids)
        if self.rope != "mrope":
            return torch.arange(L)
        ids = torch.tensor(input_ids)
        is_media = (ids == self.tok.image_pad_id) | (ids == self.tok.video_pad_id)
        pos = torch.empty(3, L, dtype=torch.long)
        i, p, m = 0, 0, 0
        while i < L:
            if not is_media[i]:
                pos[:, i] = p
                p += 1
                i += 1
                continue
            t, h, w = (int(v) for v in self.token_grid(grids_in_order[m]))
            n = t * h * w
            tt = torch.arange(t).view(t, 1, 1).expand(t, h, w).reshape(-1)
            hh = torch.arange(h).view(1, h, 1).expand(t, h, w).reshape(-1)
            ww = torch.arange(w).view(1, 1, w).expand(t, h, w).reshape(-1)
            pos[0, i : i + n] = p + tt
            pos[1, i : i + n] = p + hh
            pos[2, i : i + n] = p + ww
            p = int(pos[:, i : i + n].max()) + 1
            i += n
            m += 1
        return pos
