"""Memory and time on hostile input: what the loader and `infer.py` spend before they refuse it.

    python bench/hostile_input.py

Each case runs in a fresh Python process, which reports its own peak resident memory
(`ru_maxrss`) and wall time:

- the shard loader (evaluation pass, and a training stream beside a good shard) on a 10 KB tar
  whose GNU sparse member declares 2 GiB (made with GNU `tar -S`);
- `python infer.py ckpt=… image=/dev/zero prompt=…` (a file that never ends);
- `python infer.py ckpt=… image=FIFO prompt=…` (a named pipe nobody writes to: it must not block);
- `python infer.py ckpt=… image=BIG` (a 1 GiB sparse regular file, over the 512 MiB file cap).

The checkpoint is a tiny export folder this script writes (untrained weights: only the refusal
path is measured). Prints a table; the target is a peak under 1 GB and no wait on the pipe.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD_LOADER = r"""
import json, resource, sys, time
from collections import Counter
from vlm.build.model import build_processor, build_template
from vlm.data.sample import SampleTransform
from vlm.data.webdataset import ShardDataset
from vlm.tokenizer import TextTokenizer
bomb, good, tok, mode = sys.argv[1:5]
t0 = time.perf_counter()
tok = TextTokenizer.from_file(tok)
proc = SampleTransform(build_processor({"patch_size": 8, "image_size": 32}), build_template({"max_length": 256}, tok),
                       mode="eval" if mode == "eval" else "train")
counts = Counter()
if mode == "eval":
    for s in ShardDataset(bomb, proc, train=False):
        counts.update(s.skipped or {})
else:
    for _, s in zip(range(50), ShardDataset([bomb, good], proc, train=True, shuffle_buffer=1)):
        counts.update(s.skipped or {})
print(json.dumps({"outcome": "skipped " + ", ".join(f"{k} {v}" for k, v in counts.items()),
                  "seconds": time.perf_counter() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_INFER = r"""
import json, resource, runpy, sys, time, io, contextlib
sys.argv = ["infer.py", *sys.argv[1:]]
t0 = time.perf_counter()
err = io.StringIO()
code = 0
with contextlib.redirect_stderr(err):
    try:
        runpy.run_path("infer.py", run_name="__main__")
    except SystemExit as e:
        code = e.code
line = next((ln for ln in err.getvalue().splitlines() if ln.startswith("error:")), "no error")
print(json.dumps({"outcome": f"exit {code}: {line[:90]}", "seconds": time.perf_counter() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def tiny_export(out: Path) -> Path:
    """An export folder of an untrained tiny model (the default config, shrunk)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vlm.build.model import build_model, build_processor, geometry_of
    from vlm.checkpoint.load import export_folder
    from vlm.tokenizer import train_tokenizer

    tok = train_tokenizer(["What colour is the circle?", "red", "blue"] * 20)
    tok.save(out / "tokenizer.json")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={out}",
                "model.encoder.dim=32",
                "model.encoder.n_layers=1",
                "model.encoder.n_heads=2",
                "model.decoder.dim=32",
                "model.decoder.n_layers=1",
                "model.decoder.n_heads=2",
                "model.decoder.n_kv_heads=1",
            ],
        )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)

    processor = build_processor(
        OmegaConf.to_container(cfg.data.processor, resolve=True), geometry=geometry_of(cfg.model)
    )
    template = OmegaConf.to_container(cfg.data.template, resolve=True)
    model = build_model(model_cfg, tok)
    return export_folder(
        model, tok, {"model": model_cfg, "processor": processor.to_config(), "template": template}, out / "export"
    )


def sparse_tar(d: Path) -> Path:
    src = d / "sparse"
    src.mkdir()
    (src / "k.json").write_text('{"messages": []}')
    with open(src / "k.0.png", "wb") as f:
        f.truncate(2 * 2**30)
    bomb = d / "bomb.tar"
    subprocess.run(["tar", "-S", "--format=gnu", "-C", str(src), "-cf", str(bomb), "k.json", "k.0.png"], check=True)
    return bomb


def good_tar(d: Path) -> Path:
    import io
    import tarfile

    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(b, "PNG")
    chat = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "media": 0}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"},
        ]
    }
    path = d / "good.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("g.json", json.dumps(chat).encode()), ("g.0.png", b.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def child(code: str, args: list[str], timeout: int = 300) -> dict:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {
            "outcome": f"HUNG (killed after {timeout} s)",
            "seconds": time.perf_counter() - t0,
            "peak_mb": float("nan"),
        }
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not last:
        return {
            "outcome": f"crashed: {r.stderr.strip().splitlines()[-1][:90] if r.stderr.strip() else r.returncode}",
            "seconds": time.perf_counter() - t0,
            "peak_mb": float("nan"),
        }
    return json.loads(last[-1])


def refusal_time(path) -> dict:
    """How long `vlm.data.media.read_file` takes to refuse `path`, in this process."""
    from vlm.data.media import MediaError, read_file

    t0 = time.perf_counter()
    try:
        read_file(path)
        outcome = "read (not refused!)"
    except MediaError as e:
        outcome = f"refused [{e.reason}]"
    return {
        "outcome": outcome,
        "seconds": time.perf_counter() - t0,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export = tiny_export(d)
        bomb, good = sparse_tar(d), good_tar(d)
        fifo = d / "pipe.png"
        os.mkfifo(fifo)
        big = d / "big.png"
        with open(big, "wb") as f:
            f.truncate(2**30)
        base = child(
            "import torch, vlm.serve.infer, vlm.data.webdataset; import json, resource; "
            "print(json.dumps({'outcome': 'imports only', 'seconds': 0, "
            "'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))",
            [],
        )
        rows = [
            ("python + torch + vlm imported (baseline)", base),
            (
                f"loader, evaluation: tar of {bomb.stat().st_size // 1024} KB, member declares 2 GiB",
                child(CHILD_LOADER, [str(bomb), str(good), str(export / "tokenizer.json"), "eval"]),
            ),
            (
                "loader, training: the same tar beside a good shard (50 samples)",
                child(CHILD_LOADER, [str(bomb), str(good), str(export / "tokenizer.json"), "train"]),
            ),
            (
                "infer.py image=/dev/zero",
                child(CHILD_INFER, [f"ckpt={export}", "image=/dev/zero", "prompt=hi", f"hydra.run.dir={d / 'h'}"]),
            ),
            (
                "infer.py image=<named pipe>",
                child(
                    CHILD_INFER,
                    [f"ckpt={export}", f"image={fifo}", "prompt=hi", f"hydra.run.dir={d / 'h'}"],
                    timeout=120,
                ),
            ),
            (
                "infer.py image=<1 GiB file>",
                child(CHILD_INFER, [f"ckpt={export}", f"image={big}", "prompt=hi", f"hydra.run.dir={d / 'h'}"]),
            ),
            ("read_file(<named pipe>) alone", refusal_time(fifo)),
            ("read_file(/dev/zero) alone", refusal_time("/dev/zero")),
        ]
    print("| case | outcome | peak RSS (MB) | seconds (incl. imports) |")
    print("| --- | --- | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['outcome']} | {r['peak_mb']:.0f} | {r['seconds']:.4f} |")


if __name__ == "__main__":
    main()
