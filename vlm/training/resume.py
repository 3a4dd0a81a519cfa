"""Per-rank state in a checkpoint, for exact resume.

Lightning writes the checkpoint from rank 0 (or rank 0's metadata file beside a sharded one), so
state that differs per rank (RNG states, data positions) is gathered into one entry,
`{"world_size": W, "ranks": [state of rank 0, …]}`, and each rank takes its own back on load —
when the world size is the same; otherwise nothing per rank can be continued exactly.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_ranks(mine: object) -> dict:
    """Every rank's `mine`, on every rank: a collective, to be called by all ranks at once."""
    _, world = _rank_world()
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    return {"world_size": world, "ranks": ranks}


def same_world(saved: dict) -> bool:
    return int(saved.get("world_size", 1)) == _rank_world()[1]


def my_rank(saved: dict) -> object | None:
    """This rank's entry of a `gather_ranks` dict; None when it was saved by another world size."""
    rank, _ = _rank_world()
    return saved["ranks"][rank] if same_world(saved) else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def legacy_data_state(res: dict, step: int) -> dict:
    """The datamodule state of a checkpoint written before the datamodule saved its own: each
    rank's data position was its `data` entry in `vlm_resume` (Lightning calls the datamodule's
    `load_state_dict` only when the datamodule's own entry exists)."""
    return {"step": step, "world_size": res["world_size"], "ranks": [r.get("data") for r in res["ranks"]]}
