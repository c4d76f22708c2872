"""The thinking-budget controller: where reasoning is cut, as a few tensor operations per token.

The rule, per row of a batch (the `budget` argument of `nano.generate`):

- The budget N counts reasoning tokens: the tokens generated inside `<think>` ... `</think>`, over
  every think block of one response together. Tags, forced tokens and answer tokens do not count.
- After its N-th reasoning token the model may finish its line: the first reasoning token k with
  N <= k <= N + grace that ends a line closes reasoning right after it; if none does, reasoning is
  closed after token N + grace. So a response never holds more than N + grace reasoning tokens.
- Closing means forcing the close sequence (`</think>` and the newline after it) on the next
  steps; the answer then follows in the same pass.
- A think block opened once the budget is spent (count >= N) is closed at once.
- Tags always alternate: `<think>` cannot be sampled inside reasoning nor `</think>` outside it,
  so a forced close is never followed by a second one, and nothing is forced outside reasoning
  (an answer, a tool call).

Everything lives on the model's device and no value is read back to the host, so the decode loop
can run ahead of the CPU and the step can be captured in a CUDA graph. `BudgetRow`, at the end, is
the same rule for one row in plain Python, which this must match token for token.

This file needs nothing but torch on the CPU: TensorRT-LLM bundles carry it verbatim, as the rule
their logits processor runs (`export/trtllm_budget/`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

# What each generated token is, per row and step.
REASONING, ANSWER, CONTROL, END, PAD = 0, 1, 2, 3, 4
NO_LIMIT = 2**62
_LINE_END, _EOS = 1, 2  # bits of BudgetController.token_class


@dataclass(frozen=True)
class ThinkTokens:
    """The token ids the budget controller works with."""

    open: int
    close: int
    close_sequence: tuple[int, ...]  # what a budget cut forces: `</think>` and the newline after it
    eos: tuple[int, ...]


def default_grace(budget: int) -> int:
    """The line-finishing window when none is given: 10% of the budget, at least one token."""
    return max(1, budget // 10)


class BudgetController:
    """Per-row reasoning state of one batched generation.

    `budgets[i]` is None for no limit; `graces[i]` None for the default window; `thinking[i]`
    says whether row i's prompt leaves reasoning open (the template wrote `<think>`);
    `max_new[i]` is the number of tokens row i may generate.
    """

    def __init__(
        self,
        think: ThinkTokens,
        line_end_ids: torch.Tensor,
        vocab_size: int,
        budgets: Sequence[int | None],
        graces: Sequence[int | None],
        thinking: Sequence[bool],
        max_new: Sequence[int],
        device: torch.device | str = "cpu",
    ):
        rows = len(budgets)
        if not (len(graces) == len(thinking) == len(max_new) == rows):
            raise ValueError("budgets, graces, thinking and max_new must have one entry per row")
        as_long = dict(dtype=torch.long, device=device)
        self.open_id, self.close_id = think.open, think.close
        self.close_sequence = torch.tensor(think.close_sequence, **as_long)
        self.pad_id = think.eos[0]
        # One lookup per step tells whether a token ends a line and whether it ends the turn.
        self.token_class = torch.zeros(vocab_size, dtype=torch.uint8, device=device)
        self.token_class[line_end_ids[line_end_ids < vocab_size].to(device)] = _LINE_END
        self.token_class[torch.tensor(think.eos, **as_long)] |= _EOS

        budget = [NO_LIMIT if b is None else b for b in budgets]
        window = [0 if b is None else (default_grace(b) if g is None else g) for b, g in zip(budgets, graces)]
        self.budget = torch.tensor(budget, **as_long)
        self.limit = self.budget + torch.tensor(window, **as_long)
        self.max_new = torch.tensor(list(max_new), **as_long)
        self.count = torch.zeros(rows, **as_long)
        self.generated = torch.zeros(rows, **as_long)
        self.thinking = torch.tensor(list(thinking), dtype=torch.bool, device=device)
        self.done = self.max_new <= 0
        self.hit = self.thinking & (self.budget <= 0)
        # Index into the close sequence being forced on the next step, -1 when free.
        self.force = torch.where(self.hit, 0, -1)

    @classmethod
    def pool(cls, think: ThinkTokens, line_end_ids: torch.Tensor, vocab_size: int, rows: int,
             device: torch.device | str = "cpu") -> BudgetController:
        """A controller of `rows` free rows (finished, feeding padding), each given to a request by `admit`."""
        return cls(think, line_end_ids, vocab_size, [None] * rows, [None] * rows, [False] * rows, [0] * rows, device)

    def admit(self, row: int, budget: int | None, grace: int | None, thinking: bool, max_new: int) -> None:
        """Row `row` starts a response afresh, as a controller made for it alone would (in place: a
        captured step keeps reading these tensors)."""
        window = 0 if budget is None else (default_grace(budget) if grace is None else grace)
        self.budget[row] = NO_LIMIT if budget is None else budget
        self.limit[row] = self.budget[row] + window
        self.max_new[row] = max_new
        self.count[row] = 0
        self.generated[row] = 0
        self.thinking[row] = thinking
        self.done[row] = max_new <= 0
        hit = thinking and budget is not None and budget <= 0
        self.hit[row] = hit
        self.force[row] = 0 if hit else -1

    def release(self, row: int) -> None:
        """Row `row` stops (its request ended or left) and feeds padding until admitted again."""
        self.done[row] = True

    def rows(self, start: int, stop: int) -> BudgetController:
        """Rows start..stop-1, sharing these tensors (views): a step over part of a pool."""
        view = copy.copy(self)
        for name in ("budget", "limit", "max_new", "count", "generated", "thinking", "done", "hit", "force"):
            setattr(view, name, getattr(self, name)[start:stop])
        return view

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid the tag that would not alternate: `<think>` inside reasoning, `</think>` outside."""
        logits[:, self.open_id].masked_fill_(self.thinking, float("-inf"))
        logits[:, self.close_id].masked_fill_(~self.thinking, float("-inf"))
        return logits

    def advance(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the sampled tokens (one per row), apply forcing, update the state.

        Returns the tokens to emit and feed back, and what each one is (REASONING, ANSWER, ...).
        """
        step = _advance
        if sampled.is_cuda:
            from .compiled import compiled  # the only import beyond torch, and only on a GPU

            step = compiled(_advance)
        return step(
            sampled, self.force, self.count, self.thinking, self.done, self.hit, self.generated,
            self.budget, self.limit, self.max_new, self.close_sequence, self.token_class,
            self.pad_id, self.open_id, self.close_id,
        )


def _advance(sampled, force, count, thinking, done, hit, generated, budget, limit, max_new, close_sequence,
             token_class, pad_id: int, open_id: int, close_id: int):
    """The controller's step on its state tensors, updated in place (a captured CUDA graph keeps
    pointing at them). A free function, so that one compilation serves every generation."""
    forcing = force >= 0
    forced = close_sequence[force.clamp(min=0)]
    token = torch.where(forcing, forced, sampled)
    token = torch.where(done, pad_id, token)
    live = ~done

    classes = token_class[token]
    is_end = live & ~forcing & (classes >= _EOS)
    opens = live & ~thinking & (token == open_id)
    is_tag = opens | (live & thinking & (token == close_id))
    reasoning = live & thinking & ~forcing & ~is_tag & ~is_end
    count += reasoning
    budget_reached = count >= budget
    cut = reasoning & budget_reached & (((classes & _LINE_END) > 0) | (count >= limit))
    reopened_spent = opens & budget_reached

    kind = torch.full_like(token, ANSWER)
    kind = torch.where(reasoning, REASONING, kind)
    kind = torch.where(forcing | is_tag, CONTROL, kind)
    kind = torch.where(is_end, END, kind)
    kind = torch.where(done, PAD, kind)

    thinking ^= is_tag
    following = force + 1
    start = cut | reopened_spent
    force.copy_(torch.where(start, 0, torch.where(forcing & (following < close_sequence.numel()), following, -1)))
    hit |= start
    generated += live
    done |= is_end | (generated >= max_new)
    return token, kind


class BudgetRow:
    """The rule for one row in plain Python, one branch per case: the obvious twin of
    `BudgetController` (the property tests hold the two equal token for token), and the form a host-side
    engine runs per request (TensorRT-LLM's logits processor, `export/bundled/budget_processor.py`),
    where a few Python branches cost microseconds and a dozen tensor operations cost hundreds.

    `line_end` is a set of ids; `step(token)` takes the sampled token (already restricted by
    `allowed`) and returns what is emitted and its kind."""

    def __init__(self, think, line_end: set[int], budget, grace, thinking: bool, max_new: int):
        self.open, self.close = think.open, think.close
        self.close_sequence = list(think.close_sequence)
        self.eos = set(think.eos)
        self.pad = think.eos[0]  # what a finished row feeds the model
        self.line_end = line_end
        self.budget = budget
        self.grace = 0 if budget is None else (default_grace(budget) if grace is None else grace)
        self.thinking = thinking
        self.max_new = max_new
        self.count = 0  # reasoning tokens so far
        self.generated = 0
        self.done = max_new <= 0
        self.hit = False
        self.forced: list[int] = []  # tokens still to force, in order
        if thinking and self._spent():
            self._force_close()

    def _spent(self) -> bool:
        return self.budget is not None and self.count >= self.budget

    def _force_close(self) -> None:
        self.forced = list(self.close_sequence)
        self.hit = True

    def allowed(self, token: int) -> bool:
        """Tags alternate: no `<think>` inside reasoning, no `</think>` outside it."""
        if self.thinking:
            return token != self.open
        return token != self.close

    def step(self, proposed: int) -> tuple[int, int]:
        """The model proposes a token (already restricted by `allowed`); return (token, kind)."""
        if self.done:
            return self.pad, PAD
        self.generated += 1
        if self.forced:
            token = self.forced.pop(0)
            if token == self.close:
                self.thinking = False
            kind = CONTROL
        elif proposed in self.eos:
            token, kind = proposed, END
            self.done = True
        elif self.thinking and proposed == self.close:
            token, kind = proposed, CONTROL
            self.thinking = False
        elif not self.thinking and proposed == self.open:
            token, kind = proposed, CONTROL
            self.thinking = True
            if self._spent():
                self._force_close()
        elif self.thinking:
            token, kind = proposed, REASONING
            self.count += 1
            if self._spent():
                ends_line = proposed in self.line_end
                if ends_line or self.count >= self.budget + self.grace:
                    self._force_close()
        else:
            token, kind = proposed, ANSWER
        if self.generated >= self.max_new:
            self.done = True
        return token, kind
