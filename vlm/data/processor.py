"""Image → normalised patches + grid, the "processed media" contract (data/README.md).

An image becomes ``patches [n, C*P*P]`` (float32) and ``grid (t, h, w)`` in patch units, with
``t = 1`` and ``n = h * w``. Patch ``(i, j)`` of the resized, normalised image ``x [C, H, W]`` is
``x[:, i*P:(i+1)*P, j*P:(j+1)*P].reshape(-1)`` -- channel-major, the layout of a ``Conv2d(C, D, P,
stride=P)`` weight, so a patch-embedding ``Linear`` and that ``Conv2d`` are interchangeable -- and
patches are row-major over ``(i, j)``. Merging (``merge_size`` m > 1) is left to the projector,
which sees the ``h x w`` grid; the processor only guarantees that ``h`` and ``w`` are multiples of
``m``. (Qwen2-VL instead reorders patches so each m x m window is contiguous; we keep plain
row-major order, which the projector can reshape for free.)

Two resolution policies:

* ``"fixed"``: resize to ``image_size x image_size`` (aspect ratio not kept) -- one grid for all.
* ``"crop"``: CLIP's rule: the shortest edge to ``image_size`` (aspect kept), then the centred
  ``image_size`` square (the same one grid; video frames are squashed to it instead).
* ``"dynamic"``: Qwen2-VL's smart resize (:func:`smart_resize`): keep the aspect ratio, round each
  side to a multiple of ``factor = patch_size * merge_size``, and keep the pixel count within
  ``[min_pixels, max_pixels]``.

The processor is rebuilt from :meth:`ImageProcessor.to_config` (a JSON-able dict stored in the
checkpoint), so inference preprocesses exactly like training did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm.data.media import MediaError, to_rgb

__all__ = [
    "INTERPOLATIONS",
    "ImageProcessor",
    "ProcessedImage",
    "patchify",
    "smart_resize",
    "unpatchify",
]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
RESOLUTIONS = ("fixed", "dynamic", "crop")  # crop: shortest edge to image_size, then a centred square (CLIP)


@dataclass
class ProcessedImage:
    """``patches [n, C*P*P]`` float32, ``grid (t, h, w)`` in patch units, ``size (H, W)`` pixels."""

    patches: torch.Tensor
    grid: tuple[int, int, int]
    size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


# ----------------------------------------------------------------------------- patch layout


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``x [C, H, W]`` → ``[h*w, C*P*P]`` with ``h = H/P``, ``w = W/P`` (layout: module docstring)."""
    if x.dim() != 3:
        raise ValueError(f"patchify expects [C, H, W], got shape {tuple(x.shape)}")
    c, hh, ww = x.shape
    p = int(patch_size)
    if hh % p or ww % p:
        raise ValueError(f"image {hh}x{ww} is not divisible by patch_size {p}")
    h, w = hh // p, ww // p
    return x.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, c * p * p)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int, int], patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[h*w, C*P*P]`` and ``grid (1, h, w)`` → ``[C, h*P, w*P]``."""
    t, h, w = (int(v) for v in grid)
    p, c = int(patch_size), int(channels)
    if t != 1:
        raise ValueError(f"unpatchify handles images (t=1), got grid {tuple(grid)}")
    if tuple(patches.shape) != (h * w, c * p * p):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match grid {tuple(grid)}, "
            f"patch_size {p}, channels {c} (expected {(h * w, c * p * p)})"
        )
    return patches.reshape(h, w, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h * p, w * p)


# ---------------------------------------------------------------------------- smart resize


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: target ``(H, W)``, both multiples of ``factor``.

    1. Refuse (``MediaError`` reason ``aspect_ratio``) when ``max(h, w) / min(h, w)`` exceeds
       ``max_aspect_ratio``.
    2. ``H = max(factor, round(h / factor) * factor)``, same for ``W``.
    3. If ``H * W > max_pixels``: ``beta = sqrt(h * w / max_pixels)``,
       ``H = max(factor, floor(h / beta / factor) * factor)`` (same for ``W``);
       elif ``H * W < min_pixels``: ``beta = sqrt(min_pixels / (h * w))``,
       ``H = ceil(h * beta / factor) * factor`` (same for ``W``).

    Deviation from the reference (documented on purpose): when a side is clamped up to ``factor``
    (very thin strips) or the min-pixels ceiling overshoots, the reference can return more than
    ``max_pixels``. Here ``max_pixels`` is a hard cap: the longer side is then shrunk further, to
    the largest multiple of ``factor`` that fits. ``min_pixels`` stays best effort (the cap wins).
    Python's ``round`` (half to even) is used, as in the reference.
    """
    height, width, factor = int(height), int(width), int(factor)
    if height <= 0 or width <= 0:
        raise MediaError("bad_size", f"cannot resize a {height}x{width} image")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one factor^2 block ({factor}^2={factor * factor})")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise MediaError(
            "aspect_ratio",
            f"image {height}x{width} has aspect ratio {ratio:.1f} > max_aspect_ratio={max_aspect_ratio:g}",
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    # Hard cap (deviation, see docstring). Each pass shrinks the longer side to fit; two passes
    # suffice because max_pixels >= factor^2.
    while h_bar * w_bar > max_pixels:
        if h_bar >= w_bar:
            h_bar = max(factor, (max_pixels // (w_bar * factor)) * factor)
        else:
            w_bar = max(factor, (max_pixels // (h_bar * factor)) * factor)
    return h_bar, w_bar


# --------------------------------------------------------------------------------- processor


class ImageProcessor:
    """Resize, normalise and patchify one image. See the module docstring for the contract.

    Args:
        patch_size: ViT patch size ``P`` in pixels.
        merge_size: projector merge ``m``; grid sides are multiples of ``m``.
        resolution: ``"fixed"``, ``"crop"`` or ``"dynamic"``.
        image_size: side of the square target for ``"fixed"`` / ``"crop"`` (multiple of ``P * m``).
        min_pixels, max_pixels: pixel budget for ``"dynamic"``; default ``4 * factor^2`` and
            ``256 * factor^2`` with ``factor = P * m``.
        max_aspect_ratio: ``"dynamic"`` refuses images more elongated than this.
        interpolation: one of ``nearest, bilinear, bicubic, lanczos, box`` (Pillow resampling).
        mean, std: per-channel normalisation of values in ``[0, 1]``.
        reducing_gap: Pillow's ``Image.resize(reducing_gap=...)``: for big downscales, first
            shrink by an integer factor with a box filter, then resample. ``None`` (default) is
            the exact filter; ``2.0``-``3.0`` is several times faster for large photos at a
            near-invisible cost. Part of the config, so training and inference agree.
        jpeg_draft: let libjpeg decode a JPEG directly at 1/2, 1/4 or 1/8 scale when the target
            is that much smaller (DCT-domain downscaling, what Pillow's ``thumbnail`` does), then
            resample to the exact target. Decoding a 640x480 photo for a 64 px target then costs
            less than decoding it whole. The image is never drafted below the target size.
    """

    def __init__(
        self,
        patch_size: int = 8,
        merge_size: int = 1,
        resolution: str = "fixed",
        image_size: int = 64,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_aspect_ratio: float = 200.0,
        interpolation: str = "bicubic",
        mean: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        reducing_gap: float | None = None,
        jpeg_draft: bool = False,
    ) -> None:
        self.patch_size = _positive_int("patch_size", patch_size)
        self.merge_size = _positive_int("merge_size", merge_size)
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        self.resolution = resolution
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation
        factor = self.factor
        self.image_size = _positive_int("image_size", image_size)
        if resolution in ("fixed", "crop") and self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by patch_size*merge_size="
                f"{self.patch_size}*{self.merge_size}={factor}"
            )
        self.min_pixels = _positive_int("min_pixels", min_pixels) if min_pixels is not None else None
        self.max_pixels = _positive_int("max_pixels", max_pixels) if max_pixels is not None else None
        if resolution == "dynamic":
            self.min_pixels = self.min_pixels if self.min_pixels is not None else 4 * factor * factor
            self.max_pixels = self.max_pixels if self.max_pixels is not None else 256 * factor * factor
            if self.max_pixels < factor * factor:
                raise ValueError(
                    f"max_pixels={self.max_pixels} is below one factor^2 block ({factor}^2={factor * factor})"
                )
            if self.min_pixels > self.max_pixels:
                raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")
        self.max_aspect_ratio = float(max_aspect_ratio)
        if not self.max_aspect_ratio >= 1.0:  # also rejects NaN
            raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if reducing_gap is not None:
            reducing_gap = float(reducing_gap)
            if not reducing_gap >= 1.0:
                raise ValueError(f"reducing_gap must be None or >= 1.0, got {reducing_gap}")
        self.reducing_gap = reducing_gap
        self.jpeg_draft = bool(jpeg_draft)
        # x_norm = (u8 / 255 - mean) / std = u8 * scale + shift, per channel, fused in one pass.
        std_t = torch.tensor(self.std, dtype=torch.float64)
        mean_t = torch.tensor(self.mean, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, 3, 1, 1)
        self._shift = (-mean_t / std_t).to(torch.float32).view(1, 3, 1, 1)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """Every resized side is a multiple of this: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, ``3 * P * P``."""
        return 3 * self.patch_size * self.patch_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized ``(H, W)`` in pixels for an input of ``height x width`` (may raise MediaError)."""
        if self.resolution in ("fixed", "crop"):
            if height <= 0 or width <= 0:
                raise MediaError("bad_size", f"cannot resize a {height}x{width} image")
            return self.image_size, self.image_size
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, self.max_aspect_ratio)

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """`(H, W)` the image is resized to before any crop: `target_size`, except for `crop`,
        where the shortest edge becomes `image_size` and the other keeps the aspect ratio (the
        rule of CLIP's processor: `int(size * long / short)`)."""
        if self.resolution != "crop":
            return self.target_size(height, width)
        if height <= 0 or width <= 0:
            raise MediaError("bad_size", f"cannot resize a {height}x{width} image")
        s = self.image_size
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """What `decode_image(draft=…)` may shrink a JPEG to: the target `(W, H)`, or None when
        drafting is off or the image would be refused anyway (the processor reports that)."""
        if not self.jpeg_draft:
            return None
        try:
            hh, ww = self.resize_size(height, width)
        except MediaError:
            return None
        return ww, hh

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """``(1, h, w)`` grid an input of ``height x width`` pixels gets, without processing it."""
        hh, ww = self.target_size(height, width)
        return 1, hh // self.patch_size, ww // self.patch_size

    # -- processing ----------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> ProcessedImage:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor expects a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB" or "transparency" in image.info:
            image = to_rgb(image)  # same rules as the decoder: alpha on white, 16-bit scaled
        hh, ww = self.target_size(image.height, image.width)
        rh, rw = self.resize_size(image.height, image.width)
        if (image.width, image.height) != (rw, rh):
            image = image.resize((rw, rh), INTERPOLATIONS[self.interpolation], reducing_gap=self.reducing_gap)
        if (rh, rw) != (hh, ww):  # crop: the centred square (top / left rounded down, as CLIP's processor)
            top, left = (rh - hh) // 2, (rw - ww) // 2
            image = image.crop((left, top, left + ww, top + hh))
        p = self.patch_size
        h, w = hh // p, ww // p
        # [H, W, 3] uint8. bytearray: torch wants a writable buffer (it warns otherwise); the copy
        # is of the already-resized image, so it is small.
        u8 = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(hh, ww, 3)
        # [H, W, C] -> [h, P, w, P, C] -> [h, w, C, P, P]: one byte-sized copy, then one float pass.
        blocks = u8.reshape(h, p, w, p, 3).permute(0, 2, 4, 1, 3).reshape(h * w, 3, p, p)
        patches = blocks.to(torch.float32).mul_(self._scale).add_(self._shift)
        return ProcessedImage(patches=patches.reshape(h * w, 3 * p * p), grid=(1, h, w), size=(hh, ww))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[C, H, W]`` values in ``[0, 1]`` → normalised (reference path used by tests)."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std

    def to_pil(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> Image.Image:
        """Undo patchify and normalisation: ``[n, 3·P·P]`` + grid -> the resized RGB image (first frame)."""
        t, h, w = (int(v) for v in grid)
        x = unpatchify(patches.float()[: h * w], (1, h, w), self.patch_size)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        u8 = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), "RGB")

    # -- config --------------------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """JSON-able dict with everything needed to rebuild this processor (resolved defaults)."""
        return {
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "resolution": self.resolution,
            "image_size": self.image_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "max_aspect_ratio": self.max_aspect_ratio,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "reducing_gap": self.reducing_gap,
            "jpeg_draft": self.jpeg_draft,
        }

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> ImageProcessor:
        """Rebuild from :meth:`to_config` output (also accepts an OmegaConf mapping)."""
        return cls(**cls.config_kwargs(d))

    @staticmethod
    def config_kwargs(d: dict[str, Any], extra_keys: set[str] = frozenset()) -> dict[str, Any]:
        """Check a config's keys (unknown ones are an error) and normalise it to constructor kwargs."""
        d = dict(d)
        d.pop("_target_", None)
        unknown = set(d) - set(ImageProcessor().to_config()) - set(extra_keys)
        if unknown:
            raise ValueError(f"unknown ImageProcessor config keys: {sorted(unknown)}")
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageProcessor) and self.to_config() == other.to_config()

    __hash__ = None  # mutable-ish config object; equality by value


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():  # e.g. `max_pixels: 1e6` from a YAML file
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _triple(name: str, v: Any) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {v!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {v!r}")
    return t
