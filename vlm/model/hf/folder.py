"""Reading a Hugging Face-layout folder: its `config.json`, its safetensors weights, and loading
them into one of our modules through a key map with every key accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlm.errors import PretrainedError


def read_config(folder: str | Path) -> dict:
    """The folder's `config.json` (no weights are opened)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no config.json (expected a Hugging Face-layout model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None


class SafetensorsFolder:
    """Lazy, memory-mapped access to every tensor of a folder's safetensors file(s): tensors are
    read one at a time, so loading a 7B decoder does not need twice its size in memory."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise PretrainedError(f"{folder}: no *.safetensors weights")
        self._handles = {f: safe_open(str(folder / f), framework="pt", device="cpu") for f in files}
        self.where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.where[key]].get_tensor(key)


class Remapped:
    """A SafetensorsFolder view without some keys (handled elsewhere or deliberately unused)."""

    def __init__(self, src: SafetensorsFolder, drop: set[str]):
        self.src, self.drop = src, drop

    def keys(self) -> set[str]:
        return self.src.keys() - self.drop

    def shape(self, key):
        return self.src.shape(key)

    def get(self, key):
        return self.src.get(key)


class Split:
    """A source view that exposes fused tensors as their parts: `NAME#q|k|v` = rows of NAME."""

    def __init__(self, src, fused: set[str], parts=("q", "k", "v")):
        self.src, self.fused, self.parts = src, fused, parts

    def keys(self) -> set[str]:
        ks = set(self.src.keys()) - self.fused
        return ks | {f"{k}#{p}" for k in self.fused if k in self.src.keys() for p in self.parts}

    def _part(self, key):
        base, part = key.split("#")
        return base, self.parts.index(part)

    def shape(self, key):
        if "#" not in key:
            return self.src.shape(key)
        base, i = self._part(key)
        s = list(self.src.shape(base))
        s[0] //= len(self.parts)
        return tuple(s)

    def get(self, key):
        if "#" not in key:
            return self.src.get(key)
        base, i = self._part(key)
        return self.src.get(base).chunk(len(self.parts), 0)[i]


class Without(nn.Module):
    """`module`'s state without some keys (loaded by hand), for `check_and_load`'s accounting."""

    def __init__(self, module: nn.Module, skip: set[str]):
        super().__init__()
        self.inner, self.skip = module, skip

    def state_dict(self, *a, **kw):
        return {k: v for k, v in self.inner.state_dict().items() if k not in self.skip}

    def named_parameters(self, *a, **kw):
        return ((k, v) for k, v in self.inner.named_parameters() if k not in self.skip)

    def named_buffers(self, *a, **kw):
        return ((k, v) for k, v in self.inner.named_buffers() if k not in self.skip)


def check_and_load(
    module: nn.Module,
    source: SafetensorsFolder | dict[str, torch.Tensor],
    mapping: dict[str, str],
    ignore: tuple[str, ...] = (),
    where: str = "",
) -> None:
    """Load `source[hf] -> module[ours]` for every pair of `mapping`; every parameter and buffer the
    module saves must be covered and every source key used (except names matching `ignore`
    suffixes), shapes must agree — otherwise one `PretrainedError` naming the keys."""
    ours = module.state_dict()
    src_keys = set(source.keys()) if isinstance(source, dict) else source.keys()
    shape = (lambda k: tuple(source[k].shape)) if isinstance(source, dict) else source.shape
    mapped_ours = set(mapping.values())
    missing_src = sorted(k for k in mapping if k not in src_keys)
    unexpected = sorted(k for k in src_keys if k not in mapping and not k.endswith(ignore))
    unmapped = sorted(k for k in ours if k not in mapped_ours and not _tied_alias(module, k, mapped_ours))
    bad_target = sorted(v for v in mapped_ours if v not in ours)
    shapes = sorted(
        f"{k} {shape(k)} -> {v} {tuple(ours[v].shape)}"
        for k, v in mapping.items()
        if k in src_keys and v in ours and shape(k) != tuple(ours[v].shape)
    )
    problems = [
        (f"missing in the checkpoint: {few(missing_src)}" if missing_src else ""),
        (f"unexpected in the checkpoint: {few(unexpected)}" if unexpected else ""),
        (f"not covered by the key map: {few(unmapped)}" if unmapped else ""),
        (f"key map names unknown parameters: {few(bad_target)}" if bad_target else ""),
        (f"shape mismatch: {few(shapes)}" if shapes else ""),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise PretrainedError(f"{where or 'pretrained weights'}: " + "; ".join(problems))
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    if any(p.is_meta for p in params.values()):
        return  # the key map and shapes are proven; nothing is allocated
    with torch.no_grad():
        for k, v in mapping.items():
            t = source[k] if isinstance(source, dict) else source.get(k)
            params[v].copy_(t.to(params[v].dtype))


def _tied_alias(module: nn.Module, key: str, mapped: set[str]) -> bool:
    """`lm_head.weight` tied to `embed_tokens.weight` needs no entry of its own."""
    if key.endswith("lm_head.weight"):
        emb = key[: -len("lm_head.weight")] + "embed_tokens.weight"
        sd = module.state_dict()
        return emb in mapped and sd[key].data_ptr() == sd[emb].data_ptr() if not sd[key].is_meta else emb in mapped
    return False


def few(xs: list[str], n: int = 6) -> str:
    return ", ".join(xs[:n]) + (f" … (+{len(xs) - n} more)" if len(xs) > n else "")


def prefix_of(keys, suffix: str, where) -> str:
    """The prefix before `suffix` of the (first) checkpoint key ending with it."""
    hits = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
    if not hits:
        raise PretrainedError(f"{where}: no '*{suffix}' in the checkpoint")
    return hits[0]
