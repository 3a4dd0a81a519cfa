"""What synthvqa is made of: its name and version, qtypes and families, shapes, colours, the OCR
charset and the exact wording of every question (see the package docstring for the rules)."""

from __future__ import annotations

NAME = "synthvqa"
VERSION = 1

QTYPES = ("color", "count_shape", "count_all", "exists", "left_right", "describe", "ocr")
SHAPE_QTYPES = QTYPES[:-1]
#: synthvqa v2 qtypes (one per v2 family); only drawn when their family is in ``SynthConfig.families``.
QTYPES_V2 = ("ocr_wide", "multi_image", "video")
QTYPES_ALL = QTYPES + QTYPES_V2
V1_FAMILIES = ("shapes", "ocr")
V2_FAMILIES = ("ocr_wide", "multi_image", "video")
FAMILIES = V1_FAMILIES + V2_FAMILIES
FAMILY_ALIASES = {"v1": V1_FAMILIES, "v2": V2_FAMILIES, "all": FAMILIES}
QTYPE_FAMILY = {**{q: "shapes" for q in SHAPE_QTYPES}, "ocr": "ocr", **{q: q for q in QTYPES_V2}}
DIRECTIONS = ("left", "right", "up", "down")
VIDEO_FORMATS = {"mp4": "mp4", "apng": "apng"}  # video_format -> shard member extension
SHAPES = ("circle", "square", "triangle")
#: Colour name → RGB. Saturated and far apart, and every one has a channel far below the
#: background's 225..255, so no shape can vanish into the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 50, 190),
    "orange": (255, 130, 0),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
OCR_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

Q_COLOR = "What color is the {shape}?"
Q_COUNT_SHAPE = "How many {shape}s are there?"
Q_COUNT_ALL = "How many shapes are there?"
Q_EXISTS = "Is there a {color} {shape}?"
Q_LEFT_RIGHT = "Is the {color} {shape} on the left or the right?"
Q_DESCRIBE = "Describe the image."
Q_OCR = "What does the text say?"
Q_MULTI = "Which image has more shapes, the first or the second?"
Q_VIDEO = "Which way is the {color} {shape} moving?"

MAX_TRIES = 10_000  # rejection-sampling bound; reaching it means the config cannot be satisfied
