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

from vlm.model.generate import SamplerOptions


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
    the engine is running.

    top_k, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty: see
    `vlm.model.generate.SamplerOptions` (the order they apply in). n: answers (choices) to the
    same prompt; choice i samples with seed `seed + i`. logprobs: return each token's
    log-probability, with the `top_logprobs` most likely alternatives. response_format:
    None, `{"type": "json_object"}` or `{"type": "json_schema", "schema": {...}}`: the answer is
    constrained by a grammar (`vlm.serve.structured`) to JSON (matching the schema)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None

    def sampler(self) -> SamplerOptions:
        """The model-side options of one choice."""
        return SamplerOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k),  # -1 (vLLM's "off") = 0
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=self.top_logprobs if self.logprobs else None,
        )

    def choice_seed(self, index: int) -> int | None:
        """The seed of choice `index` (None: unseeded)."""
        return None if self.seed is None else (self.seed + index) % 2**63


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # the engine assigns one when None
    model: str | None = None  # which served model answers (`vlm.serve.named`); None: the default


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
class Logprob:
    """One answer token in OpenAI's terms: its text, UTF-8 bytes, log-probability and the most
    likely alternatives (`Logprob`s with empty `top`)."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[Logprob] = field(default_factory=list)


@dataclass
class Delta:
    """New answer text (whole UTF-8 characters only) and the token ids that produced it.
    index: the choice it belongs to (`SamplingParams.n`). logprobs: one per token id, when asked."""

    text: str
    token_ids: list[int]
    index: int = 0
    logprobs: list[Logprob] | None = None


@dataclass
class Finished:
    """The last event of a request. finish_reason: "stop" (an end token or a stop string),
    "length" (max_tokens), "cancelled", or "error" (then `error` holds the RequestError)."""

    finish_reason: str
    text: str
    token_ids: list[int]
    usage: Usage
    error: RequestError | None = None
    index: int = 0
    logprobs: list[Logprob] | None = None  # the answer's tokens, when asked
    # n > 1: every choice's own Finished, by index (this one carries choice 0's fields and the
    # usage of all: the prompt once, the completion tokens of every choice)
    choices: list[Finished] | None = None
