"""The thinking budget on TensorRT-LLM: nanokit's rule as a logits processor of its LLM API.

`rule.py` beside this file is nanokit's `nano/budget.py`, copied verbatim when the bundle was
written; each request runs its `BudgetRow` (the rule for one row in plain Python, held equal to the
tensor controller `nano.generate` runs by nanokit's tests). `tokens.json` holds the ids the rule
needs (the think tags, the close sequence, the end tokens, the tokens that end a line), read from
the model's tokenizer at export. Only torch is needed here.

    from tensorrt_llm import LLM, SamplingParams
    from nanokit_budget import ThinkingBudget

    llm = LLM("checkpoint", **options)               # options from llm_options.yaml
    params = SamplingParams(max_tokens=4096, logits_processor=ThinkingBudget(budget=256))
    print(llm.generate([prompt], params)[0].outputs[0].text)

How TensorRT-LLM 1.2.1's PyTorch backend calls a processor: once per request and engine step, after
the forward and before sampling, as `processor(request_id, logits, [prompt + generated ids], None,
None)`, where `logits` is that request's row as a [1, 1, vocab] float32 view to change in place.
Earlier chunks of a chunked prefill are called too, with the same ids. So this processor advances
the rule by the ids it has not seen yet (none on a repeated call), then masks the logits: only the
forced token where the rule forces the close, and the tag that would not alternate otherwise. The
sampler then can only pick what `nano.generate` would emit.

The ids must be up to date at every call: TensorRT-LLM's overlap scheduler appends each sampled
token one step late, so the bundle's options set `disable_overlap_scheduler: true`. A processor that
finds ids disagreeing with what it forced says so instead of cutting a token late.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .rule import NO_LIMIT, BudgetRow, ThinkTokens

TOKENS = Path(__file__).with_name("tokens.json")

try:  # the declared interface where TensorRT-LLM is installed; the call site needs only the signature
    from tensorrt_llm.sampling_params import LogitsProcessor as _Interface
except Exception:  # not installed (tests, or a machine without it)
    _Interface = object


def _whole_or_none(value, name: str):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a whole number of tokens (0 or more) or None, got {value!r}")
    return value


class ThinkingBudget(_Interface):
    """Cut reasoning near `budget` tokens (`None`: no limit; 0: close it at once), letting the model
    finish its line within `grace` tokens (default 10% of the budget, at least one).

    One instance may serve several requests: each request id has its own state."""

    def __init__(self, budget: int | None, grace: int | None = None, tokens: dict | str | Path | None = None):
        self.budget = _whole_or_none(budget, "budget")
        self.grace = _whole_or_none(grace, "grace")
        if not isinstance(tokens, dict):
            tokens = json.loads(Path(tokens or TOKENS).read_text())
        self.tokens = tokens
        self.line_end, self.blank = set(tokens["line_end"]), set(tokens["blank"])
        self._requests: dict[int, _Request] = {}

    def __call__(self, req_id, logits, token_ids, stream_ptr=None, client_id=None) -> None:
        ids = token_ids[0]  # beam 0: the only beam a budget makes sense for
        request = self._requests.get(req_id)
        if request is None:
            request = self._requests[req_id] = _Request(self, ids)
        request.catch_up(ids)
        request.mask(logits)

    def state(self, req_id, token_ids: list[int] | None = None) -> dict:
        """What the rule holds for one request: reasoning tokens, whether the budget cut it, and the
        kind of every token generated (nano.budget's REASONING, ANSWER, CONTROL, END). The engine
        calls a processor before each sampled token, so the last one is seen only when the
        request's final ids (prompt and generated) are given here."""
        request = self._requests[req_id]
        if token_ids is not None:
            request.catch_up(list(token_ids))
        return {"reasoning_tokens": request.row.count, "budget_hit": request.row.hit, "kinds": list(request.kinds)}

    def forget(self, req_id) -> None:
        self._requests.pop(req_id, None)


class _Request:
    """The rule's state for one request, started from its prompt."""

    def __init__(self, owner: ThinkingBudget, prompt: list[int]):
        t = owner.tokens
        think = ThinkTokens(t["open"], t["close"], tuple(t["close_sequence"]), tuple(t["eos"]))
        tags = [at for at, i in enumerate(prompt) if i in (think.open, think.close)]
        thinking = bool(tags) and prompt[tags[-1]] == think.open
        # A template that switched reasoning off ends its prompt with the empty block's `</think>`
        # (then blanks at most); as in nano.generate, a block the model opens anyway is closed at once.
        off = bool(tags) and not thinking and all(i in owner.blank for i in prompt[tags[-1] + 1:])
        budget = 0 if off else owner.budget
        self.row = BudgetRow(think, owner.line_end, budget, owner.grace, thinking, NO_LIMIT)
        self.seen = len(prompt)
        self.kinds: list[int] = []

    def catch_up(self, ids: list[int]) -> None:
        for token in ids[self.seen:]:
            emitted, kind = self.row.step(token)
            if emitted != token:
                raise RuntimeError(
                    f"the thinking budget forced token {emitted} but the request continued with {token}: "
                    f"the ids reached the processor late (set disable_overlap_scheduler: true in the LLM options) "
                    f"or another processor changed the choice")
            self.kinds.append(kind)
        self.seen = max(self.seen, len(ids))

    def mask(self, logits: torch.Tensor) -> None:
        row = self.row
        if row.done:
            return
        if row.forced:
            logits.fill_(float("-inf"))
            logits[..., row.forced[0]] = 0.0
        elif row.thinking:
            logits[..., row.open] = float("-inf")
        else:
            logits[..., row.close] = float("-inf")
