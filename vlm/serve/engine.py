"""The serving engine: continuous batching over one model, with chunked prefill and two caches.

    engine = Engine(load_checkpoint(path), EngineConfig(max_batch=16))
    with engine:
        handle = engine.submit(ChatRequest(messages, SamplingParams(max_tokens=64)))
        usage = handle.admitted(timeout=30)      # the prompt is built (or its RequestError)
        for ev in handle: ...                    # Delta ... Finished

Request path: `submit` (any thread) -> a preprocessing pool builds the prompt (decode, resize,
template: `PromptBuilder`) and looks the prefix cache up -> `admitted()` returns -> the engine
thread gives it a KV slot when one is free -> prefill in chunks -> decode until an end token, a
stop string, max_tokens or `cancel()`.

Each engine step (`Engine.step`): drop cancelled rows; give free slots to admitted requests (copy
a cached prefix in); prefill at most `prefill_chunk` prompt tokens (several requests' chunks
packed into one forward, each attending over its own KV slot: `PackedPrefill`); then one decode
step for every decoding row at once. A request joins the decode
batch the step its prefill ends and leaves it the step it finishes: nobody waits for a batch to
drain, and a long prompt costs the running rows one chunk of latency per step, not its whole
prefill. Rows keep their own (M-)RoPE next position, so images of any size, several images and
videos decode together.

Failures stay with their request: an exception while building one request's prompt, copying its
cached prefix in, encoding its images, prefilling it or handling its token ends that request alone
(an `error` finish, its slot and pins freed) and the step goes on for the others; when a batched
decode step fails, each row is retried alone and only those that fail again end. If the engine
thread itself dies, `alive` turns False, every waiting and running request ends with a 503 error
and `submit` refuses new ones.

The engine thread owns the model; the pool never touches it. The model is cast in place to the
engine's dtype and device (the engine owns it from then on).

Greedy outputs equal `vlm.model.generate.generate` run on each request alone (fp32), whatever runs
beside it: the same masks and positions, per-row sampling with the request's own generator, the
same suppressed tokens (`vlm.model.generate.never_generate`). Seeded sampling does too, with every
sampling option (penalties, top_k, min_p, a `response_format` grammar: `vlm.model.generate.pick`,
`vlm.serve.structured`). A request with `n` choices runs as n rows that enter slots together; the
first prefills the prompt and the others copy its KV (`_share_prefill`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from vlm.model.generate import constrain, never_generate, pick
from vlm.model.packed import pack_linears
from vlm.serve.api import ChatRequest, Finished, Overloaded, RequestError, Usage
from vlm.serve.choices import ChoiceGroup, TokenPieces
from vlm.serve.embed_cache import EmbedCache
from vlm.serve.engine_config import (
    ALL_OPTIONS,
    DTYPES,
    EngineConfig,
    check_sampling,
    default_dtype,
    default_max_context,
    prune_options,
    resolve,
)
from vlm.serve.handle import RequestHandle, TextStream
from vlm.serve.kv_slots import DecodeCache, KVSlots, PackedPrefill, RowCache
from vlm.serve.media import row_inputs
from vlm.serve.prefix_cache import PrefixCache
from vlm.serve.prompt import PromptBuilder
from vlm.serve.row import Row
from vlm.serve.scheduling import chunk_end, stack_cross
from vlm.serve.structured import Grammars
from vlm.serve.threads import single_threaded_here

log = logging.getLogger("vlm.serve.engine")
__all__ = ["Engine", "EngineConfig", "default_dtype"]


class Engine:
    OPTIONS = ALL_OPTIONS  # the `EngineConfig` fields it honours: all of them

    def __init__(self, loaded, config: EngineConfig | None = None):
        from vlm.build.model import stop_ids

        self.config = cfg = config or EngineConfig()
        self.device, self.dtype_name = resolve(cfg)
        if min(cfg.prefill_groups, cfg.prefill_chunk, cfg.prefill_group_min) < 1:
            raise ValueError(
                "prefill_chunk, prefill_groups and prefill_group_min must be at least 1, got "
                f"{cfg.prefill_chunk}, {cfg.prefill_groups}, {cfg.prefill_group_min}"
            )
        self.dtype = DTYPES[self.dtype_name]
        self.model = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        # q/k/v and gate/up as one GEMM each (same weights, no copy): packed GEMMs have a fixed cost per
        # call, and bf16's gain from the wider matrices (qwen40m decode step, 2 threads: 5-15% faster
        # at batch 1..32); plain fp32 GEMMs were 1-4% slower fused
        packed = pack_linears(self.model, cfg.packed_weights)
        self.model.fuse_projections(packed > 0 or self.dtype != torch.float32)
        self.tokenizer = loaded.tokenizer
        dec = self.model.decoder
        self.max_context = int(cfg.max_context or default_max_context(self.model))
        self.model_name = cfg.model_name or "vlm"
        self.builder = PromptBuilder(loaded.processor, loaded.template, loaded.tokenizer, self.max_context)
        self.eos = set(stop_ids(loaded.tokenizer, (loaded.config or {}).get("template")))
        self.suppress = never_generate(self.model, loaded.tokenizer.structural_ids).to(self.device)
        self.grammars = Grammars(loaded.tokenizer, dec.vocab_size, self.eos)
        self.pieces = TokenPieces(loaded.tokenizer)
        self.slots = KVSlots(
            dec.n_layers, cfg.max_batch, dec.n_kv_heads, self.max_context, dec.head_dim, self.dtype, self.device
        )
        self.prune = prune_options(cfg)
        mb = 1 << 20
        self.embed_cache = EmbedCache(int(cfg.embed_cache_mb * mb)) if cfg.embed_cache_mb > 0 else None
        self.bidir = self.model.image_attention == "bidirectional"
        # several rows' prefill chunks in one forward: causal attention only (a bidirectional media
        # span needs the model's span mask) and no cross-attention media (per-row state)
        self.packed_prefill = not self.bidir and self.model.cross_attn is None
        self.prefix_cache = (
            PrefixCache(int(cfg.prefix_cache_mb * mb), self.bidir)
            if cfg.prefix_cache_mb > 0 and self.prune is None
            else None
        )
        # the preprocessing threads run single-threaded: the engine thread's OpenMP team stays the
        # process's only one (`vlm.serve.threads`)
        self.pool = ThreadPoolExecutor(
            max(1, cfg.preprocess_workers), thread_name_prefix="vlm-preprocess", initializer=single_threaded_here
        )
        self._lock = threading.Condition()
        self._ready: deque[Row] = deque()  # admitted, waiting for a slot
        self._waiting = 0  # submitted, not yet in a slot (preprocessing or ready)
        self._preprocessing: set[RequestHandle] = set()  # submitted, prompt not being built yet
        self.prefilling: list[Row] = []
        self.decoding: list[Row] = []  # decoding[i].slot == i
        self._cross_cache: tuple[tuple, dict | None] | None = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._dead = False  # the engine thread died: nothing runs any more
        self.counters = dict(
            steps=0, prefill_tokens=0, packed_prefills=0, generated_tokens=0, finished=0, cancelled=0, errors=0
        )

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="vlm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            rows = [*self._ready, *self.prefilling, *self.decoding]
            self._ready.clear()
            never_built = list(self._preprocessing)  # their futures were cancelled before running
            self._preprocessing.clear()
            self._waiting = 0
        for r in rows:
            self._end(r, "cancelled")
        for h in never_built:
            h.finish(Finished("cancelled", "", [], Usage()))

    @property
    def alive(self) -> bool:
        """The engine thread is running and takes work."""
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def full(self) -> bool:
        """`submit` would raise `Overloaded` now (a server checks before reading a request body)."""
        with self._lock:
            return self._waiting >= self.config.max_queue

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- submission (any thread) -----------------------------------------------------------------
    def submit(self, request: ChatRequest) -> RequestHandle:
        """A handle at once; the prompt is built in the pool. Raises `Overloaded` when the queue is full."""
        rid = request.request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(rid)
        with self._lock:
            if self._closing or self._dead:
                raise Overloaded("the engine is shutting down" if self._closing else "the engine has stopped")
            if self._waiting >= self.config.max_queue:
                raise Overloaded(f"the engine's queue is full ({self.config.max_queue} requests waiting)")
            self._waiting += 1
            self._preprocessing.add(handle)
        self.pool.submit(self._preprocess, request, handle)
        return handle

    def _preprocess(self, request: ChatRequest, handle: RequestHandle) -> None:
        with self._lock:
            self._preprocessing.discard(handle)
        try:
            sp = request.sampling
            check_sampling(sp)
            prompt = self.builder(request.messages, sp.max_tokens)
            entry, cached = None, 0
            if self.prefix_cache is not None:
                entry, cached = self.prefix_cache.lookup(prompt.prefix_keys, prompt.position_ids, len(prompt) - 1)
            usage = Usage(prompt_tokens=len(prompt), visual_tokens=prompt.visual_tokens, cached_tokens=cached)
            row = self._make_rows(request, handle, prompt, usage, entry, cached)
        except RequestError as e:
            self._fail(handle, e)
            return
        except Exception as e:  # noqa: BLE001 - a server answers 500 and keeps serving
            log.exception("preprocessing %s failed", handle.request_id)
            self._fail(handle, RequestError(f"preprocessing failed: {e}", status=500, code="internal_error"))
            return
        handle.admit(usage)
        with self._lock:
            if not self._dead:
                self._ready.extend([row, *row.followers])  # n > 1: one queue entry per choice
                self._waiting += len(row.followers)
                self._lock.notify_all()
                return
        self._release_prefix(row)
        self._fail(handle, _stopped())

    def _make_rows(self, request: ChatRequest, handle: RequestHandle, prompt, usage: Usage, entry, cached: int) -> Row:
        """The request's first row; with n > 1 choices it carries the others (`followers`), which
        enter slots with it and copy its prompt KV when its prefill ends (one prefill for all)."""
        sp = request.sampling
        try:
            if sp.n > self.config.max_batch:
                raise RequestError(f"n={sp.n} is over this engine's max_batch={self.config.max_batch}", param="n")
            group = ChoiceGroup(handle, sp.n) if sp.n > 1 else None
            opts = sp.sampler()
            rows: list[Row] = []
            for i in range(sp.n):
                gen = None
                if sp.temperature > 0:
                    seed = sp.choice_seed(i)
                    gen = torch.Generator(self.device)
                    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
                first = i == 0
                rows.append(
                    Row(
                        request,
                        group.child(i) if group is not None else handle,
                        prompt,
                        usage if first else dataclasses.replace(usage),
                        TextStream(self.tokenizer, sp.stop),
                        gen,
                        entry if first else None,
                        cached if first else 0,
                        options=opts,
                        constraint=self.grammars.constraint(sp.response_format),
                        pieces=self.pieces if sp.logprobs else None,
                    )
                )
        except BaseException:
            if entry is not None:
                self.prefix_cache.release(entry)
            raise
        for f in rows[1:]:
            f.leader = rows[0]
        rows[0].followers = rows[1:]
        return rows[0]

    def _share_prefill(self, row: Row, logits: torch.Tensor) -> None:
        """`row`'s prefill just ended: its followers copy the prompt's KV and pick their first token
        from the same logits (each with its own generator), then decode."""
        for f in row.followers:
            if f.leader is not row or f.done or f not in self.prefilling:
                continue
            f.leader = None
            self.slots.move(row.slot, f.slot, row.length)
            f.inputs, f.length, f.next_pos = row.inputs, row.length, row.next_pos
            reason = self._sample_and_push(f, logits.clone())
            if reason is not None:
                self._end(f, reason)
            else:
                self.prefilling.remove(f)
                self._place_decoding(f)

    def _fail(self, handle: RequestHandle, error: RequestError) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - 1)
            self.counters["errors"] += 1
        handle.finish(Finished("error", "", [], Usage(), error=error))

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closing and not (self._ready or self.prefilling or self.decoding):
                        self._lock.wait()
                    if self._closing:
                        return
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - not tied to one row: fail the running ones, go on
                    log.exception("engine step failed")
                    for r in [*self.prefilling, *self.decoding]:
                        self._end_safely(r, _internal(e))
        except BaseException:  # noqa: BLE001 - the thread is dying: nobody may wait on it forever
            log.critical("the engine thread died", exc_info=True)
            self._die()

    def _die(self) -> None:
        """The engine thread is gone: end every request it held or would have run (503)."""
        with self._lock:
            self._dead = True
            rows = [*self._ready, *self.prefilling, *self.decoding]
            self._ready.clear()
            self.prefilling, self.decoding = [], []
            self._waiting = len(self._preprocessing)  # those still end through `_preprocess`
        for r in rows:
            if not r.done:
                r.done = True
                r.handle.finish(Finished("error", r.stream.sent, list(r.out), r.usage, error=_stopped()))

    def _release_prefix(self, row: Row) -> None:
        if row.prefix is not None and self.prefix_cache is not None:
            self.prefix_cache.release(row.prefix)
        row.prefix = None

    def _end_safely(self, row: Row, error: RequestError) -> None:
        """End `row` with `error`; if even that fails, still answer its client and free its slot."""
        try:
            self._end(row, "error", error)
        except Exception:  # noqa: BLE001
            log.exception("ending %s failed", row.handle.request_id)
            for rows in (self.prefilling, self.decoding):
                if row in rows:
                    rows.remove(row)
            if row.slot >= 0:
                self.slots.release(row.slot)
                row.slot = -1
            if not row.done:
                row.done = True
                row.handle.finish(Finished("error", "", list(row.out), row.usage, error=error))

    @torch.no_grad()
    def step(self) -> None:
        """One engine step: cancellations, admissions, one prefill budget, one decode step."""
        self._reap()
        self._admit()
        self._prefill()
        self._decode()
        self.counters["steps"] += 1

    def _reap(self) -> None:
        with self._lock:
            gone = [r for r in self._ready if r.handle.cancelled]
            for r in gone:
                self._ready.remove(r)
                self._waiting -= 1
        for r in gone:
            self._end(r, "cancelled")
        for r in [*self.prefilling, *self.decoding]:
            if r.handle.cancelled:
                self._end(r, "cancelled")

    def _admit(self) -> None:
        while self.slots.free:
            with self._lock:
                if not self._ready:
                    return
                if len(self._ready[0].followers) >= len(self.slots.free):  # a request's choices enter together
                    return
                row = self._ready.popleft()
                self._waiting -= 1
                mates = []  # its other choices, queued right behind it
                while self._ready and self._ready[0].leader is row:
                    mates.append(self._ready.popleft())
                    self._waiting -= 1
            row.slot = self.slots.take_top()
            for f in mates:  # a slot now, the prompt's KV when row's prefill ends (`_share_prefill`)
                f.slot = self.slots.take_top()
                self.prefilling.append(f)
            try:
                if row.prefix is not None:
                    self.slots.write(row.slot, row.prefix.k[:, :, : row.cached], row.prefix.v[:, :, : row.cached])
                    self._release_prefix(row)
            except Exception as e:  # noqa: BLE001 - this request ends; its slot goes back
                log.exception("admitting %s failed", row.handle.request_id)
                self._end_safely(row, _internal(e))
                continue
            row.length = row.cached
            self.prefilling.append(row)

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens this step, from as many prefilling rows as fit (at
        most 1 / `prefill_groups` of them, at least `prefill_group_min`), in one forward
        (`PackedPrefill`) where the model allows it. A failure ends the row it came from: making a
        row's inputs fails alone; a packed forward that fails is run again one row at a time, and
        only the rows that fail again end."""
        budget, batch = self.config.prefill_chunk, []
        cfg = self.config  # prefill_groups > 1: a burst spread over steps, in groups of prefill_group_min or more
        rows = max(-(-len(self.prefilling) // cfg.prefill_groups), cfg.prefill_group_min)
        for row in list(self.prefilling):
            if budget <= 0 or len(batch) >= rows:
                break
            try:
                span = self._next_chunk(row, budget)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in the vision encoder: this row only
                log.exception("prefilling %s failed", row.handle.request_id)
                self._end_safely(row, _internal(e))
                continue
            if span is not None:
                batch.append((row, *span))
                budget -= span[1] - span[0]
        if batch and self.packed_prefill:
            try:
                hidden = self._forward_packed(batch)
            except Exception:  # noqa: BLE001
                log.exception("a packed prefill of %d rows failed: running each alone", len(batch))
            else:
                self.counters["packed_prefills"] += 1
                for row, _, end in batch:  # every chunk is in its slot before any row moves slots
                    row.length = end
                for (row, start, end), h in zip(batch, hidden):
                    self._safely(row, self._chunk_done, row, start, end, h)
                return
        for row, start, end in batch:
            self._safely(row, self._prefill_alone, row, start, end)

    def _prefill_alone(self, row: Row, start: int, end: int) -> None:
        self._chunk_done(row, start, end, self._forward_chunk(row, start, end))

    def _safely(self, row: Row, fn, *args) -> None:
        """`fn(*args)`; if it raises, `row` ends with an internal error and the step goes on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - this row only
            log.exception("prefilling %s failed", row.handle.request_id)
            self._end_safely(row, _internal(e))

    def _next_chunk(self, row: Row, budget: int) -> tuple[int, int] | None:
        """`row`'s next prefill chunk `(start, end)` within `budget` tokens (its inputs made first:
        vision encoding), or None: it waits for another choice's prefill, or it ended."""
        if row.leader is not None:
            if not row.leader.done:
                return None  # another choice prefills this prompt; `_share_prefill` copies its KV here
            row.leader = None  # that one ended before its prefill did: prefill alone
        if row.inputs is None:
            try:
                row.inputs = row_inputs(self.model, row.prompt, self.embed_cache, self.device, self.prune)
            except RequestError as e:
                self._end(row, "error", e)
                return None
            pos = row.inputs.position_ids
            row.next_pos = int((pos.amax(0) if pos.dim() == 2 else pos).max()) + 1
            if row.inputs.cross is not None:
                row.inputs.cross["markers"] += int(self.model.is_media(row.inputs.input_ids[: row.length]).sum())
        start = row.length
        return start, chunk_end(row.inputs.input_ids, self.model, start, budget, self.bidir)

    def _forward_chunk(self, row: Row, start: int, end: int) -> torch.Tensor:
        """One row's chunk through the model over its own slot: the last position's hidden `[D]`."""
        inp = row.inputs
        pos = inp.position_ids[..., start:end]
        pos = pos[:, None] if pos.dim() == 2 else pos[None]
        cache = RowCache(self.slots, row.slot, start, inp.cross)
        hidden = self.model(inp.input_ids[start:end][None], pos, cache=cache, inputs_embeds=inp.embeds[start:end][None])
        return hidden[0, -1]

    def _forward_packed(self, batch: list[tuple[Row, int, int]]) -> list[torch.Tensor]:
        """Several rows' chunks in one forward, packed end to end: each row's last hidden `[D]`."""
        ids = torch.cat([r.inputs.input_ids[s:e] for r, s, e in batch])
        embeds = torch.cat([r.inputs.embeds[s:e] for r, s, e in batch])
        pos = torch.cat([r.inputs.position_ids[..., s:e] for r, s, e in batch], dim=-1)
        pos = pos[:, None] if pos.dim() == 2 else pos[None]
        cache = PackedPrefill(self.slots, [(r.slot, s, e - s) for r, s, e in batch])
        hidden = self.model(ids[None], pos, cache=cache, inputs_embeds=embeds[None])[0]
        ends = torch.tensor([e - s for _, s, e in batch]).cumsum(0) - 1
        return list(hidden[ends.to(hidden.device)])

    def _chunk_done(self, row: Row, start: int, end: int, last_hidden: torch.Tensor) -> None:
        """`row`'s chunk `[start, end)` is in its slot; at the prompt's end, its first token (and
        the row moves to a decode slot, swapping with a prefilling row: lengths must be current)."""
        row.length = end
        self.counters["prefill_tokens"] += end - start
        if end == row.prompt_len:
            logits = self.model.logits(last_hidden[None]).float()
            self._share_prefill(row, logits)
            reason = self._sample_and_push(row, logits)
            if reason is not None:
                self._end(row, reason)
            else:
                self.prefilling.remove(row)
                self._place_decoding(row)

    def _place_decoding(self, row: Row) -> None:
        """Move a row whose prefill ended into slot `len(decoding)` (the decode batch is a view)."""
        target = len(self.decoding)
        if row.slot != target:
            other = next((r for r in self.prefilling if r.slot == target), None)
            if other is not None:
                self.slots.swap(row.slot, row.length, other.slot, other.length)
                other.slot = row.slot
            else:
                self.slots.move(row.slot, target, row.length)
                self.slots.release(row.slot)
                self.slots.free.discard(target)
            row.slot = target
        self.decoding.append(row)

    def _decode(self) -> None:
        rows = self.decoding
        if not rows:
            return
        n = len(rows)
        logits, failed = self._decode_logits(rows)
        for r in rows:
            r.length += 1
            r.next_pos += 1
        self.counters["generated_tokens"] += n
        greedy = logits.masked_fill(self._suppress_mask(logits), float("-inf")).argmax(-1).tolist()
        finished = []
        for b, r in enumerate(list(rows)):
            if r in failed:
                continue
            try:
                if r.plain_greedy:
                    reason = r.push(greedy[b], self.eos)
                else:
                    reason = self._sample_and_push(r, logits[b : b + 1])
            except Exception as e:  # noqa: BLE001 - this row's token handling failed: this row ends
                log.exception("decoding %s failed", r.handle.request_id)
                failed[r] = _internal(e)
                continue
            if reason is not None:
                finished.append(r)
        for r in finished:
            self._end(r, r.reason)
        for r, error in failed.items():
            self._end_safely(r, error)

    def _decode_logits(self, rows: list[Row]) -> tuple[torch.Tensor, dict[Row, RequestError]]:
        """One decode step's logits `[n, V]` for the decoding rows. If the batched step fails, each
        row is run alone (a one-token chunk over its own slot): those that fail again are returned
        with their error (their logits row is zeros), the others go on as if nothing happened."""
        n, dev = len(rows), self.device
        try:
            tokens = torch.tensor([[r.last] for r in rows], device=dev)
            lengths = torch.tensor([r.length for r in rows], device=dev)
            pos = torch.tensor([[r.next_pos] for r in rows], device=dev)
            if self.model.decoder.rope == "mrope":
                pos = pos[None].expand(3, n, 1)
            cache = DecodeCache(self.slots, lengths, self._decode_cross())
            hidden = self.model(tokens, pos, cache.key_valid(), cache=cache)
            return self.model.logits(hidden[:, -1]).float(), {}
        except Exception:  # noqa: BLE001
            log.exception("the decode step over %d rows failed: running each alone", n)
        out, failed = [], {}
        for r in rows:
            try:
                out.append(self._decode_one(r))
            except Exception as e:  # noqa: BLE001
                log.exception("decoding %s failed", r.handle.request_id)
                failed[r] = _internal(e)
                out.append(None)
        width = next((x.shape[-1] for x in out if x is not None), 1)
        zeros = torch.zeros(1, width, device=dev)
        return torch.cat([zeros if x is None else x for x in out]), failed

    def _decode_one(self, r: Row) -> torch.Tensor:
        """`r`'s next-token logits `[1, V]` from a step over its slot alone."""
        tokens = torch.tensor([[r.last]], device=self.device)
        pos = torch.tensor([[r.next_pos]], device=self.device)
        if self.model.decoder.rope == "mrope":
            pos = pos[None].expand(3, 1, 1)
        cache = RowCache(self.slots, r.slot, r.length, r.inputs.cross)
        hidden = self.model(tokens, pos, cache=cache)
        return self.model.logits(hidden[:, -1]).float()

    def _suppress_mask(self, logits: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        m[self.suppress] = True
        return m

    def _decode_cross(self) -> dict | None:
        """fusion=cross_attn: the decoding rows' media keys/values stacked (rebuilt when they change)."""
        if self.model.cross_attn is None:
            return None
        key = tuple(id(r) for r in self.decoding)
        if self._cross_cache is None or self._cross_cache[0] != key:
            self._cross_cache = (key, stack_cross([r.inputs.cross for r in self.decoding], self.model))
        return self._cross_cache[1]

    def _sample_and_push(self, row: Row, logits: torch.Tensor) -> str | None:
        """logits `[1, V]` -> the row's next token (its own sampling parameters and generator)."""
        logits[:, self.suppress] = float("-inf")
        if row.constraint is not None:
            constrain(logits, row.constraint)
        tok, lp = pick(logits, row.options, row.prompt.input_ids, row.out, row.generator)
        if row.constraint is not None:
            row.constraint.accept(tok)
        return row.push(tok, self.eos, lp)

    # ---- the end of a row -------------------------------------------------------------------------
    def _end(self, row: Row, reason: str | None, error: RequestError | None = None) -> None:
        """Finish `row` (reason None: its own finish reason) and give back its slot and pins."""
        if row.done:
            return
        if row.slot >= 0 and self.prefix_cache is not None and error is None and row.inputs is not None:
            keys, pos = row.kv_keys()
            if len(keys) > row.cached:
                k, v = self.slots.read(row.slot, row.length)
                self.prefix_cache.insert(keys, pos, k, v)
        if error is not None:
            row.done = True
            row.handle.finish(Finished("error", row.stream.sent, list(row.out), row.usage, error=error))
            self.counters["errors"] += 1
        else:
            row.finish(reason or row.reason or "stop")
            self.counters["cancelled" if reason == "cancelled" else "finished"] += 1
        if row.prefix is not None and self.prefix_cache is not None:
            self.prefix_cache.release(row.prefix)
            row.prefix = None
        if row in self.prefilling:
            self.prefilling.remove(row)
            self.slots.release(row.slot)
        elif row in self.decoding:
            i = row.slot
            last = self.decoding[-1]
            if last is not row:
                self.slots.move(last.slot, i, last.length)
                last.slot = i
                self.decoding[i] = last
            self.decoding.pop()
            self.slots.release(len(self.decoding))
        elif row.slot >= 0:  # taken at admission, never placed
            self.slots.release(row.slot)
        row.slot = -1

    def stats(self) -> dict:
        with self._lock:
            queue = self._waiting
            ready = len(self._ready)
        return {
            **self.counters,
            "alive": self.alive,
            "queue_depth": queue,
            "ready": ready,
            "running": len(self.decoding),
            "prefilling": len(self.prefilling),
            "free_slots": len(self.slots.free),
            "max_batch": self.config.max_batch,
            "kv_slots_bytes": self.slots.nbytes,
            "dtype": self.dtype_name,
            "embed_cache": self.embed_cache.stats() if self.embed_cache else None,
            "prefix_cache": self.prefix_cache.stats() if self.prefix_cache else None,
        }


def _internal(e: BaseException) -> RequestError:
    """What the client of a request that failed inside the engine is told (details go to the log)."""
    return RequestError(f"internal error in the engine: {type(e).__name__}", status=500, code="internal_error")


def _stopped() -> RequestError:
    return RequestError("the engine has stopped; the server cannot answer", status=503, code="engine_stopped")
