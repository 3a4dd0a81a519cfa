"""Several answers to one request (`SamplingParams.n`) and the answer tokens' log-probabilities in
OpenAI's terms.

`ChoiceGroup` gives each choice its own handle (`ChoiceHandle`, what the engine drives for one
answer): their `Delta`s reach the request's one `RequestHandle` tagged with the choice's index,
and when every choice has finished the request finishes once, with all of them in
`Finished.choices`. Cancelling the request cancels every choice.

`TokenPieces` turns token ids into the text and UTF-8 bytes of OpenAI's `logprobs.content`.
"""

from __future__ import annotations

import threading

from vlm.model.generate import TokenLogprob
from vlm.serve.api import Delta, Finished, Logprob, Usage


class ChoiceGroup:
    def __init__(self, handle, n: int):
        self.handle, self.n = handle, n
        self.results: list[Finished | None] = [None] * n
        self._lock = threading.Lock()

    def child(self, index: int) -> ChoiceHandle:
        return ChoiceHandle(self, index)

    def done(self, index: int, fin: Finished) -> None:
        fin.index = index
        with self._lock:
            if self.results[index] is not None:
                return
            self.results[index] = fin
            if any(r is None for r in self.results):
                return
        self.handle.finish(merge(self.results))


def merge(results: list[Finished]) -> Finished:
    """One request's `Finished` from its choices' (choice 0's fields, everyone's usage)."""
    first = results[0]
    error = next((r.error for r in results if r.error is not None), None)
    u = first.usage
    usage = Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        visual_tokens=u.visual_tokens,
        cached_tokens=u.cached_tokens,
    )
    reason = "error" if error is not None else first.finish_reason
    return Finished(reason, first.text, first.token_ids, usage, error, 0, first.logprobs, list(results))


class ChoiceHandle:
    """The engine side of `RequestHandle` for one choice of a `ChoiceGroup`."""

    def __init__(self, group: ChoiceGroup, index: int):
        self.group, self.index = group, index
        self.request_id = f"{group.handle.request_id}/{index}"

    @property
    def cancelled(self) -> bool:
        return self.group.handle.cancelled

    def cancel(self) -> None:
        self.group.handle.cancel()

    def first_token(self) -> None:
        self.group.handle.first_token()

    def emit(self, delta: Delta) -> None:
        delta.index = self.index
        self.group.handle.emit(delta)

    def finish(self, finished: Finished) -> None:
        self.group.done(self.index, finished)


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), inverted: character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenPieces:
    """Token id -> (text, UTF-8 bytes) for log-probabilities. A byte-level BPE token's bytes are
    exact (a token may hold part of a character: its text then shows U+FFFD, its bytes the part);
    other tokenizers fall back to the decoded text's bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tok = getattr(tokenizer, "tok", None)
        byte_level = tok is not None and type(tok.decoder).__name__ == "ByteLevel"
        self._raw = tok if byte_level else None
        self._map = _byte_decoder() if byte_level else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        data = None
        if self._raw is not None:
            piece = self._raw.id_to_token(token)
            if piece is not None and all(c in self._map for c in piece):
                data = bytes(self._map[c] for c in piece)
        if data is None:
            data = self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
        out = (data.decode("utf-8", errors="replace"), list(data))
        if len(self._cache) < 1 << 16:
            self._cache[token] = out
        return out

    def logprob(self, lp: TokenLogprob) -> Logprob:
        text, data = self(lp.token)
        top = []
        for t, v in lp.top:
            tt, tb = self(t)
            top.append(Logprob(tt, tb, v))
        return Logprob(text, data, lp.logprob, top)
