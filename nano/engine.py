"""A continuous-batching engine over the fast runtime: requests join and leave a running batch.

The engine holds a fixed pool of `slots` request slots in one `HybridRuntime`: per slot the conv
window and the fp32 SSM state of every Mamba layer and the keys and values of every attention
layer, for up to `context` tokens. Each `step()`:

1. admits waiting requests into free slots (the lowest free first, so the busy slots stay packed
   at the front);
2. runs one prefill call: the prompts of up to `prefill_rows` requests admitted afresh, each short
   enough for one call, as one batch of at most `prefill_chunk` tokens, each into its own slot;
   or else one chunk of the first admitted request's prompt (a long one, or one that goes on from
   a stored prefix). While other slots decode, a batch with room for more prompts waits one step
   for company, so that prompts arriving together share one call. After its prompt's last token a
   request samples its first token and starts decoding;
3. launches one decode step for every decoding slot: the first B slots, B the smallest bucket that
   holds them all, with the budget controller and the sampler of each slot inside the same step.
   On a GPU each bucket's step is captured once in a CUDA graph and replayed;
4. reads back the tokens of the step before (and the first tokens of prefills that ended): the
   host hands those out while the device runs this one.

Slots in the first B that are not decoding (free, or part way through a prefill) are padding
rows of the step. They can never touch a live slot: their Mamba state is left as it was (the
kernel skips them), their keys and values go to the cache's last column, which no decoding row
attends to, and their controller row is finished. A finished or cancelled request frees its slot
at once, for the next admission.

With a prefix cache (`prefix_cache` bytes, `nano.prefix_cache`), a request's prefill stops at the
ends of its chat turns: there the slot's state is stored (at the last two ends: the conversation
so far, and the whole of it, which the next turn of the same conversation begins with), and a
request admitted later whose tokens begin with a stored prefix starts from its state. Prefixes
shorter than `prefix_min_tokens` (256) are left out: stopping a prefill there costs a prefill call
more, which a short prefix does not pay back.

Sampling is per request (temperature, top-p, seed). The noise a request draws at its t-th token
is a function of its seed and t alone, so a request samples the same tokens whatever else shares
the batch; at temperature 0 it is greedy, and a batch through the engine then equals each request
run alone through `nano.generate` (tests/test_engine.py).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .budget import PAD, BudgetController
from .config import context_length
from .generation import Generation, PreparedPrompt, Readback, _check_sampling, _generation, prepare_prompt
from .hardware import PREFILL_CHUNK, PREFILL_ROWS, powers_of_two
from .layers import MambaCache
from .prefix_cache import PrefixCache, restore, take
from .runtime import HybridRuntime, batch_width, to_device


@dataclass
class Request:
    """One request and everything it has produced so far."""

    prompt: object  # a string or chat messages
    budget: int | None = None
    grace: int | None = None
    think: bool = True
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    id: int = 0
    # Filled in by the engine.
    ready: PreparedPrompt | None = field(default=None, repr=False)
    max_new: int = 0  # tokens it may generate: max_new_tokens, or what the context leaves
    tokens: list[int] = field(default_factory=list, repr=False)
    kinds: list[int] = field(default_factory=list, repr=False)
    state: str = "waiting"  # waiting, prefilling, decoding, finished, cancelled
    slot: int | None = None
    admitted_at: int = -1  # the engine step that gave it its slot
    prefilled: int = 0  # prompt tokens in the slot's caches so far
    stops: tuple[int, ...] = ()  # prompt lengths at the ends of its chat turns: where the prefix cache looks
    reused: int = 0  # prompt tokens taken from the prefix cache
    result: Generation | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.ready.ids

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "cancelled")


@dataclass(frozen=True)
class Token:
    """One token a step produced for a request."""

    request: Request
    token: int
    kind: int  # REASONING, ANSWER, CONTROL, END (see nano.budget)


class Engine:
    """Requests in, tokens out, one `step()` at a time (see the module doc)."""

    def __init__(self, model, slots: int = 8, context: int | None = None, prefill_chunk: int | None = None,
                 buckets: tuple[int, ...] | None = None, graphs: bool | None = None, prefix_cache: int = 0,
                 prefix_min_tokens: int = 256, prefill_rows: int = PREFILL_ROWS, prefill_buckets: bool | None = None):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self.prefix = PrefixCache(prefix_cache)
        self.prefix_min_tokens = prefix_min_tokens
        self.model = model
        self.context = min(context or context_length(model.config), context_length(model.config))
        # One column past the context: where padding rows write their keys and values.
        self.runtime = HybridRuntime(model.model, slots, self.context + 1, graphs=graphs)
        self.device, self.slots = self.runtime.device, slots
        self.prefill_chunk = prefill_chunk or (PREFILL_CHUNK if self.device.type == "cuda" else 512)
        if isinstance(prefill_rows, bool) or not isinstance(prefill_rows, int) or prefill_rows < 1:
            raise ValueError(f"prefill_rows must be a positive integer, got {prefill_rows!r}")
        self.prefill_rows = min(prefill_rows, slots)
        if prefill_buckets is None:
            # Short prompts are prefilled in a few shapes, each replayed from a CUDA graph; with one prompt
            # at a time (a tight memory plan) they go straight into their slots instead, needing no caches
            # of their own.
            prefill_buckets = self.runtime.graphs and self.prefill_rows > 1
        if prefill_buckets:
            self.runtime.bucket_prefills(self.prefill_rows)
        self.buckets = tuple(sorted(set(buckets or powers_of_two(slots)) | {slots}))
        if self.buckets[0] < 1 or self.buckets[-1] > slots:
            raise ValueError(f"buckets must lie in 1..{slots}, got {buckets!r}")
        chat = model.chat
        self.controller = BudgetController.pool(chat.think, chat.line_end_ids, model.config.vocab_size, slots,
                                                self.device)
        on = dict(device=self.device)
        self.scratch = self.context  # the cache column padding rows write to
        self.positions = torch.full((slots,), self.scratch, dtype=torch.long, **on)
        self.live = torch.zeros(slots, dtype=torch.bool, **on)
        self.tokens = torch.zeros(slots, dtype=torch.long, **on)  # what each slot feeds next
        self.temperature = torch.zeros(slots, **on)
        self.top_p = torch.ones(slots, **on)
        self.seed = torch.zeros(slots, dtype=torch.long, **on)
        self.decodable = len(model.tokenizer)  # ids past the tokenizer are padding rows of the head
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.in_slot: list[Request | None] = [None] * slots
        self._steps: dict[tuple[int, bool], object] = {}
        self._pending: tuple[Readback, list[tuple[int, Request]]] | None = None  # the decode step not yet read
        self._first: tuple[list[Request], Readback] | None = None  # first tokens of prefills ended, not yet read
        self._ids = itertools.count()
        # What the steps did; padding_rows: rows of decode steps that were not decoding (the buckets' cost);
        # step_s: seconds in step(), and device_wait_s of them waiting for the device's results (near 0:
        # the device waits for the host, not the other way round).
        self.counts = dict(steps=0, decode_steps=0, padding_rows=0, prefill_calls=0, prompts_together=0,
                           step_s=0.0, device_wait_s=0.0)
        self.name = f"engine of {slots} slots x {self.context} tokens, {self.runtime.name}"

    # Requests.

    def request(self, prompt, budget: int | None = None, grace: int | None = None, think: bool = True,
                max_new_tokens: int = 1024, temperature: float = 0.0, top_p: float = 1.0,
                seed: int | None = None) -> Request:
        """A request made ready (rendered, encoded, checked) but not queued. Bad settings are refused
        here, naming the value. It touches no state of the engine's, so a server's threads may call it
        while another thread steps."""
        _check_sampling(max_new_tokens, temperature, top_p)
        for name, value in (("budget", budget), ("grace", grace)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        ready = prepare_prompt(self.model, prompt, budget, think, max_new_tokens)
        if len(ready.ids) >= self.context:
            raise ValueError(f"the prompt is {len(ready.ids)} tokens; the engine's context is {self.context} tokens")
        number = next(self._ids)
        return Request(prompt, budget, grace, think, max_new_tokens, temperature, top_p,
                       number if seed is None else seed, id=number, ready=ready,
                       max_new=min(ready.max_new, self.context - len(ready.ids)),
                       stops=self._stops(prompt, think and budget != 0, ready.ids))

    def submit(self, prompt, **settings) -> Request:
        """Queue a request (a prompt and its settings as for `request`, or a `Request` it made); it
        joins the batch at a coming `step()`."""
        request = prompt if isinstance(prompt, Request) else self.request(prompt, **settings)
        self.waiting.append(request)
        return request

    def _stops(self, prompt, think: bool, ids: list[int]) -> tuple[int, ...]:
        """The prompt's lengths at the ends of its chat turns, where they are token for token how the
        prompt begins and long enough to be worth a snapshot."""
        if not self.prefix.capacity:
            return ()
        stops = []
        for text in self.model.chat.turn_ends(prompt, think):
            head = self.model.chat.encode(text)
            if self.prefix_min_tokens <= len(head) < len(ids) and ids[: len(head)] == head:
                stops.append(len(head))
        return tuple(sorted(set(stops)))

    def cancel(self, request: Request) -> None:
        """Stop `request` now; its slot is free for the next admission."""
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.prefilling:
            self.prefilling.remove(request)
        if request.slot is not None:
            self._free(request.slot)
        request.state = "cancelled"
        request.result = self._result(request, hit=False)

    def warm_up(self, progress: bool = False) -> int:
        """Compile and capture the decode step of every bucket, greedy and sampling, and the prefill of
        every short-prompt bucket, now rather than when a request first needs one: a first capture
        compiles the step's fused pieces for its batch size and takes seconds, which every decoding
        request would wait. The steps run with every row a padding row, so no slot's state changes.
        Returns how many steps were captured (0 without graphs)."""
        if self.busy:
            raise RuntimeError(f"warm_up needs an idle engine; {self.active()} requests are in slots and "
                               f"{len(self.waiting)} waiting")
        if not self.runtime.graphs:
            return 0
        from tqdm.auto import tqdm

        captured = 0
        for rows, greedy in tqdm([(b, g) for b in self.buckets for g in (True, False)], desc="capture decode steps",
                                 disable=not progress):
            captured += self._step(rows, greedy).prepare(self.tokens[:rows])
        return captured + self.runtime.warm_up_prefills(progress)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self._pending or self._first
                    or any(r is not None for r in self.in_slot))

    def active(self) -> int:
        """Requests admitted and not finished."""
        return sum(r is not None for r in self.in_slot)

    # The loop.

    def step(self) -> list[Token]:
        """Admit, run one prefill chunk, launch one decode step, then read the decode step launched by
        the call before; the tokens produced (the prefill's first, the earlier step's), in slot order.

        Reading a step one call late lets the device run it while the host reads and hands out the
        one before: the step's input tokens stay on the device, and a request the host does not yet
        know has finished runs one step more as a padding row of its own slot."""
        began = time.perf_counter()
        self._admit()
        first = self._prefill()
        decoding = [s for s, r in enumerate(self.in_slot) if r is not None and r.state == "decoding"]
        launched = None
        self.counts["steps"] += 1
        if decoding:
            self.counts["decode_steps"] += 1
            rows = next(b for b in self.buckets if b > max(decoding))
            self.counts["padding_rows"] += rows - len(decoding)
            greedy = all(self.in_slot[s].temperature == 0 for s in decoding)
            token, kind, done, hit = self._step(rows, greedy)(self.tokens[:rows])
            launched = (Readback(torch.stack([token, kind, done.long(), hit.long()])),
                        [(s, self.in_slot[s]) for s in decoding])
        out = []
        if self._first is not None:
            started, readback = self._first
            out = [self._take(r, *values) for r, values in zip(started, self._read(readback)) if self._holds(r)]
        if self._pending is not None:
            out += self._collect(*self._pending)
        self._first, self._pending = first, launched
        self.counts["step_s"] += time.perf_counter() - began
        return out

    def _read(self, readback: Readback) -> list:
        began = time.perf_counter()
        values = readback.values()
        self.counts["device_wait_s"] += time.perf_counter() - began
        return values

    def _holds(self, request: Request) -> bool:
        """Whether `request` is still decoding in its slot (not cancelled, not ended meanwhile)."""
        return request.state == "decoding" and self.in_slot[request.slot] is request

    def _collect(self, readback: Readback, rows: list[tuple[int, Request]]) -> list[Token]:
        token, kind, done, hit = self._read(readback)
        return [self._take(request, token[s], kind[s], done[s], hit[s]) for s, request in rows if self._holds(request)]

    def run(self) -> None:
        """Step until every request is finished."""
        while self.busy:
            self.step()

    def generate(self, prompts, **settings) -> list[Generation]:
        """Every prompt through the engine at once (settings as for `submit`, the same for all)."""
        requests = [self.submit(p, **settings) for p in prompts]
        self.run()
        return [r.result for r in requests]

    # Inside.

    def _admit(self) -> None:
        while self.waiting and None in self.in_slot:
            request = self.waiting.popleft()
            slot = self.in_slot.index(None)
            self.in_slot[slot], request.slot, request.state = request, slot, "prefilling"
            request.admitted_at = self.counts["steps"]
            caches = self.runtime.slot(slot).caches
            for cache in caches:
                if isinstance(cache, MambaCache):
                    cache.reset()  # keys and values need none: a row attends to its own positions only
            found = self.prefix.find(request.prompt_ids, request.stops) if request.stops else None
            if found is not None:
                restore(caches, found)
                request.prefilled = request.reused = len(found.ids)
            self.temperature[slot], self.top_p[slot], self.seed[slot] = request.temperature, request.top_p, request.seed
            self.prefilling.append(request)

    def _prefill(self) -> tuple[list[Request], Readback] | None:
        """One prefill call: the first prefilling request's next chunk or, where that request is a
        whole prompt of one chunk started afresh, it and the others like it behind it, as one batch
        of up to `prefill_rows` prompts and `prefill_chunk` tokens with the padding. A request whose
        prompt is done starts decoding; its first token is read back with the next call's tokens."""
        if not self.prefilling:
            return None
        head = self.prefilling[0]
        if not self._whole(head):
            self.counts["prefill_calls"] += 1
            return self._prefill_chunk(head)
        batch, width = [head], batch_width(len(head.prompt_ids))
        for request in itertools.islice(self.prefilling, 1, None):
            if len(batch) == self.prefill_rows:
                break
            wider = max(width, batch_width(len(request.prompt_ids)))
            if self._whole(request) and (len(batch) + 1) * wider <= self.prefill_chunk:
                batch.append(request)
                width = wider
        if len(batch) < self.prefill_rows and head.admitted_at == self.counts["steps"] and self._decoding():
            # While others decode, a prefill with room to spare waits one step for company: clients whose
            # answers ended together send their next prompts within a step, and one call for them all
            # stalls the decoding streams once, not once per prompt.
            return None
        self.counts["prefill_calls"] += 1
        if len(batch) == 1 and self.runtime.prefill_bucket(1, len(head.prompt_ids)) is None:
            return self._prefill_chunk(head)  # alone, and no bucket to replay: straight into its slot
        for request in batch:
            self.prefilling.remove(request)
        self.counts["prompts_together"] += len(batch)
        logits = self.runtime.prefill_slots([r.prompt_ids for r in batch], [r.slot for r in batch])
        return batch, Readback(torch.stack([self._start(r, logits[i : i + 1]) for i, r in enumerate(batch)]))

    def _decoding(self) -> bool:
        return any(r is not None and r.state == "decoding" for r in self.in_slot)

    def _whole(self, request: Request) -> bool:
        """Whether `request`'s prompt goes in one call from the start (no prefix taken, no stop to store)."""
        return request.prefilled == 0 and not request.stops and len(request.prompt_ids) <= self.prefill_chunk

    def _prefill_chunk(self, request: Request) -> tuple[list[Request], Readback] | None:
        """The next chunk of `request`'s prompt, straight into its slot, up to its next turn end where
        there are any (at the last two, the slot's state goes into the prefix cache)."""
        ids = request.prompt_ids
        begin = request.prefilled
        end = min([begin + self.prefill_chunk, len(ids), *(s for s in request.stops if s > begin)])
        runtime = self.runtime.slot(request.slot)
        logits = runtime.extend(to_device(torch.tensor([ids[begin:end]]), self.device), begin)
        request.prefilled = end
        if end in request.stops[-2:] and ids[:end] not in self.prefix:
            self.prefix.put(take(runtime.caches, end, ids))
        if end < len(ids):
            return None
        self.prefilling.popleft()
        return [request], Readback(self._start(request, logits)[None])

    def _start(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        """`request`'s prompt is in its slot (`logits`, (1, vocab), of its last token): it samples its
        first token and decodes from the next step on. Its token, kind, done and hit flags, to read back."""
        slot = request.slot
        # The controller row starts only now: until this step the slot was a padding row of the decode steps.
        self.controller.admit(slot, request.ready.budget, request.grace, request.ready.thinking, request.max_new)
        token, kind = self._choose(logits, self.controller.rows(slot, slot + 1), slice(slot, slot + 1),
                                   request.temperature == 0)
        self.tokens[slot] = token[0]
        self.positions[slot] = len(request.prompt_ids)
        request.state = "decoding"
        self.live[slot] = True
        return torch.stack([token[0], kind[0], self.controller.done[slot].long(), self.controller.hit[slot].long()])

    def _choose(self, logits, controller: BudgetController, rows: slice, greedy: bool):
        logits[:, self.decodable:] = float("-inf")
        controller.mask_logits(logits)
        if greedy:  # every row at temperature 0: the sampler's sort and noise over the vocabulary are not needed
            sampled = logits.argmax(dim=-1)
        else:
            sampled = sample_rows(logits, self.temperature[rows], self.top_p[rows], self.seed[rows],
                                  controller.generated)
        return controller.advance(sampled)

    def _step(self, rows: int, greedy: bool):
        """The decode step of the first `rows` slots: model, controller and sampler (a CUDA graph on a
        GPU, one per bucket, and one more where any row samples)."""
        if (rows, greedy) not in self._steps:
            controller, span = self.controller.rows(0, rows), slice(0, rows)
            positions, live = self.positions[:rows], self.live[:rows]

            @torch.no_grad()
            def step(tokens):
                logits = self.runtime.step_slots(tokens, positions, live)
                token, kind = self._choose(logits, controller, span, greedy)
                positions.add_(live)
                self.tokens[:rows].copy_(token)  # the next step's input, without a trip through the host
                return token, kind, controller.done, controller.hit

            self._steps[rows, greedy] = self.runtime.graphed(step)
        return self._steps[rows, greedy]

    def _take(self, request: Request, token: int, kind: int, done: bool, hit: bool) -> Token:
        if kind != PAD:
            request.tokens.append(token)
            request.kinds.append(kind)
        if done:
            self._free(request.slot)
            request.state = "finished"
            request.result = self._result(request, bool(hit))
        return Token(request, token, kind)

    def _free(self, slot: int) -> None:
        request = self.in_slot[slot]
        self.in_slot[slot] = None
        self.live[slot] = False
        self.positions[slot] = self.scratch
        self.controller.release(slot)
        if request is not None:
            request.slot = None

    def _result(self, request: Request, hit: bool) -> Generation:
        return _generation(self.model.tokenizer, request.tokens, request.kinds, hit, len(request.prompt_ids))


_MASK31 = (1 << 31) - 1


def _uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) numbers in (0, 1), a hash of (seed, step, token id): the same for a row whatever
    the other rows are. Integer arithmetic below 2**62, so it is exact on every device."""
    ids = torch.arange(vocab, device=seed.device)
    x = ((seed[:, None] & _MASK31) * 1_000_003 + (step[:, None] & _MASK31)) & _MASK31
    x = (x * 69_069 + ids[None, :] + 1) & _MASK31
    for _ in range(3):
        x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    return ((x >> 7).float() + 0.5) / float(1 << 24)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                step: torch.Tensor) -> torch.Tensor:
    """One token per row, each row with its own temperature (0: greedy), top-p and seed; `step` is the
    row's count of generated tokens. An exponential race: the first token of p / E, E ~ Exp(1)."""
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p[:, None]  # keeps at least the top token
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    race = -torch.log(_uniform(seed, step, logits.shape[-1]).gather(-1, order))
    drawn = order.gather(-1, (sorted_probs / race).argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature == 0, greedy, drawn)


