"""`python infer.py ckpt=PATH …`: answer one prompt (streamed), chat, answer a file of requests,
or evaluate on held-out shards. The first three run on the serving engine (the `engine` config
group, `vlm.serve.local`); evaluation runs the validation loop over batches of shards.

    python infer.py ckpt=PATH image=a.png prompt="…"
    python infer.py ckpt=PATH 'image=[a.png,b.png]' prompt="Which image has more shapes, the first or the second?"
    python infer.py ckpt=PATH video=clip.mp4 prompt="Which way is the red circle moving?"
    python infer.py ckpt=PATH video=frames/ prompt="…"          # a folder of frames (sorted by name)
    python infer.py ckpt=PATH chat=true [image=a.png]           # a terminal chat (vlm/serve/chat.py)
    python infer.py ckpt=PATH requests=in.jsonl out=answers.jsonl   # OpenAI request bodies (vlm/serve/batch.py)

Images come first (media 0, 1, …), then videos, placed before or after the prompt as in training
(`template.image_position`).

Model, image processor, template and tokenizer all come from the checkpoint, never from a
training config, so preprocessing at inference is the preprocessing the model was trained with.
"""

from __future__ import annotations

import json
import time

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from vlm.checkpoint.load import LoadedVLM, load_checkpoint
from vlm.data.collate import Collator
from vlm.data.media import MediaError
from vlm.data.sample import SampleTransform, format_skips
from vlm.data.webdataset import ShardDataset
from vlm.evaluation.evaluate import Evaluator
from vlm.serve import local
from vlm.serve.local_media import checked_image, path_list, read_video
from vlm.serve.memory import freeze_loaded_objects, keep_freed_memory
from vlm.serve.threads import single_threaded


def _stop_ids(loaded: LoadedVLM) -> list[int]:
    from vlm.build.model import stop_ids

    return stop_ids(loaded.tokenizer, loaded.config.get("template"))


def evaluate(
    loaded: LoadedVLM,
    shards,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    num_workers: int = 1,
    out_path: str | None = None,
    max_samples: int | None = None,
    prune: dict | None = None,
) -> dict:
    """Greedy answers on held-out shards (`vlm.evaluation.evaluate.Evaluator`, the loop validation uses);
    returns {'table': str, 'metrics': exact match per type (and 'mean', 'overall'), 'cer': character
    error rate per type, 'n': int, 'seconds': float, 'skipped': {...}, 'visual_tokens': mean visual
    tokens per sample the decoder saw}."""
    proc = SampleTransform(loaded.processor, loaded.template, mode="eval")
    ds = ShardDataset(shards, proc, train=False)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=min(num_workers, len(ds.urls)),
        collate_fn=Collator(loaded.tokenizer.pad_id, "left"),
    )
    evaluator = Evaluator(loaded.tokenizer, loaded.config.get("val_qtypes"), _stop_ids(loaded), max_new_tokens, prune)
    t0 = time.perf_counter()
    out = open(out_path, "w") if out_path else None  # noqa: SIM115 - closed in the finally below
    try:
        for batch in loader:
            scored = evaluator.step(loaded.model, batch)
            if scored is not None and out:
                out.writelines(json.dumps(row) + "\n" for row in scored.rows())
            if max_samples and evaluator.n >= max_samples:
                break
    finally:
        if out:
            out.close()
    res = evaluator.compute()
    return {"table": evaluator.table(res), **res, "seconds": time.perf_counter() - t0}


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt"):
        raise FileNotFoundError("no checkpoint given: pass ckpt=PATH (a .ckpt file or an export folder)")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    keep_freed_memory()  # activations reuse freed pages instead of faulting in new ones (`vlm.serve.memory`)
    if cfg.get("chat") or cfg.get("requests"):
        # an engine thread runs the model: this one loads it and talks to the user single-threaded,
        # so the engine's OpenMP team is the process's only one (`vlm.serve.threads`)
        with single_threaded():
            return _run_engine(cfg)
    return _run_here(cfg)


def _run_engine(cfg: DictConfig) -> dict:
    loaded = _load(cfg)
    freeze_loaded_objects()  # the collector's full passes no longer walk the model (`vlm.serve.memory`)
    return local.chat(loaded, cfg) if cfg.get("chat") else local.batch(loaded, cfg)


def _load(cfg: DictConfig) -> LoadedVLM:
    loaded = load_checkpoint(cfg.ckpt)
    if loaded.model.lora is not None or cfg.get("adapter"):  # adapters folded into the weights
        from vlm.checkpoint.adapters import for_inference

        loaded = for_inference(loaded, cfg.get("adapter"))
    torch.manual_seed(cfg.seed)
    return loaded


def _run_here(cfg: DictConfig) -> dict:
    loaded = _load(cfg)
    prune = dict(cfg.get("infer", {}).get("prune") or {}) or None
    data = cfg.get("data")
    if data and data.get("val_shards"):
        res = evaluate(
            loaded,
            data.val_shards,
            data.get("batch_size", 64),
            cfg.max_new_tokens,
            data.get("num_workers", 1),
            cfg.get("out"),
            data.get("max_samples"),
            prune,
        )
        print(res["table"])
        print(f"{res['n']} samples in {res['seconds']:.1f} s; " + format_skips(res["skipped"], "evaluation"))
        if cfg.get("out"):
            print(f"predictions written to {cfg.out}")
        return res
    if cfg.get("prompt") is None:
        raise FileNotFoundError('nothing to do: pass image=PATH (or video=PATH) prompt="…" or data=synthvqa_heldout')
    return local.answer(loaded, cfg)


__all__ = ["MediaError", "checked_image", "evaluate", "path_list", "read_video", "run"]
