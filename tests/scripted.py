"""A fake model whose next tokens the test dictates, for testing the controller at exact positions.

A script is a function of what has been generated so far (forced tokens included) that returns
the token the model wants next, so the fake reacts to a forced `</think>` as a real model would.
The fake puts a high logit on that token and a lower one on a fallback ("x"), which is what the
sampler picks if the controller forbids the scripted token.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from nano.chat import ChatFormat
from nano.generate import generate
from nano.tiny import TINY_CONFIG, tiny_config, tiny_tokenizer

Script = Callable[[list[int]], int]

TOKENIZER = tiny_tokenizer()
_CONFIG = tiny_config()


def tok(text: str) -> int:
    (token,) = TOKENIZER.encode(text, add_special_tokens=False)
    return token


A, B, X, NL, SPACE = tok("a"), tok("b"), tok("x"), tok("\n"), tok(" ")
OPEN, CLOSE = tok("<think>"), tok("</think>")
EOS = tok("<SPECIAL_12>")
TOOL_OPEN, TOOL_CLOSE = tok("<TOOLCALL>"), tok("</TOOLCALL>")


class ScriptedDecoder:
    name = "scripted"

    def __init__(self, owner: "ScriptedModel"):
        self.owner = owner
        self.histories: list[list[int]] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.owner.prefills += 1
        self.histories = [[] for _ in range(input_ids.shape[0])]
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape == (len(self.histories),), "a decode step takes exactly one token per row"
        self.owner.steps += 1
        for history, token in zip(self.histories, tokens.tolist()):
            history.append(token)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        logits = torch.zeros(len(self.histories), self.owner.config.vocab_size)
        for row, history in enumerate(self.histories):
            logits[row, X] = 5.0
            logits[row, self.owner.scripts[row % len(self.owner.scripts)](history)] = 10.0
        return logits


class ScriptedModel:
    """Quacks like `nano.Model` for `nano.generate`: the tiny tokenizer and chat format, scripted logits."""

    def __init__(self, *scripts: Script, context: int = TINY_CONFIG["max_position_embeddings"]):
        self.scripts = scripts
        self.tokenizer = TOKENIZER
        self.config = SimpleNamespace(vocab_size=_CONFIG.vocab_size, max_position_embeddings=context)
        self.chat = ChatFormat(TOKENIZER, _CONFIG.eos_token_id)
        self.device = torch.device("cpu")
        self.prefills = 0
        self.steps = 0

    def decoder(self, rows: int = 1, capacity: int | None = None) -> ScriptedDecoder:
        return ScriptedDecoder(self)

    def generate(self, prompt="Q?", **kwargs):
        kwargs.setdefault("max_new_tokens", 400)
        return generate(self, prompt, **kwargs)


def thinker(think_len: int, answer_len: int = 4, newlines: Sequence[int] = ()) -> Script:
    """Reasons `think_len` tokens ("a", or a newline at the given 0-based positions), then closes
    reasoning itself, answers `answer_len` tokens ("b") and ends its turn."""

    def script(history: list[int]) -> int:
        if CLOSE not in history:
            r = len(history)
            if r >= think_len:
                return CLOSE
            return NL if r in newlines else A
        return B if history.count(B) < answer_len else EOS

    return script


def sequence(tokens: Sequence[int]) -> Script:
    """Proposes `tokens` in order whatever happens, then ends its turn."""

    def script(history: list[int]) -> int:
        return tokens[len(history)] if len(history) < len(tokens) else EOS

    return script
