"""What the ``python -m vlm.cli.*`` tools share: each is a Hydra app on ``conf/<name>.yaml``.

Arguments are ``key=value`` Hydra overrides, as for ``train.py``. Before Hydra sees them, `Tool`
checks the keys (an unknown key is one line, not Hydra's "Key 'foo' is not in struct"), passes the
values of path- and name-like keys through verbatim (a comma, a space or ``${`` in a path is part of
it) and collects a key given several times (``image=a.png image=b.png``) into a list. Inside the
app, a missing required key (``???``) and the errors of `vlm.errors` are one ``error:`` line and
exit 2. Hydra's flags (``--cfg job``, ``--info``, ``hydra.*=…``) work as for any Hydra app, except
``--multirun``.

The tools write nothing besides their own outputs: their configs set ``hydra.output_subdir: null``,
``hydra.run.dir: .`` and ``hydra/job_logging: none`` (logging is left as it is).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlm.errors import user_errors

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
CONF_PATH = str(CONF)  # the checkout's conf/, found from this file (not the working directory)
HELP = ("-h", "--help", "help")


def quote(value: str) -> str:
    """`value` as a Hydra quoted string that parses back to exactly `value` (no interpolation)."""
    value = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote, ${ or the end
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def _is_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


@functools.cache
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def verbatim(value: str) -> str:
    """`value` as written when Hydra reads it back as that same string, else quoted (`quote`)."""
    if _is_quoted(value):
        return value
    if "${" not in value and "\\" not in value:
        try:
            if _parser().parse_override(f"k={value}").value() == value:
                return value
        except Exception:  # not a plain value (a comma, a bracket, …)
            pass
    return quote(value)


@dataclass(frozen=True)
class Tool:
    """One ``python -m vlm.cli.NAME`` tool: its config name, help text and argument rules."""

    name: str  # conf/<name>.yaml
    doc: str  # printed by -h / --help / help
    text: tuple[str, ...] = ()  # keys whose values are taken verbatim as strings (paths, names)
    repeat: tuple[str, ...] = ()  # keys that may be given several times: collected into a list

    def keys(self) -> list[str]:
        cfg = OmegaConf.load(CONF / f"{self.name}.yaml")
        return [k for k in cfg if k not in ("defaults", "hydra")]

    def overrides(self, argv: Sequence[str]) -> list[str]:
        """``key=value`` arguments -> Hydra overrides; ValueError names a bad argument."""
        known = self.keys()
        out: list[str] = []
        repeated: dict[str, list[str]] = {}
        where: dict[str, int] = {}  # a repeated key's list goes where the key first appeared
        flag_value = False  # the word after a Hydra flag (`--cfg job`)
        for a in argv:
            if a in ("-m", "--multirun"):
                raise ValueError(f"python -m vlm.cli.{self.name} runs once: no {a}")
            if a.startswith("-"):
                out.append(a)
                flag_value = "=" not in a
                continue
            if flag_value and "=" not in a:
                out.append(a)
                flag_value = False
                continue
            flag_value = False
            if a.startswith(("+", "~", "hydra.", "hydra/")):  # Hydra's own syntax: as written
                out.append(a)
                continue
            key, eq, value = a.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"expected key=value, got {a!r} (keys: {', '.join(known)})")
            if key.split(".", 1)[0] not in known:
                raise ValueError(f"unknown key {key!r} (keys: {', '.join(known)})")
            if key in self.repeat:
                if key not in repeated:
                    repeated[key], where[key] = [], len(out)
                    out.append("")
                repeated[key].append(value)
                continue
            if key in self.text:
                value = verbatim(value)
            out.append(f"{key}={value}")
        for key, values in repeated.items():
            if len(values) == 1 and values[0].startswith("["):  # already a Hydra list: image=[a.png,b.png]
                item = f"{key}={values[0]}"
            elif any(v.startswith("[") for v in values):
                raise ValueError(f"give {key}= either as one list or several times, not both")
            else:
                item = f"{key}=[{','.join(verbatim(v) for v in values)}]"
            out[where[key]] = item
        self._check_syntax(out)
        return out

    @staticmethod
    def _check_syntax(overrides: list[str]) -> None:
        """Hydra's grammar, checked here so that a slip is one line (Hydra prints several)."""
        from hydra.errors import HydraException

        for a in overrides:
            if a.startswith("-") or "=" not in a:
                continue
            try:
                o = _parser().parse_override(a)
            except HydraException as e:
                raise ValueError(f"cannot read {a!r}: {str(e).splitlines()[0]}") from None
            if o.is_sweep_override():
                key = a.split("=", 1)[0]
                raise ValueError(f"{a!r} is a list of choices: write a list as {key}=[a,b], or quote the value")

    def compose(self, argv: Sequence[str] = ()) -> DictConfig:
        """The config the app would run with for these arguments (without the ``hydra`` section)."""
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=CONF_PATH, version_base="1.3"):
            return compose(self.name, overrides=self.overrides(argv))

    def main(self, app: Callable[[], object], argv: Sequence[str] | None = None) -> int:
        """Run the Hydra app `app` (a `hydra.main` function) on `argv`; the exit status."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] in HELP:
            print(self.doc)
            return 0
        try:
            overrides = self.overrides(argv)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        saved = sys.argv
        sys.argv = [f"python -m vlm.cli.{self.name}", *overrides]  # hydra.main reads sys.argv
        try:
            app()
        except SystemExit as e:
            if isinstance(e.code, str):  # a message: Python prints it when the process ends
                print(e.code, file=sys.stderr)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = saved
        return 0

    def run(self, fn: Callable[[DictConfig], int], cfg: DictConfig, usage: str) -> None:
        """Inside the app: the required keys, then `fn`; a user error is one line and exit 2, a
        nonzero status from `fn` is the exit status."""
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            given = " and ".join(f"{k}=" for k in missing)
            print(f"error: {given} missing; usage: {usage}", file=sys.stderr)
            sys.exit(2)
        with user_errors():
            code = fn(cfg)
        if code:
            sys.exit(code)
