"""The engine as a service: one background thread steps the scheduler; any thread or event loop submits.

Why a thread: decoding is a blocking loop of forward passes.  Running it inside a web server's event
loop would freeze every other connection, and running one loop per request would decode requests
one after another.  Here every submitted request joins the engine's running batch at the next step
(continuous batching), and its tokens come back as :class:`~minimind.infer.scheduler.TokenEvent` s
through a queue, consumed with ``for`` in a thread or ``async for`` in an event loop.

Backpressure and cleanup: :meth:`RequestHandle.cancel` (a client disconnected) frees the request's
slots at the next step.  A sample whose numbers go bad (NaN/inf logits) is not an exception: the
scheduler ends that row alone with ``finish_reason == "error"`` (message in ``result.error``) and the
others decode on.  If a whole step raises (e.g. out of memory), every request in flight receives the
error instead of hanging, and the engine starts empty again.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from minimind.infer.engine import GenerationEngine
from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult, Request, TokenEvent

__all__ = ["EngineService", "RequestHandle", "TokenEvent"]

_END = object()


class RequestHandle:
    """Events of one submitted request; iterate with ``for`` (threads) or ``async for`` (asyncio)."""

    def __init__(self, service: EngineService, request: Request,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self._service = service
        self.request = request
        self._loop = loop
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._open = request.n  # samples not finished yet

    @property
    def results(self) -> list[GenerationResult | None]:
        return self.request.results

    @property
    def done(self) -> bool:
        return self.request.done or self.request.cancelled

    def cancel(self) -> None:
        """Stop generating; the slots are freed at the engine's next step."""
        if not self.request.cancelled:
            self._service.engine.scheduler.cancel(self.request)
            self._service._wake()
            self._put(_END)

    # called on the engine thread
    def _put(self, item: Any) -> None:
        if self._aqueue is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self._service.engine.scheduler.cancel(self.request)
        else:
            self._queue.put(item)

    def _on_event(self, event: TokenEvent) -> None:
        self._put(event)
        if event.finish_reason is not None:
            self._open -= 1
            if self._open == 0:
                self._put(_END)

    def _next(self, item: Any) -> TokenEvent:
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise RuntimeError(f"generation failed: {item}") from item  # noqa: TRY004 - re-raised, not a type check
        return item

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._aqueue is not None:
            raise TypeError("this request was submitted from an event loop: use `async for`")
        while True:
            try:
                yield self._next(self._queue.get())
            except StopIteration:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._aqueue is None:
            raise TypeError("this request was submitted outside an event loop: use `for`")
        while True:
            try:
                yield self._next(await self._aqueue.get())
            except StopIteration:
                return


class EngineService:
    """Runs ``engine``'s scheduler on a daemon thread; :meth:`submit` is safe from any thread."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._closed = False
        self._handles: set[RequestHandle] = set()
        self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
        self._thread.start()

    @property
    def active_rows(self) -> int:
        """Rows decoding now (0 when idle): what a disconnect test or a health check looks at."""
        return len(self.engine.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, n: int = 1,
               logprobs: bool = False) -> RequestHandle:
        """Queue a prompt; raises ``ValueError`` (naming the limit) if the engine cannot run it."""
        if self._closed:
            raise RuntimeError("the engine service is closed")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        request = Request(list(prompt_ids), params, n=n, logprobs=logprobs, track_text=True)
        handle = RequestHandle(self, request, loop)
        request.on_event = handle._on_event
        self.engine.scheduler.add(request)  # validates; raises before anything is queued
        with self._cv:
            self._handles.add(handle)
            self._cv.notify()
        return handle

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        sched = self.engine.scheduler
        while True:
            with self._cv:
                while not self._closed and not sched.has_work:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                sched.step()
            except Exception as exc:  # noqa: BLE001 - every waiting client must hear about it
                self._fail_all(exc)
            with self._cv:
                self._handles = {h for h in self._handles if not h.done}

    def _fail_all(self, exc: Exception) -> None:
        sched = self.engine.scheduler
        with sched.lock:
            sched.running.clear()
            sched.waiting.clear()
            sched._knobs = None
        with self._cv:
            handles, self._handles = self._handles, set()
        for h in handles:
            h.request.cancelled = True
            h._put(exc)
