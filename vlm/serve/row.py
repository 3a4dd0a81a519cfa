"""One answer inside the engine: its prompt, where its prefill stands, what it generated, and how a
new token turns into `Delta`s and the final `Finished` (end tokens, stop strings, max_tokens).
A request with `n` choices runs as n rows; the first prefills, the others copy its KV (`leader`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlm.model.generate import SamplerOptions, TokenLogprob
from vlm.serve.api import ChatRequest, Delta, Finished, Logprob, Usage
from vlm.serve.choices import TokenPieces
from vlm.serve.handle import RequestHandle, TextStream
from vlm.serve.media import RowInputs
from vlm.serve.prefix_cache import Entry
from vlm.serve.prompt import Prompt


@dataclass(eq=False)
class Row:
    request: ChatRequest
    handle: RequestHandle
    prompt: Prompt
    usage: Usage
    stream: TextStream
    generator: torch.Generator | None
    prefix: Entry | None = None  # pinned prefix-cache entry to copy in at admission
    cached: int = 0  # positions reused from it
    submitted: float = field(default_factory=time.perf_counter)
    inputs: RowInputs | None = None  # made on the engine thread before the first chunk
    slot: int = -1
    length: int = 0  # positions written in the slot (prefill cursor, then decode)
    next_pos: int = 0  # the (M-)RoPE position of the next fed token
    last: int = -1  # the token to feed at the next decode step
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # token ids whose text is not released yet
    done: bool = False
    reason: str | None = None  # why generation ended, once it has
    options: SamplerOptions = field(default_factory=SamplerOptions)
    constraint: object | None = None  # a grammar (`vlm.serve.structured.JsonConstraint`)
    pieces: TokenPieces | None = None  # set when the request asks for logprobs
    logprobs: list[Logprob] = field(default_factory=list)  # of the answer's tokens (end tokens not)
    pending_lp: list[Logprob] = field(default_factory=list)  # those of `pending`
    leader: Row | None = None  # another choice of the same request whose prefill this row reuses
    followers: list[Row] = field(default_factory=list)  # the request's other choices (on its first row)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no grammar, penalties or logprobs: the engine's batched argmax picks for it."""
        return self.generator is None and self.constraint is None and self.options.plain_greedy

    @property
    def sampling(self):
        return self.request.sampling

    @property
    def prompt_len(self) -> int:
        return int(self.inputs.input_ids.numel()) if self.inputs is not None else len(self.prompt)

    def push(self, tok: int, eos: set[int], lp: TokenLogprob | None = None) -> str | None:
        """Record a generated token; emit its text. Returns the finish reason, or None to go on."""
        self.reason = self._push(tok, eos, lp)
        return self.reason

    def _push(self, tok: int, eos: set[int], lp: TokenLogprob | None) -> str | None:
        self.out.append(tok)
        if len(self.out) == 1:
            self.handle.first_token()
        if tok in eos:
            return "stop"
        self.pending.append(tok)
        if lp is not None and self.pieces is not None and not self.stream.stopped:
            entry = self.pieces.logprob(lp)
            self.logprobs.append(entry)
            self.pending_lp.append(entry)
        text = self.stream.push(tok)
        if text:
            self._emit(text)
        if self.stream.stopped:
            return "stop"
        if len(self.out) >= self.sampling.max_tokens:
            return "length"
        self.last = tok
        return None

    def finish(self, reason: str) -> None:
        """Release the held-back text and end the request with `reason`."""
        if self.done:
            return
        self.done = True
        tail = self.stream.flush()
        if tail or self.pending:
            if tail:
                self._emit(tail)
            self.pending = []
        self.usage.completion_tokens = len(self.out)
        lps = self.logprobs if self.pieces is not None else None
        self.handle.finish(Finished(reason, self.stream.sent, list(self.out), self.usage, logprobs=lps))

    def _emit(self, text: str) -> None:
        lps = self.pending_lp if self.pieces is not None else None
        self.handle.emit(Delta(text, self.pending, logprobs=lps))
        self.pending, self.pending_lp = [], []

    def kv_keys(self) -> tuple[list[int], Tensor]:
        """prefix keys and positions of the `length` positions in the slot (prompt + fed tokens)."""
        n_fed = self.length - self.prompt_len
        pos = self.inputs.position_ids.cpu()
        if n_fed <= 0:  # ended during its prefill
            return list(self.prompt.prefix_keys[: self.length]), pos[..., : self.length]
        keys = list(self.prompt.prefix_keys) + self.out[:n_fed]
        gen = torch.arange(n_fed, dtype=pos.dtype) + self.next_pos - n_fed
        pos = torch.cat([pos, gen.expand(*pos.shape[:-1], n_fed)], -1)
        return keys, pos
