"""Text from token ids, whole or as it grows.

A byte-level token may hold part of a UTF-8 character, so text is released only once it decodes
cleanly; when a run of tokens ends, whatever remains is released, so that the pieces always add
up to the decoding of the whole run.
"""

from __future__ import annotations

from typing import Sequence


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False) if ids else ""


class IncrementalText:
    """Decodes one run of tokens as it grows; `push` and `finish` return the new text.

    Each step decodes only the tokens since the last release plus the ones before them (a
    decoder may spell a token differently at the start of a text, as SentencePiece drops a
    leading space), and keeps the difference.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters released so far
        self.prefix = 0  # ids[prefix:read] were decoded last time, for context
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = decode(self.tokenizer, self.ids[self.prefix : self.read])
        after = decode(self.tokenizer, self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before) or not after.startswith(before):
            return ""
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted += len(new)
        return new

    def finish(self) -> str:
        """The rest of the run's text: after this, the released pieces equal decode(ids)."""
        whole = decode(self.tokenizer, self.ids)
        rest = whole[self.emitted :]
        self.emitted = len(whole)
        return rest
