"""A prefix cache for the hybrid: the state at the end of a shared prefix, kept to skip its prefill.

A transformer's prefix cache keeps keys and values per block and can resume anywhere; a hybrid
cannot, since a Mamba layer's state after a prefix is one tensor that no later state gives back.
So this cache keeps whole snapshots at chosen points (the engine picks the ends of chat turns: a
system prompt, a conversation so far): per Mamba layer the conv window and the SSM state, per
attention layer the keys and values of the prefix. A request whose tokens begin with a stored
prefix copies its snapshot into its slot and prefills only the rest.

Snapshots stay on the model's device, up to `capacity` bytes; the least recently used go first.
A snapshot is found by a hash of its tokens and checked against the tokens themselves, so two
prefixes never share one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .layers import KVCache, MambaCache


@dataclass
class Snapshot:
    """The caches of one sequence after its first `len(ids)` tokens, copied out of a slot."""

    ids: tuple[int, ...]
    states: list[tuple[torch.Tensor, ...] | None]  # per layer: (conv, ssm), (k, v) up to len(ids), or None

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states if s is not None for t in s)


def _key(ids) -> bytes:
    return hashlib.blake2b(repr(tuple(ids)).encode(), digest_size=16).digest()


def take(caches: list, length: int, ids) -> Snapshot:
    """A snapshot of one slot's caches (each a one-row view) after `length` tokens."""
    states = []
    for cache in caches:
        if isinstance(cache, MambaCache):
            states.append((cache.conv.clone(), cache.ssm.clone()))
        elif isinstance(cache, KVCache):
            states.append((cache.k[:, :, :length].clone(), cache.v[:, :, :length].clone()))
        else:
            states.append(None)
    return Snapshot(tuple(ids[:length]), states)


def restore(caches: list, snapshot: Snapshot) -> None:
    """Write `snapshot` into one slot's caches (one-row views): the slot then holds its prefix."""
    length = len(snapshot.ids)
    for cache, state in zip(caches, snapshot.states):
        if isinstance(cache, MambaCache):
            cache.conv.copy_(state[0])
            cache.ssm.copy_(state[1])
        elif isinstance(cache, KVCache):
            cache.k[:, :, :length].copy_(state[0])
            cache.v[:, :, :length].copy_(state[1])


class PrefixCache:
    """Snapshots by prefix, least recently used evicted past `capacity` bytes; hits counted."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"the prefix cache's capacity must be a number of bytes >= 0, got {capacity!r}")
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Snapshot] = OrderedDict()
        self.size = 0
        self.lookups = self.hits = self.tokens_reused = self.stored = self.evicted = 0

    def __contains__(self, ids) -> bool:
        found = self.entries.get(_key(ids))
        return found is not None and found.ids == tuple(ids)

    def find(self, ids, lengths) -> Snapshot | None:
        """The longest stored prefix of `ids` among `lengths`, counted as a lookup (and a hit)."""
        self.lookups += 1
        for length in sorted(lengths, reverse=True):
            key = _key(ids[:length])
            found = self.entries.get(key)
            if found is not None and found.ids == tuple(ids[:length]):
                self.entries.move_to_end(key)
                self.hits += 1
                self.tokens_reused += length
                return found
        return None

    def put(self, snapshot: Snapshot) -> bool:
        """Keep `snapshot`, evicting the least recently used to make room; False if it cannot fit."""
        size = snapshot.bytes
        key = _key(snapshot.ids)
        if size > self.capacity or key in self.entries:
            return False
        while self.size + size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= old.bytes
            self.evicted += 1
        self.entries[key] = snapshot
        self.size += size
        self.stored += 1
        return True

    def stats(self) -> dict:
        return dict(lookups=self.lookups, hits=self.hits, hit_rate=self.hits / self.lookups if self.lookups else 0.0,
                    tokens_reused=self.tokens_reused, entries=len(self.entries), bytes=self.size,
                    stored=self.stored, evicted=self.evicted)
