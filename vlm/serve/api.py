"""What a caller hands the serving engine and what it gets back.

The engine (`vlm.serve.engine.Engine`) and every front end (the OpenAI-compatible HTTP server,
the terminal chat, the offline batch runner) meet only through these types.

A conversation is a list of messages in the project's chat format, with the media inline:

    [{"role": "system" | "user" | "assistant",
      "content": [{"type": "text", "text": "..."},
                  {"type": "image", "image": b"<encoded image bytes>"},
                  {"type": "video", "video": b"<encoded video bytes>" or [b"<frame>", ...]}]}]

Front ends turn their own wire format into this (and refuse what they cannot, e.g. a remote URL);
the engine decodes, resizes and renders it with the checkpoint's processor and template, so a
served model sees exactly the preprocessing it was trained with. Text is always text: a
`<image>` or `<|image_pad|>` typed by a user is tokenized as characters, never as a media slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine refuses (bad media, too long for the context, bad parameters).

    status: the HTTP status a server answers with (4xx). param: the offending field, if known.
    code: a short machine-readable reason (`"context_length_exceeded"`, `"invalid_image"`, ...).
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class Overloaded(RuntimeError):
    """The engine's queue is full: try again later (HTTP 429)."""


@dataclass
class SamplingParams:
    """max_tokens: new tokens at most. temperature 0 = greedy. stop: strings that end the answer
    (not included in it). seed: sampling with the same seed gives the same answer, whatever else
    the engine is running."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # the engine assigns one when None


@dataclass
class Usage:
    """prompt_tokens counts every token the decoder saw for the prompt, visual tokens included.
    cached_tokens: prompt tokens whose KV came from the prefix cache (not prefilled again)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    visual_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """New answer text (whole UTF-8 characters only) and the token ids that produced it."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """The last event of a request. finish_reason: "stop" (an end token or a stop string),
    "length" (max_tokens), "cancelled", or "error" (then `error` holds the RequestError)."""

    finish_reason: str
    text: str
    token_ids: list[int]
    usage: Usage
    error: RequestError | None = None
