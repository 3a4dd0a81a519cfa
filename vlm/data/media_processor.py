"""The media processor: the image processor plus the video processor that shares its geometry.

`vlm.build.model.build_processor` returns one; checkpoints store its `to_config()`.
"""

from __future__ import annotations

from typing import Any

import torch

from vlm.data.processor import ImageProcessor
from vlm.data.video import VideoProcessor, repeat_temporal

# The keys `vlm.model.geometry.Geometry` supplies (a checkpoint stores them only in older versions).
GEOMETRY_KEYS = ("patch_size", "merge_size", "temporal_patch")


class MediaProcessor(ImageProcessor):
    """The image processor plus the video processor that shares its geometry and normalisation.

    Its config is the image config with one more key, `video`: the `VideoProcessor` keys
    (`temporal_patch`, `target_fps`, `max_frames`, `max_video_tokens`, ...; image keys there
    override the image value for video frames, e.g. a lower per-frame `max_pixels`, or
    `min_tokens` / `max_tokens`). `patch_size` and `merge_size` are always the image's. A config
    without `video` (checkpoints made before video support) gets `temporal_patch=1`, the only
    encoder layout that existed then. `temporal_patch` is also what images are repeated to
    (`process_image`).

    `min_tokens` / `max_tokens` (here and under `video`): the dynamic-resolution caps in LLM
    tokens per image (per frame), instead of `min_pixels` / `max_pixels`:
    `pixels = tokens * (patch_size * merge_size)^2`, so the caps keep their meaning when the merge
    changes. Give one or the other, not both; `to_config()` records the resulting pixels.
    """

    def __init__(
        self, video: dict | None = None, min_tokens: int | None = None, max_tokens: int | None = None, **image_kw: Any
    ) -> None:
        f2 = (int(image_kw.get("patch_size", 8)) * int(image_kw.get("merge_size", 1))) ** 2
        tokens_to_pixels(image_kw, min_tokens, max_tokens, f2, "processor")
        super().__init__(**image_kw)
        video = dict(video or {})
        video.pop("_target_", None)
        for k in ("patch_size", "merge_size"):
            if k in video and int(video[k]) != getattr(self, k):
                raise ValueError(f"processor.video.{k}={video[k]} differs from processor.{k}={getattr(self, k)}")
        video.setdefault("temporal_patch", 1)
        tokens_to_pixels(
            video, video.pop("min_tokens", None), video.pop("max_tokens", None), self.factor**2, "processor.video"
        )
        image_cfg = ImageProcessor.to_config(self)
        known = set(VideoProcessor().to_config())
        unknown = set(video) - known
        if unknown:
            raise ValueError(f"unknown processor.video keys: {sorted(unknown)}")
        if "mean" in video or "std" in video:
            video = {**video, **{k: tuple(float(v) for v in video[k]) for k in ("mean", "std") if k in video}}
        self.video = VideoProcessor(**{**image_cfg, **video})

    @property
    def temporal_patch(self) -> int:
        return self.video.temporal_patch

    def process_image(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """An image as the vision encoder takes it: `patches [h*w, C*T*P*P]`, grid `(1, h, w)`."""
        p = self(image)
        patches = p.patches if self.temporal_patch == 1 else repeat_temporal(p.patches, self.temporal_patch)
        return patches, p.grid

    def to_pil(self, patches: torch.Tensor, grid: tuple[int, int, int]):
        """The first frame of an image or video as the model saw it (``[n, C·T·P·P]`` + grid)."""
        T, P = self.temporal_patch, self.patch_size
        if T > 1 and patches.shape[-1] == 3 * T * P * P:
            _, h, w = (int(v) for v in grid)
            patches = patches[: h * w].reshape(h * w, 3, T, P * P)[:, :, 0].reshape(h * w, 3 * P * P)
        return super().to_pil(patches, grid)

    def to_config(self, geometry: bool = True) -> dict[str, Any]:
        """Everything needed to rebuild this processor. geometry=False leaves out the keys the
        model's geometry supplies (`patch_size`, `merge_size`, `video.temporal_patch`): what a
        checkpoint stores, since `build_processor(cfg, geometry=…)` takes them from the model."""
        cfg = ImageProcessor.to_config(self)
        vid = self.video.to_config()
        cfg["video"] = {k: v for k, v in vid.items() if k in VideoProcessor._VIDEO_KEYS or v != cfg.get(k)}
        if not geometry:
            for k in GEOMETRY_KEYS:
                cfg.pop(k, None)
                cfg["video"].pop(k, None)
        return cfg

    @classmethod
    def from_config(cls, d: Any) -> MediaProcessor:
        d = dict(d)
        video = d.pop("video", None)
        d = ImageProcessor.config_kwargs(d, extra_keys={"min_tokens", "max_tokens"})
        return cls(video=dict(video) if video is not None else None, **d)


def tokens_to_pixels(cfg: dict, min_tokens, max_tokens, factor_sq: int, where: str) -> None:
    """Write `min_pixels` / `max_pixels` into `cfg` from token caps (in place)."""
    for name, tokens in (("min", min_tokens), ("max", max_tokens)):
        if tokens is None:
            continue
        if cfg.get(f"{name}_pixels") is not None:
            raise ValueError(f"{where}: give {name}_tokens or {name}_pixels, not both")
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0 or int(tokens) != tokens:
            raise ValueError(f"{where}.{name}_tokens must be a positive integer, got {tokens!r}")
        cfg[f"{name}_pixels"] = int(tokens) * factor_sq
