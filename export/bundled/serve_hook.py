"""The thinking budget for `trtllm-serve`, loaded by `--custom_module_dirs nanokit_serve_hook` (serve.sh).

TensorRT-LLM 1.2.1's server has no thinking budget and refuses request fields it does not know,
but it passes `chat_template_kwargs` through. So a chat request asks for a budget there:

    {"messages": [...], "chat_template_kwargs": {"thinking_budget": 256, "thinking_grace": 16}}

(the chat template ignores names it does not use), and `THINKING_BUDGET` (and `THINKING_GRACE`) in
the server's environment set it for requests that name none. Each such request gets its own
`nanokit_budget.ThinkingBudget` logits processor. This module wraps the server's
`ChatCompletionRequest.to_sampling_params`, whatever its arguments, and changes nothing else.
"""

from __future__ import annotations

import os

from tensorrt_llm.serve import openai_protocol

from nanokit_budget import ThinkingBudget

def _setting(value, name: str):
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0 or str(number) != str(value).strip():
        raise ValueError(f"{name} must be a whole number of tokens (0 or more), got {value!r}")
    return number


def budget_of(request) -> ThinkingBudget | None:
    """The processor a chat request asks for, or None (no budget, nothing attached)."""
    kwargs = getattr(request, "chat_template_kwargs", None) or {}
    budget = _setting(kwargs.get("thinking_budget", os.environ.get("THINKING_BUDGET")), "thinking_budget")
    grace = _setting(kwargs.get("thinking_grace", os.environ.get("THINKING_GRACE")), "thinking_grace")
    return None if budget is None else ThinkingBudget(budget, grace)


def install(request_class=openai_protocol.ChatCompletionRequest) -> None:
    original = request_class.to_sampling_params
    if getattr(original, "nanokit_budget", False):
        return

    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        processor = budget_of(self)
        if processor is not None:
            present = params.logits_processor
            present = [] if present is None else present if isinstance(present, list) else [present]
            params.logits_processor = [*present, processor]  # last, so that nothing undoes its mask
        return params

    to_sampling_params.nanokit_budget = True
    request_class.to_sampling_params = to_sampling_params


install()
