"""Does the model know what it cannot say? For held-out `exists` questions ("Is there a red
circle?"), asks the trained model twice about the same image: the question itself, and
"Describe the image." Then scores three answers against the truth:

    asked      the model's own answer to the question
    caption    "yes" when the model's own caption names that colour and shape, else "no"
    agreement  how often the two agree

A caption that answers far more questions than the model's direct answer means the image was
read (the tower and projector carry the scene, the decoder can list it) and what is missing is
the question-conditioned read-out. It also splits the direct answers by what the image holds
(neither the colour nor the shape, one of them, both in different shapes, the asked pair).

    python bench/caption_vs_question.py --ckpt outputs/DATE/TIME/02-train/export --data-dir data
    python bench/caption_vs_question.py --ckpt … --data-dir … --qtype count_shape --n 200

Run by hand; nothing here is asserted. Answers go through `infer.py requests=…` (the same
engine as serving), greedy."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DESCRIBE = "Describe the image."


def _heldout(data_dir: Path, qtype: str, n: int) -> list[tuple[bytes, str, str]]:
    """The first `n` held-out samples of `qtype`: (PNG bytes, question, answer)."""
    import webdataset as wds

    shards = sorted(str(p) for p in (data_dir / "synthvqa" / "heldout").glob("*.tar"))
    if not shards:
        sys.exit(f"no held-out shards under {data_dir}/synthvqa/heldout (train once with paths.data_dir={data_dir})")
    out = []
    for s in wds.WebDataset(shards, shardshuffle=False):
        j = json.loads(s["json"])
        if j["meta"]["qtypes"] != [qtype]:
            continue
        out.append((s["0.png"], j["messages"][0]["content"][1]["text"], j["messages"][1]["content"][0]["text"]))
        if len(out) == n:
            break
    return out


def _ask(ckpt: str, images: list[Path], prompts: list[str], tmp: Path) -> list[str]:
    """Greedy answers of `ckpt`, one per (image, prompt), through `infer.py requests=`."""
    req, ans = tmp / "requests.jsonl", tmp / "answers.jsonl"
    with req.open("w") as f:
        for im, p in zip(images, prompts):
            content = [{"type": "image_url", "image_url": {"url": str(im)}}, {"type": "text", "text": p}]
            f.write(
                json.dumps({"max_tokens": 48, "temperature": 0, "messages": [{"role": "user", "content": content}]})
            )
            f.write("\n")
    cmd = [sys.executable, "infer.py", f"ckpt={ckpt}", f"requests={req}", f"out={ans}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return [json.loads(line).get("answer", "") for line in ans.read_text().splitlines()]


def _from_caption(qtype: str, question: str, caption: str) -> str | None:
    """The answer the caption implies, for the question types a caption settles."""
    from vlm.synthvqa.spec import COUNT_WORDS

    if qtype == "exists":
        col, shape = re.match(r"Is there an? (\w+) (\w+)\?", question).groups()
        return "yes" if re.search(rf"\b{col} {shape}s?\b", caption) else "no"
    if qtype == "count_shape":
        shape = re.match(r"How many (\w+?)s are there\?", question).group(1)
        words = {w: i for i, w in enumerate(COUNT_WORDS)}
        found = re.findall(rf"\b(\w+) \w+ {shape}s?\b", caption)
        return str(sum(words.get(w, 0) for w in found))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="an export folder or checkpoint")
    ap.add_argument(
        "--data-dir", required=True, type=Path, help="paths.data_dir of the run (synthvqa/heldout under it)"
    )
    ap.add_argument("--qtype", default="exists", choices=["exists", "count_shape"])
    ap.add_argument("--n", type=int, default=200, help="held-out questions")
    args = ap.parse_args()

    samples = _heldout(args.data_dir, args.qtype, args.n)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = []
        for i, (png, _, _) in enumerate(samples):
            images.append(tmp / f"{i}.png")
            images[-1].write_bytes(png)
        answers = _ask(args.ckpt, images * 2, [q for _, q, _ in samples] + [DESCRIBE] * len(samples), tmp)
    asked, captions = answers[: len(samples)], answers[len(samples) :]
    implied = [_from_caption(args.qtype, q, c) for (_, q, _), c in zip(samples, captions)]
    truth = [a for _, _, a in samples]
    n = len(samples)

    def pct(xs) -> str:
        return f"{100 * sum(xs) / max(len(xs), 1):.1f}"

    print(f"{args.ckpt}: {n} held-out `{args.qtype}` questions")
    print("| answer | exact match (%) |\n| --- | ---: |")
    print(f"| asked directly | {pct([a == t for a, t in zip(asked, truth)])} |")
    print(f"| implied by its own caption | {pct([a == t for a, t in zip(implied, truth)])} |")
    print(f"| the two agree | {pct([a == b for a, b in zip(asked, implied)])} |")
    if args.qtype == "exists":
        groups = defaultdict(list)
        kinds = {(0, 0): "neither", (1, 0): "the colour only", (0, 1): "the shape only", (1, 1): "both, apart"}
        for (_, q, _), a, c, pair in zip(samples, asked, captions, implied):
            col, shape = re.match(r"Is there an? (\w+) (\w+)\?", q).groups()
            has = "the pair" if pair == "yes" else kinds[(col in c, shape in c)]
            groups[has].append(a == "yes")
        print("\n| the image holds (by its caption) | n | answered yes (%) |\n| --- | ---: | ---: |")
        for k in ("the pair", "both, apart", "the colour only", "the shape only", "neither"):
            if groups[k]:
                print(f"| {k} | {len(groups[k])} | {pct(groups[k])} |")


if __name__ == "__main__":
    main()
