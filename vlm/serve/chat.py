"""Terminal chat: `python infer.py ckpt=PATH chat=true [image=a.png]`.

Type a message and press Enter; the answer streams back. The conversation is kept, so a
follow-up question sees the earlier turns and their images. Commands (one per line):

    /image PATH    attach an image to your next message (several are fine)
    /video PATH    attach a video file or a folder of frames
    /reset         forget the conversation
    /quit          leave (so does Ctrl-D)

It runs on the serving engine, so a follow-up about an image already in the conversation reuses
the prefix cache instead of encoding it again (`verbose=true` prints the token counts per turn).
Input comes from stdin, so a conversation can be piped in.
"""

from __future__ import annotations

import sys
import time

from vlm.data.media import MediaError
from vlm.serve.api import ChatRequest, Delta, Finished, RequestError, SamplingParams

HELP = "commands: /image PATH, /video PATH (attach to your next message), /reset, /quit"


class ChatSession:
    """One conversation on an engine: attachments wait for the next message; a turn that fails
    (a bad image, no room left in the context) is not added to the history."""

    def __init__(self, engine, sampling: SamplingParams, media_first: bool = True):
        self.engine, self.sampling, self.media_first = engine, sampling, media_first
        self.messages: list[dict] = []
        self.pending: list[dict] = []
        self.turns = 0

    def attach(self, kind: str, path: str) -> None:
        from vlm.serve.local_media import checked_image, read_video

        data = checked_image(path) if kind == "image" else read_video(path)
        self.pending.append({"type": kind, kind: data})

    def reset(self) -> None:
        self.messages, self.pending = [], []

    def ask(self, text: str, out) -> Finished:
        """Send one user message with the pending attachments; stream the answer to `out`."""
        text_part = [{"type": "text", "text": text}]
        content = [*self.pending, *text_part] if self.media_first else [*text_part, *self.pending]
        turn = {"role": "user", "content": content}
        sp = self.sampling
        seed = None if sp.seed is None else sp.seed + self.turns
        params = SamplingParams(sp.max_tokens, sp.temperature, sp.top_p, list(sp.stop), seed)
        handle = self.engine.submit(ChatRequest([*self.messages, turn], params))
        self.pending = []
        try:
            handle.admitted()  # raises the RequestError of a prompt that cannot run
            for ev in handle:
                if isinstance(ev, Delta):
                    out.write(ev.text)
                    out.flush()
                elif isinstance(ev, Finished):
                    break
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            handle.cancel()
            ev = handle.result()
        out.write("\n")
        out.flush()
        if ev.finish_reason == "error":
            raise ev.error or RequestError("the request failed", 500)
        if ev.finish_reason != "cancelled":
            self.messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": ev.text}]}]
            self.turns += 1
        return ev


def _status(ev: Finished, seconds: float) -> str:
    u = ev.usage
    return (
        f"[{u.prompt_tokens} prompt tokens ({u.visual_tokens} visual, {u.cached_tokens} from the prefix cache), "
        f"{u.completion_tokens} new, {seconds:.2f} s, {ev.finish_reason}]"
    )


def run_chat(
    engine, session: ChatSession, stdin=None, stdout=None, stderr=None, verbose: bool = False, first_media=()
) -> int:
    """The read-answer loop; returns the number of answered turns. first_media: (kind, path) pairs
    attached to the first message (the command line's image= / video=)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()

    def error(msg) -> None:
        print(f"error: {msg}", file=stderr, flush=True)

    for kind, path in first_media:
        try:
            session.attach(kind, path)
        except (MediaError, FileNotFoundError, OSError) as e:
            error(e)
    if interactive:
        print(f"chatting with {engine.model_name} ({HELP})", file=stderr)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/reset":
            session.reset()
            print("(conversation cleared)", file=stderr, flush=True)
        elif cmd in ("/image", "/video"):
            if not arg.strip():
                error(f"{cmd} needs a path")
                continue
            try:
                session.attach(cmd[1:], arg.strip())
            except (MediaError, FileNotFoundError, OSError) as e:
                error(e)
        elif cmd in ("/help", "/?") or (cmd.startswith("/") and not cmd.startswith("//")):
            if cmd not in ("/help", "/?"):
                error(f"unknown command {cmd}")
            print(HELP, file=stderr, flush=True)
        else:
            text = line[1:] if line.startswith("//") else line  # "//" sends a line that starts with "/"
            t0 = time.perf_counter()
            try:
                ev = session.ask(text, stdout)
            except RequestError as e:
                error(f"{e} (this turn was not kept; /reset starts a new conversation)")
                continue
            if verbose:
                print(_status(ev, time.perf_counter() - t0), file=stderr, flush=True)
    return session.turns
