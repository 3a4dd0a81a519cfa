"""Hostile checkpoints: a checkpoint never runs code, and a damaged one gives one clear line.

Part 1: a checkpoint's config (export folder `config.yaml`, a `.ckpt`'s `hyper_parameters`, a
sharded checkpoint's `meta.pt`) names only the registered native classes: every other callable
reachable under `vlm.` (each module's attributes and, one level further, theirs: `vlm.data.media.io.open`,
`vlm.build.model.torch.load`, …) is refused as any component's `_target_`, nested, with Hydra's keys,
through `load_checkpoint`, `python -m vlm.cli.export`, `init_from` and `infer.py`, and none is called.

Part 2: damaged folders and `.ckpt` files (weights, config, tokenizer, special files) are refused
before anything is built or read in full, with one line naming the file (`infer.py`: one `error:`
line, exit 2)."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pkgutil
import shutil
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import vlm
from tests.conftest import ROOT
from vlm.build.model import (
    NATIVE_COMPONENTS,
    PRETRAINED_LOADERS,
    build_model,
    build_processor,
    component,
)
from vlm.checkpoint.load import CheckpointError, check_checkpoint_config, export_folder, load_checkpoint
from vlm.model.config import COMPONENTS
from vlm.tokenizer import train_tokenizer

WORDS = ["What is shown?", "a red square", "a blue circle", "hi", "user\n", "assistant\n", "system\n"]
MODEL = {
    "encoder": {
        "_target_": "vlm.model.vision.VisionEncoder",
        "patch_size": 4,
        "dim": 16,
        "n_layers": 1,
        "n_heads": 2,
        "pos_grid": 4,
    },
    "projector": {"_target_": "vlm.model.projector.Projector", "in_dim": None, "out_dim": None, "merge_size": 1},
    "decoder": {
        "_target_": "vlm.model.decoder.Decoder",
        "vocab_size": None,
        "dim": 16,
        "n_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 1,
        "max_seq_len": 256,
    },
    "image_attention": "causal",
    "fusion": "interleave",
    "packed_attention": "sdpa",
    "cross_attn": {"every": 2, "media": "all"},
    "freeze": {"encoder": False, "projector": False, "decoder": False, "cross_attn": False},
}
PROCESSOR = {"patch_size": 4, "merge_size": 1, "image_size": 16}
TEMPLATE = {"max_length": 128, "merge_size": 1}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def hparams(tok):
    torch.manual_seed(0)
    model = build_model(MODEL, tok)
    return model, {
        "model": model.spec.to_dict(),
        "tokenizer_json": tok.to_str(),
        "processor": build_processor(PROCESSOR).to_config(),
        "template": TEMPLATE,
        "val_qtypes": ["color"],
    }


@pytest.fixture(scope="module")
def export(tmp_path_factory, tok, hparams):
    model, hp = hparams
    return export_folder(model, tok, hp, tmp_path_factory.mktemp("good") / "export")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hparams):
    """A pickle-free Lightning-style `.ckpt`: tensors and plain containers only."""
    model, hp = hparams
    path = tmp_path_factory.mktemp("good") / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": hp,
            "global_step": 4,
        },
        path,
    )
    return path


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_cfg(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def write_cfg(folder: Path, cfg) -> None:
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def refused(path, *needles: str, loader=load_checkpoint) -> str:
    """The one-line CheckpointError `loader(path)` raises; it contains every needle."""
    with pytest.raises(CheckpointError) as e:
        loader(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
    )


# ------------------------------------------------------------------------- the good checkpoints
def test_good_export_and_ckpt_load_the_same_weights(export, ckpt, hparams):
    model, _ = hparams
    for path in (export, ckpt):
        loaded = load_checkpoint(path)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v), (path, k)


def test_registry_is_what_checkpoints_record():
    """Every native class is registered under the `_target_` that `ModelSpec.to_dict` records for it,
    and every pretrained loader a training config names (conf/model/**) is registered."""
    for part, classes in NATIVE_COMPONENTS.items():
        for target, cls in classes.items():
            assert target == f"{cls.__module__}.{cls.__qualname__}", (part, target)
    loaders = {t for d in PRETRAINED_LOADERS.values() for t in d}
    in_conf = {yaml.safe_load(f.read_text()).get("_target_") for f in (ROOT / "conf" / "model").rglob("*.yaml")}
    natives = {t for d in NATIVE_COMPONENTS.values() for t in d}
    assert in_conf - {None} <= natives | loaders, in_conf - natives - loaders
    for part, cfg_cls in COMPONENTS.items():
        assert {cfg_cls.TARGET} == set(NATIVE_COMPONENTS[part]), part


# --------------------------------------------------------------------- part 1: no code is run
def _vlm_callables() -> list[str]:
    """Every callable reachable as an attribute path under `vlm.`: each module's attributes and,
    for attributes that are modules or classes, theirs."""
    mods = {"vlm": vlm}
    for m in pkgutil.walk_packages(vlm.__path__, "vlm."):
        try:
            mods[m.name] = importlib.import_module(m.name)
        except Exception:  # an optional dependency missing: nothing of it is reachable either
            continue
    out = set()
    for name, mod in mods.items():
        for a in dir(mod):
            try:
                obj = getattr(mod, a)
            except Exception:
                continue
            if callable(obj):
                out.add(f"{name}.{a}")
            if isinstance(obj, (types.ModuleType, type)):
                for b in dir(obj):
                    try:
                        o2 = getattr(obj, b)
                    except Exception:
                        continue
                    if callable(o2):
                        out.add(f"{name}.{a}.{b}")
    return sorted(out)


DANGEROUS = [
    "vlm.data.media.io.open",
    "vlm.data.media.os.makedirs",
    "vlm.build.model.instantiate",
    "vlm.build.model.hf.json.loads",
    "vlm.checkpoint.load.torch.load",
    "vlm.checkpoint.load.os.system",
    "vlm.training.train.os.system",
    "vlm.cli.export.sys.exit",
    "vlm.checkpoint.load.shutil.rmtree",
    "vlm.model.hf.pretrained_decoder",
    "vlm.build.model.partial",
    "os.system",
    "builtins.eval",
    "vlm.checkpoint.load.pickle.loads",
    "vlm.serve.infer.run",
    "vlm.training.train.run",
    "vlm.cli.lab.main",
]


class _Audit:
    """Python audit events (file opens, process starts, imports, exec, …) seen while armed."""

    armed = False
    events: list = []
    WATCH = (
        "open",
        "os.",
        "subprocess.",
        "shutil.",
        "socket.",
        "import",
        "exec",
        "ctypes.",
        "pickle.",
        "builtins.input",
    )

    @classmethod
    def hook(cls, event, args):
        if cls.armed and event.startswith(cls.WATCH):
            cls.events.append((event, args[:2] if isinstance(args, tuple) else args))


sys.addaudithook(_Audit.hook)


@pytest.fixture(scope="module")
def targets():
    return _vlm_callables()


def test_every_vlm_callable_is_refused_as_every_component(export, targets, tmp_path, monkeypatch):
    """The check `load_checkpoint` runs on a config before reading anything else refuses every
    callable under `vlm.` as each component's `_target_` (with `_args_` that would create a file),
    naming the key; no file is opened, no process started, no module imported meanwhile. The same
    names are refused in a training config unless they are that component's registered loader."""
    called = []
    monkeypatch.setattr(vlm.build.model, "sentinel", lambda *a, **k: called.append(a), raising=False)
    pwned = tmp_path / "pwned"
    base = read_cfg(export)
    natives = {t for d in NATIVE_COMPONENTS.values() for t in d}
    names = [t for t in targets if t not in natives] + ["vlm.build.model.sentinel", *DANGEROUS]
    assert len(names) > 5000 and "vlm.data.media.io.open" in targets and "vlm.build.model.instantiate" not in natives
    where = f"checkpoint config {export / 'config.yaml'}"
    _Audit.events.clear()
    _Audit.armed = True
    try:
        for t in names:
            for part in ("encoder", "projector", "decoder"):
                comp = {**base["model"][part], "_target_": t, "_args_": [str(pwned), "w"]}
                cfg = {**base, "model": {**base["model"], part: comp}}
                with pytest.raises(CheckpointError) as e:
                    check_checkpoint_config(cfg, where)
                msg = str(e.value)
                assert f"model.{part}._target_" in msg, msg
                assert ("a pretrained loader" if t in PRETRAINED_LOADERS[part] else "not a registered class") in msg, (
                    msg
                )
                # a training config: the same, but a registered loader passes the registry and is
                # then refused for its `_args_`
                key = "_args_" if t in PRETRAINED_LOADERS[part] else "_target_"
                with pytest.raises(ValueError, match=rf"model\.{part}\.{key}"):
                    component(part, comp, trusted=True)
    finally:
        _Audit.armed = False
    assert not _Audit.events, _Audit.events[:10]
    assert not pwned.exists() and not called


def test_pretrained_loaders_are_refused_in_checkpoints_and_hydra_keys_everywhere(export):
    base = read_cfg(export)
    where = "checkpoint config X"
    for part, loaders in PRETRAINED_LOADERS.items():
        for t in loaders:
            cfg = {**base, "model": {**base["model"], part: {"_target_": t, "pretrained": "/models/x"}}}
            with pytest.raises(CheckpointError, match=rf"model\.{part}\._target_='{t}': a pretrained loader"):
                check_checkpoint_config(cfg, where)
    for key in ("_args_", "_partial_", "_recursive_", "_convert_", "_other_"):
        for part in ("encoder", "projector", "decoder"):
            cfg = {**base, "model": {**base["model"], part: {**base["model"][part], key: True}}}
            with pytest.raises(CheckpointError, match=rf"model\.{part}\.{key}: Hydra's special keys"):
                check_checkpoint_config(cfg, where)
            with pytest.raises(ValueError, match=rf"model\.{part}\.{key}: Hydra's special keys"):
                build_model(cfg["model"], None, trusted=True)
        for section in ("processor", "template"):
            cfg = {**base, section: {**base[section], key: True}}
            with pytest.raises(CheckpointError, match=rf"{section}\.{key}: Hydra's special keys"):
                check_checkpoint_config(cfg, where)
    cfg = {**base, "model": {**base["model"], "_target_": "vlm.data.media.io.open"}}
    with pytest.raises(CheckpointError, match=r"model\._target_="):
        check_checkpoint_config(cfg, where)


def _sample(targets: list[str], every: int = 400) -> list[str]:
    return sorted((set(targets[::every]) | set(DANGEROUS)) - {t for d in NATIVE_COMPONENTS.values() for t in d})


def _evil_component(base: dict, part: str, target: str, pwned: Path, nested: bool) -> dict:
    comp = dict(base["model"][part])
    evil = {"_target_": target, "_args_": [str(pwned), "w"]}
    if nested:
        comp["extra"] = {"inner": [evil]}
    else:
        comp.update(evil)
    return comp


def test_hostile_targets_through_export_folders(export, targets, tmp_path, monkeypatch):
    """A sample of the callables (and every one named in DANGEROUS) written into a copy of
    config.yaml, as each component's `_target_` and nested inside one: `load_checkpoint` refuses
    each with one line naming the file and the key; nothing is created or called."""
    called = []
    monkeypatch.setattr(vlm.build.model, "sentinel", lambda *a, **k: called.append(a), raising=False)
    pwned = tmp_path / "pwned"
    evil = clone(export, tmp_path / "evil")
    base = read_cfg(export)
    n = 0
    for t in [*_sample(targets), "vlm.build.model.sentinel"]:
        for part in ("encoder", "projector", "decoder"):
            for nested in (False, True):
                write_cfg(
                    evil, {**base, "model": {**base["model"], part: _evil_component(base, part, t, pwned, nested)}}
                )
                key = f"model.{part}.extra.inner[0]._target_" if nested else f"model.{part}._target_"
                refused(evil, str(evil / "config.yaml"), key)
                n += 1
    assert n > 300 and not pwned.exists() and not called


def test_hostile_targets_through_ckpt_export_cli_and_init_from(ckpt, targets, tmp_path, tok, monkeypatch, capsys):
    """The same through a pickle-free `.ckpt`'s hyper_parameters: `load_checkpoint`,
    `python -m vlm.cli.export` (its `main`) and `init_from` (`vlm.training.train.init_weights`)."""
    from vlm.cli.export import main as export_main
    from vlm.training.module import VLMModule
    from vlm.training.train import init_weights

    called = []
    monkeypatch.setattr(vlm.build.model, "sentinel", lambda *a, **k: called.append(a), raising=False)
    pwned = tmp_path / "pwned"
    good = torch.load(ckpt, weights_only=True)
    hp = good["hyper_parameters"]
    module = VLMModule(model=MODEL, tokenizer_json=tok.to_str(), processor=hp["processor"], template=TEMPLATE)
    for i, t in enumerate([*_sample(targets, 1500), "vlm.build.model.sentinel"]):
        part = ("encoder", "projector", "decoder")[i % 3]
        nested = i % 2 == 1
        path = tmp_path / f"evil{i}.ckpt"
        torch.save(
            {
                **good,
                "hyper_parameters": {**hp, "model": {**hp["model"], part: _evil_component(hp, part, t, pwned, nested)}},
            },
            path,
        )
        key = f"model.{part}.extra.inner[0]._target_" if nested else f"model.{part}._target_"
        refused(path, str(path), key)
        assert export_main([f"ckpt={path}", f"out={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and key in err, err
        refused(path, key, loader=lambda p: init_weights(module, str(p)))
    assert not pwned.exists() and not called and not (tmp_path / "out").exists()
    init_weights(module, str(ckpt))  # the good one initialises
    for k, v in good["state_dict"].items():
        assert torch.equal(module.model.state_dict()[k.removeprefix("model.")], v)


def test_template_and_processor_of_a_checkpoint_read_no_files(export, tmp_path):
    """`template.jinja` in a checkpoint is the template's text: a path is refused (no file opened);
    `processor.pretrained` (a model folder) is refused; `${…}` is not interpolated."""
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ messages }}")
    folder = tmp_path / "model_folder"
    folder.mkdir()
    evil = clone(export, tmp_path / "evil")
    base = read_cfg(export)
    for jinja in (str(secret), str(folder), "/etc/passwd", "/dev/zero", 42):
        write_cfg(evil, {**base, "template": {**base["template"], "jinja": jinja}})
        _Audit.events.clear()
        _Audit.armed = True
        try:
            refused(evil, str(evil / "config.yaml"), "template.jinja", "not a chat template's text")
        finally:
            _Audit.armed = False
        opened = [a for e, a in _Audit.events if e == "open"]
        assert not any(str(a[0]).startswith((str(secret), str(folder), "/etc", "/dev")) for a in opened), opened
    write_cfg(evil, {**base, "processor": {**base["processor"], "pretrained": str(folder)}})
    refused(evil, "processor.pretrained")
    # a template given as text is rendered (in the sandbox), and interpolation stays text
    text = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    write_cfg(evil, {**base, "template": {**base["template"], "jinja": text, "system_prompt": "${oc.env:HOME}"}})
    loaded = load_checkpoint(evil)
    assert loaded.template.system_prompt == "${oc.env:HOME}"
    assert type(loaded.template).__name__ == "JinjaChatTemplate"


# ------------------------------------------------------- sharded checkpoints and training resume
def _sharded(tmp: Path, model, hp: dict, metadata: bytes | None = None) -> Path:
    import torch.distributed.checkpoint as dcp

    out = tmp / "step4.ckpt"
    dcp.save(
        {"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}},
        checkpoint_id=str(out),
        no_dist=True,
    )
    torch.save({"hyper_parameters": hp, "global_step": 4}, out / "meta.pt")
    if metadata is not None:
        (out / ".metadata").write_bytes(metadata)
    return out


class _Pwn:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sharded_checkpoint_metadata_pickle_is_restricted(tmp_path, hparams, capsys):
    """A sharded (DCP) checkpoint's `.metadata` is a pickle that torch reads with plain
    `pickle.load`: `python -m vlm.cli.export` and the resume check read it with DCP's classes only."""
    from vlm.checkpoint.load import check_resume_checkpoint
    from vlm.cli.export import main as export_main

    model, hp = hparams
    good = _sharded(tmp_path / "good", model, hp)
    assert export_main([f"ckpt={good}", f"out={tmp_path / 'export'}"]) == 0
    loaded = load_checkpoint(tmp_path / "export")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    check_resume_checkpoint(good)
    pwned = tmp_path / "pwned"
    evil = _sharded(tmp_path / "evil", model, hp, pickle.dumps(_Pwn(pwned)))
    assert export_main([f"ckpt={evil}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and ".metadata" in err and "refused global io.open" in err, err
    refused(evil, ".metadata", loader=check_resume_checkpoint)
    assert not pwned.exists()
    # a hostile target in meta.pt's hyper_parameters
    bad_hp = {
        **hp,
        "model": {**hp["model"], "decoder": {**hp["model"]["decoder"], "_target_": "vlm.checkpoint.load.os.system"}},
    }
    evil2 = _sharded(tmp_path / "evil2", model, bad_hp)
    assert export_main([f"ckpt={evil2}", f"out={tmp_path / 'out'}"]) == 2
    assert "model.decoder._target_='vlm.checkpoint.load.os.system'" in capsys.readouterr().err


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path, ckpt):
    """`ckpt_path=` is checked (weights_only, memory-mapped) before Lightning reads it."""
    from vlm.checkpoint.load import check_resume_checkpoint

    check_resume_checkpoint(ckpt)
    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Pwn(pwned)}, evil)
    refused(
        evil, str(evil), "pickled objects, refused: Unsupported global: GLOBAL io.open", loader=check_resume_checkpoint
    )
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(1000))
    refused(junk, str(junk), "not a torch zip file", loader=check_resume_checkpoint)
    refused(tmp_path / "nope.ckpt", "not found", loader=check_resume_checkpoint)
    assert not pwned.exists()


# ------------------------------------------------- part 2: damaged export folders, one line each
def _header(entries) -> bytes:
    h = json.dumps(entries).encode()
    return struct.pack("<Q", len(h)) + h


def _damage_cases(export: Path, tmp: Path, hparams) -> dict:
    """name -> (folder, the file the message must name, more needles)."""
    model, _ = hparams
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.lm_head.weight"}
    base = read_cfg(export)
    cases = {}

    def case(name, file, *needles, cfg=None, weights=None, tokenizer=None, replace=None):
        d = clone(export, tmp / name)
        if cfg is not None:
            (d / "config.yaml").write_bytes(cfg if isinstance(cfg, bytes) else yaml.safe_dump(cfg).encode())
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        if tokenizer is not None:
            (d / "tokenizer.json").write_bytes(tokenizer)
        if replace is not None:
            replace(d)
        cases[name] = (d, d / file, needles)

    good = (export / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    case("weights_random", "model.safetensors", "not a safetensors file", weights=os.urandom(4096))
    case("weights_truncated", "model.safetensors", "outside the file", weights=good[: len(good) // 2])
    case("weights_empty", "model.safetensors", "shorter than its 8-byte header length", weights=b"")
    case(
        "weights_header_2_62",
        "model.safetensors",
        "header claims 4611686018427387904 bytes",
        weights=struct.pack("<Q", 2**62) + good[8:],
    )
    past = dict(header)
    k0 = next(k for k in past if k != "__metadata__")
    past[k0] = {**past[k0], "data_offsets": [0, 2**40]}
    case("weights_offsets_past_end", "model.safetensors", "outside the file", weights=_header(past) + good[8 + n :])
    case(
        "weights_header_not_json",
        "model.safetensors",
        "header is not JSON",
        weights=struct.pack("<Q", 4) + b"\xff\xfe{[",
    )
    case("weights_header_list", "model.safetensors", "not a JSON object", weights=_header([1, 2]))  # type: ignore[arg-type]
    odd = dict(header)
    odd[k0] = {**odd[k0], "dtype": "EVIL"}
    case("weights_bad_dtype", "model.safetensors", "malformed header entry", weights=_header(odd) + good[8 + n :])
    overlap = dict(header)
    ka, kb = "encoder.blocks.0.norm1.weight", "encoder.blocks.0.norm2.weight"  # same dtype and shape
    overlap[kb] = {**overlap[kb], "data_offsets": overlap[ka]["data_offsets"]}
    case("weights_overlap", "model.safetensors", "overlap", weights=_header(overlap) + good[8 + n :])
    wrong = dict(sd)
    wrong["decoder.embed_tokens.weight"] = torch.zeros(7, 16)
    tmpw = tmp / "wrong.safetensors"
    save_file(wrong, str(tmpw))
    case(
        "weights_wrong_shape",
        "model.safetensors",
        "shape mismatch decoder.embed_tokens.weight (7, 16)",
        weights=tmpw.read_bytes(),
    )
    missing = {k: v for k, v in sd.items() if k != "encoder.blocks.0.attn.q_proj.weight"}
    save_file(missing, str(tmpw))
    case(
        "weights_missing_key",
        "model.safetensors",
        "missing encoder.blocks.0.attn.q_proj.weight",
        weights=tmpw.read_bytes(),
    )
    save_file({**sd, "evil.weight": torch.zeros(2)}, str(tmpw))
    case("weights_extra_key", "model.safetensors", "unexpected evil.weight", weights=tmpw.read_bytes())
    case("config_not_utf8", "config.yaml", "is not UTF-8 text (byte 0)", cfg=b"\xff\xfe\x00model: 1\n")
    case("config_list", "config.yaml", "is not a YAML mapping (got list)", cfg=b"- 1\n- 2\n")
    case("config_scalar", "config.yaml", "is not a YAML mapping (got int)", cfg=b"42\n")
    case("config_empty", "config.yaml", "is not a YAML mapping (got NoneType)", cfg=b"")
    case("config_bad_yaml", "config.yaml", "not valid YAML", cfg=b"model: [1, 2\nprocessor: {\n")
    case(
        "config_aliases",
        "config.yaml",
        "YAML aliases (*name) are not accepted at line 2",
        cfg=b"a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b]\n",
    )
    for key in ("model", "processor", "template"):
        case(f"config_no_{key}", "config.yaml", f"`{key}` is missing", cfg={k: v for k, v in base.items() if k != key})
    case(
        "config_no_version",
        "config.yaml",
        "format_version",
        cfg={k: v for k, v in base.items() if k != "format_version"},
    )
    case("config_model_list", "config.yaml", "model is not a mapping", cfg={**base, "model": [1, 2]})
    dec = base["model"]["decoder"]
    for name, (k, v, needle) in {
        "dim_str": ("dim", "abc", "model.decoder.dim='abc' is not of type int"),
        "layers_negative": ("n_layers", -3, "model.decoder.n_layers=-3 is negative"),
        "layers_huge": ("n_layers", 10**6, "model.decoder.n_layers=1000000 is out of range"),
        # built on the meta device only, nothing allocated: the tensors do not fit the file, or
        # their size does not even fit in 64 bits
        "dim_huge": ("dim", 2**20, "shape mismatch"),
        "dim_overflow": ("dim", 2**30, "Storage size calculation overflowed"),
        "theta_nan": ("rope_theta", float("nan"), "model.decoder.rope_theta=nan is not a finite number"),
        "unknown_arg": ("evil", 1, "model.decoder.evil is not a field of DecoderConfig"),
        "vocab_small": ("vocab_size", 3, "decoder.vocab_size 3 < tokenizer vocabulary"),
        "tie_str": ("tie_embeddings", "yes", "model.decoder.tie_embeddings='yes' is not of type bool"),
    }.items():
        # the stored spec records the projector's width: a consistent change of the decoder's moves it too
        proj = {**base["model"]["projector"], **({"out_dim": v} if k == "dim" and isinstance(v, int) else {})}
        case(
            f"config_{name}",
            "config.yaml" if needle != "shape mismatch" else "model.safetensors",
            needle,
            cfg={**base, "model": {**base["model"], "projector": proj, "decoder": {**dec, k: v}}},
        )
    case(
        "config_encoder_str",
        "config.yaml",
        "model.encoder is not a mapping",
        cfg={**base, "model": {**base["model"], "encoder": "vlm.model.vision.VisionEncoder"}},
    )
    case(
        "config_no_target",
        "config.yaml",
        "model.encoder: no _target_",
        cfg={**base, "model": {**base["model"], "encoder": {"dim": 16}}},
    )
    case(
        "config_processor_type",
        "config.yaml",
        "processor.patch_size='x' is not of type int",
        cfg={**base, "processor": {**base["processor"], "patch_size": "x"}},
    )
    case(
        "config_processor_video_type",
        "config.yaml",
        "processor.video.max_frames=[1] is not of type int",
        cfg={**base, "processor": {**base["processor"], "video": {**base["processor"]["video"], "max_frames": [1]}}},
    )
    case(
        "config_processor_huge",
        "config.yaml",
        "processor.image_size=1000000 is out of range (at most 8192)",
        cfg={**base, "processor": {**base["processor"], "image_size": 10**6}},
    )
    case(
        "config_processor_unknown",
        "config.yaml",
        "processor.evil is not an argument of the image processor",
        cfg={**base, "processor": {**base["processor"], "evil": 1}},
    )
    case(
        "config_template_type",
        "config.yaml",
        "template.max_length='long' is not of type int",
        cfg={**base, "template": {**base["template"], "max_length": "long"}},
    )
    case(
        "config_stop_ids",
        "config.yaml",
        "stop token id 99999",
        cfg={**base, "template": {**base["template"], "stop_token_ids": [99999]}},
    )
    case("config_qtypes", "config.yaml", "val_qtypes", cfg={**base, "val_qtypes": {"a": 1}})
    case("tokenizer_garbage", "tokenizer.json", "not a tokenizer", tokenizer=b"}{ this is not JSON " * 50)
    case("tokenizer_random", "tokenizer.json", "is not UTF-8 text", tokenizer=b"\xff" + os.urandom(2000))
    case("tokenizer_json_not_tokenizer", "tokenizer.json", "not a tokenizer", tokenizer=b'{"hello": [1, 2, 3]}')
    case("tokenizer_not_utf8", "tokenizer.json", "not UTF-8", tokenizer=b"\xff\xfe{}")
    case("tokenizer_empty", "tokenizer.json", "not a tokenizer", tokenizer=b"")

    def as_dir(name):
        return lambda d: ((d / name).unlink(), (d / name).mkdir())

    def as_link(name, target):
        return lambda d: ((d / name).unlink(), (d / name).symlink_to(target))

    def as_fifo(name):
        return lambda d: ((d / name).unlink(), os.mkfifo(d / name))

    def as_sparse(name, size):
        def f(d):
            with open(d / name, "wb") as fh:
                fh.truncate(size)

        return f

    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):
        stem = name.split(".")[0]
        case(f"{stem}_is_dir", name, "is a directory", replace=as_dir(name))
        case(f"{stem}_is_dev_zero", name, "is a character device", replace=as_link(name, "/dev/zero"))
        case(f"{stem}_is_fifo", name, "is a named pipe", replace=as_fifo(name))
    case(
        "config_huge",
        "config.yaml",
        "more than the 64 MiB allowed for config.yaml",
        replace=as_sparse("config.yaml", 65 << 20),
    )
    case(
        "tokenizer_huge",
        "tokenizer.json",
        "more than the 64 MiB allowed",
        replace=as_sparse("tokenizer.json", 65 << 20),
    )
    case(
        "config_dangling_link", "config.yaml", "config.yaml is missing", replace=as_link("config.yaml", tmp / "nowhere")
    )
    return cases


@pytest.fixture(scope="module")
def damaged(export, tmp_path_factory, hparams):
    return _damage_cases(export, tmp_path_factory.mktemp("damaged"), hparams)


def test_damaged_export_folders_give_one_line_naming_the_file(damaged):
    for name, (folder, file, needles) in damaged.items():
        msg = refused(folder, str(file), *needles)
        assert msg, name


def test_damaged_export_folders_through_infer_run(damaged, tmp_path, synth_dir):
    """`vlm.serve.infer.run(cfg)` (what infer.py calls) raises the same CheckpointError."""
    from tests.conftest import compose_infer
    from vlm.serve.infer import run

    for name in ("weights_truncated", "config_not_utf8", "tokenizer_garbage", "config_is_fifo"):
        folder, file, needles = damaged[name]
        cfg = compose_infer([f"ckpt={folder}", "prompt=hi"], tmp_path, synth_dir)
        refused(cfg, str(file), *needles, loader=run)


# ------------------------------------------------------------- part 2: damaged .ckpt files
def _ckpt_cases(ckpt: Path, tmp: Path) -> dict:
    good = torch.load(ckpt, weights_only=True)
    hp, sd = good["hyper_parameters"], good["state_dict"]
    pwned = tmp / "pwned"
    cases = {}

    def case(name, data, *needles):
        p = tmp / f"{name}.ckpt"
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            torch.save(data, p)
        cases[name] = (p, needles)

    case("text", b"not a checkpoint", "not a loadable checkpoint", "not a torch zip file")
    case("empty", b"", "not a loadable checkpoint", "an empty file")
    case("random", os.urandom(5000), "not a torch zip file")
    case("raw_pickle", pickle.dumps(_Pwn(pwned)), "not a torch zip file")
    case(
        "pickled_object",
        {"state_dict": sd, "hyper_parameters": hp, "x": _Pwn(pwned)},
        "pickled objects, refused: Unsupported global: GLOBAL io.open",
    )
    case("pickled_object_only", _Pwn(pwned), "pickled objects, refused")
    raw = ckpt.read_bytes()
    case("truncated", raw[: len(raw) // 2], "not a loadable checkpoint")
    zipped = tmp / "deflated.zip"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    case("compressed", zipped.read_bytes(), "is compressed")
    case("list", [1, 2, 3], "no state_dict / hyper_parameters")
    case("no_hparams", {"state_dict": sd}, "no state_dict / hyper_parameters")
    case("no_state", {"hyper_parameters": hp}, "no state_dict / hyper_parameters")
    case("hparams_str", {"state_dict": sd, "hyper_parameters": "abc"}, "hyper_parameters is not a mapping")
    case(
        "hparams_no_tokenizer",
        {"state_dict": sd, "hyper_parameters": {k: v for k, v in hp.items() if k != "tokenizer_json"}},
        "hyper_parameters.tokenizer_json is missing",
    )
    case("model_list", {"state_dict": sd, "hyper_parameters": {**hp, "model": [1, 2]}}, "model is not a mapping")
    case(
        "dim_str",
        {
            "state_dict": sd,
            "hyper_parameters": {**hp, "model": {**hp["model"], "decoder": {**hp["model"]["decoder"], "dim": "abc"}}},
        },
        "model.decoder.dim='abc' is not of type int",
    )
    case(
        "layers_negative",
        {
            "state_dict": sd,
            "hyper_parameters": {**hp, "model": {**hp["model"], "encoder": {**hp["model"]["encoder"], "n_layers": -1}}},
        },
        "model.encoder.n_layers=-1 is negative",
    )
    case(
        "tokenizer_garbage",
        {"state_dict": sd, "hyper_parameters": {**hp, "tokenizer_json": "}{ garbage"}},
        "tokenizer_json",
        "not a tokenizer",
    )
    case(
        "tokenizer_not_tokenizer",
        {"state_dict": sd, "hyper_parameters": {**hp, "tokenizer_json": '{"a": 1}'}},
        "not a tokenizer",
    )
    case("tokenizer_int", {"state_dict": sd, "hyper_parameters": {**hp, "tokenizer_json": 42}}, "not JSON text")
    case("state_not_dict", {"state_dict": [1], "hyper_parameters": hp}, "state_dict is not a mapping")
    case(
        "state_not_tensor",
        {"state_dict": {**sd, "model.decoder.norm.weight": 3}, "hyper_parameters": hp},
        "state_dict['model.decoder.norm.weight'] is not a dense tensor",
    )
    case(
        "state_wrong_shape",
        {"state_dict": {**sd, "model.decoder.norm.weight": torch.zeros(5)}, "hyper_parameters": hp},
        "shape mismatch decoder.norm.weight (5,) vs (16,)",
    )
    case(
        "state_missing",
        {"state_dict": {k: v for k, v in sd.items() if k != "model.decoder.norm.weight"}, "hyper_parameters": hp},
        "missing decoder.norm.weight",
    )
    case("state_extra", {"state_dict": {**sd, "model.evil": torch.zeros(1)}, "hyper_parameters": hp}, "unexpected evil")
    return cases


@pytest.fixture(scope="module")
def bad_ckpts(ckpt, tmp_path_factory):
    return _ckpt_cases(ckpt, tmp_path_factory.mktemp("badckpt"))


def test_damaged_ckpts_give_one_line_naming_the_file(bad_ckpts, capsys, tmp_path):
    """`load_checkpoint` and `python -m vlm.cli.export` (its `main`) refuse each; nothing pickled runs."""
    from vlm.cli.export import main as export_main

    for name, (path, needles) in bad_ckpts.items():
        refused(path, str(path), *needles)
        assert export_main([f"ckpt={path}", f"out={tmp_path / 'out'}"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(path) in err, (name, err)
    assert not (path.parent / "pwned").exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------- the real entry points
def test_export_usage_is_one_line(capsys, tmp_path):
    """`python -m vlm.cli.export` without `ckpt=`/`out=`, or with an unknown key: one `error:` line, exit 2."""
    from vlm.cli.export import main as export_main

    assert export_main([]) == 2
    assert export_main([f"ckpt={tmp_path}", f"out={tmp_path / 'o'}", "fromat=hf_llava"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: ckpt= and out= missing; usage: python -m vlm.cli.export ")
    assert err[1].startswith("error: unknown key 'fromat'")
    assert not (tmp_path / "o").exists()


def test_the_clis_give_one_error_line_and_exit_2(export, damaged, bad_ckpts, tmp_path):
    """`python infer.py ckpt=… prompt=hi`, `python -m vlm.cli.export ckpt=… out=…` and `python train.py
    ckpt_path=…` (run in parallel): a hostile `_target_` (`vlm.data.media.io.open` with `_args_`
    that would create a file), damaged folders (a FIFO or /dev/zero never blocks) and a pickled
    `.ckpt` each give one `error:` line naming the file (and the key), exit 2, nothing created."""
    from tests.conftest import TINY

    pwned = tmp_path / "pwned"
    evil = clone(export, tmp_path / "evil")
    base = read_cfg(export)
    write_cfg(
        evil,
        {
            **base,
            "model": {
                **base["model"],
                "encoder": _evil_component(base, "encoder", "vlm.data.media.io.open", pwned, False),
            },
        },
    )
    runs = {
        "infer hostile target": (
            ["infer.py", f"ckpt={evil}", "prompt=hi"],
            [str(evil / "config.yaml"), "model.encoder._target_='vlm.data.media.io.open'"],
        )
    }
    for name in ("weights_header_2_62", "config_is_dev_zero", "config_is_fifo"):
        folder, file, needles = damaged[name]
        runs[f"infer {name}"] = (["infer.py", f"ckpt={folder}", "prompt=hi"], [str(file), *needles])
    path, needles = bad_ckpts["pickled_object"]
    runs["infer pickled ckpt"] = (["infer.py", f"ckpt={path}", "prompt=hi"], [str(path), *needles])
    runs["export pickled ckpt"] = (
        ["-m", "vlm.cli.export", f"ckpt={path}", f"out={tmp_path / 'out'}"],
        [str(path), *needles],
    )
    resume = tmp_path / "resume.ckpt"
    torch.save({"state_dict": {}, "x": _Pwn(pwned)}, resume)
    runs["train resume pickled ckpt"] = (
        ["train.py", f"ckpt_path={resume}", "logger=none", f"paths.data_dir={tmp_path}", *TINY],
        [str(resume), "Unsupported global: GLOBAL io.open"],
    )
    procs = {}
    for i, (name, (args, _)) in enumerate(runs.items()):
        if args[0] in ("infer.py", "train.py"):
            args = [*args, f"hydra.run.dir={tmp_path / f'h{i}'}"]
        procs[name] = args
    results = {}
    names = list(procs)
    for batch in (names[i : i + 2] for i in range(0, len(names), 2)):  # two at a time: each is mostly imports
        started = {name: _cli(procs[name]) for name in batch}
        for name, proc in started.items():
            results[name] = (proc, *proc.communicate(timeout=300))
    for name, (proc, _out, err) in results.items():
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        lines = [line for line in err.splitlines() if line.strip() and "Seed set" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        for n in runs[name][1]:
            assert n in lines[0], (name, n, lines[0])
    assert not pwned.exists() and not (tmp_path / "out").exists()
