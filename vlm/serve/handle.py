"""The caller's side of one request (`RequestHandle`) and the detokenizer that feeds it (`TextStream`).

An engine thread produces events; any other thread consumes them. `admitted()` returns once the
prompt is built (or raises its `RequestError`), so a server can answer 4xx before it starts a
stream; iterating yields `Delta`s and ends with one `Finished`; `cancel()` asks the engine to
free the request's slot at its next step. `listen(fn)` has the events pushed to `fn` instead (the
HTTP server's way: no thread per request waits on a queue).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from vlm.serve.api import Delta, Finished, RequestError, Usage

log = logging.getLogger("vlm.serve.handle")


class TextStream:
    """Token ids -> answer text, released in whole UTF-8 characters and cut at the first stop string.

    Text that could still become a stop string is held back until it cannot (so a stop string
    never reaches the client, even split over several tokens). Each token costs work in the new
    text only: the tokens since the last release are decoded (not the whole answer), and only the
    held-back tail plus the new text is searched for stop strings, so a long answer or a stop list
    at the caps (`vlm.serve.openai_protocol.MAX_STOP` strings of `MAX_STOP_CHARS`) does not slow
    down the engine step every other request shares."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = list(dict.fromkeys(s for s in stop if s))
        self.ids: list[int] = []
        self.stopped = False
        self._start = 0  # ids[_start:_read] produced `_window_text`, the context of the next decode
        self._read = 0
        self._window_text = ""
        self._held = ""  # decoded, not released: it may be the start of a stop string
        self._parts: list[str] = []  # released text

    @property
    def sent(self) -> str:
        """The text released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _release(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text

    def _new_text(self, final: bool = False) -> str | None:
        """Text of the tokens since the last call that returned some (None: an incomplete UTF-8
        character at the end, wait for the rest)."""
        text = self.tok.decode(self.ids[self._start :])
        if text.endswith("\ufffd"):
            if not final:
                return None
            text = text.removesuffix("\ufffd")
        if len(text) <= len(self._window_text):
            return ""
        new = text[len(self._window_text) :]
        self._start, self._read = self._read, len(self.ids)
        self._window_text = self.tok.decode(self.ids[self._start :])  # decoded alone, as the next call will
        return new

    def _holdback(self, text: str) -> int:
        """How many trailing characters of `text` may be the start of a stop string."""
        keep = 0
        for s in self.stop:
            i = max(0, len(text) - len(s) + 1)
            while True:
                i = text.find(s[0], i)
                if i < 0 or len(text) - i <= keep:
                    break
                if s.startswith(text[i:]):
                    keep = len(text) - i
                    break
                i += 1
        return keep

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly released text ('' if none yet)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        new = self._new_text()
        if not new:
            return ""
        text = self._held + new
        cut = min((at for at in (text.find(s) for s in self.stop) if at >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return self._release(text[:cut])
        end = len(text) - self._holdback(text)
        self._held = text[end:]
        return self._release(text[:end])

    def flush(self) -> str:
        """At the end of a request: the held-back text (no stop string completed)."""
        if self.stopped:
            return ""
        text = self._held + (self._new_text(final=True) or "")
        self._held = ""
        return self._release(text)


ADMITTED, EVENT, ERROR = "admitted", "event", "error"  # what `RequestHandle.listen` passes on


class RequestHandle:
    """One request in flight. Thread-safe: the engine calls the `_`-less producer methods
    (`admit`, `first_token`, `emit`, `finish`), the caller the consumer ones (`admitted`, iteration,
    `cancel`, `first_token_at`: the time to first token of benchmarks and servers)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # producer calls vs `listen`
        self._listener: Callable[[str, object], None] | None = None
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
        with self._lock:
            self._usage = usage
            self._admitted.set()
            if self._listener is not None:
                self._tell(ADMITTED, usage)

    def emit(self, delta: Delta) -> None:
        with self._lock:
            if self._listener is not None:
                self._tell(EVENT, delta)
            else:
                self._events.put(delta)

    def finish(self, finished: Finished) -> None:
        with self._lock:
            early = finished.error is not None and not self._admitted.is_set()
            if early:
                self._error = finished.error
            self.finished = finished
            self._admitted.set()
            if self._listener is None:
                self._events.put(finished)
            else:
                self._tell(*((ERROR, finished.error) if early else (EVENT, finished)))

    def _tell(self, kind: str, value) -> None:
        try:
            self._listener(kind, value)
        except Exception:  # noqa: BLE001 - a consumer's failure must not reach the engine thread
            log.exception("the listener of %s failed", self.request_id)

    # ---- caller side ---------------------------------------------------------------------------
    def listen(self, fn: Callable[[str, object], None]) -> None:
        """Have the events pushed instead of waited for: `fn(ADMITTED, usage)` or `fn(ERROR,
        request_error)` once the prompt is built, then `fn(EVENT, delta_or_finished)` for each
        `Delta` and the `Finished`. What happened before is delivered at once, in order. `fn` runs
        on the producing thread (the engine's): it must be quick (an asyncio server hands the item
        to its loop with `call_soon_threadsafe`), and iteration sees nothing after this call."""
        with self._lock:
            self._listener = fn
            if not self._admitted.is_set():
                return
            if self._error is not None:
                self._tell(ERROR, self._error)
                return
            self._tell(ADMITTED, self._usage if self._usage is not None else Usage())
            while True:
                try:
                    ev = self._events.get_nowait()
                except queue.Empty:
                    return
                self._tell(EVENT, ev)

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
