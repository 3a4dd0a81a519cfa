"""The reference engine: one request at a time, with plain `vlm.model.generate.generate`.

Same interface as the continuous-batching `vlm.serve.engine.Engine` (submit -> RequestHandle,
admitted / events / cancel, stats, close), so every front end runs on either. It has no batching
and no caches: a request waits in a bounded queue, its prompt is built by `PromptBuilder`, then it
decodes alone until an end token, a stop string, `max_tokens` or a cancel. Use it to check the
batching engine's answers against, or where one request at a time is all there is (`engine=serial`).

It reads the same `EngineConfig` and picks device, dtype and context by the same rule
(`vlm.serve.engine_config`), so a check runs both under the same settings; the batching and cache
settings it has no use for are refused, not ignored.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
from dataclasses import replace

import torch

from vlm.model.generate import generate
from vlm.model.packed import pack_linears
from vlm.serve.api import ChatRequest, Delta, Finished, Overloaded, RequestError, Usage
from vlm.serve.choices import TokenPieces, merge
from vlm.serve.engine_config import (
    COMMON_OPTIONS,
    DTYPES,
    EngineConfig,
    check_sampling,
    default_max_context,
    prune_options,
    refuse_unused,
    resolve,
)
from vlm.serve.handle import RequestHandle, TextStream
from vlm.serve.prompt import PromptBuilder
from vlm.serve.structured import Grammars

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from the token callback to end decoding early (cancel or stop string)."""


class SerialEngine:
    OPTIONS = COMMON_OPTIONS  # the `EngineConfig` fields it honours (no batching, no caches)

    def __init__(self, loaded, config: EngineConfig | None = None):
        from vlm.build.model import stop_ids

        cfg = config or EngineConfig()
        refuse_unused(cfg, self.OPTIONS, "the serial engine")
        self.config = cfg
        self.device, self.dtype_name = resolve(cfg)
        self.model = loaded.model.to(self.device, DTYPES[self.dtype_name]).eval()
        pack_linears(self.model, cfg.packed_weights)
        self.tokenizer = loaded.tokenizer
        self.max_context = int(cfg.max_context or default_max_context(self.model))
        self.model_name = cfg.model_name or "vlm"
        self.builder = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, self.max_context)
        self.eos = set(stop_ids(loaded.tokenizer, (loaded.config or {}).get("template")))
        self.prune = prune_options(cfg)
        self.grammars = Grammars(loaded.tokenizer, self.model.decoder.vocab_size, self.eos)
        self.pieces = TokenPieces(loaded.tokenizer)
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._current: RequestHandle | None = None
        self._dead = False  # the worker thread died
        self._counts = {"finished": 0, "cancelled": 0, "errors": 0}  # the continuous engine's names

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> SerialEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="serial-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker; the running request and those still queued end as cancelled."""
        self._closed.set()
        current = self._current
        if current is not None:
            current.cancel()
        try:
            self._queue.put_nowait(None)  # wake the worker
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=30)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].finish(Finished("cancelled", "", [], Usage()))

    @property
    def alive(self) -> bool:
        """The worker thread is running and takes work."""
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def full(self) -> bool:
        """`submit` would raise `Overloaded` now."""
        return self._queue.full()

    def __enter__(self) -> SerialEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, request: ChatRequest) -> RequestHandle:
        if self._closed.is_set() or self._dead:
            raise Overloaded("the engine is shut down" if self._closed.is_set() else "the engine has stopped")
        handle = RequestHandle(request.request_id or f"req-{next(self._ids)}")
        try:
            self._queue.put_nowait((request, handle))
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are already waiting; try again later") from None
        return handle

    def stats(self) -> dict:
        return {
            **self._counts,
            "alive": self.alive,
            "queue_depth": self._queue.qsize(),
            "running": int(self._current is not None),
            "max_batch": 1,
            "dtype": self.dtype_name,
        }

    # ---- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - the worker is dying: end what it held and what waits
            log.critical("the serial engine's worker died", exc_info=True)
            self._dead = True
            stopped = RequestError(
                "the engine has stopped; the server cannot answer", status=503, code="engine_stopped"
            )
            current, self._current = self._current, None
            if current is not None and current.finished is None:
                current.finish(Finished("error", "", [], Usage(), stopped))
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].finish(Finished("error", "", [], Usage(), stopped))

    def _serve(self) -> None:
        while not self._closed.is_set():
            item = self._queue.get()
            if item is None:
                continue
            request, handle = item
            self._current = handle
            try:
                finished = self._run(request, handle)
            except Exception as e:  # a bug or an out-of-memory: fail this request, keep serving
                log.exception("request %s failed", handle.request_id)
                err = RequestError(f"internal error: {type(e).__name__}: {e}", status=500, code="internal_error")
                finished = Finished("error", "", [], Usage(), err)
            self._current = None
            key = {"stop": "finished", "length": "finished", "cancelled": "cancelled"}.get(finished.finish_reason)
            self._counts[key or "errors"] += 1
            handle.finish(finished)

    def _run(self, request: ChatRequest, handle: RequestHandle) -> Finished:
        sp = request.sampling
        if handle.cancelled:
            return Finished("cancelled", "", [], Usage())
        try:
            check_sampling(sp)
            prompt = self.builder(request.messages, sp.max_tokens)
            constraints = [self.grammars.constraint(sp.response_format) for _ in range(sp.n)]
        except RequestError as e:
            return Finished("error", "", [], Usage(), e)
        usage = Usage(prompt_tokens=len(prompt), visual_tokens=prompt.visual_tokens)
        handle.admit(replace(usage))  # a copy: the caller reads it while this one counts on
        batch = {
            k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prompt.batch(self.tokenizer.pad_id).items()
        }
        if torch.is_tensor(batch.get("pixel_patches")):
            batch["pixel_patches"] = batch["pixel_patches"].to(next(self.model.parameters()).dtype)
        results: list[Finished] = []
        for i, constraint in enumerate(constraints):  # n choices, one after the other
            if handle.cancelled:
                results.append(Finished("cancelled", "", [], replace(usage, completion_tokens=0), index=i))
                continue
            results.append(self._choice(sp, i, batch, usage if i == 0 else replace(usage), handle, constraint))
        return results[0] if len(results) == 1 else merge(results)

    def _choice(self, sp, index: int, batch: dict, usage: Usage, handle: RequestHandle, constraint) -> Finished:
        """One answer (choice `index`, seeded with `sp.choice_seed(index)`) by `generate`."""
        seed = sp.choice_seed(index)
        gen = torch.Generator(self.device).manual_seed(seed if seed is not None else secrets.randbits(63))
        stream = TextStream(self.tokenizer, sp.stop)
        pieces = self.pieces if sp.logprobs else None
        reason = "length"
        pending: list[int] = []
        pending_lp: list = []
        answer_lp: list = []
        step_lp: list = [None]

        def on_logprobs(lps: list) -> None:
            step_lp[0] = lps[0]

        def on_token(t: torch.Tensor) -> None:
            nonlocal reason, pending, pending_lp
            tok = int(t[0])
            if usage.completion_tokens == 0:
                handle.first_token()
            usage.completion_tokens += 1
            if tok in self.eos:
                reason = "stop"
                raise _Stop
            pending.append(tok)
            if pieces is not None and step_lp[0] is not None:
                entry = pieces.logprob(step_lp[0])
                answer_lp.append(entry)
                pending_lp.append(entry)
            text = stream.push(tok)
            if text:
                handle.emit(Delta(text, pending, index, pending_lp if pieces is not None else None))
                pending, pending_lp = [], []
            if stream.stopped:
                reason = "stop"
                raise _Stop
            if handle.cancelled:
                reason = "cancelled"
                raise _Stop

        try:
            generate(
                self.model,
                batch,
                sp.max_tokens,
                sorted(self.eos),
                suppress_ids=self.tokenizer.structural_ids,
                generator=gen,
                on_token=on_token,
                prune=self.prune,
                sampler=sp.sampler(),
                constraints=None if constraint is None else [constraint],
                on_logprobs=on_logprobs,
            )
        except _Stop:
            pass
        tail = stream.flush() if reason != "cancelled" else ""
        if tail:
            handle.emit(Delta(tail, pending, index, pending_lp if pieces is not None else None))
        text = stream.sent
        ids = [t for t in stream.ids if t not in self.eos]
        return Finished(reason, text, ids, usage, index=index, logprobs=answer_lp if pieces is not None else None)
