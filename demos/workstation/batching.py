"""How the server runs its requests: continuously through `nano.engine`, or in static batches.

`ContinuousBatcher` (the default) hands every request to one engine on one worker thread, which
admits it into a free slot at the next step while the others decode: a request never waits for
another to finish, only for a slot. Its slot pool is fixed when the server starts (the planner
sizes it), so load cannot make it run out of memory: past `max_waiting` queued requests the server
answers 429 with a retry hint instead. `StaticBatcher` is the older way, kept to compare against:
waiting requests with the same sampling settings run as one `nano.generate` batch, and a request
that comes meanwhile waits for the whole batch to end.

Both stream each request's text to its `Ticket` and stop work for a client that has left.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import nano
from nano.engine import Engine, Request
from nano.generation import _RowText, prepare_prompt
from nano.hardware import PREFILL_ROWS

DONE = object()  # the end of a request's events


@dataclass
class Ticket:
    """One request from a client: its settings, and the events it is sent on `events`."""

    prompt: Any
    budget: int | None
    grace: int | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    loop: asyncio.AbstractEventLoop | None = None  # the server's loop, which reads `events`
    events: asyncio.Queue | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # the client disconnected
    result: Any = None
    error: str | None = None
    request: Request | None = None  # the engine's request (continuous batching)
    began: float = 0.0  # when it was accepted (time.perf_counter)

    def key(self) -> tuple:
        return (self.temperature, self.top_p, self.seed)

    def put(self, item) -> None:
        """From the worker thread: hand an event (or DONE) to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _Outbox:
    """Events for many tickets, handed over to the server's event loop with one wake-up per step rather
    than one per token (each wake-up is a write to the loop's pipe)."""

    def __init__(self):
        self.items: list[tuple[Ticket, Any]] = []

    def put(self, ticket: Ticket, item) -> None:
        self.items.append((ticket, item))

    def send(self) -> None:
        by_loop: dict[Any, list] = {}
        for ticket, item in self.items:
            by_loop.setdefault(ticket.loop, []).append((ticket, item))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)
        self.items = []


def _deliver(items: list[tuple[Ticket, Any]]) -> None:
    for ticket, item in items:
        ticket.events.put_nowait(item)


class Busy(Exception):
    """The queue is full: the client should come back in `retry_after` seconds (HTTP 429)."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting for a slot; retry in {retry_after} s")
        self.retry_after = retry_after


class ContinuousBatcher:
    """Requests join one engine's running batch (see the module doc)."""

    kind = "continuous"

    def __init__(self, model, slots: int = 8, context: int | None = None, max_waiting: int | None = None,
                 prefix_cache: int = 0, prefill_chunk: int | None = None, prefill_rows: int = PREFILL_ROWS,
                 progress: bool = False):
        self.engine = Engine(model, slots=slots, context=context, prefix_cache=prefix_cache,
                             prefill_chunk=prefill_chunk, prefill_rows=prefill_rows)
        self.engine.warm_up(progress)  # every decode step and prefill bucket captured before the first request
        self.max_waiting = 4 * slots if max_waiting is None else max_waiting
        self.inbox: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self.live: dict[int, tuple[Ticket, _RowText]] = {}  # by request id
        self.finished = self.refused = self.failed_steps = 0
        self.outside_step_s = 0.0  # the worker's seconds at work outside engine.step(): admitting, handing out text
        self.seconds_per_request = 1.0  # a running mean, for the retry hint
        self.largest = 0  # the most requests decoding together
        threading.Thread(target=self._work, daemon=True, name="nano-engine").start()

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet in a slot."""
        return self.inbox.qsize() + len(self.engine.waiting)

    def submit(self, ticket: Ticket) -> Ticket:
        """Make the ticket's request (ValueError names a bad setting) and queue it, or raise Busy."""
        waiting = self.waiting
        if waiting >= self.max_waiting:
            self.refused += 1
            slots = self.engine.slots
            raise Busy(waiting, max(1, math.ceil(self.seconds_per_request * (waiting + 1) / slots)))
        ticket.request = self.engine.request(ticket.prompt, budget=ticket.budget, grace=ticket.grace,
                                             max_new_tokens=ticket.max_tokens, temperature=ticket.temperature,
                                             top_p=ticket.top_p, seed=ticket.seed)
        ticket.began = time.perf_counter()
        self.inbox.put(ticket)
        return ticket

    def stats(self) -> dict:
        return dict(batching=self.kind, slots=self.engine.slots, context=self.engine.context,
                    active=self.engine.active(), waiting=self.waiting, finished=self.finished,
                    refused=self.refused, largest_batch=self.largest, prefix_cache=self.engine.prefix.stats(),
                    outside_step_s=round(self.outside_step_s, 3),
                    engine={k: round(v, 3) if isinstance(v, float) else v for k, v in self.engine.counts.items()})

    def _work(self) -> None:
        engine, outbox = self.engine, _Outbox()
        while True:
            began = time.perf_counter()
            outbox.send()
            if not engine.busy:
                self._take(self.inbox.get())  # idle: sleep until a request comes
                began = time.perf_counter()
            while True:
                try:
                    self._take(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for number, (ticket, _) in list(self.live.items()):
                if ticket.gone.is_set():  # the client left: its slot is free for the next admission now
                    engine.cancel(ticket.request)
                    del self.live[number]
            self.outside_step_s += time.perf_counter() - began
            try:
                tokens = engine.step()
            except Exception as e:  # a failed step fails the requests in it, not the server
                self.failed_steps += 1
                for ticket, _ in self.live.values():
                    engine.cancel(ticket.request)
                    ticket.error = f"{type(e).__name__}: {e}"
                    outbox.put(ticket, DONE)
                self.live.clear()
                continue
            began = time.perf_counter()
            self.largest = max(self.largest, sum(r is not None and r.state == "decoding" for r in engine.in_slot))
            for token in tokens:
                request = token.request
                entry = self.live.get(request.id)
                if entry is None:
                    continue
                ticket, text = entry
                for event in text.feed(token.token, token.kind):
                    outbox.put(ticket, event)
                if request.finished:
                    self._finish(ticket, text, outbox)
            self.outside_step_s += time.perf_counter() - began

    def _take(self, ticket: Ticket) -> None:
        if ticket.gone.is_set():
            return
        self.engine.submit(ticket.request)
        self.live[ticket.request.id] = (ticket, _RowText(self.engine.model.tokenizer, 0))

    def _finish(self, ticket: Ticket, text: _RowText, outbox: _Outbox) -> None:
        for event in text.end_run():
            outbox.put(ticket, event)
        request = ticket.request
        ticket.result = request.result
        outbox.put(ticket, DONE)
        del self.live[request.id]
        self.finished += 1
        took = time.perf_counter() - ticket.began
        self.seconds_per_request += (took - self.seconds_per_request) / min(self.finished, 32)


class StaticBatcher:
    """Runs waiting requests in batches through `nano.generate` on one worker thread."""

    kind = "static"

    def __init__(self, model, max_batch: int = 8, gather_s: float = 0.01):
        self.model, self.max_batch, self.gather_s = model, max_batch, gather_s
        self.waiting_tickets: queue.Queue[Ticket] = queue.Queue()
        self.batches = 0  # batches run, and the largest, for the page and the load test
        self.largest = 0
        threading.Thread(target=self._work, daemon=True, name="nano-batcher").start()

    def submit(self, ticket: Ticket) -> Ticket:
        """Queue the ticket; a prompt that cannot run (ValueError, naming it) is refused here, alone,
        rather than failing the batch it would have joined."""
        prepare_prompt(self.model, ticket.prompt, ticket.budget, True, ticket.max_tokens)
        self.waiting_tickets.put(ticket)
        return ticket

    def stats(self) -> dict:
        return dict(batching=self.kind, max_batch=self.max_batch, waiting=self.waiting_tickets.qsize(),
                    batches=self.batches, largest_batch=self.largest)

    def _gather(self) -> list[Ticket]:
        first = self.waiting_tickets.get()
        batch, others = [first], []
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch:
            try:
                ticket = self.waiting_tickets.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if ticket.key() == first.key() else others).append(ticket)
        for ticket in others:  # different sampling settings: the next batch
            self.waiting_tickets.put(ticket)
        return [t for t in batch if not t.gone.is_set()]

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                continue
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                self._run(batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                for ticket in batch:
                    ticket.error = f"{type(e).__name__}: {e}"
            for ticket in batch:
                ticket.put(DONE)

    def _run(self, batch: list[Ticket]) -> None:
        first = batch[0]
        stream = nano.generate(  # a row's budget of 0 turns its reasoning off
            self.model, [t.prompt for t in batch], budget=[t.budget for t in batch], grace=[t.grace for t in batch],
            max_new_tokens=[t.max_tokens for t in batch], temperature=first.temperature, top_p=first.top_p,
            seed=first.seed, stream=True,
        )
        for event in stream:
            ticket = batch[event.row]
            if not ticket.gone.is_set():
                ticket.put(event)
            if all(t.gone.is_set() for t in batch):
                return  # everyone left: stop here
        for ticket, result in zip(batch, stream.result):
            ticket.result = result
