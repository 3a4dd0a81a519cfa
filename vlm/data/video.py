"""Video → frames → temporal patches + grid: the video half of the "processed media" contract.

Sampling (:func:`sample_frames`, Qwen2-VL style): ``n = round(n_frames * target_fps / fps)``
frames, at least 1 and at most ``n_frames``; ``n`` rounded (half up) to a multiple of
``temporal_patch`` and at least ``temporal_patch``; capped at ``max_frames`` (rounded down to a
multiple of ``temporal_patch``); the distinct frames are spread evenly over the clip
(``linspace(0, n_frames - 1, k)`` rounded), and when the clip has fewer frames than ``n`` the last
one is repeated to fill the temporal patch.

Token budget (:class:`VideoProcessor`): the video gets at most ``max_video_tokens`` LLM tokens
(``visual_token_count(grid, merge)``, the one function the template and the model use). In order:

1. Sample the frames, resize each frame by the image rule (:func:`smart_resize`, same
   ``factor = patch * merge``, per-frame ``[min_pixels, max_pixels]``).
2. Over budget → lower the per-frame resolution (smart resize with ``max_pixels`` lowered to
   ``floor(budget / t) * factor²``), but not below ``min_pixels``.
3. Still over at the minimum resolution → drop frames (resample evenly with fewer frames,
   ``t = floor(budget / tokens_at_min)``, at least one temporal patch); then raise the resolution
   again as far as the budget allows with those frames.
4. One temporal patch at ``min_pixels`` still over budget → go below ``min_pixels`` (the budget is
   a hard cap, ``min_pixels`` a soft floor, as in :func:`smart_resize`).

Layout. Frames ``x [n, C, H, W]`` (n a multiple of T) are grouped into ``t = n / T`` temporal
patches. Patch ``(g, i, j)`` is ``x[g*T:(g+1)*T, :, i*P:(i+1)*P, j*P:(j+1)*P]`` permuted to
``[C, T, P, P]`` and flattened -- channel-major, then time, then the P x P pixels: the layout of a
``Conv3d(C, D, (T, P, P), stride=(T, P, P))`` weight ``[D, C, T, P, P]`` (Qwen2-VL's layout), so a
patch-embedding ``Linear(C*T*P*P, D)`` and that Conv3d are interchangeable. Patches are ordered
``g``-major, then row-major over ``(i, j)``: ``patches [t*h*w, C*T*P*P]``, ``grid (t, h, w)``.
With ``T = 1`` a patch is exactly the image layout of :mod:`vlm.data.processor` (``[C, P, P]``),
so an image is a 1-frame video; with ``T > 1`` an image can join a video encoder by repeating it
``T`` times (:func:`repeat_temporal`, what Qwen2-VL does). Images themselves stay ``[n, C*P*P]``.

Decoding (sniffing, probing, the hardened decoders, `encode_video`) lives in `vlm.data.video_decode`;
its public names are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vlm.data.media import to_rgb
from vlm.data.processor import INTERPOLATIONS, ImageProcessor, smart_resize
from vlm.data.video_decode import (
    DEFAULT_FPS,
    VideoInfo,
    decode_video,
    encode_video,
    frames_from_images,
    probe_video,
)
from vlm.model.projector import visual_token_count

__all__ = [
    "DEFAULT_FPS",
    "ProcessedVideo",
    "VideoInfo",
    "VideoPlan",
    "VideoProcessor",
    "decode_video",
    "encode_video",
    "frames_from_images",
    "patchify_video",
    "probe_video",
    "repeat_temporal",
    "sample_frames",
    "unpatchify_video",
]

# ------------------------------------------------------------------------------------ sampling


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def sample_frames(
    n_frames: int,
    fps: float | None,
    target_fps: float | None = 2.0,
    max_frames: int = 16,
    temporal_patch: int = 2,
) -> list[int]:
    """Source frame indices to keep (rule in the module docstring). Length is a positive multiple
    of ``temporal_patch``; indices are non-decreasing and repeat only as end padding.

    ``fps`` or ``target_fps`` None / non-positive / non-finite: take every frame (up to the cap).
    """
    n_frames, T = int(n_frames), int(temporal_patch)
    if n_frames < 1:
        raise ValueError(f"cannot sample frames from a video of {n_frames} frames")
    if T < 1:
        raise ValueError(f"temporal_patch must be >= 1, got {temporal_patch}")
    cap = max(T, (int(max_frames) // T) * T)
    ok = lambda v: v is not None and math.isfinite(float(v)) and float(v) > 0
    n = _round_half_up(n_frames * float(target_fps) / float(fps)) if ok(fps) and ok(target_fps) else n_frames
    n = max(1, min(n, n_frames))
    n = min(cap, max(T, _round_half_up(n / T) * T))
    k = min(n, n_frames)  # distinct frames; the rest is padding with the last one
    if k == 1:
        idx = [0]
    else:  # round(i * (N - 1) / (k - 1)), half up, in exact integers
        idx = [(2 * i * (n_frames - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]
    return idx + [idx[-1]] * (n - k)


# -------------------------------------------------------------------------------------- layout


def patchify_video(x: torch.Tensor, patch_size: int, temporal_patch: int) -> torch.Tensor:
    """``x [n, C, H, W]`` (n a multiple of T) → ``[t*h*w, C*T*P*P]`` (layout: module docstring)."""
    if x.dim() != 4:
        raise ValueError(f"patchify_video expects [n, C, H, W], got shape {tuple(x.shape)}")
    n, c, hh, ww = x.shape
    p, T = int(patch_size), int(temporal_patch)
    if n % T or hh % p or ww % p:
        raise ValueError(f"{n} frames of {hh}x{ww} do not divide into temporal_patch {T} x patch_size {p}")
    t, h, w = n // T, hh // p, ww // p
    x = x.reshape(t, T, c, h, p, w, p).permute(0, 3, 5, 2, 1, 4, 6)  # [t, h, w, C, T, P, P]
    return x.reshape(t * h * w, c * T * p * p)


def unpatchify_video(
    patches: torch.Tensor, grid: Sequence[int], patch_size: int, temporal_patch: int, channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: ``[t*h*w, C*T*P*P]`` + grid → ``[t*T, C, h*P, w*P]``."""
    t, h, w = (int(v) for v in grid)
    p, T, c = int(patch_size), int(temporal_patch), int(channels)
    if tuple(patches.shape) != (t * h * w, c * T * p * p):
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {tuple(grid)}, P={p}, T={T}, C={c}")
    x = patches.reshape(t, h, w, c, T, p, p).permute(0, 4, 3, 1, 5, 2, 6)  # [t, T, C, h, P, w, P]
    return x.reshape(t * T, c, h * p, w * p)


def repeat_temporal(patches: torch.Tensor, temporal_patch: int, channels: int = 3) -> torch.Tensor:
    """Image patches ``[n, C*P*P]`` → ``[n, C*T*P*P]``: the image as ``T`` identical frames, so an
    encoder with a ``C*T*P*P`` patch embedding can take images too (Qwen2-VL does this)."""
    n, d = patches.shape
    T, c = int(temporal_patch), int(channels)
    if d % c:
        raise ValueError(f"patch dim {d} is not divisible by {c} channels")
    return patches.reshape(n, c, 1, d // c).expand(n, c, T, d // c).reshape(n, c * T * (d // c))


# ----------------------------------------------------------------------------------- processor


@dataclass(frozen=True)
class VideoPlan:
    """What a video of a given size becomes: source frame ``indices`` (length t*T), per-frame
    ``size (H, W)`` in pixels, ``grid (t, h, w)`` in patches, LLM ``tokens`` and whether frames had
    to be dropped or the resolution lowered to fit the budget."""

    indices: tuple[int, ...]
    size: tuple[int, int]
    grid: tuple[int, int, int]
    tokens: int
    lowered_resolution: bool
    dropped_frames: bool


@dataclass
class ProcessedVideo:
    """``patches [t*h*w, C*T*P*P]`` float32, ``grid (t, h, w)``, per-frame ``size (H, W)``,
    source ``frame_indices`` (length t*T) and source ``fps``."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    size: tuple[int, int]
    frame_indices: tuple[int, ...]
    fps: float

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


class VideoProcessor:
    """Sample, budget, resize, normalise and patchify one video (contract: module docstring).

    Geometry and normalisation arguments are those of :class:`ImageProcessor` (``resolution``,
    ``min_pixels``/``max_pixels`` per frame, ...); :meth:`from_image_processor` copies them so
    images and videos share one preprocessing. Video arguments:

    Args:
        temporal_patch: frames per temporal patch ``T``.
        target_fps: sampling rate (None: every frame, up to ``max_frames``).
        max_frames: most frames kept (rounded down to a multiple of ``T``; at least ``T``).
        max_video_tokens: LLM-token budget per video (None: no budget beyond the caps above).
        max_frames_decoded, max_decode_pixels: decoder guards (:func:`decode_video`).
        default_fps: frame rate of a frame list given without one.
    """

    _VIDEO_KEYS = (
        "temporal_patch",
        "target_fps",
        "max_frames",
        "max_video_tokens",
        "max_frames_decoded",
        "max_decode_pixels",
        "default_fps",
    )

    def __init__(
        self,
        patch_size: int = 8,
        merge_size: int = 1,
        resolution: str = "dynamic",
        image_size: int = 64,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_aspect_ratio: float = 200.0,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        reducing_gap: float | None = None,
        jpeg_draft: bool = False,  # frames are decoded by the video path; kept so image configs fit
        temporal_patch: int = 2,
        target_fps: float | None = 2.0,
        max_frames: int = 16,
        max_video_tokens: int | None = 1024,
        max_frames_decoded: int = 4096,
        max_decode_pixels: int = 50_000_000,
        default_fps: float = DEFAULT_FPS,
    ) -> None:
        self.image = ImageProcessor(
            patch_size=patch_size,
            merge_size=merge_size,
            resolution=resolution,
            image_size=image_size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
            interpolation=interpolation,
            mean=mean,
            std=std,
            reducing_gap=reducing_gap,
            jpeg_draft=jpeg_draft,
        )
        self.temporal_patch = _pos_int("temporal_patch", temporal_patch)
        self.max_frames = _pos_int("max_frames", max_frames)
        if self.max_frames < self.temporal_patch:
            raise ValueError(f"max_frames={max_frames} must be >= temporal_patch={temporal_patch}")
        if target_fps is not None:
            target_fps = float(target_fps)
            if not (math.isfinite(target_fps) and target_fps > 0):
                raise ValueError(f"target_fps must be positive or None, got {target_fps}")
        self.target_fps = target_fps
        self.max_video_tokens = None if max_video_tokens is None else _pos_int("max_video_tokens", max_video_tokens)
        self.max_frames_decoded = _pos_int("max_frames_decoded", max_frames_decoded)
        self.max_decode_pixels = _pos_int("max_decode_pixels", max_decode_pixels)
        self.default_fps = float(default_fps)
        if not (math.isfinite(self.default_fps) and self.default_fps > 0):
            raise ValueError(f"default_fps must be positive, got {default_fps}")
        if self.resolution in ("fixed", "crop") and self.max_video_tokens is not None:
            per = self._tokens_per_patch(self.image.image_size, self.image.image_size)
            if per > self.max_video_tokens:
                raise ValueError(
                    f"max_video_tokens={self.max_video_tokens} cannot hold one temporal patch at the fixed "
                    f"{self.image.image_size}px resolution ({per} tokens)"
                )
        f = self.image.factor
        self._scale = self.image._scale.view(1, 3, 1, 1, 1)
        self._shift = self.image._shift.view(1, 3, 1, 1, 1)
        self._f2 = f * f

    @classmethod
    def from_image_processor(cls, image_processor: ImageProcessor, **video_kw: Any) -> VideoProcessor:
        """Share ``image_processor``'s geometry and normalisation; ``video_kw`` sets the rest."""
        cfg = image_processor.to_config()
        cfg.update(video_kw)
        return cls(**cfg)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def resolution(self) -> str:
        return self.image.resolution

    @property
    def patch_size(self) -> int:
        return self.image.patch_size

    @property
    def merge_size(self) -> int:
        return self.image.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, ``3 * T * P * P``."""
        return 3 * self.temporal_patch * self.patch_size * self.patch_size

    def _tokens_per_patch(self, hh: int, ww: int) -> int:
        p = self.patch_size
        return visual_token_count((1, hh // p, ww // p), self.merge_size)

    def _sample(self, n_frames: int, fps: float | None, max_frames: int) -> list[int]:
        return sample_frames(n_frames, fps, self.target_fps, max_frames, self.temporal_patch)

    def _resize(self, height: int, width: int, cap_tokens: int | None) -> tuple[int, int]:
        """Per-frame size by the image rule, with the pixel cap lowered to ``cap_tokens`` tokens."""
        ip = self.image
        if ip.resolution in ("fixed", "crop"):  # video frames are squashed to the square (no crop)
            return ip.target_size(height, width)
        max_px, min_px = ip.max_pixels, ip.min_pixels
        if cap_tokens is None:
            return smart_resize(height, width, ip.factor, min_px, max_px, ip.max_aspect_ratio)
        max_px = min(max_px, cap_tokens * self._f2)
        size = smart_resize(height, width, ip.factor, min(min_px, max_px), max_px, ip.max_aspect_ratio)
        # smart_resize floors both sides when it scales down, so a cap just at the minimum size can
        # land below it: never go under the minimum resolution while the minimum itself fits.
        floor = self._min_size(height, width)
        if size[0] * size[1] < floor[0] * floor[1] <= max_px:
            size = floor
        return size

    def _min_size(self, height: int, width: int) -> tuple[int, int]:
        """The minimum per-frame resolution: the image rule with ``max_pixels = min_pixels``."""
        ip = self.image
        return smart_resize(height, width, ip.factor, ip.min_pixels, max(ip.min_pixels, self._f2), ip.max_aspect_ratio)

    def plan(self, n_frames: int, fps: float | None, height: int, width: int) -> VideoPlan:
        """Frames, per-frame size and grid for a video of ``n_frames`` frames of ``height x width``
        at ``fps``, within ``max_video_tokens`` (budget rule: module docstring). Pure geometry."""
        T, p, budget = self.temporal_patch, self.patch_size, self.max_video_tokens
        idx = self._sample(n_frames, fps, self.max_frames)
        size = self._resize(height, width, None)
        t = len(idx) // T
        tokens = t * self._tokens_per_patch(*size)
        lowered = dropped = False
        if budget is not None and tokens > budget:
            if self.resolution == "dynamic":
                lowered = True
                per_min = self._tokens_per_patch(*self._min_size(height, width))
                if t * per_min > budget:  # even the minimum resolution is over: drop frames
                    idx = self._sample(n_frames, fps, max(1, budget // per_min) * T)
                    dropped, t = True, len(idx) // T
                size = self._resize(height, width, budget // t)  # as large as the budget allows
            else:  # fixed resolution: only frames can go
                idx = self._sample(n_frames, fps, max(1, budget // self._tokens_per_patch(*size)) * T)
                dropped, t = True, len(idx) // T
            tokens = t * self._tokens_per_patch(*size)
        grid = (t, size[0] // p, size[1] // p)
        assert tokens == visual_token_count(grid, self.merge_size)
        assert budget is None or tokens <= budget, (tokens, budget)
        return VideoPlan(tuple(idx), size, grid, tokens, lowered, dropped)

    # -- processing ----------------------------------------------------------------------------
    def __call__(
        self,
        video: bytes | bytearray | memoryview | Sequence[Image.Image | bytes],
        fps: float | None = None,
        *,
        key: str | None = None,
    ) -> ProcessedVideo:
        """Process encoded video bytes, or a list of frames (PIL images or image bytes) at ``fps``
        (default ``default_fps``)."""
        if isinstance(video, (bytes, bytearray, memoryview)):
            plans: list[VideoPlan] = []

            def choose(info: VideoInfo) -> list[int]:
                plans.append(self.plan(info.n_frames, info.fps, info.height, info.width))
                return list(plans[0].indices)

            frames, src_fps = decode_video(
                video,
                key=key,
                max_pixels=self.max_decode_pixels,
                max_frames_decoded=self.max_frames_decoded,
                indices=choose,
            )
            plan = plans[0]
        else:
            all_frames = frames_from_images(list(video), key=key, max_pixels=self.max_decode_pixels)
            src_fps = float(fps) if fps is not None else self.default_fps
            w0, h0 = all_frames[0].size
            plan = self.plan(len(all_frames), src_fps, h0, w0)
            frames = [all_frames[i] for i in plan.indices]
        return self.process_frames(frames, plan, src_fps)

    def process_frames(self, frames: Sequence[Image.Image], plan: VideoPlan, fps: float) -> ProcessedVideo:
        """Resize + normalise + patchify already selected frames (``len(frames) == t*T``)."""
        hh, ww = plan.size
        p, T = self.patch_size, self.temporal_patch
        if len(frames) % T or len(frames) != len(plan.indices):
            raise ValueError(f"{len(frames)} frames do not match the plan's {len(plan.indices)}")
        resample = INTERPOLATIONS[self.image.interpolation]
        resized_cache: dict[int, torch.Tensor] = {}
        u8 = torch.empty(len(frames), hh, ww, 3, dtype=torch.uint8)
        for k, (src, f) in enumerate(zip(plan.indices, frames)):
            if src in resized_cache:  # padding repeats a frame: resize it once
                u8[k] = resized_cache[src]
                continue
            if f.mode != "RGB" or "transparency" in f.info:
                f = to_rgb(f)
            if f.size != (ww, hh):
                f = f.resize((ww, hh), resample, reducing_gap=self.image.reducing_gap)
            u8[k] = torch.frombuffer(bytearray(f.tobytes()), dtype=torch.uint8).view(hh, ww, 3)
            resized_cache[src] = u8[k]
        t, h, w = len(frames) // T, hh // p, ww // p
        # [t*T, H, W, C] -> [t, T, h, P, w, P, C] -> [t, h, w, C, T, P, P]; one byte copy, one float pass
        blocks = u8.view(t, T, h, p, w, p, 3).permute(0, 2, 4, 6, 1, 3, 5).reshape(t * h * w, 3, T, p, p)
        patches = blocks.to(torch.float32).mul_(self._scale).add_(self._shift)
        return ProcessedVideo(
            patches=patches.reshape(t * h * w, 3 * T * p * p),
            grid=(t, h, w),
            size=(hh, ww),
            frame_indices=plan.indices,
            fps=float(fps),
        )

    def to_pil(self, patches: torch.Tensor, grid: Sequence[int]) -> list[Image.Image]:
        """Undo patchify and normalisation: the resized frames (``t*T`` of them)."""
        x = unpatchify_video(patches.float(), grid, self.patch_size, self.temporal_patch)
        mean = torch.tensor(self.image.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image.std).view(1, 3, 1, 1)
        u8 = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return [Image.fromarray(a, "RGB") for a in u8]

    # -- config --------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-able dict that rebuilds this processor (the image keys plus the video keys)."""
        cfg = self.image.to_config()
        cfg.update({k: getattr(self, k) for k in self._VIDEO_KEYS})
        return cfg

    @classmethod
    def from_config(cls, d: Any) -> VideoProcessor:
        d = dict(d)
        d.pop("_target_", None)
        unknown = set(d) - set(cls().to_config())
        if unknown:
            raise ValueError(f"unknown VideoProcessor config keys: {sorted(unknown)}")
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_config().items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VideoProcessor) and self.to_config() == other.to_config()

    __hash__ = None


def _pos_int(name: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)
