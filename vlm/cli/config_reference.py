"""`python -m vlm.cli.config_reference > docs/reference/config.md`: every key of the composed
`train.py`, `infer.py` and `serve.py` configs with its default and the comment beside it in conf/,
and the config groups with their options.

The output is committed; tests/test_docs_commands.py fails when it differs from what this prints,
so a config change that is not regenerated is caught.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
APPS = (("train.py", "train"), ("infer.py", "infer"), ("serve.py", "serve"))
KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(.*)$")


def _comment(rest: str) -> str:
    """The comment after a YAML value (`# …` outside quotes), else ''."""
    quote = ""
    for i, c in enumerate(rest):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1 :].strip()
    return ""


def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """(package, {dotted key: the comment beside it}) of one config file; a comment continued on the
    next lines (a comment-only line indented deeper than its key) is joined to it."""
    text = path.read_text()
    rel = path.relative_to(CONF).with_suffix("")
    package = ".".join(rel.parts[:-1]) if len(rel.parts) > 1 else ""
    m = re.search(r"^# @package (\S+)", text, re.M)
    if m:
        package = "" if m.group(1) == "_global_" else m.group(1).replace("_group_", package)
    out: dict[str, str] = {}
    blocks: dict[str, str] = {}  # keys whose comment is the block above them
    stack: list[tuple[int, str]] = []
    last: tuple[str, int] | None = None  # the key whose comment may continue, and its indent
    above: list[str] = []  # comment lines right above the next key (not the file's header)
    header = True
    for line in text.splitlines():
        only_comment = re.match(r"^(\s*)#\s?(.*)$", line)
        if only_comment:
            if last is not None and len(only_comment.group(1)) > last[1]:
                out[last[0]] += " " + only_comment.group(2).strip()
            elif not only_comment.group(2).startswith("@package"):
                above.append(only_comment.group(2).strip())
            continue
        if not line.strip():
            above = []
            continue
        last = None
        item = re.match(r"^(\s*)- ", line)
        if item:  # an item of a block list: its keys belong to the list's value
            while stack and stack[-1][0] >= len(item.group(1)) and stack[-1][1] != "\0list":
                stack.pop()
            if not stack or stack[-1][1] != "\0list":
                stack.append((len(item.group(1)), "\0list"))
            continue
        m = KEY.match(line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and stack[-1][1] == "\0list":  # keys of a list item: part of the list's value
            continue
        dotted = ".".join([*(k for _, k in stack), key])
        note = _comment(rest)
        if not note and above and not header:
            note = " ".join(above)
            blocks[dotted] = note
        above, header = [], False
        if note:
            out[dotted] = note
            last = (dotted, indent) if dotted not in blocks else None
        value = rest.split("#", 1)[0].strip()
        if value == "":
            stack.append((indent, key))
    return package, out


def comment_index(files: list[Path]) -> dict[str, str]:
    """{full dotted key: comment}, later files winning (the defaults order)."""
    out: dict[str, str] = {}
    for f in files:
        package, notes = yaml_comments(f)
        for k, v in notes.items():
            out[f"{package}.{k}" if package else k] = v
    return out


def _files(config_name: str, choices: dict[str, str | None]) -> list[Path]:
    """The config files a composition read, roughly in defaults order: each group's option (and the
    same-group files its defaults list names), then the primary config."""
    files: list[Path] = []

    def add(group: str, option: str) -> None:
        path = CONF / group / f"{option}.yaml"
        if not path.is_file() or path in files:
            return
        for d in yaml.safe_load(path.read_text()).get("defaults", []) or []:
            if isinstance(d, str) and d != "_self_":
                add(group, d)
        files.append(path)

    for group, option in choices.items():
        if option and not group.startswith("hydra") and "@" not in group:
            add(group, option)
    files.append(CONF / f"{config_name}.yaml")
    return files


def _value(v) -> str:
    if isinstance(v, (dict, list)):
        s = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    elif v is None:
        s = "null"
    elif isinstance(v, bool):
        s = str(v).lower()
    else:
        s = str(v)
    return s


def _cell(s: str) -> str:
    s = s.replace("|", "\\|")
    return f"`{s}`" if s else ""


SECTION = object()  # a row for a section's own comment


def _rows(cfg: DictConfig, prefix: str = ""):
    for key in cfg:
        node = cfg._get_node(key)
        full = f"{prefix}{key}"
        if isinstance(node, DictConfig) and not node._is_none() and len(node) > 0 and not node._is_missing():
            yield full, SECTION
            yield from _rows(node, f"{full}.")
        else:
            raw = OmegaConf.to_container(cfg, resolve=False)[key] if not node._is_missing() else "???"
            if isinstance(node, (DictConfig, ListConfig)) and not node._is_none() and not node._is_missing():
                raw = OmegaConf.to_container(node, resolve=False)
            yield full, raw


def _plus_only(cfg: DictConfig) -> list[str]:
    """Fields of the typed specs that the composed config leaves out: they are added with `+key=value`."""
    from vlm.model.config import COMPONENTS
    from vlm.synthvqa import SynthConfig

    out = []
    for name, cls in COMPONENTS.items():
        have = set(cfg.model.get(name) or {})
        out += [f"model.{name}.{f.name}" for f in dataclasses.fields(cls) if f.name not in have]
    synth = cfg.data.get("synthetic")
    if synth is not None:
        out += [f"data.synthetic.{f.name}" for f in dataclasses.fields(SynthConfig) if f.name not in set(synth)]
    return out


def _groups(choices: dict[str, str | None]) -> list[tuple[str, str, list[str]]]:
    out = []
    for group, option in choices.items():
        if group.startswith("hydra") or "@" in group or not (CONF / group).is_dir():
            continue
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        out.append((group, option or "null", options))
    return sorted(out)


def reference() -> str:
    from hydra import compose, initialize_config_dir

    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m vlm.cli.config_reference > docs/reference/config.md` from `conf/`; "
        "`tests/test_docs_commands.py` fails when this file is not what the generator prints.",
        "",
        "Every key below is set on the command line with `key=value` (`python train.py data.batch_size=8`), "
        "a group with `group=option` (`python train.py model/projector=linear`). A key the composed config "
        "does not hold is added with `+key=value` and a key is removed with `~key`; Hydra refuses "
        "`key=value` for a key that is not there. Defaults are shown as written in `conf/` "
        "(`${…}` interpolations unresolved).",
        "",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for script, name in APPS:
            full = compose(name, return_hydra_config=True)
            choices = dict(full.hydra.runtime.choices)
            cfg = compose(name)
            notes = comment_index(_files(name, choices))
            lines += [f"## `python {script}` (`conf/{name}.yaml`)", ""]
            head = (CONF / f"{name}.yaml").read_text().splitlines()
            top = [re.sub(r"^# ?", "", h) for h in head[: next(i for i, h in enumerate(head) if not h.startswith("#"))]]
            lines += [*top, ""]
            groups = _groups(choices)
            if groups:
                lines += ["Config groups (`group=option`):", "", "| group | default | options |", "| --- | --- | --- |"]
                lines += [f"| `{g}` | `{o}` | {', '.join(f'`{x}`' for x in opts)} |" for g, o, opts in groups]
                lines += [""]
            lines += ["| key | default | comment |", "| --- | --- | --- |"]
            for key, raw in _rows(cfg):
                note = notes.get(key, "").replace("|", "\\|")
                if raw is SECTION:
                    if note:
                        lines.append(f"| `{key}.*` | | {note} |")
                    continue
                lines.append(f"| `{key}` | {_cell(_value(raw))} | {note} |")
            lines.append("")
            if name == "train":
                plus = _plus_only(cfg)
                lines += [
                    "Fields of the model spec (`vlm/model/config.py`) and of `SynthConfig` "
                    "(`vlm/synthvqa/config.py`) that the composed config leaves out take their "
                    "defaults from the code; set them with `+`, e.g. `+data.synthetic.ocr_min_len=1`:",
                    "",
                    ", ".join(f"`{k}`" for k in plus),
                    "",
                ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
