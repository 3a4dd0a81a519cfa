"""Tokenizer: a real `tokenizer.json` through HF `tokenizers`, plus the special tokens the chat
template needs.

The special tokens are *structural*: the template inserts them by id. User and assistant text is
always encoded with `encode_special_tokens=True`, so a caption that contains the literal string
`<|im_end|>` or `<image>` is tokenized as ordinary text and can never forge structure.

The default tokenizer is a byte-level BPE trained on the synthvqa text when the data is made.
Its pre-tokenizer isolates every capital letter and digit, so OCR answers (random strings of
A–Z and 0–9) are always spelled one character per token instead of depending on which random
pairs happened to be frequent in the training text.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Structural tokens (ChatML-style turns + media spans). Order fixes their ids after training.
PAD = "<|pad|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# Text the chat template writes around every turn; trained in with high weight so each role
# header is one or two tokens instead of a byte per letter.
TEMPLATE_TEXTS = ["system\n", "user\n", "assistant\n", "\n"]
# Bump when the training recipe of the default tokenizer changes (datasets record it).
TOKENIZER_REVISION = 2


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows the structural special tokens.

    `encode(text)` never produces a special token, whatever the text contains.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.tok.encode_special_tokens = True  # text is text: "<|im_end|>" in a caption stays text
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.pad_id = self.special[PAD]
        self.eos_id = self.special[EOS]
        self.im_start_id = self.special[IM_START]
        self.im_end_id = self.special[IM_END]
        self.vision_start_id = self.special[VISION_START]
        self.vision_end_id = self.special[VISION_END]
        self.image_pad_id = self.special[IMAGE_PAD]
        self.video_pad_id = self.special[VIDEO_PAD]

    @property
    def structural_ids(self) -> list[int]:
        """Tokens a model must never generate: padding, turn starts and the media markers
        (a generated `<|image_pad|>` would claim visual tokens that do not exist)."""
        return [
            self.pad_id,
            self.im_start_id,
            self.vision_start_id,
            self.vision_end_id,
            self.image_pad_id,
            self.video_pad_id,
        ]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path, add_missing: bool = True) -> TextTokenizer:
        """A `tokenizer.json` (or a folder holding one, e.g. a pretrained model's). Structural
        tokens the tokenizer lacks (a pretrained LLM's has no `<|image_pad|>`) are added as new
        special tokens at the end of the vocabulary when `add_missing`; the model's embedding and
        head grow to match (`vlm.model.decoder.Decoder.grow_vocab`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = Tokenizer.from_file(str(path))
        if add_missing:
            from tokenizers import AddedToken

            missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
            if missing:
                tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    def to_str(self) -> str:
        return self.tok.to_str()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on `texts` (any iterable of strings).

    Capital letters and digits are isolated before the byte-level split, so they never merge.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[A-Z0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(itertools.chain(texts, TEMPLATE_TEXTS * 1000), trainer=trainer)
    return TextTokenizer(tok)
