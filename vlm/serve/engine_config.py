"""What both engines share: their settings (`EngineConfig`), the device and dtype rule
(`default_dtype`, `resolve_device`), the default context and the sampling check.

The continuous-batching `vlm.serve.engine.Engine` and the serial reference
`vlm.serve.serial.SerialEngine` read the same `EngineConfig` and resolve device, dtype and
context the same way, so the reference checks the engine under the same settings. Each engine
lists the fields it honours (`OPTIONS`); the serial one refuses batching and cache settings
it has no use for (`refuse_unused`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vlm.model.prune import METHODS as PRUNE_METHODS
from vlm.precision import fast_bf16_cpu
from vlm.serve.api import RequestError, SamplingParams
from vlm.serve.structured import grammar_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_dtype(device: str | torch.device | None = "cpu") -> str:
    """bf16 on CUDA and on CPUs with native bf16 matmuls (`vlm.precision.fast_bf16_cpu`); fp32
    elsewhere (other CPUs emulate bf16 matmuls, far slower than fp32)."""
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if fast_bf16_cpu() else "fp32"


def resolve_device(device: str | None) -> torch.device:
    """None: CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class EngineConfig:
    """Settings of either engine (`conf/engine/*.yaml`).

    Both engines: max_context: longest prompt + max_tokens (None: the decoder's `max_seq_len`).
    max_queue: requests submitted but not yet running; beyond it `submit` raises `Overloaded`.
    dtype: "bf16" | "fp32" | None (`default_dtype` for the device). device: None picks CUDA when
    there is one. prune_keep_ratio < 1 drops visual tokens (`vlm.model.prune`: `prune_method`,
    `prune_seed` for the random method) before the decoder. model_name: the name clients see
    (None: "vlm"; `build_engine` passes the checkpoint's folder or file name). packed_weights: on
    the CPU, Linear layers run oneDNN GEMMs over a copy of their weights packed once
    (`vlm.model.packed`: 2-3x faster decode GEMMs, that copy's memory more); False: `F.linear`.

    Continuous engine only (the serial one runs one request at a time without caches):
    max_batch: KV slots = requests running at once (prefilling or decoding); a slot holds
    `max_context` positions. prefill_chunk: prompt tokens prefilled per engine step, the chunks
    of several requests in one forward (a chunk never cuts a bidirectional media span, so one span
    may exceed it). prefill_groups: a step prefills at most 1 / prefill_groups of the requests
    waiting for their prefill, so the first of a burst of arrivals get their first token after a
    fraction of the burst's prefill instead of all of it (1: every prompt that fits
    `prefill_chunk`). prefill_group_min: a step prefills at least this many of them (all when
    fewer wait), so a small burst is not spread over steps that each also run a decode step. The
    defaults (4 and 4) leave bursts of up to 4 whole and give 16 clients their first token about
    40% sooner at the median than 1 and 1, at the same tokens/s. embed_cache_mb /
    prefix_cache_mb: budgets of the image-embedding and prefix KV caches (0 turns one off; the
    prefix cache is off while pruning: what is kept depends on the whole prompt).
    preprocess_workers: threads building prompts.
    """

    max_context: int | None = None
    max_queue: int = 256
    dtype: str | None = None
    device: str | None = None
    prune_keep_ratio: float = 1.0
    prune_method: str = "attention"
    prune_seed: int = 0
    model_name: str | None = None
    packed_weights: bool = True
    max_batch: int = 16
    prefill_chunk: int = 2048
    prefill_groups: int = 4
    prefill_group_min: int = 4
    embed_cache_mb: float = 256.0
    prefix_cache_mb: float = 512.0
    preprocess_workers: int = 2


COMMON_OPTIONS = frozenset(
    (
        "max_context",
        "max_queue",
        "dtype",
        "device",
        "prune_keep_ratio",
        "prune_method",
        "prune_seed",
        "model_name",
        "packed_weights",
    )
)
ALL_OPTIONS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


def refuse_unused(cfg: EngineConfig, options: frozenset[str], engine: str) -> None:
    """ValueError naming the settings of `cfg` that differ from the defaults but that `engine`
    (honouring only `options`) would ignore."""
    unused = [
        f"{f.name}={getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if f.name not in options and getattr(cfg, f.name) != f.default
    ]
    if unused:
        raise ValueError(f"{engine} does not use {', '.join(unused)} (it takes: {', '.join(sorted(options))})")


def resolve(cfg: EngineConfig) -> tuple[torch.device, str]:
    """The engine's device and dtype name under the one rule both engines follow."""
    device = resolve_device(cfg.device)
    name = cfg.dtype or default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.max_queue < 1:
        raise ValueError(f"max_queue must be at least 1, got {cfg.max_queue}")
    if not 0.0 < cfg.prune_keep_ratio <= 1.0:
        raise ValueError(f"prune_keep_ratio must be in (0, 1], got {cfg.prune_keep_ratio}")
    if cfg.prune_method not in PRUNE_METHODS:
        raise ValueError(f"prune_method must be one of {', '.join(PRUNE_METHODS)}, got {cfg.prune_method!r}")
    return device, name


def prune_options(cfg: EngineConfig) -> dict | None:
    """The `prune` argument of `generate` / `row_inputs` (None: no pruning)."""
    if cfg.prune_keep_ratio >= 1.0:
        return None
    return {"keep_ratio": cfg.prune_keep_ratio, "method": cfg.prune_method, "seed": cfg.prune_seed}


def default_max_context(model) -> int:
    """The decoder's `max_seq_len` (4096 when it has none)."""
    return int(getattr(model.decoder, "max_seq_len", 0) or 4096)


MAX_N = 8  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's cap
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_sampling(sp: SamplingParams) -> None:
    """RequestError (with the offending `param`) for sampling parameters neither engine can run,
    NaN included; a `response_format` whose schema does not compile is one."""
    if not _int(sp.max_tokens) or sp.max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {sp.max_tokens!r}", param="max_tokens")
    if not sp.temperature >= 0:
        raise RequestError(f"temperature must be >= 0, got {sp.temperature}", param="temperature")
    if not 0.0 < sp.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {sp.top_p}", param="top_p")
    if not _int(sp.top_k) or sp.top_k < -1:
        raise RequestError(f"top_k must be an integer >= 0 (0 or -1: off), got {sp.top_k!r}", param="top_k")
    if not 0.0 <= sp.min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {sp.min_p}", param="min_p")
    lo, hi = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(sp, name)
        if not lo <= v <= hi:
            raise RequestError(f"{name} must be in [{lo:g}, {hi:g}], got {v}", param=name)
    if not 0.0 < sp.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise RequestError(
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {sp.repetition_penalty}",
            param="repetition_penalty",
        )
    if not _int(sp.n) or not 1 <= sp.n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}], got {sp.n!r}", param="n")
    if not _int(sp.top_logprobs) or not 0 <= sp.top_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(
            f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {sp.top_logprobs!r}",
            param="top_logprobs",
        )
    if sp.top_logprobs and not sp.logprobs:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    grammar_for(sp.response_format)
