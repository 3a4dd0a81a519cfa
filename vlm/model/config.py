"""The model spec: one typed config per component, the single source of truth for the model.

`EncoderConfig`, `ProjectorConfig` and `DecoderConfig` hold the arguments of `VisionEncoder`,
`Projector` and `Decoder` (each module keeps its config as `.config`; `Class.from_config(cfg)`
builds it); `ModelSpec` holds the three plus the model-level choices (`fusion`, …). Each config
validates itself when made (`__post_init__`: field types and ranges via `vlm.model.fields`, then
the combinations, such as `dim % n_heads`), and what follows from the fields is a property
(`head_dim`, the encoder's `out_dim` with several feature layers, the `Geometry`), so no other
place recomputes it.

A pretrained part is resolved to its native config before anything is built
(`vlm.model.hf.specs` reads the folder's `config.json`), so the spec a checkpoint stores
(`ModelSpec.to_dict()`, `_target_` naming the native class of each component) rebuilds the model
without the original folders. `None` in `ProjectorConfig.in_dim` / `out_dim` and
`DecoderConfig.vocab_size` means "follow the encoder / the decoder / the tokenizer";
`ModelSpec` fills the projector's, `vlm.build.model` the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlm.model.fields import Fields, SpecError
from vlm.model.geometry import FUSIONS, ROPES, Geometry

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
PATCH_EMBEDS = ("linear", "conv", "conv_image")
POSITIONS = ("learned", "rope2d")
PROJECTOR_KINDS = ("linear", "mlp", "merge", "pixel_shuffle", "qformer")
IMAGE_ATTENTION = ("causal", "bidirectional")
PACKED_ATTENTION = ("sdpa", "flex")
CROSS_ATTN_MEDIA = ("all", "last")


def _one_of(cfg: Fields, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in allowed:
        raise cfg.fail(key, f"is not one of {', '.join(allowed)}")


def _positive(cfg: Fields, *keys: str) -> None:
    for k in keys:
        v = getattr(cfg, k)
        if v is not None and v < 1:
            raise cfg.fail(k, "must be >= 1")


def _divisible(cfg: Fields, key: str, by: str) -> None:
    a, b = getattr(cfg, key), getattr(cfg, by)
    if a % b:
        raise SpecError(f"{cfg.WHERE}.{key} {a} is not divisible by {cfg.WHERE}.{by} {b}")


@dataclass(frozen=True)
class EncoderConfig(Fields):
    """`VisionEncoder`'s arguments (their meaning: `vlm.model.vision.VisionEncoder`)."""

    WHERE: ClassVar[str] = "model.encoder"
    TARGET: ClassVar[str] = "vlm.model.vision.VisionEncoder"

    patch_size: int = 8
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    channels: int = 3
    pos_grid: int = 8
    patch_embed: str = "linear"
    conv_channels: int = 32
    feature_layer: int = -1
    temporal_patch: int = 1
    pos: str = "learned"
    rope_theta: float = 10000.0
    feature_layers: list[int] | None = None
    feature_combine: str = "concat"
    act: str = "gelu"
    norm_eps: float = 1e-5
    mlp_hidden: int | None = None
    cls_token: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    patch_bias: bool = True
    attention: str = "item"

    def __post_init__(self) -> None:
        self.check_fields()
        _positive(self, "patch_size", "dim", "n_layers", "n_heads", "channels", "pos_grid", "temporal_patch")
        _positive(self, "conv_channels", "mlp_hidden")
        _divisible(self, "dim", "n_heads")
        for key, allowed in (
            ("patch_embed", PATCH_EMBEDS),
            ("pos", POSITIONS),
            ("feature_combine", ("concat", "mean")),
            ("act", ACTIVATIONS),
            ("attention", ("item", "frame")),
        ):
            _one_of(self, key, allowed)
        layers = self.selected_layers
        if not layers:
            raise self.fail("feature_layers", "is empty")
        for i in layers:
            if not -self.n_layers <= i < self.n_layers:
                raise SpecError(f"{self.WHERE}.feature_layer {i} out of range for {self.n_layers} layers")
        if self.patch_embed != "linear" and self.patch_size % 2:
            raise self.fail("patch_size", f"is odd: patch_embed={self.patch_embed} needs an even patch_size")
        if self.cls_token and self.pos != "learned":
            raise self.fail("cls_token", "needs pos=learned")

    @property
    def selected_layers(self) -> list[int]:
        """The layer indices as given (`feature_layers` overrides `feature_layer`)."""
        return [self.feature_layer] if self.feature_layers is None else [int(i) for i in self.feature_layers]

    @property
    def feature_indices(self) -> list[int]:
        """The feature layers counted from 0, sorted, without repeats."""
        return sorted({i % self.n_layers for i in self.selected_layers})

    @property
    def built_layers(self) -> int:
        """Blocks built: those after the last feature layer would never be used."""
        return self.feature_indices[-1] + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or int(self.dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one input patch vector, `C·T·P·P`."""
        return self.channels * self.temporal_patch * self.patch_size**2

    @property
    def out_dim(self) -> int:
        """Width of what the encoder emits: `k·dim` with k concatenated feature layers."""
        return self.dim * len(self.feature_indices) if self.feature_combine == "concat" else self.dim


@dataclass(frozen=True)
class ProjectorConfig(Fields):
    """`Projector`'s arguments (`vlm.model.projector`). `in_dim` / `out_dim` None: what the
    encoder emits / the decoder's width (`ModelSpec` fills them)."""

    WHERE: ClassVar[str] = "model.projector"
    TARGET: ClassVar[str] = "vlm.model.projector.Projector"

    in_dim: int | None = None
    out_dim: int | None = None
    kind: str = "mlp"
    merge_size: int = 1
    hidden: int | None = None
    queries: int | None = None
    blocks: int = 2
    n_heads: int = 4
    dim: int | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.check_fields()
        _positive(self, "in_dim", "out_dim", "merge_size", "hidden", "n_heads", "dim")
        _one_of(self, "kind", PROJECTOR_KINDS)
        if (self.kind == "qformer") != bool(self.queries):
            raise SpecError(
                f"{self.WHERE}.queries is for kind=qformer only (kind={self.kind!r}, queries={self.queries!r})"
            )
        if self.kind == "qformer" and self.query_dim is not None and self.query_dim % self.n_heads:
            raise SpecError(
                f"{self.WHERE}.dim {self.query_dim} is not divisible by {self.WHERE}.n_heads {self.n_heads}"
            )

    @property
    def query_dim(self) -> int | None:
        """The qformer's width: `dim`, or the encoder's feature width."""
        return self.dim or self.in_dim

    @property
    def merged_dim(self) -> int | None:
        """Width of one merged token before the projection, `m²·in_dim`."""
        return None if self.in_dim is None else self.in_dim * self.merge_size**2


@dataclass(frozen=True)
class DecoderConfig(Fields):
    """`Decoder`'s arguments (`vlm.model.decoder`). `vocab_size` None: the tokenizer's."""

    WHERE: ClassVar[str] = "model.decoder"
    TARGET: ClassVar[str] = "vlm.model.decoder.Decoder"

    vocab_size: int | None = None
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    rope: str = "rope"
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.check_fields()
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "max_seq_len")
        _one_of(self, "rope", ROPES)
        _divisible(self, "dim", "n_heads")
        if self.n_heads % self.kv_heads:
            raise SpecError(f"{self.WHERE}.n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise self.fail("mrope_section", f"does not sum to head_dim / 2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_width(self) -> int:
        """`mlp_hidden`, or the Llama rule: 8/3·dim rounded up to a multiple of 64."""
        return self.mlp_hidden or 64 * -(-int(8 * self.dim / 3) // 64)

    @property
    def mrope_sections(self) -> list[int] | None:
        """The (t, h, w) split of the rotary pairs (`rope="mrope"`); an even split by default."""
        if self.rope != "mrope":
            return None
        if self.mrope_section is not None:
            return list(self.mrope_section)
        half = self.head_dim // 2
        return [half - 2 * (half // 3), half // 3, half // 3]


@dataclass(frozen=True)
class CrossAttnConfig(Fields):
    """`fusion=cross_attn`'s blocks (`vlm.model.cross_attention.CrossAttentionFusion`)."""

    WHERE: ClassVar[str] = "model.cross_attn"

    every: int = 2
    media: str = "all"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.check_fields()
        _positive(self, "every")
        _one_of(self, "media", CROSS_ATTN_MEDIA)


@dataclass(frozen=True)
class FreezeConfig(Fields):
    """Per component: a frozen one gets no gradient and no optimizer state."""

    WHERE: ClassVar[str] = "model.freeze"

    encoder: bool = False
    projector: bool = False
    decoder: bool = False
    cross_attn: bool = False

    def __post_init__(self) -> None:
        self.check_fields()


# what `model.lora.targets` may name: the Linear layers of a component's attention or MLP, or the
# projector's (`vlm.model.lora` maps each to module names)
LORA_TARGETS = ("decoder.attn", "decoder.mlp", "encoder.attn", "encoder.mlp", "projector")


@dataclass(frozen=True)
class LoraConfig(Fields):
    """Low-rank adapters (`vlm.model.lora`, built on peft): `r` the rank, `alpha` the scale
    (`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`), `dropout` on the adapter's input,
    `targets` the layers that get one (`LORA_TARGETS`), `use_dora` weight-decomposed adapters.
    `model.lora.r: 0` (the presets' default) or no `lora` key: no adapters."""

    WHERE: ClassVar[str] = "model.lora"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["decoder.attn", "decoder.mlp"])
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.check_fields()
        _positive(self, "r")
        if self.alpha <= 0:
            raise self.fail("alpha", "must be > 0")
        if not 0 <= self.dropout < 1:
            raise self.fail("dropout", "must be in [0, 1)")
        if not self.targets:
            raise self.fail("targets", f"is empty (choose from {', '.join(LORA_TARGETS)})")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise self.fail("targets", f"names {t!r}, not one of {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise self.fail("targets", "repeats a target")

    @property
    def scale(self) -> float:
        """What the adapter's product `B·A` is multiplied by."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def components(self) -> set[str]:
        """The components that hold an adapter."""
        return {t.split(".")[0] for t in self.targets}

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig | None:  # type: ignore[override]
        """None for `r: 0` (adapters off); unknown keys are refused either way."""
        if not isinstance(d, dict):
            raise SpecError(f"{cls.WHERE} is not a mapping (got {type(d).__name__})")
        cls.check_keys(d)
        if d.get("r") == 0:
            return None
        d = dict(d)
        if isinstance(d.get("targets"), tuple):
            d["targets"] = list(d["targets"])
        return cls(**d)


COMPONENTS: dict[str, type[Fields]] = {"encoder": EncoderConfig, "projector": ProjectorConfig, "decoder": DecoderConfig}
# model-level keys; None (older configs wrote it) stands for the default
OPTIONS = ("image_attention", "fusion", "packed_attention", "cross_attn", "freeze", "lora")


@dataclass(frozen=True)
class ModelSpec:
    """The whole model: its three components and how they are put together.

    Made with the projector's `in_dim` / `out_dim` left None, it fills them from the encoder's
    `out_dim` and the decoder's `dim`; given, they must agree."""

    encoder: EncoderConfig
    projector: ProjectorConfig
    decoder: DecoderConfig
    image_attention: str = "causal"
    fusion: str = "interleave"
    packed_attention: str = "sdpa"
    cross_attn: CrossAttnConfig = field(default_factory=CrossAttnConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        for key, allowed in (
            ("image_attention", IMAGE_ATTENTION),
            ("fusion", FUSIONS),
            ("packed_attention", PACKED_ATTENTION),
        ):
            if getattr(self, key) not in allowed:
                raise SpecError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        proj = self.projector
        for key, have, what in (
            ("in_dim", self.encoder.out_dim, "the encoder emits"),
            ("out_dim", self.decoder.dim, "the decoder is"),
        ):
            given = getattr(proj, key)
            if given is None:
                proj = proj.replace(**{key: have})
            elif given != have:
                raise SpecError(
                    f"model.projector.{key}={given} but {what} {have} wide (set model.projector.{key}=null to follow it)"
                )
        object.__setattr__(self, "projector", proj)  # the dims resolved: a derived, frozen value

    @classmethod
    def from_dict(cls, d: dict, parts: dict[str, Fields] | None = None) -> ModelSpec:
        """From `{encoder, projector, decoder, image_attention, …}`: each component a mapping of its
        config's fields (a `_target_`, if there, must name the native class), or given resolved
        in `parts` (`vlm.build.model.model_spec`: pretrained parts read from their folders)."""
        if not isinstance(d, dict):
            raise SpecError(f"model is not a mapping (got {type(d).__name__})")
        unknown = set(d) - set(COMPONENTS) - set(OPTIONS)
        if unknown:
            k = sorted(unknown)[0]
            raise SpecError(f"model.{k} is not a field of ModelSpec (known: {', '.join([*COMPONENTS, *OPTIONS])})")
        parts = dict(parts or {})
        for part, cfg_cls in COMPONENTS.items():
            if part in parts:
                continue
            if part not in d:
                raise SpecError(f"model.{part} is missing")
            c = d[part]
            if not isinstance(c, dict):
                raise SpecError(f"model.{part} is not a mapping (got {type(c).__name__})")
            target = c.get("_target_", cfg_cls.TARGET)
            if target != cfg_cls.TARGET:
                raise SpecError(f"model.{part}._target_={target!r} is not {cfg_cls.TARGET}")
            parts[part] = cfg_cls.from_dict({k: v for k, v in c.items() if k != "_target_"})
        opts = {k: d[k] for k in OPTIONS if d.get(k) is not None}
        for key, cfg_cls in (("cross_attn", CrossAttnConfig), ("freeze", FreezeConfig), ("lora", LoraConfig)):
            if key in opts:
                opts[key] = cfg_cls.from_dict(opts[key])
        for key in ("image_attention", "fusion", "packed_attention"):
            if key in opts and not isinstance(opts[key], str):
                raise SpecError(f"model.{key}={opts[key]!r} is not of type str")
        return cls(**parts, **opts)

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: plain data, `_target_` naming each component's native class."""
        out: dict[str, Any] = {
            part: {"_target_": type(getattr(self, part)).TARGET, **getattr(self, part).to_dict()} for part in COMPONENTS
        }
        out.update(image_attention=self.image_attention, fusion=self.fusion, packed_attention=self.packed_attention)
        out.update(cross_attn=self.cross_attn.to_dict(), freeze=self.freeze.to_dict())
        if self.lora is not None:  # no key: no adapters (what older checkpoints hold)
            out["lora"] = self.lora.to_dict()
        return out

    @property
    def geometry(self) -> Geometry:
        """The media geometry the data side follows (`vlm.model.geometry.Geometry`)."""
        return Geometry(
            patch_size=self.encoder.patch_size,
            temporal_patch=self.encoder.temporal_patch,
            merge_size=self.projector.merge_size,
            queries=self.projector.queries,
            fusion=self.fusion,
            rope=self.decoder.rope,
        )
