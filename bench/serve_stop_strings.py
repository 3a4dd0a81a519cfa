"""What one request with the longest stop list costs everyone else on the engine.

    python bench/serve_stop_strings.py                     # about a minute on a 2-core CPU
    python bench/serve_stop_strings.py --clients 4 --new-tokens 64 --requests 24 --threads 2

`--clients` normal clients (closed loop, text prompts, no stop strings) share the continuous engine
with one more request that runs the whole time, in turn: nothing (the clients alone), a long
request without stop strings, the same request with the longest stop list the server accepts
(`MAX_STOP` strings of `MAX_STOP_CHARS` characters whose prefixes keep matching the answer's tail
but which never complete), and that stop list under the previous detokenizer (the whole answer
decoded and every stop string's prefixes sliced at every token) for comparison. The table gives
the normal clients' generated tokens per second (median of `--rounds`). Random tiny-model weights
with the end tokens made unreachable: every request generates exactly its max_tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
bench_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)  # puts the repository on sys.path too

import vlm.serve.engine as engine_module  # noqa: E402
from vlm.serve.api import ChatRequest, SamplingParams  # noqa: E402
from vlm.serve.engine import Engine, EngineConfig  # noqa: E402
from vlm.serve.handle import TextStream  # noqa: E402
from vlm.serve.openai_protocol import MAX_STOP, MAX_STOP_CHARS  # noqa: E402


class WholeAnswerTextStream:
    """The previous detokenizer: the whole answer decoded at every token, every stop string's
    prefixes sliced against its end."""

    def __init__(self, tokenizer, stop=()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.sent, self.stopped = [], "", False

    def _holdback(self, text):
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def push(self, token_id):
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        for s in self.stop:
            at = text.find(s, max(0, len(self.sent) - len(s)))
            if at >= 0:
                self.stopped = True
                out, self.sent = text[len(self.sent) : at], text[:at]
                return out
        end = len(text) - self._holdback(text)
        if end <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent) : end], text[:end]
        return out

    def flush(self):
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids).removesuffix("\ufffd")
        out, self.sent = text[len(self.sent) :], text
        return out


def capped_stops(loaded) -> list[str]:
    """MAX_STOP strings of MAX_STOP_CHARS characters made of the answer's own words (so their
    prefixes keep matching its tail) ending in a character it never produces."""
    words = [w for w in bench_serve.WORDS]
    out = []
    for i in range(MAX_STOP):
        text = " ".join(words[(i + j) % len(words)] for j in range(64))
        out.append(text[: MAX_STOP_CHARS - 1] + "\u2603")
    return out


def run(loaded, clients: int, requests: int, new: int, extra: list[str] | None, extra_tokens: int) -> float:
    """The normal clients' generated tokens/s while `extra` (a stop list; None: no extra request) runs."""
    cfg = EngineConfig(max_context=bench_serve.CTX, dtype="fp32", max_batch=clients + 1, prefix_cache_mb=0)
    msgs = [[{"role": "user", "content": [{"type": "text", "text": bench_serve.WORDS[i % 5]}]}] for i in range(8)]
    nxt, lock, stop_extra = iter(range(requests)), threading.Lock(), threading.Event()
    with Engine(loaded, cfg) as engine:

        def client():
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                engine.submit(ChatRequest(msgs[i % len(msgs)], SamplingParams(max_tokens=new))).result(600)

        def extra_client():
            while not stop_extra.is_set():
                sp = SamplingParams(max_tokens=extra_tokens, stop=list(extra))
                h = engine.submit(ChatRequest(msgs[0], sp))
                while h.finished is None and not stop_extra.is_set():
                    time.sleep(0.01)
                h.cancel()
                h.result(600)

        side = threading.Thread(target=extra_client) if extra is not None else None
        if side is not None:
            side.start()
            time.sleep(0.3)  # the extra request is running
        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        stop_extra.set()
        if side is not None:
            side.join()
    return requests * new / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24, help="requests of the normal clients per round")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--extra-tokens", type=int, default=1500, help="max_tokens of the extra request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = bench_serve.train_tokenizer(bench_serve.WORDS * 20, vocab_size=400)
    loaded = bench_serve.tiny_model(tok)
    stops = capped_stops(loaded)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
        f"{args.clients} clients x {args.new_tokens} new tokens, {args.requests} requests per round, "
        f"median of {args.rounds}; stop list: {len(stops)} x {len(stops[0])} chars"
    )
    cases = [
        ("clients alone", None, TextStream),
        ("beside 1 long request, no stop strings", [], TextStream),
        (f"beside 1 long request, {MAX_STOP} x {MAX_STOP_CHARS}-char stops", stops, TextStream),
        ("same, previous detokenizer (whole answer per token)", stops, WholeAnswerTextStream),
    ]
    rows = []
    for name, extra, stream_cls in cases:
        engine_module.TextStream = stream_cls
        try:
            rates = [run(loaded, args.clients, args.requests, args.new_tokens, extra, args.extra_tokens)]
            rates += [
                run(loaded, args.clients, args.requests, args.new_tokens, extra, args.extra_tokens)
                for _ in range(args.rounds - 1)
            ]
        finally:
            engine_module.TextStream = TextStream
        rows.append((name, statistics.median(rates)))
    base = rows[0][1]
    print("\n| normal clients | generated tokens/s | vs alone |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
