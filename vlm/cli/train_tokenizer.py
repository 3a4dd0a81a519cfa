"""`python -m vlm.cli.train_tokenizer shards=SHARDS out=tokenizer.json [vocab_size=N]`: a tokenizer
for a decoder trained from scratch on your own shards.

The text of every sample is read (the `messages` of a chat sample, the text items of an
interleaved `document`, a `.txt` caption; media are never decoded) and a byte-level BPE with the
chat template's special tokens is trained on it (`vlm.tokenizer.train_tokenizer`). Shards are read
as training reads them (`vlm.data.tar_reader`): an unreadable shard or member is counted by reason
and passed over, as is a sample whose JSON is malformed. The result is what `data.tokenizer=` takes:
`python train.py data=shards data.tokenizer=tokenizer.json …`. Config: conf/train_tokenizer.yaml.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from vlm.cli.app import CONF_PATH, Tool

USAGE = "python -m vlm.cli.train_tokenizer shards=SHARDS out=tokenizer.json [vocab_size=N] [min_frequency=N]"
TOOL = Tool("train_tokenizer", __doc__, text=("out",), repeat=("shards",))


def _content_texts(content) -> list[str]:
    """The text of one message's content or one document: a string, or the `text` items of a list."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [it["text"] for it in content if isinstance(it, dict) and isinstance(it.get("text"), str)]
    return []


def sample_texts(raw: dict) -> list[str]:
    """The text of one raw shard sample; ValueError for JSON that is not a chat or document sample."""
    texts: list[str] = []
    if "json" in raw:
        obj = json.loads(raw["json"])
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            for m in obj["messages"]:
                if isinstance(m, dict):
                    texts += _content_texts(m.get("content"))
        elif isinstance(obj, dict) and isinstance(obj.get("document"), list):
            texts += _content_texts(obj["document"])
        elif not (isinstance(obj, dict) and "txt" in raw):  # a caption sample's metadata beside its .txt
            raise ValueError("not a chat (messages) or document sample")
    if "txt" in raw:
        texts.append(raw["txt"].decode("utf-8"))
    return [t for t in texts if t]


def shard_texts(
    urls: Iterable[str], counts: Counter, max_member_bytes: int, max_sample_bytes: int, max_samples: int | None
) -> Iterator[str]:
    """The text of every sample of `urls`, in order; `counts` gets `samples`, `texts` and each
    skip reason (the tar reader's, `bad_json`, `bad_text`, `no_text`)."""
    from vlm.data.tar_reader import ShardErrors, read_samples

    errors = ShardErrors()
    try:
        for url in urls:
            for raw in read_samples(url, errors, max_member_bytes, max_sample_bytes):
                if max_samples is not None and counts["samples"] >= max_samples:
                    return
                counts["samples"] += 1
                try:
                    texts = sample_texts(raw)
                except UnicodeDecodeError:
                    counts["bad_text"] += 1
                    continue
                except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
                    counts["bad_json"] += 1
                    continue
                if not texts:
                    counts["no_text"] += 1
                    continue
                counts["texts"] += len(texts)
                yield from texts
    finally:
        counts.update(errors.counts)


def run(cfg: DictConfig) -> int:
    """Train the tokenizer on `cfg.shards`' text and write it to `cfg.out`; 0, or 2 with one `error:` line."""
    from vlm.data.webdataset import expand_urls
    from vlm.tokenizer import train_tokenizer

    spec = OmegaConf.to_container(cfg.shards) if OmegaConf.is_list(cfg.shards) else str(cfg.shards)
    shown = spec[0] if isinstance(spec, list) and len(spec) == 1 else spec
    try:
        urls = expand_urls(spec)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: shards={shown}: {e}", file=sys.stderr)
        return 2
    if int(cfg.vocab_size) <= 0:
        print(f"error: vocab_size={cfg.vocab_size} must be positive", file=sys.stderr)
        return 2
    out = Path(str(cfg.out))
    if out.is_dir():
        out = out / "tokenizer.json"
    counts: Counter = Counter()
    limit = None if cfg.max_samples is None else int(cfg.max_samples)
    texts = shard_texts(urls, counts, int(cfg.max_member_bytes), int(cfg.max_sample_bytes), limit)
    tok = train_tokenizer(texts, vocab_size=int(cfg.vocab_size), min_frequency=int(cfg.min_frequency))
    skipped = {k: v for k, v in sorted(counts.items()) if k not in ("samples", "texts")}
    print(
        f"read {counts['samples']} samples ({counts['texts']} texts) from {len(urls)} shard(s)"
        + (f"; skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())}" if skipped else "")
    )
    if not counts["texts"]:
        print(f"error: no text in shards={shown}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"wrote {out} ({tok.vocab_size} tokens): python train.py data=shards data.tokenizer={out} …")
    return 0


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train_tokenizer")
def app(cfg: DictConfig) -> None:
    TOOL.run(run, cfg, USAGE)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlm.cli.train_tokenizer KEY=VALUE …` on `argv` (default: the command line); the exit status."""
    return TOOL.main(app, argv)


if __name__ == "__main__":
    sys.exit(main())
