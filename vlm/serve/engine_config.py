"""The engine's settings (`EngineConfig`), the default dtype rule, and the sampling checks."""

from __future__ import annotations

from dataclasses import dataclass

from vlm.precision import fast_bf16_cpu
from vlm.serve.api import RequestError, SamplingParams


def default_dtype(device: str = "cpu") -> str:
    """bf16 on CUDA and on CPUs with native bf16 matmuls (`vlm.precision.fast_bf16_cpu`); fp32
    elsewhere (other CPUs emulate bf16 matmuls, far slower than fp32)."""
    if str(device).startswith("cuda"):
        return "bf16"
    return "bf16" if fast_bf16_cpu() else "fp32"


@dataclass
class EngineConfig:
    """max_batch: KV slots = requests running at once (prefilling or decoding).
    max_context: longest prompt + max_tokens (None: the decoder's `max_seq_len`); a slot holds
    this many positions. prefill_chunk: prompt tokens prefilled per engine step (a chunk never
    cuts a bidirectional media span, so one span may exceed it). embed_cache_mb / prefix_cache_mb:
    budgets of the image-embedding and prefix KV caches (0 turns one off). max_queue: requests
    submitted but not yet in a slot; beyond it `submit` raises `Overloaded`. preprocess_workers:
    threads building prompts. dtype: "bf16" | "fp32" | None (`default_dtype`). prune_keep_ratio:
    < 1 drops visual tokens (`vlm.model.prune`, `prune_method`) before prefill (the prefix cache is then
    off: what is kept depends on the whole prompt). model_name: None = the checkpoint folder's name.
    """

    max_batch: int = 16
    max_context: int | None = None
    prefill_chunk: int = 512
    embed_cache_mb: float = 256.0
    prefix_cache_mb: float = 512.0
    max_queue: int = 256
    preprocess_workers: int = 2
    dtype: str | None = None
    prune_keep_ratio: float = 1.0
    prune_method: str = "attention"
    device: str = "cpu"
    model_name: str | None = None


def check_sampling(sp: SamplingParams) -> None:
    if not isinstance(sp.max_tokens, int) or sp.max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {sp.max_tokens!r}", param="max_tokens")
    if sp.temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {sp.temperature}", param="temperature")
    if not 0.0 < sp.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {sp.top_p}", param="top_p")
