"""The chat format: rendering conversations with the checkpoint's own template, and the reasoning switch.

Two families of switches exist in the wild and users type both:
- Nano 2 style: `/think` or `/no_think` anywhere in the system or a user turn;
- Ultra / Super style: a system prompt of "detailed thinking on" or "detailed thinking off".
The last switch typed wins, `think=False` overrides them all, and the switch is then written back
in the form the checkpoint's template understands. Reasoning is on by default.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Sequence

import torch

from .budget import ThinkTokens

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# `/think` as a word of its own: not the `/think` inside a `</think>` tag, not `/thinking`.
_SWITCH = re.compile(r"(?<![<\w])/(?:no_)?think(?!\w)|\bdetailed thinking (?:on|off)\b")
_SYSTEM_ROLES = ("system", "developer")


class ChatError(ValueError):
    """A tokenizer or a conversation cannot be used for reasoning-controlled generation."""


def _single_token(tokenizer, text: str, source: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ChatError(
            f"{source}: the tokenizer has no {text!r} token (it encodes {text!r} as {ids}); "
            f"reasoning control needs {THINK_OPEN!r} and {THINK_CLOSE!r} as single tokens"
        )
    return ids[0]


def reasoning_switch(messages: Sequence[dict[str, Any]]) -> bool | None:
    """The last reasoning switch typed in system or user turns: True (on), False (off) or None (none)."""
    state = None
    for message in messages:
        if message.get("role") not in ("user", *_SYSTEM_ROLES):
            continue
        for match in _SWITCH.finditer(str(message.get("content", ""))):
            state = match.group(0) in ("/think", "detailed thinking on")
    return state


def _strip_switches(content: str) -> str:
    return re.sub(r"[ \t]*(?:" + _SWITCH.pattern + r")[ \t]*", " ", content).strip()


class ChatFormat:
    """Renders conversations for one tokenizer and finds the tokens reasoning control needs.

    `style` says how the template expects the reasoning switch: "nano" (`/think`, `/no_think`),
    "ultra" (a "detailed thinking on/off" system prompt) or "generic" (an `enable_thinking`
    template variable, as Qwen-style templates read).
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int], style: str | None = None, source: str = "tokenizer"):
        template = tokenizer.chat_template
        if not template:
            raise ChatError(
                f"{source}: no chat_template (looked in tokenizer_config.json and chat_template.jinja)"
            )
        if isinstance(template, dict):  # named templates: the default one is what users get
            template = template.get("default") or next(iter(template.values()))
        self.tokenizer = tokenizer
        self.template = template
        if style is None:
            if _SWITCH.search(template.replace("detailed thinking", "")):
                style = "nano"
            elif "detailed thinking" in template:
                style = "ultra"
            else:
                style = "generic"
        if style not in ("nano", "ultra", "generic"):
            raise ChatError(f"unknown chat style {style!r}; accepted: 'nano', 'ultra', 'generic'")
        self.style = style
        open_id = _single_token(tokenizer, THINK_OPEN, source)
        close_id = _single_token(tokenizer, THINK_CLOSE, source)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        eos = tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None))
        if not eos:
            raise ChatError(f"{source}: no end-of-sequence token (eos_token_id is unset)")
        self.think = ThinkTokens(open_id, close_id, (close_id, *newline), eos)

    def conversation(self, prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """A prompt as a list of messages: a string becomes one user turn."""
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        messages = list(prompt)
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        return messages

    def render(self, prompt: str | Sequence[dict[str, Any]], think: bool = True) -> tuple[str, bool]:
        """The prompt text for generation and whether reasoning is on in it."""
        messages, kwargs, reasoning = self._as_rendered(prompt, think)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return text, reasoning

    def turn_ends(self, prompt: str | Sequence[dict[str, Any]], think: bool = True) -> list[str]:
        """The prompt's text up to the end of each of its turns (the system turn the switch may add
        included), without the generation prompt: where a later prompt that shares these turns may
        share the text. A template may render a turn differently when it is the last one, so a
        caller checks that the whole prompt begins with it (`nano.engine` does, token for token)."""
        messages, kwargs, _ = self._as_rendered(prompt, think)
        ends = []
        for i in range(1, len(messages) + 1):
            text = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=False,
                                                      **kwargs)
            if text and text not in ends:
                ends.append(text)
        return ends

    def _as_rendered(self, prompt, think: bool) -> tuple[list[dict[str, Any]], dict, bool]:
        """The messages as the template receives them, its extra arguments, and whether reasoning is on."""
        messages = self.conversation(prompt)
        typed = reasoning_switch(messages)
        reasoning = bool(think) and typed is not False
        messages = [
            {**m, "content": _strip_switches(str(m["content"]))} if m["role"] in ("user", *_SYSTEM_ROLES) else m
            for m in messages
        ]
        kwargs = {}
        if self.style == "nano":
            self._set_system_line(messages, "/think" if reasoning else "/no_think")
        elif self.style == "ultra":
            self._set_system_line(messages, f"detailed thinking {'on' if reasoning else 'off'}")
        else:
            kwargs["enable_thinking"] = reasoning
        return messages, kwargs, reasoning

    @staticmethod
    def _set_system_line(messages: list[dict[str, Any]], line: str) -> None:
        if messages and messages[0]["role"] in _SYSTEM_ROLES:
            content = messages[0]["content"]
            messages[0] = {**messages[0], "content": f"{content}\n{line}" if content else line}
        else:
            messages.insert(0, {"role": "system", "content": line})

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @cached_property
    def line_end_ids(self) -> torch.Tensor:
        """Ids of the tokens that end a line: their text holds a newline followed only by blanks.

        The budget controller closes reasoning after one of these, so the trace ends on a whole line.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        n = len(self.tokenizer)
        if backend is not None:
            texts = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        else:
            texts = [self.tokenizer.decode([i]) for i in range(n)]
        ids = [i for i, t in enumerate(texts) if "\n" in t and not t[t.rindex("\n") + 1 :].strip()]
        return torch.tensor(ids, dtype=torch.long)
