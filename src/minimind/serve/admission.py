"""Fair, bounded admission of HTTP requests into the engine: round-robin between requests, 429 when full.

Why a gate in front of the engine service: the engine admits waiting requests first come, first
served. One HTTP request may carry many prompts (``/v1/completions`` takes a list) times ``n``
samples; submitted all at once they would fill the engine's queue, and a small request arriving just
after would wait for every one of them (issue: a 16-token request took 34 s behind 20,000 queued
prompts instead of 0.07 s). Here:

* each HTTP request's prompts wait in the gate as :class:`Ticket` s, and the gate hands the engine
  at most as many rows as it has slots; when a slot frees, the next prompt comes from the *next
  request in turn* (round-robin), so a concurrent small request waits for at most one finishing row
  per request ahead of it, not for a whole big request;
* the rows waiting in the gate are bounded (``max_queue_rows``): a request that would pass the
  bound is refused at once with :class:`QueueFull` (the app answers 429 with ``Retry-After``)
  instead of queueing without limit.

A :class:`Ticket` behaves like the :class:`~minimind.infer.service.RequestHandle` it becomes once
admitted (``async for`` events, ``results``, ``done``, ``cancel``), so the handlers' streaming and
disconnect code is the same for both. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from itertools import count

from minimind.infer.sampling import SamplingParams
from minimind.infer.scheduler import GenerationResult, TokenEvent
from minimind.infer.service import EngineService, RequestHandle

__all__ = ["AdmissionGate", "QueueFull", "Ticket"]

#: How often the gate looks for freed slots while prompts wait (a slot may free without any
#: handler noticing, e.g. a request whose client never read its response).
TICK_S = 0.02


class QueueFull(Exception):
    """The gate's queue cannot take the request's rows now (answered as 429)."""


class Ticket:
    """One prompt of one HTTP request: waits in the gate, then streams from its engine handle."""

    def __init__(self, gate: AdmissionGate, ids: Sequence[int], params: SamplingParams, n: int,
                 logprobs: bool) -> None:
        self.gate = gate
        self.ids = list(ids)
        self.params = params
        self.n = n
        self.logprobs = logprobs
        self.handle: RequestHandle | None = None
        self.error: BaseException | None = None  # the engine refused it at admission
        self.cancelled = False
        self._admitted = asyncio.Event()

    @property
    def results(self) -> list[GenerationResult | None]:
        return self.handle.results if self.handle is not None else [None] * self.n

    @property
    def done(self) -> bool:
        return self.cancelled or self.error is not None or (self.handle is not None and self.handle.done)

    def cancel(self) -> None:
        """Leave the queue, or stop generating if already admitted."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()
        self.gate._forget(self)
        self._admitted.set()
        self.gate.pump()

    def _admit(self, handle: RequestHandle | None, error: BaseException | None) -> None:
        self.handle, self.error = handle, error
        self._admitted.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            await self._admitted.wait()
            if self.error is not None:
                raise RuntimeError(f"generation failed: {self.error}") from self.error
            if self.handle is None:  # cancelled while waiting
                return
            async for ev in self.handle:
                yield ev
        finally:
            self.gate.pump()


class AdmissionGate:
    """Feeds the prompts of concurrent requests to ``service`` round-robin, ``capacity`` rows at a time.

    ``capacity``: rows handed to the engine at once (default: its slots). ``max_queue_rows``: rows
    that may wait in the gate; more is :class:`QueueFull`.
    """

    def __init__(self, service: EngineService, max_queue_rows: int, capacity: int | None = None) -> None:
        if max_queue_rows < 0:
            raise ValueError(f"max_queue_rows must be >= 0, got {max_queue_rows}")
        self.service = service
        self.max_queue_rows = max_queue_rows
        self.capacity = capacity or service.engine.num_slots
        self._groups: OrderedDict[int, deque[Ticket]] = OrderedDict()  # turn order: first = next
        self._ids = count()
        self._inflight: list[Ticket] = []
        self.queued_rows = 0
        self._ticker: asyncio.Task[None] | None = None

    @property
    def inflight_rows(self) -> int:
        self._inflight = [t for t in self._inflight if not t.done]
        return sum(t.n for t in self._inflight)

    def enqueue(self, prompts: Sequence[tuple[Sequence[int], SamplingParams]], n: int,
                logprobs: bool) -> list[Ticket]:
        """Queue one request's prompts (each with ``n`` samples) as one group; admits what fits now.

        Raises :class:`QueueFull` when the rows that would have to wait pass ``max_queue_rows``.
        """
        rows = len(prompts) * n
        free_now = max(self.capacity - self.inflight_rows, 0) if not self._groups else 0
        if rows - free_now > self.max_queue_rows - self.queued_rows:
            raise QueueFull(f"the server is busy: {self.queued_rows} rows are waiting and this request adds "
                            f"{rows}, over the queue limit of {self.max_queue_rows} (--max_queue); retry later")
        tickets = [Ticket(self, ids, params, n, logprobs) for ids, params in prompts]
        self._groups[next(self._ids)] = deque(tickets)
        self.queued_rows += rows
        self.pump()
        return tickets

    def pump(self) -> None:
        """Hand the engine the next prompts in turn while it has room."""
        used = self.inflight_rows
        while self._groups:
            gid, queue = next(iter(self._groups.items()))
            ticket = queue[0]
            if used > 0 and used + ticket.n > self.capacity:
                break  # wait for room; no skipping ahead, so a large n is never starved
            queue.popleft()
            del self._groups[gid]
            if queue:
                self._groups[gid] = queue  # to the back of the line
            self.queued_rows -= ticket.n
            try:
                handle = self.service.submit(ticket.ids, ticket.params, n=ticket.n, logprobs=ticket.logprobs)
            except (ValueError, RuntimeError) as exc:
                ticket._admit(None, exc)
                continue
            ticket._admit(handle, None)
            self._inflight.append(ticket)
            used += ticket.n
        if self._groups and (self._ticker is None or self._ticker.done()):
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def _forget(self, ticket: Ticket) -> None:
        """Drop a cancelled ticket that is still queued."""
        for gid, queue in list(self._groups.items()):
            if ticket in queue:
                queue.remove(ticket)
                self.queued_rows -= ticket.n
                if not queue:
                    del self._groups[gid]
                return

    async def _tick(self) -> None:
        while self._groups:
            await asyncio.sleep(TICK_S)
            self.pump()
