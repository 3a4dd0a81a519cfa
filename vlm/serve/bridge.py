"""A request handle's events, awaited from asyncio without holding the event loop.

The handle pushes each event to the loop as the engine produces it (`RequestHandle.listen`:
`call_soon_threadsafe` from the engine thread, no thread per request); a handle without `listen`
gets one small thread that waits on it. The loop side waits with a timeout, so a client that went
away is noticed within `poll` seconds even while the engine is still busy with other requests, and
the request is cancelled at once (its slot and cache pins are freed at the engine's next step). A
caller that must act at a given time (a deadline, a keep-alive comment) passes `until` and gets
`TICK` then.
"""

from __future__ import annotations

import asyncio
import threading
import time

from vlm.serve.handle import ADMITTED, ERROR, EVENT, RequestHandle

__all__ = ["ADMITTED", "ERROR", "EVENT", "TICK", "EventPump"]
TICK = ("tick", None)  # `until` came before the next event


class EventPump:
    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        listen = getattr(handle, "listen", None)
        if listen is not None:
            listen(lambda kind, value: self._put((kind, value)))
        else:
            threading.Thread(target=self._run, name=f"pump-{handle.request_id}", daemon=True).start()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _run(self) -> None:
        try:
            self._put((ADMITTED, self.handle.admitted()))
        except Exception as e:  # the request's RequestError: nothing else will come
            self._put((ERROR, e))
            return
        for ev in self.handle:
            self._put((EVENT, ev))

    async def next(self, request, poll: float = 0.5, until: float | None = None):
        """(kind, value): (ADMITTED, Usage), (EVENT, Delta | Finished) or (ERROR, RequestError).
        None when the client disconnected while waiting; the request is then cancelled. `TICK`
        when `until` (a `time.monotonic()` value) passes with no event."""
        while True:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            wait = poll if until is None else max(0.001, min(poll, until - time.monotonic()))
            try:
                return await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.handle.cancel()
                    return None
                if until is not None and time.monotonic() >= until:
                    return TICK
