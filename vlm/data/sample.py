"""One raw shard sample (json + media bytes) -> one model-ready sample, or a `SampleError`.

Used by the training loader, the evaluation loader and inference, so preprocessing cannot drift
between them.

Media members (data/README.md): `KEY.N.ext` is media item N. Whether it is an image or a video is
decided by the content item that references it (`{"type": "image", "media": N}` or
`{"type": "video", "media": N}`), never by the file name; the bytes are sniffed by the decoders.
Images: jpg, jpeg, png, webp, gif, bmp, tif, tiff. Videos: mp4, mov, webm, mkv, avi, apng, gif,
webp (PyAV or Pillow), or a list of frames stored as `KEY.N.F.ext` (F = 0, 1, ...; image
extensions) with an optional `"fps"` on the video item (default: the video processor's
`default_fps`). Any number of images and videos may appear anywhere in any turn, or in an
interleaved `{"document": [...]}` sample.

Images go through the `ImageProcessor` (repeated `temporal_patch` times when the vision encoder
groups frames, so images and videos share one patch layout `[n, C*T*P*P]`); videos go through the
`VideoProcessor` (frame sampling, per-video token budget). A refused sample raises `SampleError`
with a short reason for counting: `media_<reason>` for media the decoders or resizers refuse
(`media_corrupt`, `media_too_many_pixels`, `media_aspect_ratio`, `media_too_many_frames`, ...),
`bad_media_kind` for an index referenced both as an image and as a video or a frame list
referenced as an image, `bad_media_index`, `template`, `too_long`, `bad_json` (not JSON, not a
chat or document object, nested too deep), `bad_text` (a string that is not valid Unicode),
`no_json`, `empty` (no messages), `no_label` (training: nothing to learn, e.g. no assistant turn),
`no_reference` (evaluation: no assistant answer to score against). The loader counts anything
else a sample provokes as `error_<ExceptionType>` (`vlm.data.webdataset`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from vlm.data.media import MediaError, decode_image
from vlm.data.processor import ImageProcessor
from vlm.data.template import ChatTemplate, SampleTooLong, TemplateError
from vlm.data.video import VideoProcessor, repeat_temporal
from vlm.errors import SampleError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
VIDEO_EXTS = ("mp4", "mov", "webm", "mkv", "avi", "apng", "gif", "webp")
_MEDIA_MEMBER = re.compile(r"^(\d+)\.(" + "|".join(sorted(set(IMAGE_EXTS + VIDEO_EXTS))) + r")$")
_FRAME_MEMBER = re.compile(r"^(\d+)\.(\d+)\.(" + "|".join(IMAGE_EXTS) + r")$")


@dataclass
class ProcessedSample:
    key: str
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, -100 = no loss
    position_ids: torch.Tensor  # [L] or [3, L]
    patches: list[torch.Tensor]  # per media item in span order: [n_i, C·T·P·P]
    grids: list[tuple[int, int, int]]  # per media item in span order
    kinds: list[str] | None = None  # per media item in span order: image | video
    qtype: str | None = None  # eval mode: the question type (from meta)
    answer: str | None = None  # eval mode: the reference answer
    prompt: str | None = None  # eval mode: the question text
    skipped: dict | None = None  # bad samples (reason -> count) skipped just before this one
    seq_lens: list[int] | None = None  # a packed row (vlm.data.packing): its samples' lengths, in order
    source: str | None = None  # the mixture source (data=mix); "a+b" for a packed row
    report_only: bool = False  # no sample: carries the skip counts of the bad samples at a stream's end


def skip_report(skipped: dict) -> ProcessedSample:
    """A stand-in that carries skip counts when no good sample follows them (end of a finite
    stream); collate drops it and keeps the counts."""
    e = torch.empty(0, dtype=torch.long)
    return ProcessedSample(
        key="", input_ids=e, labels=e, position_ids=e, patches=[], grids=[], skipped=dict(skipped), report_only=True
    )


def format_skips(counts: dict, what: str) -> str:
    """One line for the console: `skipped 3 training samples: bad_json 2, no_label 1`."""
    counts = {k: int(v) for k, v in counts.items() if v}
    if not counts:
        return f"skipped no {what} samples"
    by_count = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"skipped {sum(counts.values())} {what} samples: " + ", ".join(f"{k} {v}" for k, v in by_count)


def _texts(content) -> list[str]:
    """The text parts of a message's content (a string, or a list of content items)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            c["text"]
            for c in content
            if isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
        ]
    return []


def first_turn(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The messages up to the first assistant turn, and that turn's text (the reference).
    Without an assistant turn (a bare prompt), or one without text: all messages up to it and None."""
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            return messages[:i], "".join(_texts(m.get("content"))) or None
    return messages, None


def question_text(messages: list[dict]) -> str:
    return " ".join(t for m in messages if isinstance(m, dict) for t in _texts(m.get("content")))


MAX_JSON_DEPTH = 32  # a chat sample is a few levels deep; deeper JSON is refused, not walked


def check_json(obj: Any, key: str) -> None:
    """Refuse a sample JSON nested deeper than `MAX_JSON_DEPTH` or holding a string that is not
    valid Unicode (a lone surrogate such as "\\ud800" decodes from JSON but no tokenizer takes it)."""
    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise SampleError("bad_json", key, f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise SampleError("bad_text", key, "a string is not valid Unicode (lone surrogate)") from None
        elif isinstance(x, dict):
            stack += [(v, depth + 1) for v in x.values()] + [(k, depth + 1) for k in x]
        elif isinstance(x, list):
            stack += [(v, depth + 1) for v in x]


def question_type(meta: Any) -> str | None:
    """`meta.qtypes[0]` (or `meta.qtype`) when it is a string; None otherwise."""
    if not isinstance(meta, dict):
        return None
    q = meta.get("qtypes", meta.get("qtype"))
    q = q[0] if isinstance(q, list) and q else q
    return q if isinstance(q, str) else None


def media_items(sample: dict) -> list[dict]:
    """Every content item of a chat (`messages`) or `document` sample, in order (malformed parts
    are skipped here; the template reports them)."""
    out: list[dict] = []
    if isinstance(sample.get("messages"), list):
        contents = [m.get("content") for m in sample["messages"] if isinstance(m, dict)]
    else:
        contents = [sample.get("document")]
    for c in contents:
        if isinstance(c, list):
            out += [it for it in c if isinstance(it, dict) and it.get("type") in ("image", "video")]
    return out


class SampleTransform:
    """Decode, check and render one raw sample.

    mode="train": the whole conversation (or document) with labels. mode="eval": the conversation
    up to the first assistant turn plus the generation prompt; the reference answer and qtype are
    kept, and a sample without a reference is refused (`no_reference`) unless
    `require_reference=False` (a bare prompt to answer, as `infer.py` builds). mode="chat": the
    whole conversation, whatever its turns, plus the generation prompt (serving: `vlm.serve.prompt`).

    media_processor: an `ImageProcessor`; a `MediaProcessor` (what `vlm.build.model.build_processor`
    returns) also brings its video processor and `temporal_patch`. video_processor: overrides it.
    Without either, videos get `VideoProcessor.from_image_processor(media_processor,
    temporal_patch=1)` (made on the first video).
    """

    def __init__(
        self,
        media_processor: ImageProcessor,
        template: ChatTemplate,
        mode: str = "train",
        max_pixels: int = 50_000_000,
        video_processor: VideoProcessor | None = None,
        require_reference: bool = True,
    ):
        if mode not in ("train", "eval", "chat"):
            raise ValueError(f"mode must be 'train', 'eval' or 'chat', got {mode!r}")
        self.media_processor, self.template, self.mode, self.max_pixels = media_processor, template, mode, max_pixels
        self.require_reference = require_reference  # eval: a sample without an answer cannot be scored
        self._video = video_processor if video_processor is not None else getattr(media_processor, "video", None)
        if self._video is not None:
            for k in ("patch_size", "merge_size"):
                if getattr(self._video, k) != getattr(media_processor, k):
                    raise ValueError(
                        f"video processor {k}={getattr(self._video, k)} differs from the image processor's "
                        f"{getattr(media_processor, k)}"
                    )

    @property
    def video_processor(self) -> VideoProcessor:
        if self._video is None:
            self._video = VideoProcessor.from_image_processor(self.media_processor, temporal_patch=1)
        return self._video

    @property
    def temporal_patch(self) -> int:
        return self._video.temporal_patch if self._video is not None else 1

    # ---- media ---------------------------------------------------------------------------------
    def _image(self, data, key: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        ip = self.media_processor
        draft = ip.draft_size if getattr(ip, "jpeg_draft", False) else None
        p = ip(decode_image(data, max_pixels=self.max_pixels, key=key, draft=draft))
        T = self.temporal_patch
        return (p.patches if T == 1 else repeat_temporal(p.patches, T)), p.grid

    def _video_frames(self, frames: list, fps: float | None, key: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A frame list: plan from the first frame's size, decode only the frames the plan keeps."""
        vp = self.video_processor
        if len(frames) > vp.max_frames_decoded:
            raise MediaError(
                "too_many_frames", f"{len(frames)} frames > max_frames_decoded={vp.max_frames_decoded}", key=key
            )
        fps = vp.default_fps if fps is None else fps
        first = decode_image(frames[0], max_pixels=min(self.max_pixels, vp.max_decode_pixels), key=key)
        plan = vp.plan(len(frames), fps, first.height, first.width)
        decoded = {0: first}
        out = []
        for j in plan.indices:
            if j not in decoded:
                try:
                    decoded[j] = decode_image(frames[j], max_pixels=min(self.max_pixels, vp.max_decode_pixels), key=key)
                except MediaError as e:
                    raise MediaError(e.reason, f"frame {j}: {e.message}", key=key) from None
                if decoded[j].size != first.size:
                    raise MediaError("bad_size", f"frame {j} is {decoded[j].size}, frame 0 is {first.size}", key=key)
            out.append(decoded[j])
        p = vp.process_frames(out, plan, fps)
        return p.patches, p.grid

    def _media(self, i: int, kind: str, data, fps: float | None, key: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if kind == "image":
            if isinstance(data, list):
                raise SampleError("bad_media_kind", key, f"media {i} is a frame list but is referenced as an image")
            return self._image(data, key)
        if isinstance(data, list):
            return self._video_frames(data, fps, key)
        p = self.video_processor(data, key=key)
        return p.patches, p.grid

    # ---- sample --------------------------------------------------------------------------------
    def __call__(self, raw: dict) -> ProcessedSample:
        key = str(raw.get("__key__", "?"))
        if "json" not in raw:
            raise SampleError("no_json", key, "sample has no .json member")
        try:
            obj = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SampleError("bad_json", key, " ".join(str(e).split())[:200] or type(e).__name__) from None
        if not isinstance(obj, dict) or not ("messages" in obj or "document" in obj):
            raise SampleError("bad_json", key, "json is not an object with 'messages' or 'document'")
        check_json(obj, key)
        body = obj["messages"] if "messages" in obj else obj["document"]
        if not isinstance(body, list):
            raise SampleError("bad_json", key, f"'messages' / 'document' must be a list, got {type(body).__name__}")
        if not body:
            raise SampleError("empty", key, "'messages' / 'document' is empty")
        media: dict[int, Any] = {}
        frames: dict[int, dict[int, Any]] = {}
        for name, value in raw.items():
            m = _MEDIA_MEMBER.match(name)
            if m:
                if int(m.group(1)) in media:
                    raise SampleError("bad_media_index", key, f"two members for media {m.group(1)}")
                media[int(m.group(1))] = value
                continue
            m = _FRAME_MEMBER.match(name)
            if m:
                frames.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
        for i, fr in frames.items():
            if i in media:
                raise SampleError("bad_media_index", key, f"media {i} is both a file and a frame list")
            if sorted(fr) != list(range(len(fr))):
                raise SampleError("bad_media_index", key, f"frames of media {i} are numbered {sorted(fr)}, not 0..n-1")
            media[i] = [fr[j] for j in range(len(fr))]
        if sorted(media) != list(range(len(media))):
            raise SampleError("bad_media_index", key, f"media members {sorted(media)} are not numbered 0..n-1")

        answer = qtype = prompt = None
        sample = obj
        if self.mode == "eval":
            if "messages" not in obj:
                raise SampleError("bad_json", key, "evaluation needs a 'messages' sample")
            msgs, answer = first_turn(obj["messages"])
            if self.require_reference and (answer is None or not answer.strip()):
                raise SampleError("no_reference", key, "no assistant turn with text to score the answer against")
            sample = {"messages": msgs}
            prompt = question_text(msgs)
            qtype = question_type(obj.get("meta"))
            # Only the media the prompt references are needed.
            used = {c.get("media") for c in media_items(sample) if isinstance(c.get("media"), int)}
            media = {i: b for i, b in media.items() if i in used}
            if sorted(media) != list(range(len(media))):
                raise SampleError("bad_media_index", key, "the first turn references media out of order")

        # Kind of every media index, from the items that reference it (checked before decoding).
        kinds: dict[int, str] = {}
        fps: dict[int, float | None] = {}
        for it in media_items(sample):
            idx = it.get("media")
            if not isinstance(idx, int) or isinstance(idx, bool) or idx not in media:
                raise SampleError(
                    "template", key, f"{it.get('type')} item references media {idx!r}, the sample has {len(media)}"
                )
            if kinds.setdefault(idx, it["type"]) != it["type"]:
                raise SampleError("bad_media_kind", key, f"media {idx} is referenced both as an image and as a video")
            if it["type"] == "video" and it.get("fps") is not None:
                try:
                    f = float(it["fps"])
                except (TypeError, ValueError):
                    f = float("nan")
                if not (math.isfinite(f) and f > 0):
                    raise SampleError("template", key, f"video item for media {idx} has a bad fps {it['fps']!r}")
                fps[idx] = f
        unused = sorted(set(media) - set(kinds))
        if unused:
            raise SampleError("template", key, f"media {unused} not referenced by any image/video item")

        processed = []
        for i in range(len(media)):
            try:
                processed.append(self._media(i, kinds[i], media[i], fps.get(i), key))
            except MediaError as e:
                raise SampleError(f"media_{e.reason}", key, f"media {i} ({kinds[i]}): {e}") from None
        grids = [g for _, g in processed]
        kind_list = [kinds[i] for i in range(len(media))]
        try:
            r = self.template.render(sample, grids, media_kinds=kind_list, add_generation_prompt=self.mode != "train")
        except SampleTooLong as e:
            raise SampleError("too_long", key, str(e)) from None
        except TemplateError as e:
            raise SampleError("template", key, str(e)) from None
        if self.mode == "train" and not any(label >= 0 for label in r.labels):
            raise SampleError("no_label", key, "nothing to learn: no assistant turn or document text")
        ordered = [processed[i] for i in r.media_order]
        grids_in_order = [g for _, g in ordered]
        return ProcessedSample(
            key=key,
            input_ids=torch.tensor(r.input_ids, dtype=torch.long),
            labels=torch.tensor(r.labels, dtype=torch.long),
            position_ids=self.template.position_ids(r.input_ids, grids_in_order),
            patches=[p for p, _ in ordered],
            grids=grids_in_order,
            kinds=[kind_list[i] for i in r.media_order],
            qtype=qtype,
            answer=answer,
            prompt=prompt,
        )
