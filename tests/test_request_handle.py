"""`RequestHandle`: the engine's producer calls and the two ways to consume them, iteration and
`listen` (the HTTP server's push path), deliver the same events in the same order, whenever the
listener subscribes, and a listener that fails never reaches the engine."""

from __future__ import annotations

import threading

from vlm.serve.api import Delta, Finished, RequestError, Usage
from vlm.serve.handle import ADMITTED, ERROR, EVENT, RequestHandle


def produce(h: RequestHandle, n: int) -> list:
    h.admit(Usage(prompt_tokens=3))
    deltas = [Delta(f"t{i}", [i]) for i in range(n)]
    for d in deltas:
        h.emit(d)
    fin = Finished("length", "".join(d.text for d in deltas), list(range(n)), Usage(prompt_tokens=3))
    h.finish(fin)
    return [*deltas, fin]


def test_listening_before_or_after_the_events_gives_them_all_in_order():
    for subscribe_after in (0, 1, 3, 6):
        h, got = RequestHandle("r"), []
        h.admit(Usage(prompt_tokens=3))
        deltas = [Delta(f"t{i}", [i]) for i in range(5)]
        for i, d in enumerate(deltas):
            if i == subscribe_after:
                h.listen(lambda kind, value, got=got: got.append((kind, value)))
            h.emit(d)
        if subscribe_after >= len(deltas):
            h.listen(lambda kind, value, got=got: got.append((kind, value)))
        fin = Finished("stop", "", [], Usage())
        h.finish(fin)
        assert got[0] == (ADMITTED, Usage(prompt_tokens=3))
        assert got[1:] == [(EVENT, e) for e in [*deltas, fin]], subscribe_after


def test_listen_and_iteration_see_the_same_stream_from_another_thread():
    pushed, pulled = RequestHandle("a"), RequestHandle("b")
    got = []
    done = threading.Event()

    def listener(kind, value):
        got.append((kind, value))
        if isinstance(value, Finished):
            done.set()

    pushed.listen(listener)
    threads = [threading.Thread(target=produce, args=(h, 50)) for h in (pushed, pulled)]
    for t in threads:
        t.start()
    assert pulled.admitted(5) == Usage(prompt_tokens=3)
    want = list(pulled.events(5))
    for t in threads:
        t.join()
    assert done.wait(5)
    assert got == [(ADMITTED, Usage(prompt_tokens=3))] + [(EVENT, e) for e in want]


def test_an_error_before_admission_is_one_error_item():
    for early in (True, False):
        h, got = RequestHandle("e"), []
        if not early:
            h.listen(lambda kind, value, got=got: got.append((kind, value)))
        err = RequestError("the image is not an image", param="messages")
        h.finish(Finished("error", "", [], Usage(), error=err))
        if early:
            h.listen(lambda kind, value, got=got: got.append((kind, value)))
        assert got == [(ERROR, err)], early


def test_a_failing_listener_does_not_reach_the_producer(caplog):
    h = RequestHandle("x")

    def broken(kind, value):
        raise ValueError("the client went away mid-write")

    h.listen(broken)
    produce(h, 3)  # no exception here: the engine thread goes on
    assert h.finished is not None and h.finished.finish_reason == "length"
    assert "the listener of x failed" in caplog.text
