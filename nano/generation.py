"""`nano.generate`: one prefill, then a decode loop with the thinking-budget controller inside it.

The loop never leaves the device between tokens except to ask whether every row has finished
(and, when streaming, to read the new tokens). A budget cut forces `</think>` into the same
sequence the model is decoding: there is no second request and no second prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .budget import ANSWER, END, PAD, REASONING, BudgetController
from .config import context_length
from .detokenize import IncrementalText, decode

KIND_NAMES = {REASONING: "reasoning", ANSWER: "answer"}


@dataclass
class Generation:
    """One response: reasoning and answer text, their token counts, and the generated ids."""

    reasoning: str
    answer: str
    reasoning_tokens: int
    answer_tokens: int
    budget_hit: bool  # the controller forced the end of reasoning
    token_ids: list[int] = field(repr=False)  # everything generated: tags, forced tokens, the end token
    prompt_tokens: int = 0
    finish_reason: str = "eos"  # "eos" (the model ended its turn) or "length" (out of tokens)


@dataclass(frozen=True)
class Event:
    """A piece of streamed text; `row` is the prompt's index in a batch."""

    kind: str  # "reasoning" or "answer"
    text: str
    row: int = 0


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _as_batch(prompt) -> tuple[list, bool]:
    if isinstance(prompt, str) or _is_chat(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) or _is_chat(p) for p in prompt):
        return list(prompt), True
    raise ValueError(
        f"prompt must be a string, a list of chat messages, or a list of either for a batch; got {prompt!r:.200}"
    )


def _per_row(value, name: str, rows: int, batched: bool) -> list:
    if isinstance(value, (list, tuple)):
        if not batched:
            raise ValueError(f"{name} is a list ({list(value)!r}) but the prompt is a single prompt")
        if len(value) != rows:
            raise ValueError(f"{name} has {len(value)} entries ({list(value)!r}) for a batch of {rows} prompts")
        values = list(value)
    else:
        values = [value] * rows
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be a non-negative integer or None, got {v!r}")
    return values


def _check_sampling(max_new_tokens, temperature, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else from the temperature- and top-p-shaped distribution."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Prepared:
    """Everything about a batch that is fixed before the first token."""

    prompt_ids: list[list[int]]
    controller: BudgetController
    max_steps: int
    batched: bool


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt made ready: its ids, and what the budget controller starts its row with."""

    ids: list[int]
    thinking: bool  # the template leaves reasoning open
    budget: int | None  # 0 where reasoning is off: a think block the model opens anyway closes at once
    max_new: int


def prepare_prompt(model, prompt, budget: int | None, think: bool, max_new_tokens: int,
                   where: str = "the prompt") -> PreparedPrompt:
    """Render and encode one prompt (a string or chat messages) for `model`; `where` names it in errors."""
    chat, context = model.chat, context_length(model.config)
    text, reasoning_on = chat.render(prompt, think=bool(think) and budget != 0)
    ids = chat.encode(text)
    if len(ids) >= context:
        raise ValueError(f"{where} is {len(ids)} tokens; the model's context is {context} tokens")
    tags = [t for t in ids if t in (chat.think.open, chat.think.close)]
    return PreparedPrompt(ids, bool(tags) and tags[-1] == chat.think.open, budget if reasoning_on else 0,
                          min(max_new_tokens, context - len(ids)))


def _prepare(model, prompt, budget, grace, think, max_new_tokens) -> _Prepared:
    prompts, batched = _as_batch(prompt)
    rows = len(prompts)
    budgets = _per_row(budget, "budget", rows, batched)
    graces = _per_row(grace, "grace", rows, batched)
    limits = _per_row(max_new_tokens, "max_new_tokens", rows, batched)
    ready = [prepare_prompt(model, p, b, think, n, f"prompt {i}" if batched else "the prompt")
             for i, (p, b, n) in enumerate(zip(prompts, budgets, limits))]
    controller = BudgetController(
        model.chat.think,
        model.chat.line_end_ids,
        model.config.vocab_size,
        [r.budget for r in ready],
        graces,
        [r.thinking for r in ready],
        [r.max_new for r in ready],
        device=model.device,
    )
    return _Prepared([r.ids for r in ready], controller, max(r.max_new for r in ready), batched)


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _decode_steps(model, prepared: _Prepared, temperature, top_p, seed) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens, kinds) per step, each a (rows,) tensor on the model's device."""
    controller = prepared.controller
    device = model.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    decodable = len(model.tokenizer)  # ids past the tokenizer's vocabulary are padding rows of the head
    input_ids, mask = _left_pad(prepared.prompt_ids, controller.pad_id, device)
    decoder = model.decoder(rows=input_ids.shape[0], capacity=input_ids.shape[1] + prepared.max_steps)

    @torch.no_grad()  # one grad mode for every step: compiled pieces are then compiled once
    def choose(logits):
        logits[:, decodable:] = float("-inf")
        controller.mask_logits(logits)
        return controller.advance(sample(logits, temperature, top_p, generator))

    def step(tokens):
        return choose(decoder.step(tokens))

    step = decoder.graphed(step, generator)  # the fast runtime: model, controller and sampler in one CUDA graph
    finished = _FinishedCheck(controller, device)
    tokens, kinds = choose(decoder.prefill(input_ids, mask))
    yield tokens, kinds
    for _ in range(prepared.max_steps - 1):
        if finished():
            return
        tokens, kinds = step(tokens)
        yield tokens, kinds


class Readback:
    """A small device tensor copied to the host in the background; `values()` waits for it."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor, None

    def values(self):
        """The tensor's values as Python numbers (nested lists), once the copy has arrived."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class _FinishedCheck:
    """Whether every row has finished, asked once per step.

    On a GPU, reading the flag right away would stall the device between steps while the host
    catches up; instead each step's flag is read back in the background and the one from `lag`
    steps back is read. The loop may run `lag` steps past the end; those steps only add padding
    (the controller's rows stay finished).
    """

    def __init__(self, controller, device, lag: int = 2):
        self.controller, self.lag = controller, lag if device.type == "cuda" else 0
        self.pending: list[Readback] = []

    def __call__(self) -> bool:
        if not self.lag:
            return bool(self.controller.done.all())
        self.pending.append(Readback(self.controller.done.all()))
        if len(self.pending) <= self.lag:
            return False
        return bool(self.pending.pop(0).values())


def _runs(tokens: Sequence[int], kinds: Sequence[int], kind: int) -> list[list[int]]:
    """The maximal runs of consecutive tokens of one kind."""
    runs, current = [], None
    for token, k in zip(tokens, kinds):
        if k == kind:
            if current is None:
                current = []
                runs.append(current)
            current.append(token)
        else:
            current = None
    return runs


def _generation(tokenizer, tokens: list[int], kinds: list[int], hit: bool, prompt_tokens: int) -> Generation:
    kept = [(t, k) for t, k in zip(tokens, kinds) if k != PAD]
    tokens, kinds = [t for t, _ in kept], [k for _, k in kept]
    text = {k: "".join(decode(tokenizer, run) for run in _runs(tokens, kinds, k)).lstrip() for k in KIND_NAMES}
    return Generation(
        reasoning=text[REASONING],
        answer=text[ANSWER],
        reasoning_tokens=kinds.count(REASONING),
        answer_tokens=kinds.count(ANSWER),
        budget_hit=hit,
        token_ids=tokens,
        prompt_tokens=prompt_tokens,
        finish_reason="eos" if kinds and kinds[-1] == END else "length",
    )


def _generations(model, prepared: _Prepared, tokens: list[list[int]], kinds: list[list[int]]) -> list[Generation]:
    hits = prepared.controller.hit.tolist()
    return [
        _generation(model.tokenizer, tokens[row], kinds[row], hits[row], len(prepared.prompt_ids[row]))
        for row in range(len(prepared.prompt_ids))
    ]


class _RowText:
    """Turns one row's tokens into stream events: a fresh decoder per run, leading blanks dropped."""

    def __init__(self, tokenizer, row: int):
        self.tokenizer, self.row = tokenizer, row
        self.kind, self.run = None, None
        self.started = {REASONING: False, ANSWER: False}

    def _event(self, kind: int, text: str) -> list[Event]:
        if not self.started[kind]:
            text = text.lstrip()
            self.started[kind] = bool(text)
        return [Event(KIND_NAMES[kind], text, self.row)] if text else []

    def end_run(self) -> list[Event]:
        events = self._event(self.kind, self.run.finish()) if self.run is not None else []
        self.kind, self.run = None, None
        return events

    def feed(self, token: int, kind: int) -> list[Event]:
        events = []
        if kind != self.kind:
            events += self.end_run()
            if kind in KIND_NAMES:
                self.kind, self.run = kind, IncrementalText(self.tokenizer)
        if self.run is not None:
            events += self._event(kind, self.run.push(token))
        return events


class Stream:
    """An iterator of `Event`s; once it is exhausted, `.result` holds what `generate` would have returned."""

    def __init__(self, model, prepared: _Prepared, steps: Iterator):
        self.result: Generation | list[Generation] | None = None
        self._events = self._run(model, prepared, steps)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def _run(self, model, prepared: _Prepared, steps: Iterator) -> Iterator[Event]:
        rows = len(prepared.prompt_ids)
        texts = [_RowText(model.tokenizer, row) for row in range(rows)]
        tokens, kinds = [[] for _ in range(rows)], [[] for _ in range(rows)]
        for step_tokens, step_kinds in steps:
            for row, (token, kind) in enumerate(zip(step_tokens.tolist(), step_kinds.tolist())):
                tokens[row].append(token)
                kinds[row].append(kind)
                yield from texts[row].feed(token, kind)
        for text in texts:
            yield from text.end_run()
        results = _generations(model, prepared, tokens, kinds)
        self.result = results if prepared.batched else results[0]


def generate(
    model,
    prompt,
    budget: int | None | Sequence[int | None] = None,
    grace: int | None | Sequence[int | None] = None,
    think: bool = True,
    max_new_tokens: int | Sequence[int] = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
):
    """Generate a response with the reasoning cut near `budget` tokens, in one pass.

    `prompt` is a string (one user turn), a list of chat messages, or a list of either (a batch,
    with `budget`, `grace` and `max_new_tokens` then allowed one per row). `budget` counts reasoning tokens; at it
    the model may finish its line within `grace` more tokens (default 10% of the budget, at least
    one), then `</think>` is forced and the answer follows. `budget=0` or `think=False` turns
    reasoning off; `None` sets no limit. Returns a `Generation` (a list for a batch), or with
    `stream=True` a `Stream` of `Event`s.
    """
    for limit in max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens]:
        _check_sampling(limit, temperature, top_p)
    prepared = _prepare(model, prompt, budget, grace, think, max_new_tokens)
    steps = _decode_steps(model, prepared, temperature, top_p, seed)
    if stream:
        return Stream(model, prepared, steps)
    step_tokens, step_kinds = [], []
    for tokens, kinds in steps:
        step_tokens.append(tokens)
        step_kinds.append(kinds)
    tokens = torch.stack(step_tokens, dim=1).tolist()
    kinds = torch.stack(step_kinds, dim=1).tolist()
    results = _generations(model, prepared, tokens, kinds)
    return results if prepared.batched else results[0]
