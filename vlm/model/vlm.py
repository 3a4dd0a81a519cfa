"""The VLM: encoder -> projector -> visual tokens scattered into placeholder slots -> decoder.

`fusion="interleave"`: the text sequence holds one placeholder token per visual token (the template
sizes each span with `visual_token_count`); the projected visual tokens replace the placeholder
embeddings in order. The count is checked per sample and a mismatch names the sample.

`fusion="cross_attn"`: the text holds one marker token per media item; the visual tokens are read
by tanh-gated cross-attention blocks before every `cross_attn.every`-th decoder layer
(`vlm.model.cross_attention`). The same per-sample check applies (one marker per item).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vlm.model.attention import KVCache, causal_mask, packed_block_mask
from vlm.model.config import CrossAttnConfig, FreezeConfig, ModelSpec
from vlm.model.cross_attention import CrossAttentionFusion, pad_media
from vlm.model.decoder import Decoder
from vlm.model.projector import Projector, token_grid
from vlm.model.vision import VisionEncoder


class VisualTokenMismatch(ValueError):
    """Placeholder count and visual-token count disagree for a sample."""


def media_span_ids(is_media: Tensor) -> Tensor:
    """`[B, L]` bool -> `[B, L]` int: k > 0 on the k-th contiguous media span of the row, 0 on text."""
    starts = is_media & ~torch.nn.functional.pad(is_media, (1, 0))[:, :-1]
    return starts.long().cumsum(-1) * is_media


class VLM(nn.Module):
    def __init__(
        self,
        encoder: VisionEncoder,
        projector: Projector,
        decoder: Decoder,
        media_token_ids: Sequence[int],
        image_attention: str = "causal",
        fusion: str = "interleave",
        cross_attn: dict | CrossAttnConfig | None = None,
        packed_attention: str = "sdpa",
        freeze: dict | FreezeConfig | None = None,
    ):
        """cross_attn: `CrossAttnConfig` fields (fusion=cross_attn). freeze: `FreezeConfig`
        fields, recorded in `spec` (`vlm.training.optim.apply_freeze` applies them)."""
        super().__init__()
        # validated together, as one spec (vlm.model.config)
        spec = ModelSpec(
            encoder.config,
            projector.config,
            decoder.config,
            image_attention=image_attention,
            fusion=fusion,
            packed_attention=packed_attention,
            cross_attn=cross_attn if isinstance(cross_attn, CrossAttnConfig) else CrossAttnConfig(**(cross_attn or {})),
            freeze=freeze if isinstance(freeze, FreezeConfig) else FreezeConfig(**(freeze or {})),
        )
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.register_buffer("media_token_ids", torch.tensor(list(media_token_ids)), persistent=False)
        self.image_attention, self.fusion, self.packed_attention = image_attention, fusion, packed_attention
        self.cross_attn_config, self.freeze = spec.cross_attn, spec.freeze
        self.lora = None  # the adapters' LoraConfig once `vlm.model.lora.apply_lora` has added them
        self.cross_attn: CrossAttentionFusion | None = None
        if fusion == "cross_attn":
            d = decoder.config
            c = spec.cross_attn
            self.cross_attn = CrossAttentionFusion(
                d.dim, d.n_heads, d.kv_heads, d.mlp_width, d.n_layers, every=c.every, media=c.media, norm_eps=c.norm_eps
            )

    @property
    def spec(self) -> ModelSpec:
        """The model's spec, read from its parts (a grown vocabulary included): what checkpoints store."""
        return ModelSpec(
            self.encoder.config,
            self.projector.config,
            self.decoder.config,
            image_attention=self.image_attention,
            fusion=self.fusion,
            packed_attention=self.packed_attention,
            cross_attn=self.cross_attn_config,
            freeze=self.freeze,
            lora=self.lora,
        )

    def token_grid(self, grid_thw) -> tuple[int, int, int]:
        """The LLM-side token grid of one media item: what the template lays out in the text."""
        return token_grid(grid_thw, self.projector.merge_size, self.projector.queries, self.fusion)

    def token_count(self, grid_thw) -> int:
        t, h, w = self.token_grid(grid_thw)
        return t * h * w

    def encode_media(self, pixel_patches: Tensor, grid_thw: Tensor) -> Tensor:
        """`[N, C·P·P]` patches of M items -> `[Σ token_count, D_llm]` visual tokens, item order.

        Patches come from the processor in float32; they are cast to the encoder's dtype here, so
        a model cast to bf16 for inference takes the same batches."""
        param = next(self.encoder.parameters(), None)
        if param is not None and pixel_patches.is_floating_point() and pixel_patches.dtype != param.dtype:
            pixel_patches = pixel_patches.to(param.dtype)
        return self.projector(self.encoder(pixel_patches, grid_thw), grid_thw)

    def is_media(self, input_ids: Tensor) -> Tensor:
        return torch.isin(input_ids, self.media_token_ids)

    def embed(
        self,
        input_ids: Tensor,
        pixel_patches: Tensor | None = None,
        grid_thw: Tensor | None = None,
        media_per_sample: Tensor | None = None,
        keys: Sequence[str] | None = None,
    ) -> Tensor:
        """Token embeddings `[B, L, D]` with visual tokens written into the placeholder slots
        (`fusion=interleave`; with `cross_attn` the markers keep their own embedding)."""
        return self._embed(input_ids, pixel_patches, grid_thw, media_per_sample, keys)[0]

    def _embed(self, input_ids, pixel_patches=None, grid_thw=None, media_per_sample=None, keys=None):
        """-> (embeds `[B, L, D]`, visual tokens `[Σ, D]` or None, per-item projector token counts)."""
        embeds = self.decoder.embed_tokens(input_ids)
        is_media = self.is_media(input_ids)
        n_slots = is_media.sum(-1)  # [B]
        n_media = 0 if grid_thw is None else grid_thw.shape[0]
        if n_media == 0:
            if n_slots.any():
                b = int(n_slots.nonzero()[0, 0])
                raise VisualTokenMismatch(f"sample {_name(keys, b)}: {int(n_slots[b])} media placeholders but no media")
            return embeds, None, []
        grids = grid_thw.tolist()
        self._check_counts(n_slots, [self.token_count(g) for g in grids], media_per_sample, keys)
        visual = self.encode_media(pixel_patches, grid_thw)
        if self.fusion == "cross_attn":
            return embeds, visual, [self.projector.token_count(g) for g in grids]
        # Row-major placeholder order == sample order of media == order of `visual`.
        return embeds.masked_scatter(is_media[..., None], visual.to(embeds.dtype)), visual, []

    @staticmethod
    def _check_counts(n_slots: Tensor, counts: list[int], media_per_sample, keys) -> None:
        n_slots = n_slots.tolist()
        if media_per_sample is None:
            if sum(n_slots) != sum(counts):
                raise VisualTokenMismatch(
                    f"batch has {sum(n_slots)} media placeholders but its media give {sum(counts)} visual tokens"
                )
            return
        start = 0
        for b, m in enumerate(media_per_sample.tolist()):
            expected = sum(counts[start : start + m])
            if n_slots[b] != expected:
                raise VisualTokenMismatch(
                    f"sample {_name(keys, b)}: {n_slots[b]} media placeholders but its {m} media item(s) "
                    f"give {expected} visual tokens ({counts[start : start + m]})"
                )
            start += m
        if start != len(counts):
            raise VisualTokenMismatch(f"media_per_sample sums to {start} but the batch has {len(counts)} media items")

    def attention_mask(
        self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None, seq_ids: Tensor | None = None
    ) -> Tensor | None:
        """Bool mask for the decoder, or None when plain causal attention is exact.

        attention_mask: `[B, past + L]` key validity (1 = real token), HF convention.
        seq_ids: `[B, L]` packed rows (k = the row's k-th sample, 0 = padding): attention stays
        inside each sample (block-diagonal causal).
        """
        L = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        bidir = self.image_attention == "bidirectional" and L > 1
        if seq_ids is not None:
            if past:
                raise ValueError("packed rows (seq_ids) are for training forwards, not cached decoding")
            spans = media_span_ids(self.is_media(input_ids)) if bidir else None
            if self.packed_attention == "flex":
                return packed_block_mask(seq_ids, spans)
            base = causal_mask(L, L, attention_mask, spans, spans, device=input_ids.device)
            same = (seq_ids[:, :, None] == seq_ids[:, None, :]) | torch.eye(
                L, dtype=torch.bool, device=input_ids.device
            )
            return base & same[:, None]
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and past == 0 and not bidir:
            # Right padding needs no mask: real tokens never look at later (pad) positions.
            am = attention_mask.bool()
            if bool((am[:, 1:] <= am[:, :-1]).all()):
                padded = False
        if not padded and not bidir and (past == 0 or L == 1):
            return None
        spans = media_span_ids(self.is_media(input_ids)) if bidir else None
        if spans is not None and past:
            spans_k = torch.nn.functional.pad(spans, (past, 0))
        else:
            spans_k = spans
        return causal_mask(L, past + L, attention_mask if padded else None, spans, spans_k, device=input_ids.device)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_patches: Tensor | None = None,
        grid_thw: Tensor | None = None,
        media_per_sample: Tensor | None = None,
        keys: Sequence[str] | None = None,
        cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        seq_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids: `[B, L]`; position_ids: `[B, L]` or `[3, B, L]`; returns hidden `[B, L, D]`.
        Use `self.logits(hidden)` on the positions that need them. inputs_embeds: precomputed
        embeddings (e.g. after visual-token pruning, `vlm.model.prune`), used instead of embedding.
        seq_ids: `[B, L]` for packed rows (`vlm.data.packing`): block-diagonal attention."""
        if inputs_embeds is not None:
            embeds, visual, counts = inputs_embeds, None, []
        else:
            embeds, visual, counts = self._embed(input_ids, pixel_patches, grid_thw, media_per_sample, keys)
        mask = self.attention_mask(input_ids, attention_mask, cache, seq_ids)
        before = None
        if self.cross_attn is not None:
            media = item = None
            if visual is not None:
                mps = media_per_sample.tolist() if media_per_sample is not None else [len(counts)]
                media, item = pad_media(visual.to(embeds.dtype), counts, mps)
            st = self.cross_attn.state(self.is_media(input_ids), media, item, cache)
            if st is not None:

                def before(i: int, x: Tensor, st=st) -> Tensor:
                    return self.cross_attn.apply(i, x, st)

        return self.decoder(embeds, position_ids, mask, cache, before)

    def fuse_projections(self, enabled: bool = True) -> int:
        """Inference: every attention's q/k/v and every SwiGLU's gate/up projections run as one GEMM
        each (`vlm.model.attention.FusedLinears`: same parameters, now views of one buffer; training
        and grad-enabled forwards use the layers one by one). `enabled=False` undoes it (the layers
        keep their weights). Returns how many modules are fused."""
        mods = [m for m in self.modules() if m is not self and hasattr(m, "fuse_projections")]
        return sum(bool(m.fuse_projections(enabled)) for m in mods)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.decoder.lm_head(hidden)


def _name(keys, b: int) -> str:
    return repr(keys[b]) if keys is not None and b < len(keys) else f"#{b}"
