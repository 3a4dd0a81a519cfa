"""Scale-out: FSDP2 sharding, activation checkpointing and compile for the VLM (torchtitan style).

`setup_model` (from `VLMModule.configure_model`) calls `parallelize(model, cfg, mesh, precision)`
once, and with `parallel.init=rank0` fills the shards from rank 0's weights. Under a
model-parallel strategy (`trainer=fsdp`) it applies, in this order:

1. activation checkpointing per transformer block (`ac: none | full | selective`; selective
   checkpoints every `ac_every`-th block),
2. `torch.compile` per block (`compile: true`),
3. `fully_shard` per decoder block, the vision tower as one unit, the projector as one unit, then
   the root (token embeddings + final norm + the LM head tied to them).

Under other strategies (single device, DDP) only steps 1 and 2 are applied, when asked for.
Checkpointing and compile wrap each block's `forward` in place, so parameter names (and so
checkpoints, optimizer groups and the export folder) do not change with these options.

Mixed precision: with a `bf16*` trainer precision (`mixed_precision: auto`), FSDP keeps fp32
sharded master weights, all-gathers them as bf16 for compute and reduce-scatters gradients in fp32.

Frozen components (`model.freeze`) are sharded like the rest; they have no gradients, and
`vlm.training.optim.param_groups` leaves them out of the optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn

log = logging.getLogger("vlm.training.parallel")

AC_MODES = ("none", "full", "selective")
INIT_MODES = ("rank0", "all_ranks")


@dataclass
class ParallelConfig:
    ac: str = "none"  # activation checkpointing: none | full (every block) | selective
    ac_every: int = 2  # selective: checkpoint every n-th block
    compile: bool = False  # torch.compile each transformer block
    compile_backend: str = "inductor"
    mixed_precision: str = "auto"  # auto (bf16 params / fp32 reduce when precision is bf16*) | none | bf16
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps gathered params until backward (ZeRO-2)
    init: str = "rank0"  # sharded only: rank0 (others build on meta, get rank 0's weights) | all_ranks

    def __post_init__(self):
        if self.ac not in AC_MODES:
            raise ValueError(f"parallel.ac must be one of {AC_MODES}, got {self.ac!r}")
        if self.ac_every < 1:
            raise ValueError(f"parallel.ac_every must be >= 1, got {self.ac_every}")
        if self.mixed_precision not in ("auto", "none", "bf16"):
            raise ValueError(f"parallel.mixed_precision must be auto, none or bf16, got {self.mixed_precision!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"parallel.init must be one of {INIT_MODES}, got {self.init!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> ParallelConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown parallel options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: vision blocks then decoder layers."""
    return list(model.encoder.blocks) + list(model.decoder.layers)


def apply_ac(block_list: list[nn.Module], mode: str, every: int = 2) -> int:
    """Wrap each chosen block's forward in non-reentrant activation checkpointing. Returns the count."""
    if mode == "none":
        return 0
    from torch.utils.checkpoint import checkpoint

    n = 0
    for i, block in enumerate(block_list):
        if mode == "selective" and i % every:
            continue
        block.forward = partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
        n += 1
    return n


def apply_compile(block_list: list[nn.Module], backend: str = "inductor") -> None:
    for block in block_list:
        block.forward = torch.compile(block.forward, backend=backend)


def mp_policy(cfg: ParallelConfig, precision: str | None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if str(precision or "").startswith("bf16") else "none"
    if mode == "none":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def parallelize(
    model: nn.Module, cfg: ParallelConfig | dict | None, mesh=None, precision: str | None = None
) -> nn.Module:
    """AC -> compile -> fully_shard (per decoder block, vision tower, projector, root). In place.

    With `mesh=None` (single device, DDP) only activation checkpointing and compile are applied."""
    cfg = cfg if isinstance(cfg, ParallelConfig) else ParallelConfig.from_dict(cfg)
    bl = blocks(model)
    n_ac = apply_ac(bl, cfg.ac, cfg.ac_every)
    if cfg.compile:
        apply_compile(bl, cfg.compile_backend)
    if mesh is None:
        log.info("parallelize: %d blocks checkpointed (%s), compile=%s, not sharded", n_ac, cfg.ac, cfg.compile)
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kw = dict(mesh=mesh, mp_policy=mp_policy(cfg, precision))
    layers = list(model.decoder.layers)
    for i, layer in enumerate(layers):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward and i < len(layers) - 1, **kw)
    fully_shard(model.encoder, reshard_after_forward=cfg.reshard_after_forward, **kw)
    fully_shard(model.projector, reshard_after_forward=cfg.reshard_after_forward, **kw)
    if getattr(model, "cross_attn", None) is not None:
        for blk in model.cross_attn.blocks:
            fully_shard(blk, reshard_after_forward=cfg.reshard_after_forward, **kw)
            register_fsdp_forward_method(blk, "media_kv")  # called outside `forward`
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kw)
    # `logits` (the tied LM head) runs outside `forward`: let FSDP gather the root for it too.
    register_fsdp_forward_method(model, "logits")
    log.info(
        "parallelize: %d blocks checkpointed (%s), compile=%s, %d decoder units + vision + projector + root, mp=%s",
        n_ac,
        cfg.ac,
        cfg.compile,
        len(layers),
        kw["mp_policy"].param_dtype,
    )
    return model


def setup_model(
    model: nn.Module,
    cfg: ParallelConfig | dict | None,
    mesh=None,
    precision: str | None = None,
    device: torch.device | None = None,
) -> bool:
    """Under a model-parallel strategy (`mesh`: its data-parallel mesh) activation checkpointing,
    compile and FSDP2; under other strategies only checkpointing and compile, when `cfg.ac` /
    `cfg.compile` ask. Returns whether the model was changed (then it must not be set up again).

    `parallel.init=rank0` with more than one rank: rank 0 holds the full weights (taken before
    sharding), the other ranks a meta skeleton; they are broadcast into every rank's shards."""
    import torch.distributed as dist

    cfg = cfg if isinstance(cfg, ParallelConfig) else ParallelConfig.from_dict(cfg)
    if mesh is None:
        if cfg.ac == "none" and not cfg.compile:
            return False
        parallelize(model, cfg, None, precision)
        return True
    rank0_init = cfg.init == "rank0" and dist.get_world_size() > 1
    full = model.state_dict() if rank0_init and dist.get_rank() == 0 else None
    parallelize(model, cfg, mesh, precision)
    if rank0_init:
        load_from_rank0(model, full, device)
        del full
    elif any(p.is_meta for p in model.parameters()):
        raise RuntimeError("the model was built on the meta device but parallel.init is not rank0")
    return True


def unsharded_copy(model: nn.Module, build, device: torch.device) -> nn.Module:
    """A plain copy of a sharded model in eval mode, built by `build()` and filled with the
    gathered weights (a collective). Generation in validation uses it: ranks hold different
    numbers of batches and stop generating at different steps, so a sharded forward (an
    all-gather per unit) would deadlock."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = build().to(device)
    copy.load_state_dict(state, strict=False)
    return copy.eval()


def load_from_rank0(model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """After `parallelize`: fill every rank's shards from rank 0's full state dict (`parallel.init=rank0`).

    Rank 0 built the model for real (pretrained parts read from their memory-mapped safetensors,
    the rest initialised) and passes `full`, taken before sharding; the other ranks built it on the
    meta device (`vlm.model.hf.skeleton`) and pass None, so a 7B decoder is read and held in full
    once per job, not once per rank. Each tensor is broadcast and each rank keeps its own shard
    (`set_model_state_dict(broadcast_from_rank0=True)`); buffers that are not saved (rotary
    frequencies) are broadcast too, since a meta build computed none."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if (full is None) != (rank != 0):
        raise RuntimeError(f"load_from_rank0: rank {rank} {'has' if full is not None else 'lacks'} the full state dict")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for _, buf in model.named_buffers():
            if buf.device.type != "meta":
                dist.broadcast(buf, src=0)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict. Collective when sharded: call on every rank; rank 0 gets
    the tensors, other ranks an empty dict."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


try:
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        """Lightning's `ModelParallelStrategy` with FSDP2 as the default layout: all devices of all
        nodes form one data-parallel (sharding) group unless sizes are given."""

        def __init__(self, data_parallel_size="auto", tensor_parallel_size=1, **kwargs):
            super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

        def setup_environment(self) -> None:
            if self._tensor_parallel_size == "auto":
                self._tensor_parallel_size = 1
            if self._data_parallel_size == "auto":
                world = self.num_nodes * self.num_processes
                if world % int(self._tensor_parallel_size):
                    raise ValueError(
                        f"world size {world} is not divisible by tensor_parallel_size {self._tensor_parallel_size}"
                    )
                self._data_parallel_size = world // int(self._tensor_parallel_size)
            if int(self._tensor_parallel_size) != 1:
                raise ValueError("vlm.training.parallel supports data-parallel sharding only (tensor_parallel_size=1)")
            super().setup_environment()
except ImportError:  # pragma: no cover - lightning always present in this project
    pass


def is_sharded_strategy(strategy) -> bool:
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(strategy, ModelParallelStrategy)
