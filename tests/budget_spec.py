"""The budget rule written the obvious way: one row, plain Python, one branch per case.

`nano.budget.BudgetController` (tensors, whole batch, no branches) must match this token for
token. Read the docstring of `nano/budget.py` for the rule in words.
"""

from __future__ import annotations

from nano.budget import ANSWER, CONTROL, END, PAD, REASONING, default_grace


class SpecRow:
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
