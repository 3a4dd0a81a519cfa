"""synthvqa: the built-in synthetic visual-question-answering benchmark and its shard writer.

Every image is a square canvas (``SynthConfig.canvas`` px, default 64) on a light background
(a random per-image grey/tint, every channel in 225..255). Two families:

``shapes``
    1–4 non-overlapping shapes from ``SHAPES`` (circle, square, triangle) in ``COLORS``. A shape's
    bounding radius (its circumradius: circle radius, half the square's diagonal, the equilateral
    triangle's circumradius) is 0.09–0.15 of the canvas side; positions are rejection-sampled so
    shapes stay fully inside and their bounding circles keep a small gap. Shapes are drawn without
    anti-aliasing, so every shape's exact RGB is present in the image. Squares are axis-aligned and
    triangles point up. Question types (``qtype``) and their exact wording:

    =============  ================================================  ==========================
    qtype          question                                          answer
    =============  ================================================  ==========================
    color          ``What color is the {shape}?``                    the colour name (only when
                                                                     exactly one {shape} is
                                                                     present)
    count_shape    ``How many {shape}s are there?``                  ``0`` … ``4``
    count_all      ``How many shapes are there?``                    ``1`` … ``4``
    exists         ``Is there a {color} {shape}?``                   ``yes`` / ``no`` (50/50)
    left_right     ``Is the {color} {shape} on the left or the       ``left`` / ``right`` (only
                   right?``                                          when that colour+shape is
                                                                     unique and its centre is at
                                                                     least canvas/10 from the
                                                                     middle)
    describe       ``Describe the image.``                           the canonical caption
    =============  ================================================  ==========================

    Canonical caption: the shapes are grouped by (colour, shape); each group is written
    ``{count word} {color} {shape}`` with a plural ``s`` when the count is above one (count words
    ``one`` … ``four``); groups are ordered by shape (circle, square, triangle), then by colour
    (red, green, blue, yellow, purple, orange); they are joined as ``A``, ``A and B``,
    ``A, B and C``, ``A, B, C and D``. E.g. ``one red circle and two blue squares``.

``ocr``
    3–6 characters from A–Z and 0–9 in dark grey (grey level 0..80) at a random position fully
    inside the canvas, rendered with Pillow's bundled font ``ImageFont.load_default(size=...)``
    and the BASIC layout engine (no system fonts, no raqm: identical on every machine).
    ``What does the text say?`` → the string exactly (the only answer that is not lower-case).

synthvqa v2 families (off by default; enable with ``SynthConfig.families``, e.g.
``["shapes", "ocr", "ocr_wide", "multi_image", "video"]`` or the aliases ``["v1", "v2"]``; with the
default ``families`` the generator, its shards and ``SynthConfig.to_dict()`` are exactly v1's):

``ocr_wide``
    12–20 characters (``ocr_wide_min_len`` … ``ocr_wide_max_len``) from the OCR charset on a canvas
    ``ocr_wide_aspect`` (8) times wider than tall (512×64 at canvas 64), same font, colours and
    background rules as ``ocr``. The font size is the largest ≤ ``ocr_wide_font_frac · canvas`` at
    which ``ocr_wide_max_len`` of the widest character fit the width less the margin (and the
    height). ``What does the text say?`` → the string. Squashing this image into a square
    compresses the text 8× horizontally; keeping the aspect ratio does not.
``multi_image``
    Two ``shapes`` images with different shape counts (the second is redrawn until they differ).
    User content: image 0, image 1, then ``Which image has more shapes, the first or the second?``
    (or the question first with ``image_position="last"``) → ``first`` / ``second``; by symmetry
    each answer is drawn half of the time.
``video``
    ``video_min_frames`` … ``video_max_frames`` (4–8) frames of one shape (size as in ``shapes``)
    moving in a straight line at constant speed: ``left`` / ``right`` / ``up`` / ``down`` (``up`` is
    towards the top of the image), a total displacement of at least ``video_min_shift · canvas`` px
    (and at most what fits; fully inside every frame). Stored as ONE media member,
    ``KEY.0.mp4`` (``video_format="mp4"``: H.264 via PyAV's ``libx264rgb`` at ``qp=0``, bit-exact
    RGB, at ``video_fps`` frames per second) or ``KEY.0.apng`` (``video_format="apng"``: an
    animated PNG, lossless, no PyAV needed to write it); both decode with
    :func:`vlm.data.video.decode_video`. User content: ``{"type": "video", "media": 0}`` and
    ``Which way is the {color} {shape} moving?`` → the direction. Reversing the frames reverses the
    answer, so it needs temporal order.

v2 samples have one turn. Their qtype is the family name.

Sampling: the qtype is drawn first by ``qtype_weights``, then images are drawn until one is valid
for it. With ``turns > 1`` a shapes sample gets up to ``turns`` distinct questions about the same
image (the first of the drawn qtype, the rest drawn by the weights among the qtypes that still
have an unasked question for that image); an ocr sample always has one turn.

Everything is a pure function of ``(seed, split, shard index)``: each shard has its own
``random.Random``, so shard ``i`` is byte-identical whatever the number of worker processes.

Shards follow the shard format of ``data/README.md``: ``KEY.json`` + ``KEY.0.png``, KEY like
``train-000003-000042`` (split, shard, index in shard; never a dot).

Files: ``spec.py`` (names, qtypes, colours, question wording), ``config.py`` (``SynthConfig``),
``fonts.py`` (the OCR font and its sizes), ``scenes.py`` (scene types and their samplers),
``render.py`` (scene → image), ``questions.py`` (question banks, caption, vocabulary),
``samples.py`` (one chat sample), ``shards.py`` (one split as tar shards), ``dataset.py``
(``ensure_synthvqa``: splits + tokenizer + ``dataset.json``).
"""

from __future__ import annotations

from vlm.synthvqa.config import SynthConfig
from vlm.synthvqa.dataset import ensure_synthvqa
from vlm.synthvqa.fonts import get_font, ocr_margin
from vlm.synthvqa.questions import describe, question_bank, vocabulary_texts
from vlm.synthvqa.render import draw_shape, render, render_video
from vlm.synthvqa.samples import make_sample, sample_texts
from vlm.synthvqa.scenes import (
    MultiImageScene,
    OcrScene,
    Shape,
    ShapesScene,
    VideoScene,
    WideOcrScene,
    char_centers,
    sample_multi_image_scene,
    sample_ocr_scene,
    sample_shapes_scene,
    sample_video_scene,
    sample_wide_ocr_scene,
)
from vlm.synthvqa.shards import scan_shard, shard_rng, write_split
from vlm.synthvqa.spec import (
    COLOR_NAMES,
    COLORS,
    DIRECTIONS,
    FAMILIES,
    FAMILY_ALIASES,
    OCR_CHARSET,
    QTYPES,
    QTYPES_ALL,
    QTYPES_V2,
    SHAPES,
    VIDEO_FORMATS,
)

__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "DIRECTIONS",
    "FAMILIES",
    "FAMILY_ALIASES",
    "OCR_CHARSET",
    "QTYPES",
    "QTYPES_ALL",
    "QTYPES_V2",
    "SHAPES",
    "VIDEO_FORMATS",
    "MultiImageScene",
    "OcrScene",
    "Shape",
    "ShapesScene",
    "SynthConfig",
    "VideoScene",
    "WideOcrScene",
    "char_centers",
    "describe",
    "draw_shape",
    "ensure_synthvqa",
    "get_font",
    "make_sample",
    "ocr_margin",
    "question_bank",
    "render",
    "render_video",
    "sample_multi_image_scene",
    "sample_ocr_scene",
    "sample_shapes_scene",
    "sample_texts",
    "sample_video_scene",
    "sample_wide_ocr_scene",
    "scan_shard",
    "shard_rng",
    "vocabulary_texts",
    "write_split",
]
