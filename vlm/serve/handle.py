"""The caller's side of one request (`RequestHandle`) and the detokenizer that feeds it (`TextStream`).

An engine thread produces events; any other thread consumes them. `admitted()` returns once the
prompt is built (or raises its `RequestError`), so a server can answer 4xx before it starts a
stream; iterating yields `Delta`s and ends with one `Finished`; `cancel()` asks the engine to
free the request's slot at its next step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

from vlm.serve.api import Delta, Finished, RequestError, Usage


class TextStream:
    """Token ids -> answer text, released in whole UTF-8 characters and cut at the first stop string.

    Text that could still become a stop string is held back until it cannot (so a stop string
    never reaches the client, even split over several tokens)."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # text already released
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """How many trailing characters of `text` may be the start of a stop string."""
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly released text ('' if none yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        for s in self.stop:
            at = text.find(s, max(0, len(self.sent) - len(s)))
            if at >= 0:
                self.stopped = True
                out, self.sent = text[len(self.sent) : at], text[:at]
                return out
        end = len(text) - self._holdback(text)
        if end <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent) : end], text[:end]
        return out

    def flush(self) -> str:
        """At the end of a request: the held-back text (no stop string completed)."""
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids).removesuffix("\ufffd")
        out, self.sent = text[len(self.sent) :], text
        return out


_ADMITTED, _EVENT = "admitted", "event"


class RequestHandle:
    """One request in flight. Thread-safe: the engine calls the `_`-less producer methods
    (`admit`, `first_token`, `emit`, `finish`), the caller the consumer ones (`admitted`, iteration,
    `cancel`, `first_token_at`: the time to first token of benchmarks and servers)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._events: queue.Queue = queue.Queue()
        self._admitted = threading.Event()
        self._usage: Usage | None = None
        self._error: RequestError | None = None
        self._cancel = threading.Event()
        self.finished: Finished | None = None
        self.first_token_at: float | None = None  # `time.perf_counter()` at the first generated token

    # ---- engine side ---------------------------------------------------------------------------
    def first_token(self) -> None:
        """The first token was generated (an end token included): stamps `first_token_at` once."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def admit(self, usage: Usage) -> None:
        self._usage = usage
        self._admitted.set()

    def emit(self, delta: Delta) -> None:
        self._events.put(delta)

    def finish(self, finished: Finished) -> None:
        if finished.error is not None and not self._admitted.is_set():
            self._error = finished.error
            self._admitted.set()
        self.finished = finished
        self._admitted.set()
        self._events.put(finished)

    # ---- caller side ---------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot and cache pins at its next step."""
        self._cancel.set()

    def admitted(self, timeout: float | None = None) -> Usage:
        """Wait until the prompt is built: its usage (prompt tokens), or its `RequestError`."""
        if not self._admitted.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not admitted within {timeout} s")
        if self._error is not None:
            raise self._error
        if self._usage is None and self.finished is not None and self.finished.error is not None:
            raise self.finished.error
        return self._usage if self._usage is not None else Usage()

    def events(self, timeout: float | None = None) -> Iterator[Delta | Finished]:
        """`Delta`s as they are generated, then the `Finished` (always last)."""
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if isinstance(ev, Finished):
                return

    def __iter__(self) -> Iterator[Delta | Finished]:
        return self.events()

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end of the request and return its `Finished` (the whole answer)."""
        for ev in self.events(timeout):
            if isinstance(ev, Finished):
                return ev
        raise RuntimeError("unreachable")
