"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, min-p),
with repetition / frequency / presence penalties, per-row token constraints (a grammar's mask),
log-probabilities, and token-by-token streaming through a callback (`SamplerOptions`, `pick`).

Batches are left-padded (`collate(..., padding_side="left")`) so every row's prompt ends at the
last column. A new token's position is one past the largest position in its row (the M-RoPE
rule; for 1D RoPE this is simply the next index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vlm.model.vlm import VLM


@dataclass(frozen=True)
class SamplerOptions:
    """How one row picks its next token from the model's logits (`pick`), in this order:

    1. masks: suppressed tokens and, for constrained rows, the grammar's disallowed tokens -> -inf;
    2. repetition_penalty (HF / vLLM): the logit of every token already in the prompt or the answer
       is divided by it when positive, multiplied by it when negative (1 = off);
    3. frequency_penalty, presence_penalty (OpenAI): minus `frequency * count + presence * (count > 0)`
       for the tokens of the answer so far (0 = off);
    4. temperature: logits / temperature (0 = greedy: argmax of the logits of step 3);
    5. top_k (0 = off), then top_p (nucleus, 1 = off), then min_p (tokens below `min_p` times the
       top probability dropped, 0 = off), each on the distribution the previous one left;
    6. a draw from what is left with the row's generator.

    logprobs: None = none; k >= 0 = the sampled token's log-probability and the k most likely
    tokens, all from `log_softmax` of the logits after step 4 (temperature 0 counts as 1), before
    the truncations of step 5."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the row's history: an argmax over a whole batch will do."""
        return self.temperature <= 0 and not self.penalized and self.logprobs is None


@dataclass
class TokenLogprob:
    """A generated token, its log-probability and the `top` most likely (token, logprob) pairs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> Tensor:
    """logits `[B, V]` -> token ids `[B]`. temperature 0 = greedy. top_k 0 / top_p 1 / min_p 0 = off."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, -1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize(logits: Tensor, opts: SamplerOptions, prompt_ids: Tensor | None, out_ids: Sequence[int]) -> Tensor:
    """logits `[1, V]` with the repetition, frequency and presence penalties of `opts` applied (a
    new tensor; `SamplerOptions` step 2 and 3). prompt_ids: the row's prompt tokens."""
    if not opts.penalized:
        return logits
    V = logits.shape[-1]
    out = torch.tensor(list(out_ids), dtype=torch.long, device=logits.device)
    if opts.repetition_penalty != 1.0:
        seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
        if prompt_ids is not None:
            seen[prompt_ids.to(logits.device).long().clamp(0, V - 1)] = True
        seen[out] = True
        p = opts.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if (opts.frequency_penalty or opts.presence_penalty) and out.numel():
        counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
        logits = logits - opts.frequency_penalty * counts - opts.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def pick(
    logits: Tensor,
    opts: SamplerOptions,
    prompt_ids: Tensor | None = None,
    out_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[int, TokenLogprob | None]:
    """One row's next token from its masked logits `[1, V]` (`SamplerOptions`, steps 2 to 6), and
    its `TokenLogprob` when `opts.logprobs` is set."""
    z = penalize(logits, opts, prompt_ids, out_ids)
    tok = int(sample_next(z, opts.temperature, opts.top_p, generator, opts.top_k, opts.min_p)[0])
    if opts.logprobs is None:
        return tok, None
    lp = torch.log_softmax(z[0].float() / (opts.temperature if opts.temperature > 0 else 1.0), -1)
    top = []
    if opts.logprobs > 0:
        vals, idx = lp.topk(min(opts.logprobs, lp.numel()))
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    return tok, TokenLogprob(tok, float(lp[tok]), top)


def constrain(logits: Tensor, constraint) -> None:
    """Set the logits `[1, V]` of the tokens `constraint` disallows now to -inf (in place).
    constraint: anything with `allowed(vocab_size) -> bool Tensor [V] | None` (None: all)."""
    allowed = constraint.allowed(logits.shape[-1])
    if allowed is not None:
        logits[0].masked_fill_(~allowed.to(logits.device), float("-inf"))


def never_generate(model: VLM, suppress_ids: Sequence[int] = ()) -> Tensor:
    """Token ids `[K]` a model must never emit: `suppress_ids` plus the model's media placeholder
    ids (a generated `<|image_pad|>` would claim visual tokens that do not exist, and the next
    forward would refuse the row), whoever calls."""
    ids = set(int(t) for t in suppress_ids) | set(model.media_token_ids.tolist())
    return torch.tensor(sorted(ids), dtype=torch.long)


@torch.no_grad()
def generate(
    model: VLM,
    batch: dict,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    suppress_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    prune: dict | None = None,
    sampler: SamplerOptions | None = None,
    constraints: Sequence | None = None,
    on_logprobs: Callable[[list[TokenLogprob | None]], None] | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row; a row stops at its first EOS (kept in its output).

    suppress_ids: tokens never generated (structural tokens such as turn starts); the model's media
    placeholder ids are always suppressed (`never_generate`).
    on_token: called with the `[B]` new tokens after every step (streaming).
    sampler: every sampling option (`SamplerOptions`; replaces `temperature` and `top_p` when given).
    With penalties, log-probabilities or constraints each row is picked on its own (`pick`).
    constraints: per row None or an object with `allowed(vocab_size)` (bool `[V]` or None) and
    `accept(token)` (a grammar): its disallowed tokens are masked before the row's pick.
    on_logprobs: called before `on_token` with each row's `TokenLogprob` (None for ended rows) when
    `sampler.logprobs` is set.
    prune: `{keep_ratio, method}` drops visual tokens before the prompt's forward (`vlm.model.prune`;
    needs the KV cache). Returns the new token ids per row.
    """
    ids: Tensor = batch["input_ids"]
    am: Tensor = batch["attention_mask"]
    pos: Tensor = batch["position_ids"]
    B, L = ids.shape
    device = ids.device
    opts = sampler or SamplerOptions(temperature=temperature, top_p=top_p)
    prompt_rows = [ids[b][am[b].bool()] for b in range(B)]  # the rows' prompt tokens (penalties)
    per_row = constraints is not None or opts.penalized or opts.logprobs is not None
    media = dict(
        pixel_patches=batch.get("pixel_patches"),
        grid_thw=batch.get("grid_thw"),
        media_per_sample=batch.get("media_per_sample"),
        keys=batch.get("keys"),
    )
    eos = torch.tensor(list(eos_ids), device=device)
    suppress = never_generate(model, suppress_ids).to(device)
    # next position per row: one past the largest used (pad positions are 0, never the max)
    next_pos = (pos.amax(0) if pos.dim() == 3 else pos).amax(-1) + 1  # [B]
    cache = None
    if use_cache:
        param = next(model.parameters())
        cache = model.decoder.new_cache(B, L + max_new_tokens, param.dtype, device)
    if prune and float(prune.get("keep_ratio", 1.0)) < 1.0 and media["grid_thw"] is not None:
        if cache is None:
            raise ValueError("visual-token pruning needs use_cache=True")
        from vlm.model.prune import prune_visual_tokens

        pb = prune_visual_tokens(
            model, batch, float(prune["keep_ratio"]), prune.get("method", "attention"), int(prune.get("seed", 0))
        )
        ids, pos, am = pb["input_ids"], pb["position_ids"], pb["attention_mask"]
        L = ids.shape[1]
        hidden = model(ids, pos, am, cache=cache, inputs_embeds=pb["inputs_embeds"])
    else:
        hidden = model(ids, pos, am, cache=cache, **media)
    if cache is not None:
        cache.advance(L)
    logits = model.logits(hidden[:, -1]).float()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        if not per_row:
            tok = sample_next(logits, opts.temperature, opts.top_p, generator, opts.top_k, opts.min_p)
        else:
            toks: list[int] = []
            lps: list[TokenLogprob | None] = []
            for b in range(B):
                if done[b]:
                    toks.append(0)
                    lps.append(None)
                    continue
                row = logits[b : b + 1]
                c = constraints[b] if constraints is not None else None
                if c is not None:
                    constrain(row, c)
                t, lp = pick(row, opts, prompt_rows[b], out[b], generator)
                if c is not None:
                    c.accept(t)
                toks.append(t)
                lps.append(lp)
            tok = torch.tensor(toks, device=device)
            if on_logprobs is not None and opts.logprobs is not None:
                on_logprobs(lps)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
        if on_token is not None:
            on_token(tok.masked_fill(done, -1))
        done |= torch.isin(tok, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        new_pos = (next_pos + step).view(B, 1)
        if pos.dim() == 3:
            new_pos = new_pos.unsqueeze(0).expand(3, B, 1)
        am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype, device=device)], 1)
        if cache is not None:
            hidden = model(tok[:, None], new_pos, am, cache=cache)
            cache.advance(1)
        else:  # full re-forward of the whole sequence (reference path for tests and benchmarks)
            ids = torch.cat([ids, tok[:, None]], 1)
            pos = torch.cat([pos, new_pos], -1)
            hidden = model(ids, pos, am, **media)
        logits = model.logits(hidden[:, -1]).float()
    return out
