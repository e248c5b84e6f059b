"""Continuous batching: one thread steps one running Generator; requests join and leave it between steps.

    batcher = Batcher(engine, tokenizer, max_batch=32, max_queue=256)
    batcher.start()
    ticket = Ticket(job, loop); batcher.submit(ticket)      # from the event loop
    event = await ticket.events.get()                        # ("delta", index, text, logprobs, finish_reason),
                                                             # ("done",) or ("error", status, message)

Each loop iteration is a step boundary:

1. rows of cancelled tickets (a client went away) leave the batch (`Generator.select`);
2. waiting tickets join in arrival order while their rows fit in `max_batch`: they are prefilled
   together in a Generator of their own (rows whose padded prompt + max_tokens would not fit the
   engine's max_seq_len together go in separate ones), which is merged into the running one
   (`Generator.merge`: the running rows' chosen tokens are fed in the same call);
3. one `advance` (cqil.runtime.completion) chooses every row's token and turns it into text;
   events go to each ticket's asyncio queue through its event loop;
4. finished rows leave (`Generator.select`), and the padding columns they leave behind go with them.

The Generator stays the one decode loop: this module only decides which rows are in it. A row's
tokens do not depend on the rows beside it (tests/test_batching.py). An exception in a step fails
the requests of that batch (status 500) and the thread goes on with the next ones; `healthy` is
False until a step succeeds again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

from cqil.errors import first_line
from cqil.runtime.completion import Output, advance, eos_ids
from cqil.runtime.generator import Generator
from cqil.serve.protocol import ApiError, Job

log = logging.getLogger("cqil")


class Ticket:
    """A request inside the batcher: its outputs (one per row) and the events its HTTP handler reads."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, tokenizer=None):
        self.job, self.loop = job, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.outputs = [Output(p, tokenizer, ids) for ids, p in job.rows]
        self.cancelled = False
        self.open = len(self.outputs)  # rows not finished yet

    def post(self, event: tuple):
        _deliver([(self, event)])


def _deliver(events: list[tuple[Ticket, tuple]]):
    """Hand events to their tickets' queues: one wake-up of each event loop for all of them."""
    by_loop: dict = {}
    for ticket, event in events:
        by_loop.setdefault(ticket.loop, []).append((ticket.events, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: the server is going down
            pass


def _put_all(items):
    for queue, event in items:
        queue.put_nowait(event)


class Batcher:
    def __init__(self, engine, tokenizer, max_batch: int, max_queue: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = eos_ids(engine, tokenizer) or None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._gen: Generator | None = None
        self._rows: list[tuple[Ticket, int]] = []  # (ticket, choice index) of every Generator row
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="cqil-batcher", daemon=True)
        self.healthy = True
        self.steps = self.tokens = self.answered = 0  # decode steps, tokens chosen, requests finished
        self.peak_rows = 0  # the largest batch decoded so far

    # -- the event loop's side ----------------------------------------------------------------

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, ticket: Ticket):
        with self._cond:
            if not self.alive:
                raise ApiError(503, "the server is shutting down", type="server_error", code="unavailable")
            if len(self._waiting) >= self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting (--max-queue "
                                    f"{self.max_queue}); retry later", type="rate_limit_error", code="queue_full")
            self._waiting.append(ticket)
            self._cond.notify()

    def cancel(self, ticket: Ticket):
        """The client went away: the ticket's rows leave the batch at the next step boundary."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    # -- the batcher thread -------------------------------------------------------------------

    def _loop(self):
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = self._take()
            try:
                self._leave([b for b, (t, _) in enumerate(self._rows) if t.cancelled])
                if joining:
                    self._join(joining)
                if self._rows:
                    self._step()
                self.healthy = True
            except Exception as e:  # the engine failed: these requests fail, the server goes on
                log.error("a decode step failed: %s: %s", type(e).__name__, first_line(e))
                self.healthy = False
                _fail({t for t, _ in self._rows} | set(joining), 500, f"generation failed: {first_line(e)}")
                self._gen, self._rows = None, []
            joining = []  # no reference to a finished request outlives its step
        _fail({t for t, _ in self._rows} | set(self._waiting), 503, "the server is shutting down")

    def _take(self) -> list[Ticket]:
        """Waiting tickets, in arrival order, whose rows fit beside the running ones."""
        free = self.max_batch - len(self._rows)
        taken = []
        while self._waiting and len(self._waiting[0].outputs) <= free:
            ticket = self._waiting.popleft()
            free -= len(ticket.outputs)
            taken.append(ticket)
        return taken

    def _join(self, tickets: list[Ticket]):
        for group in _prefill_groups(tickets, self.engine.max_seq_len):
            rows = [(t, i) for t in group for i in range(len(t.outputs))]
            try:
                gen = Generator(self.engine, [ids for t in group for ids, _ in t.job.rows],
                                params=[p for t in group for _, p in t.job.rows], eos_token_id=self.eos)
            except Exception as e:  # this prefill failed: these requests fail, the running ones go on
                log.error("a prefill failed: %s: %s", type(e).__name__, first_line(e))
                _fail(group, 500, f"generation failed: {first_line(e)}")
                continue
            if self._gen is None:
                self._gen = gen
            else:
                self._gen.merge(gen)
            self._rows += rows

    def _step(self):
        outputs = [t.outputs[i] for t, i in self._rows]
        seen = [len(o.logprobs) for o in outputs]
        deltas = advance(self._gen, outputs)
        self.steps += 1
        self.tokens += len(outputs)
        self.peak_rows = max(self.peak_rows, len(outputs))
        events = []
        for (ticket, i), out, delta, n in zip(self._rows, outputs, deltas, seen):
            if delta or out.finish_reason is not None or len(out.logprobs) > n:
                events.append((ticket, ("delta", i, delta, out.logprobs[n:], out.finish_reason)))
            if out.finish_reason is not None:
                ticket.open -= 1
                if ticket.open == 0:
                    self.answered += 1
                    events.append((ticket, ("done",)))
        _deliver(events)
        self._leave([b for b, o in enumerate(outputs) if o.finish_reason is not None])

    def _leave(self, rows: list[int]):
        if not rows:
            return
        keep = [b for b in range(len(self._rows)) if b not in set(rows)]
        if keep:
            self._gen.select(keep)
        else:
            self._gen = None
        self._rows = [self._rows[b] for b in keep]


def _fail(tickets, status: int, message: str):
    for ticket in tickets:
        ticket.post(("error", status, message))


def _prefill_groups(tickets: list[Ticket], max_seq_len: int) -> list[list[Ticket]]:
    """Tickets in arrival order, cut where the group's longest prompt + longest max_tokens would not fit."""
    groups, longest, most = [], 0, 0
    for t in tickets:
        prompt = max(len(ids) for ids, _ in t.job.rows)
        limit = max(p.max_tokens for _, p in t.job.rows)
        if groups and max(longest, prompt) + max(most, limit) <= max_seq_len:
            groups[-1].append(t)
            longest, most = max(longest, prompt), max(most, limit)
        else:
            groups.append([t])
            longest, most = prompt, limit
    return groups
