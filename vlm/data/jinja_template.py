"""A model folder's own chat template (`tokenizer_config.json` → `chat_template`), rendered safely.

    data.template.jinja=/models/Qwen2-VL-2B-Instruct      # a folder, a tokenizer_config.json, or a .jinja file

Chat templates from the Hub are untrusted code: they run in Jinja's `ImmutableSandboxedEnvironment`
with the same settings, globals and filters as transformers' `apply_chat_template`
(`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that does not
escape HTML, `loopcontrols`), and jinja2 >= 3.1.6 (older versions have known sandbox escapes).

User text stays text. Every text item is handed to the template as an opaque sentinel; the
rendered string is cut at the sentinels, the template's own text is tokenized with its special
tokens, and the user's text is tokenized with special tokens disabled — so a caption holding
`<|im_end|>` or `<image>` cannot forge structure (the same guarantee as `ChatTemplate`).

Media: the template writes its own marker for each `{"type": "image"}` / `{"type": "video"}` item
(Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`, LLaVA: `<image>`); each marker occurrence
is replaced, in order, by the media item's visual-token span (`token_count` pad tokens).

Labels: the assistant's tokens, found by rendering each conversation prefix with and without the
assistant message (`add_generation_prompt=True` for the former): whatever the template adds for
that message, its end-of-turn token included, is trained on.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from vlm.data.template import IGNORE, ChatTemplate, Rendered, TemplateError

_SENT = re.compile("\ue000(\\d+)\ue001")


def load_chat_template(source: str) -> tuple[str, dict]:
    """(template string, special-token strings {bos_token, eos_token, …}) from a model folder, a
    `tokenizer_config.json`, a `chat_template.jinja` / `.json` file, or the template text itself."""
    specials: dict = {}
    if "{%" in source or "{{" in source:  # the template text itself
        return source, specials
    p = Path(source)
    if p.is_dir():
        for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (p / name).is_file():
                if name != "tokenizer_config.json" and (p / "tokenizer_config.json").is_file():
                    specials = _specials(json.loads((p / "tokenizer_config.json").read_text()))
                text, more = load_chat_template(str(p / name))
                return text, {**specials, **more}
        raise FileNotFoundError(f"{p}: no chat_template.jinja, chat_template.json or tokenizer_config.json")
    if p.suffix == ".jinja" and p.is_file():
        return p.read_text(), specials
    if p.suffix == ".json" and p.is_file():
        cfg = json.loads(p.read_text())
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take "default"
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        if not isinstance(tmpl, str):
            raise ValueError(f"{p}: no chat_template string")
        return tmpl, _specials(cfg)
    raise FileNotFoundError(f"chat template not found: {source}")


def generation_stop_ids(source: str) -> list[int]:
    """The `eos_token_id`s of the `generation_config.json` beside a chat template (a model folder
    or a file in one): Llama 3 Instruct ends a turn with `<|eot_id|>` (128009), which its
    tokenizer_config's `eos_token` (`<|end_of_text|>`) does not name. [] when there is none."""
    if "{%" in source or "{{" in source:
        return []
    p = Path(source)
    f = (p if p.is_dir() else p.parent) / "generation_config.json"
    if not f.is_file():
        return []
    try:
        ids = json.loads(f.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{f}: not a JSON object ({e})") from None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{f}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return ids


def _specials(cfg: dict) -> dict:
    out = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def compile_template(text: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    major, minor, patch = (int(x) for x in (jinja2.__version__.split(".") + ["0", "0"])[:3])
    if (major, minor, patch) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (sandbox fixes), found {jinja2.__version__}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(text)


class JinjaChatTemplate(ChatTemplate):
    """`ChatTemplate` whose chat rendering is the model's own Jinja template (see the module
    docstring); documents, positions, `max_length` and media checks are `ChatTemplate`'s.

    jinja: the template text. specials: `bos_token` / `eos_token` strings the template may use.
    media_markers: what the template writes for an image / a video item (found in the template's
    output in order). Other args: `ChatTemplate`'s."""

    def __init__(
        self, tokenizer, token_count, jinja: str, specials: dict | None = None, media_markers: dict | None = None, **kw
    ):
        super().__init__(tokenizer, token_count, **kw)
        self.jinja_text = jinja
        self._tmpl = compile_template(jinja)
        self.specials = dict(specials or {})
        self.media_markers = dict(media_markers or {"image": "<|image_pad|>", "video": "<|video_pad|>"})
        self._marker_re = re.compile("|".join(re.escape(m) for m in self.media_markers.values()))
        # the template's own text is tokenized with its special tokens live (a second tokenizer
        # object, so the shared one keeps treating user text as text)
        from tokenizers import Tokenizer

        self._structure_tok = Tokenizer.from_str(tokenizer.to_str())
        self._structure_tok.encode_special_tokens = False

    # -- rendering -------------------------------------------------------------------------------
    def _hf_messages(self, messages: list[dict], texts: list[str], media: list[tuple[str, int]]) -> list[dict]:
        out = []
        for msg in messages:
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in ("system", "user", "assistant"):
                raise TemplateError(f"unknown role {role!r}")
            content = msg.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise TemplateError(f"message content must be a string or a list, got {type(content).__name__}")
            items = []
            for it in content:
                kind = it.get("type") if isinstance(it, dict) else None
                if kind == "text":
                    if not isinstance(it.get("text"), str):
                        raise TemplateError("text item without a string 'text'")
                    texts.append(it["text"])
                    items.append({"type": "text", "text": f"\ue000{len(texts) - 1}\ue001"})
                elif kind in ("image", "video"):
                    media.append((kind, it.get("media")))
                    items.append({"type": kind})
                else:
                    raise TemplateError(f"unknown content item type {kind!r}")
            # text-only messages as one string: most LLM templates expect `content` to be a string
            if all(i["type"] == "text" for i in items):
                out.append({"role": role, "content": "".join(i["text"] for i in items)})
            else:
                out.append({"role": role, "content": items})
        return out

    def _render_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)

    def render_messages(self, messages, grids, media_kinds=None, add_generation_prompt: bool = False) -> Rendered:
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        texts: list[str] = []
        media: list[tuple[str, int]] = []
        hf = self._hf_messages(messages, texts, media)
        full = self._render_text(hf, add_generation_prompt)
        # assistant spans: what each assistant message adds after its generation prompt
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(hf):
            if m["role"] != "assistant":
                continue
            before = self._render_text(hf[:i], True)
            upto = self._render_text(hf[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(
                    "the chat template does not render conversations prefix by prefix; "
                    "its assistant tokens cannot be located"
                )
            end = len(upto)
            while end > len(before) and upto[end - 1] in " \t\n":  # the newline after the turn is not generated
                end -= 1
            spans.append((len(before), end))
        return self._tokenize(full, texts, media, grids, media_kinds, spans)

    def _tokenize(self, full: str, texts, media, grids, media_kinds, spans) -> Rendered:
        ids: list[int] = []
        labels: list[int] = []
        order: list[int] = []
        kinds: list[str] = []
        cuts = sorted({0, len(full), *(a for a, _ in spans), *(b for _, b in spans)})
        m_iter = iter(media)
        for a, b in zip(cuts[:-1], cuts[1:]):
            train = any(s <= a and b <= e for s, e in spans)
            piece = full[a:b]
            pos = 0
            for tok in re.finditer(f"{_SENT.pattern}|{self._marker_re.pattern}", piece):
                self._emit_structure(piece[pos : tok.start()], ids, labels, train)
                if tok.group(1) is not None:  # user / assistant text: never special tokens
                    t = self.tok.encode(texts[int(tok.group(1))])
                    ids += t
                    labels += t if train else [IGNORE] * len(t)
                else:
                    try:
                        kind, idx = next(m_iter)
                    except StopIteration:
                        raise TemplateError(
                            "the chat template wrote more media markers than the sample has media"
                        ) from None
                    if not isinstance(idx, int) or not 0 <= idx < len(grids):
                        raise TemplateError(f"{kind} item references media {idx!r}, the sample has {len(grids)}")
                    media_kind = media_kinds[idx] if media_kinds else kind
                    if media_kind != kind:
                        raise TemplateError(f"{kind} item references media {idx}, which is a {media_kind}")
                    pad = self.tok.video_pad_id if kind == "video" else self.tok.image_pad_id
                    n = self.token_count(grids[idx])
                    ids += [pad] * n
                    labels += [IGNORE] * n
                    order.append(idx)
                    kinds.append(kind)
                pos = tok.end()
            self._emit_structure(piece[pos:], ids, labels, train)
        if next(m_iter, None) is not None:
            raise TemplateError(
                "the chat template did not write a marker for every media item "
                f"(markers looked for: {sorted(self.media_markers.values())})"
            )
        return Rendered(ids, labels, order, kinds)

    def _emit_structure(self, text: str, ids: list[int], labels: list[int], train: bool) -> None:
        if not text:
            return
        t = self._structure_tok.encode(text, add_special_tokens=False).ids
        ids += t
        labels += t if train else [IGNORE] * len(t)
