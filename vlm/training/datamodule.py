"""LightningDataModule over WebDataset shards (synthvqa by default, any chat/document shards).

Exact resume of the data position lives here. While training, `on_before_batch_transfer` counts
the batches the model consumes (`StreamTracker`); `state_dict` (every checkpoint) turns them into
each rank's stream positions. On restore (`trainer.fit(ckpt_path=…)`) Lightning calls
`load_state_dict` while it sets up, right after the module's `on_load_checkpoint` and before the
optimizer and loop state are restored; `train_dataloader()` comes later, when the fit loop
starts. So the positions are kept until then and handed to the training dataset it creates, as
its `resume` argument.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from vlm.build.model import build_processor, build_template, geometry_of
from vlm.data.collate import Collator
from vlm.data.sample import SampleTransform
from vlm.data.webdataset import (
    MAX_MEMBER_BYTES,
    MAX_SAMPLE_BYTES,
    ShardDataset,
    StreamTracker,
    expand_urls,
    seed_worker,
)
from vlm.model.geometry import PROCESSOR_KEYS, SOURCES, TEMPLATE_KEYS, VIDEO_KEYS, Geometry
from vlm.tokenizer import TextTokenizer
from vlm.training.resume import gather_ranks, my_rank


class VLMDataModule(L.LightningDataModule):
    """Args:
    train_shards / val_shards: a directory of `.tar` shards, a glob, a brace pattern or a list.
    tokenizer: path to `tokenizer.json`.
    processor: ImageProcessor config, with the VideoProcessor keys under `processor.video`
        (temporal_patch, target_fps, max_frames, max_video_tokens, …); built into one
        `MediaProcessor` (`self.media_processor`, whose `to_config()` is what checkpoints store,
        `video` included; `self.video_processor` is its video half).
    template: ChatTemplate config (max_length, image_position, jinja, …).
    geometry: the model's media geometry (`vlm.model.geometry.Geometry`, or its dict; or `attach` it before
        `setup`): patch_size, merge_size, temporal_patch, the token layout and rope come from the
        model config, never from these data keys (`build_datamodule` does both from a training
        config). Without one, `processor` / `template` must carry those keys themselves.
    synthetic: when set, synthvqa is generated under `synthetic.root` on first use.
    sources: a mixture (`data=mix`, `vlm.data.mixture`): `[{name, shards, weight, task, prompts?}]`;
        replaces `train_shards` for training.
    max_member_bytes / max_sample_bytes: the largest tar member and the largest sample (all its
        members) a shard may hold; larger ones are skipped from their tar headers, unread.
    packing: pack training samples into rows of `pack_length` tokens (null = the template's
        `max_length`) with `pack_method` (best_fit | greedy) over windows of `pack_window` samples
        (`vlm.data.packing`); `batch_size` then counts rows.
    """

    def __init__(
        self,
        train_shards,
        val_shards,
        tokenizer: str,
        processor: dict,
        template: dict,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 1,
        val_num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_consecutive_failures: int = 50,
        max_image_pixels: int = 50_000_000,
        pin_memory: bool = False,
        synthetic: dict | None = None,
        qtypes: list[str] | None = None,
        packing: bool = False,
        pack_length: int | None = None,
        pack_method: str = "best_fit",
        pack_window: int = 256,
        sources: list[dict] | None = None,
        max_bad_fraction: float = 0.5,
        bad_window: int = 1000,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
        geometry: Geometry | dict | None = None,
    ):
        super().__init__()
        self.cfg = dict(
            train_shards=train_shards,
            val_shards=val_shards,
            tokenizer=tokenizer,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            val_num_workers=val_num_workers,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            max_consecutive_failures=max_consecutive_failures,
            max_image_pixels=max_image_pixels,
            pin_memory=pin_memory,
            max_bad_fraction=max_bad_fraction,
            bad_window=bad_window,
            max_member_bytes=max_member_bytes,
            max_sample_bytes=max_sample_bytes,
        )
        self.processor_cfg, self.template_cfg = dict(processor), dict(template)
        self.sources = [dict(x) for x in sources] if sources else None
        self.packing = None
        if packing:
            length = int(pack_length or self.template_cfg.get("max_length", 512))
            if length < int(self.template_cfg.get("max_length", 0)):
                raise ValueError(
                    f"data.pack_length={length} is shorter than data.template.max_length="
                    f"{self.template_cfg['max_length']}: the longest samples would not fit a row"
                )
            self.packing = {"length": length, "method": pack_method, "window": int(pack_window)}
        self.synthetic = dict(synthetic) if synthetic else None
        self.qtypes = list(qtypes) if qtypes else None  # question types scored separately in validation
        self.tokenizer: TextTokenizer | None = None
        self.tracker = StreamTracker()  # the training batches consumed, per DataLoader worker
        # a checkpoint's data position, from `load_state_dict` until `train_dataloader` takes it
        self.pending_resume: dict | None = None
        self.geometry: Geometry | None = None
        if geometry is not None:
            self.attach(geometry)

    def attach(self, geometry: Geometry | dict) -> VLMDataModule:
        """Use the model's geometry (before `setup`). The data config may not repeat it: a
        `processor.patch_size`, `template.merge_size`, … there is refused, naming the model key."""
        g = geometry if isinstance(geometry, Geometry) else Geometry(**dict(geometry))
        for section, cfg, keys in (
            ("processor", self.processor_cfg, PROCESSOR_KEYS),
            ("processor.video", self.processor_cfg.get("video") or {}, VIDEO_KEYS),
            ("template", self.template_cfg, TEMPLATE_KEYS),
        ):
            for key, field in keys.items():
                if key in cfg:
                    raise ValueError(
                        f"data.{section}.{key}={cfg[key]!r}: the media geometry comes from the model config, "
                        f"not the data config; set {SOURCES[field]} instead (it is {getattr(g, field)!r})"
                    )
        self.geometry = g
        return self

    def prepare_data(self) -> None:
        if self.synthetic:
            from vlm.synthvqa import SynthConfig, ensure_synthvqa

            opts = dict(self.synthetic)
            root = opts.pop("root")
            cfg_fields = {k: opts.pop(k) for k in list(opts) if k in SynthConfig.__dataclass_fields__}
            ensure_synthvqa(root, cfg=SynthConfig(**cfg_fields), **opts)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.prepare_data()  # idempotent; makes `setup` alone enough for tests and inference
        tok_path = Path(self.cfg["tokenizer"])
        if tok_path.is_dir():  # a pretrained model's folder
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {tok_path}")
        self.tokenizer = TextTokenizer.from_file(tok_path)
        self.media_processor = build_processor(self.processor_cfg, geometry=self.geometry)
        self.video_processor = self.media_processor.video
        from vlm.build.model import resolve_template_config

        self.template_cfg = resolve_template_config(self.template_cfg)  # a jinja path -> its text (checkpoints)
        self.template = build_template(self.template_cfg, self.tokenizer, geometry=self.geometry)
        # Fail now, with the path in the message, not minutes later inside the Trainer.
        if self.sources:
            for src in self.sources:
                try:
                    expand_urls(src.get("shards") or [])
                except (FileNotFoundError, ValueError) as e:
                    raise FileNotFoundError(f"data.sources[{src.get('name')}].shards: {e}") from None
        else:
            expand_urls(self.cfg["train_shards"])
        expand_urls(self.cfg["val_shards"])

    def _loader(self, shards, train: bool, resume: dict | None = None) -> DataLoader:
        c = self.cfg
        limits = {k: c[k] for k in ("max_member_bytes", "max_sample_bytes")}
        proc = SampleTransform(
            self.media_processor, self.template, mode="train" if train else "eval", max_pixels=c["max_image_pixels"]
        )
        if train and self.sources:
            from vlm.data.mixture import MixtureDataset

            ds = MixtureDataset(
                self.sources,
                proc,
                seed=c["seed"],
                shuffle_buffer=c["shuffle_buffer"],
                max_consecutive_failures=c["max_consecutive_failures"],
                packing=self.packing,
                max_bad_fraction=c["max_bad_fraction"],
                bad_window=c["bad_window"],
                resume=resume,
                **limits,
            )
        else:
            ds = ShardDataset(
                shards,
                proc,
                train=train,
                shuffle_buffer=c["shuffle_buffer"],
                seed=c["seed"],
                max_consecutive_failures=c["max_consecutive_failures"],
                packing=self.packing if train else None,
                max_bad_fraction=c["max_bad_fraction"],
                bad_window=c["bad_window"],
                resume=resume,
                **limits,
            )
        workers = c["num_workers"] if train else min(c["val_num_workers"], len(ds.urls))
        return DataLoader(
            ds,
            batch_size=c["batch_size"] if train else c["val_batch_size"],
            num_workers=workers,
            collate_fn=Collator(self.tokenizer.pad_id, "right" if train else "left"),
            pin_memory=c["pin_memory"],
            persistent_workers=train and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=seed_worker if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        resume, self.pending_resume = self.pending_resume, None  # a resume point is used once
        return self._loader(self.cfg["train_shards"], train=True, resume=resume)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.cfg["val_shards"], train=False)

    def val_urls(self) -> list[str]:
        return expand_urls(self.cfg["val_shards"])

    # ---- exact resume ---------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count each training batch as the training loop takes it for a step (batches the
        DataLoader prefetched are not consumed yet)."""
        if self.trainer is not None and self.trainer.training:
            self.tracker.on_batch(self.trainer.train_dataloader, batch["input_ids"].shape[0])
        return batch

    def state_dict(self) -> dict:
        """`{"step", "world_size", "ranks": [each rank's stream positions or None]}`; None for a
        mixture, which resumes by reseeding from the step. A collective: every rank saves."""
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        ds = getattr(loader, "dataset", None)
        mine = self.tracker.state(loader) if isinstance(ds, ShardDataset) and ds.train else None
        return {"step": trainer.global_step if trainer is not None else 0, **gather_ranks(mine)}

    def load_state_dict(self, state: dict) -> None:
        """Keep this rank's positions for the next `train_dataloader()`. Saved with another world
        size, they cannot be continued: the streams are then reseeded from the step."""
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return
        self.pending_resume = {"state": my_rank(state), "step": int(state.get("step", 0))}

    def teardown(self, stage: str) -> None:
        self.pending_resume = None  # a position no training dataset took must not reach a later fit


def build_datamodule(cfg, geometry: Geometry | None = None) -> VLMDataModule:
    """The datamodule of a composed training config (`cfg.data`), with the geometry of its model
    (`cfg.model`, or `geometry` when the caller already derived it)."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, _convert_="all")
    return dm.attach(geometry if geometry is not None else geometry_of(cfg.model))
