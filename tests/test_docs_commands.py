"""Every `python …` command the user docs show is a command that works as written.

The commands are read from README.md, data/README.md and docs/**/*.md (fenced shell blocks and
inline `python …` spans) and from the comments of conf/data/*.yaml. Each is split the way bash
splits it (quotes, `\\` continuations, a quoted value over several lines, `#` comments, `&&`,
`VAR=… python …`, `torchrun … train.py …`, `srun python …`) and then checked without training
anything:

- `train.py` / `infer.py` / `serve.py`: the overrides compose against conf/ with Hydra's compose
  API (unknown keys, bad group options and unquoted braces fail), and train.py's own pre-Hydra
  check (`vlm.build.overrides.check_overrides`) accepts them. A sweep (`-m a=1,2`) composes its
  first point. Placeholders such as PATH or outputs/DATE/TIME are fine as values.
- `python -m MODULE`: the module imports; a Hydra app composes the arguments, a module with a
  `parse_args(argv)` parses them.
- `python data/*.py`, `python bench/*.py`: the script exists and its argparse parser accepts the
  arguments (parsing only: nothing after `parse_args` runs).

Run for real where it is cheap: each data/*.py script with `--help`, and every `train.py` /
`infer.py` / `serve.py` command whose quoting matters (quotes, braces, brackets) with `--cfg job`
(the app's own argument checks and Hydra's parsing of the real argv, no training).

In inline spans, `a|b|c` is the docs' way of writing "one of": each alternative is checked, and a
lone `…` stands for arguments left out. Each command is one test case, `FILE:LINE`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CONF_COMMENTS = sorted((CONF / "data").glob("*.yaml"))
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
HYDRA_APPS = {"train.py": "train", "infer.py": "infer", "serve.py": "serve"}
WRAPPERS = {"srun", "exec", "time", "nohup", "env"}
ELLIPSIS = {"…", "..."}


@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    text: str  # as written (continuations joined)
    argv: tuple[str, ...]  # after `python`: ("train.py", "a=b", …) or ("-m", "pkg.mod", …)


# ---------------------------------------------------------------------------------- extraction


def split_shell(text: str, first_line: int) -> list[tuple[int, str]]:
    """Simple commands of a shell snippet as (line, text): split at unquoted newlines, `;`, `&&`,
    `||` and `|`; `\\`-newline joins lines; an unquoted `#` at a word's start comments out the rest
    of its line; quotes may span lines, as in bash."""
    out: list[tuple[int, str]] = []
    cur: list[str] = []
    line, start = first_line, first_line
    quote = ""
    i = 0

    def flush() -> None:
        s = "".join(cur).strip()
        if s:
            out.append((start, s))
        cur.clear()

    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"' and i + 1 < len(text):
                cur.append(text[i : i + 2])
                line += text[i + 1] == "\n"
                i += 2
                continue
            if c == quote:
                quote = ""
            line += c == "\n"
            cur.append(c)
        elif c in "'\"":
            if not "".join(cur).strip():
                start = line
            quote = c
            cur.append(c)
        elif c == "\\" and i + 1 < len(text):
            if text[i + 1] == "\n":
                cur.append(" ")
                line += 1
            else:
                cur.append(text[i : i + 2])
            i += 2
            continue
        elif c == "#" and (not cur or cur[-1] in " \t\n"):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif c == "\n":
            flush()
            line += 1
            start = line
        elif c in ";|&":
            flush()
            while i + 1 < len(text) and text[i + 1] in "|&":
                i += 1
            start = line
        else:
            if not "".join(cur).strip():
                start = line
            cur.append(c)
        i += 1
    flush()
    return out


def python_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after `python` of a simple command, or None if it does not run Python."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value python …
        tokens = tokens[1:]
    if not tokens:
        return None
    prog = tokens[0]
    if prog in WRAPPERS:
        rest = tokens[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        return python_argv(rest)
    if re.fullmatch(r"python(3(\.\d+)?)?", prog):
        return tokens[1:]
    if prog == "torchrun":  # torchrun [--opt=value …] script.py args | -m module args
        rest = tokens[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        return rest
    return None


def _fenced(path: Path) -> tuple[list[tuple[int, str, str]], set[int]]:
    """(first line, language, text) of each fenced block, and the line numbers inside fences."""
    blocks, inside = [], set()
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, j = m.group(1), m.group(2).lower(), i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(fence):
            j += 1
        blocks.append((i + 2, lang, "\n".join(lines[i + 1 : j])))
        inside.update(range(i + 1, j + 2))
        i = j + 1
    return blocks, inside


def _alternatives(argv: list[str]) -> list[list[str]]:
    """`key=a|b|c` in an inline span: one command per alternative."""
    for k, a in enumerate(argv):
        if "|" in a and "=" in a and not a.split("=", 1)[1].startswith(("[", "{", "'", '"')):
            key, vals = a.split("=", 1)
            return [x for v in vals.split("|") for x in _alternatives([*argv[:k], f"{key}={v}", *argv[k + 1 :]])]
    return [argv]


def extract(path: Path) -> list[Command]:
    rel = path.relative_to(ROOT).as_posix()
    found: list[tuple[int, str, list[str]]] = []
    if path.suffix == ".yaml":  # commands in comments: `#   python train.py … \` and `python …` spans
        comment = []
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"\s*#\s?(.*)", raw)
            comment.append((n, m.group(1) if m else ""))
        text = "\n".join(c for _, c in comment)
        for line, cmd in split_shell(text, 1):
            cmd = cmd.strip().strip("`")
            argv = python_argv(shlex.split(cmd)) if cmd.startswith("python") else None
            if argv is not None:
                found.append((line, cmd, argv))
        return _commands(rel, found, inline=False)
    blocks, inside = _fenced(path)
    for first, lang, text in blocks:
        if lang not in SHELL_LANGS:
            continue
        for line, cmd in split_shell(text, first):
            try:
                tokens = shlex.split(cmd)
            except ValueError as e:  # an unbalanced quote: still a command, and a broken one
                if cmd.lstrip().startswith("python"):
                    found.append((line, cmd, [f"<shlex: {e}>"]))
                continue
            argv = python_argv(tokens)
            if argv is not None:
                found.append((line, cmd, argv))
    text = path.read_text()
    inline = []
    for m in re.finditer(r"(?<!`)`(python[3]? [^`]+)`(?!`)", text):
        line = text.count("\n", 0, m.start()) + 1
        if line in inside:
            continue
        cmd = " ".join(m.group(1).split())
        inline.append((line, cmd, python_argv(shlex.split(cmd)) or []))
    return _commands(rel, found, inline=False) + _commands(rel, inline, inline=True)


def _commands(rel: str, found, inline: bool) -> list[Command]:
    out = []
    for line, cmd, argv in found:
        argv = [a for a in argv if a not in ELLIPSIS]
        for alt in _alternatives(argv) if inline else [argv]:
            out.append(Command(f"{rel}:{line}", cmd, tuple(alt)))
    return out


def all_commands() -> list[Command]:
    generated = ROOT / "docs" / "reference"  # written from conf/ by vlm.cli.config_reference
    cmds = [c for p in [*DOCS, *CONF_COMMENTS] if generated not in p.parents for c in extract(p)]
    seen: dict[str, int] = {}
    out = []
    for c in cmds:  # ids stay unique: a second command on the same line is FILE:LINE#2
        seen[c.where] = seen.get(c.where, 0) + 1
        where = c.where if seen[c.where] == 1 else f"{c.where}#{seen[c.where]}"
        out.append(Command(where, c.text, c.argv))
    return out


COMMANDS = all_commands()


# ------------------------------------------------------------------------------------ checks


def _first_point(overrides: list[str]) -> list[str]:
    """A sweep's first point: `a=1,2` -> `a=1` (what one run of `-m` gets)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            o = f"{'+' if parsed.is_add() else ''}{parsed.key_or_group}={first}"
        out.append(o)
    return out


def compose_app(config_dir: Path, config_name: str, args: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    overrides = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in overrides if a.startswith("-")]
    assert not flags, f"Hydra flags this test does not know: {flags}"
    overrides = _first_point(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):  # an `optional` group takes any name
        group, option = o.key_or_group.split("@", 1)[0], o.value()
        if (config_dir / group).is_dir() and isinstance(option, str) and not o.is_delete():
            assert (config_dir / group / f"{option}.yaml").is_file(), f"{group}={option}: no conf/{group}/{option}.yaml"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        compose(config_name=config_name, overrides=overrides)


def _hydra_main(module_file: Path) -> tuple[Path, str] | None:
    """(config dir, config name) of a `@hydra.main(config_path=…, config_name=…)` in the file."""
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("hydra.main", "main"):
            kw = {k.arg: k.value for k in node.keywords}
            try:
                path, name = ast.literal_eval(kw["config_path"]), ast.literal_eval(kw["config_name"])
            except (KeyError, ValueError):  # not literals: the module is checked another way
                continue
            return (module_file.parent / path).resolve(), name
    return None


class _Parsed(Exception):
    pass


def parse_script_args(script: Path, args: list[str]) -> None:
    """Run the script's `__main__` only up to its argparse `parse_args`: the parser must accept
    `args` (an error is argparse's exit 2); nothing after parsing runs."""
    assert "argparse" in script.read_text(), f"{script.name} does not parse its arguments with argparse"
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, a=None, namespace=None):
        real(self, a, namespace)
        raise _Parsed

    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args]
    err = io.StringIO()
    argparse.ArgumentParser.parse_args = parse_only
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as e:
        assert e.code in (0, None), f"argparse refused the arguments: {err.getvalue().strip()}"
        return
    finally:
        argparse.ArgumentParser.parse_args = real
        sys.argv, sys.path[:] = argv, path
    raise AssertionError(f"{script.name} finished without parsing its arguments")


def check(cmd: Command) -> None:
    argv = list(cmd.argv)
    assert argv, "no arguments after python"
    assert not argv[0].startswith("<shlex"), f"bash would not split it: {argv[0]}"
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if not module.startswith("vlm."):
            return
        mod = importlib.import_module(module)
        source = Path(mod.__file__).read_text()
        assert re.search(r"^if __name__ == .__main__.:", source, re.M), f"{module} cannot run as python -m"
        tool = getattr(mod, "TOOL", None)
        app = _hydra_main(Path(mod.__file__))
        if callable(getattr(tool, "compose", None)):  # a vlm.cli tool: its own argument rules, then Hydra
            tool.compose(args)
        elif app is not None:
            compose_app(*app, args)
        elif callable(getattr(mod, "parse_args", None)):
            mod.parse_args(args)
        return
    if argv[0] in ("-c",):
        return
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]}: no such script"
    args = argv[1:]
    if argv[0] in HYDRA_APPS:
        if argv[0] == "train.py":
            from vlm.build.overrides import check_overrides

            problem = check_overrides(args)
            assert problem is None, f"train.py refuses it: {problem}"
        if "--help" in args or "-h" in args:
            _run_for_real(argv)
            return
        compose_app(CONF, HYDRA_APPS[argv[0]], args)
        if re.search(r"['\"{\[]", cmd.text):  # quoting matters: the real entry point must take it too
            _run_for_real([*argv, "--cfg", "job"])
        return
    if "--help" in args or "-h" in args:
        _run_for_real(argv)
        return
    parse_script_args(script, args)


def _run_for_real(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]


SCRIPTS = sorted({c.argv[0] for c in COMMANDS if re.fullmatch(r"data/\w+\.py", c.argv[0])})


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_script_answers_help(script):
    """Each data/*.py script the docs use runs for real (`--help`: argparse, imports, no work)."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), (r.stdout + r.stderr)[-2000:]


def test_the_docs_have_commands():
    files = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "data/README.md", "docs/serving.md"} <= files
    assert len(COMMANDS) > 100


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(cmd: Command):
    try:
        check(cmd)
    except Exception as e:  # the doc's place and text first: that is what to fix
        raise AssertionError(f"{cmd.where}: {cmd.text}\n  {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- the splitter itself


def test_split_shell_reads_commands_as_bash_does():
    text = (
        "# a comment\n"
        "FOO=1 python train.py a=1 \\\n"
        "  b=2   # trailing comment\n"
        "pip install x && python -m pytest -q\n"
        "python train.py 'data.sources=[\n"
        "  {name: a}]' c=3\n"
        "torchrun --nproc_per_node=2 train.py trainer=ddp\n"
        "srun python infer.py ckpt=x\n"
    )
    cmds = [(n, python_argv(shlex.split(c))) for n, c in split_shell(text, 10)]
    assert [(n, a) for n, a in cmds if a is not None] == [
        (11, ["train.py", "a=1", "b=2"]),
        (13, ["-m", "pytest", "-q"]),
        (14, ["train.py", "data.sources=[\n  {name: a}]", "c=3"]),
        (16, ["train.py", "trainer=ddp"]),
        (17, ["infer.py", "ckpt=x"]),
    ]


def test_unquoted_braces_and_unknown_keys_fail():
    from hydra.errors import ConfigCompositionException, OverrideParseException

    with pytest.raises(OverrideParseException):
        compose_app(CONF, "train", ["data=shards", "data.train_shards=shards/x-{000000..000099}.tar"])
    with pytest.raises(ConfigCompositionException):
        compose_app(CONF, "train", ["model.encoder.dimm=3"])
    with pytest.raises(AssertionError, match="no conf/model/projector/mlpp.yaml"):
        compose_app(CONF, "train", ["model/projector=mlpp"])
    compose_app(CONF, "train", ["data=shards", 'data.train_shards="shards/x-{000000..000099}.tar"'])


# ------------------------------------------------------------------------------------- links


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (code blocks left out)."""
    _, inside = _fenced(path)
    out = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"#{1,6} (.*)", line)
        if m and n not in inside:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def _links() -> list[tuple[str, Path, str]]:
    out = []
    for path in DOCS:
        _, inside = _fenced(path)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if n in inside:
                continue
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if not re.match(r"[a-z]+:", target):
                    out.append((f"{path.relative_to(ROOT).as_posix()}:{n}", path, target))
    return out


LINKS = _links()


@pytest.mark.parametrize(("where", "path", "target"), LINKS, ids=[f"{w}->{t}" for w, _, t in LINKS])
def test_doc_link_resolves(where, path, target):
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    assert dest.exists(), f"{where}: {target}: no such file"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{where}: {target}: no heading with that anchor in {dest.name}"


# --------------------------------------------------------------------------- config reference


def test_config_reference_is_current():
    """docs/reference/config.md is what `python -m vlm.cli.config_reference` prints now."""
    from vlm.cli.config_reference import reference

    committed = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert committed == reference(), (
        "docs/reference/config.md is stale: python -m vlm.cli.config_reference > docs/reference/config.md"
    )


# ------------------------------------------------------------------ pre-generated synthvqa data


def _synthvqa_options(call) -> tuple[str, dict]:
    """(folder, the options `ensure_synthvqa` records) of what `call()` would generate."""
    import inspect

    import vlm.synthvqa as synthvqa
    from vlm.synthvqa import SynthConfig
    from vlm.synthvqa.dataset import _options

    seen = []
    real = synthvqa.ensure_synthvqa

    def record(*a, **kw):
        seen.append(inspect.signature(real).bind(*a, **kw))
        raise _Parsed

    if importlib.util.find_spec("vlm.cli.make_synthetic"):  # where the script's code may live
        importlib.import_module("vlm.cli.make_synthetic")
    holders = [m for m in list(sys.modules.values()) if getattr(m, "ensure_synthvqa", None) is real]
    for m in holders:  # every module that imported it by name
        m.ensure_synthvqa = record
    try:
        call()
    except _Parsed:
        pass
    finally:
        for m in holders:
            m.ensure_synthvqa = real
    (bound,) = seen
    bound.apply_defaults()
    args = dict(bound.arguments)
    args["cfg"] = SynthConfig.from_any(args["cfg"])
    keys = ("train_samples", "heldout_samples", "cfg", "seed", "heldout_seed", "vocab_size", "shard_size")
    return str(Path(args["root"])), _options(*(args[k] for k in keys))


def test_pregenerated_synthvqa_is_what_training_makes():
    """A documented `make_synthetic.py --out data/synthvqa` writes the folder `python train.py`
    would make on first use, with the same options: other options make training regenerate it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.synthvqa import SynthConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        synth = OmegaConf.to_container(compose("train").data.synthetic, resolve=True)
    root = synth.pop("root")
    fields = {k: synth.pop(k) for k in list(synth) if k in SynthConfig.__dataclass_fields__}

    import vlm.synthvqa as synthvqa

    training = _synthvqa_options(lambda: synthvqa.ensure_synthvqa(root, cfg=SynthConfig(**fields), **synth))
    script = ROOT / "data" / "make_synthetic.py"
    cmds = [c for c in COMMANDS if c.argv[:1] == ("data/make_synthetic.py",) and "data/synthvqa" in c.argv]
    assert cmds, "no documented command pre-generates data/synthvqa"
    for c in cmds:
        argv, sys_argv = [str(script), *c.argv[1:]], sys.argv
        sys.argv = argv
        try:
            made = _synthvqa_options(lambda: runpy.run_path(str(script), run_name="__main__"))
        finally:
            sys.argv = sys_argv
        assert made == training, f"{c.where}: {c.text} makes other data than python train.py"
