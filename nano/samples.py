"""Training samples chosen from the draw number alone: from a tensor in memory, or from a blend of
token stores on disk read by memory map.

A trainer asks for draws (`take(positions)`): step s with batch b reads draws s*b .. s*b+b-1, and
each process reads only its own slice of them. A draw's sample depends on nothing but its position
and the seed, so a resumed run reads exactly what the uninterrupted one would have, and no process
holds an index of the data:

- `TensorSamples`: a fresh seeded permutation of the samples per epoch (what `nanokit distill`
  always did with data in memory);
- `Blend`: stores with weights. The draws go in blocks of 65536: a block holds each store's share
  (its weight times the block, rounded by largest remainder), placed in the block by a seeded
  permutation of the block; a store's k-th draw takes its window number perm(k mod n), with a
  fresh permutation per pass over its n windows (a store's draws are numbered in position order). A window is `length` consecutive tokens of the
  store's stream of documents (joined by their EOS tokens), as Megatron's GPT dataset cuts them.

The permutations are Feistel networks over the next power of four, walked back into range: O(1)
memory at any size, cheap enough to build one per block and per pass when asked; a block's
assignment (65536 slots, computed at once with numpy) is kept while draws stay in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .store import StoreError, TokenStore, is_store, store_prefix

BLOCK = 65536
_MASK64 = (1 << 64) - 1


def _mix(x):
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash (of a Python int, or of a uint64 array)."""
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore"):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return x ^ (x >> np.uint64(31))
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection of range(n): one position at a time (`p(i)`), or all at once (`p.table()`)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} items")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # 4**half >= n
        self.keys = [_mix((seed * 1_000_003 + r) & _MASK64) for r in range(self.ROUNDS)]

    def _feistel(self, x):
        mask = (1 << self.half) - 1
        if isinstance(x, np.ndarray):
            half, m = np.uint64(self.half), np.uint64(mask)
            left, right = x >> half, x & m
            for key in self.keys:
                left, right = right, left ^ (_mix(np.uint64(key) ^ right) & m)
            return (left << half) | right
        left, right = x >> self.half, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(key ^ right) & mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} of a permutation of {self.n}")
        x = self._feistel(i)
        while x >= self.n:  # cycle walking: the domain is under 4n, so a few steps at most on average
            x = self._feistel(x)
        return x

    def table(self) -> np.ndarray:
        """[p(0), ..., p(n-1)] computed for all positions at once (int64)."""
        x = self._feistel(np.arange(self.n, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


def apportion(weights: list[float], total: int) -> list[int]:
    """Integer shares of `total` in proportion to `weights` (largest remainder; they sum to total)."""
    exact = [w * total / sum(weights) for w in weights]
    shares = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))[: total - sum(shares)]:
        shares[i] += 1
    return shares


class TensorSamples:
    """Samples held in a tensor (n, length): a seeded permutation per epoch."""

    def __init__(self, tokens: torch.Tensor, seed: int = 0):
        self.tokens, self.seed = tokens, seed
        self.length = tokens.shape[1]
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _epoch(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._order = (epoch, torch.randperm(len(self), generator=generator))
        return self._order[1]

    def indices(self, positions) -> list[int]:
        out = []
        for position in positions:
            epoch, offset = divmod(position, len(self))
            out.append(int(self._epoch(epoch)[offset]))
        return out

    def take(self, positions) -> torch.Tensor:
        return self.tokens[self.indices(positions)]


@dataclass(frozen=True)
class Part:
    """One store of a blend: its weight, and how many of its windows are reserved (the tail)."""

    store: TokenStore
    weight: float
    windows: int  # windows of `length` tokens drawn from
    held_out: int = 0  # windows after those, kept for evaluation


class ShortDataError(ValueError):
    """The data makes no sample of the length asked for: `tokens` (of one source) is under `length`."""

    def __init__(self, message: str, tokens: int, length: int):
        super().__init__(message)
        self.tokens, self.length = tokens, length


class Blend:
    """Draws of `length` tokens from token stores in proportion to their weights."""

    def __init__(self, parts: list[tuple[float, TokenStore]], length: int, seed: int = 0, held_out: int = 0):
        if length < 2:
            raise ValueError(f"samples need at least 2 tokens, got length={length}")
        if not parts:
            raise ValueError("a blend needs at least one store")
        for weight, store in parts:
            if not weight > 0:
                raise ValueError(f"blend weights must be positive, got {weight} for {store.prefix}")
        reserve = apportion([w for w, _ in parts], held_out) if held_out else [0] * len(parts)
        self.parts = []
        for (weight, store), keep in zip(parts, reserve):
            windows = store.tokens // length - keep
            if windows < 1:
                raise ShortDataError(
                    f"{store.prefix}: {store.tokens:,} tokens make {store.tokens // length} samples of length={length}"
                    + (f", and {keep} are held out for evaluation" if keep else "")
                    + "; give a shorter --length, fewer --eval-samples, or more data", store.tokens, length)
            self.parts.append(Part(store, weight, windows, keep))
        self.length, self.seed = length, seed
        self.shares = apportion([p.weight for p in self.parts], BLOCK)
        if 0 in self.shares:
            small = [str(p.store.prefix) for p, s in zip(self.parts, self.shares) if s == 0]
            raise ValueError(f"weights too small to draw from in blocks of {BLOCK}: {', '.join(small)}")
        self._starts = np.cumsum([0] + self.shares)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        """The windows drawn from, over all stores."""
        return sum(p.windows for p in self.parts)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """For each slot of `block`: its store, and its draw number within the block for that store
        (a store's draws numbered in position order, so a pass over its windows runs in order)."""
        if self._cached is None or self._cached[0] != block:
            slots = Permutation(BLOCK, _mix(self.seed) + block).table()
            part = np.searchsorted(self._starts, slots, side="right") - 1
            rank = np.empty(BLOCK, dtype=np.int64)
            for index in range(len(self.parts)):
                mine = np.flatnonzero(part == index)
                rank[mine] = np.arange(len(mine))
            self._cached = (block, part, rank)
        return self._cached[1], self._cached[2]

    def draw(self, position: int) -> tuple[int, int]:
        """The store of draw `position`, and which of that store's draws it is."""
        block, slot = divmod(position, BLOCK)
        part, rank = self._block(block)
        index = int(part[slot])
        return index, block * self.shares[index] + int(rank[slot])

    def locate(self, position: int) -> tuple[int, int]:
        """The store and window of draw `position`: a fresh permutation of the windows per pass."""
        index, draw = self.draw(position)
        windows = self.parts[index].windows
        epoch, offset = divmod(draw, windows)
        return index, Permutation(windows, _mix(self.seed * 131 + index + 1) + epoch)(offset)

    def take(self, positions) -> torch.Tensor:
        rows = []
        for position in positions:
            part, window = self.locate(position)
            rows.append(self.parts[part].store.window(window * self.length, self.length))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def held_out_samples(self, count: int | None = None) -> torch.Tensor:
        """The reserved tail windows of every store, in store order (evaluation data)."""
        rows = []
        for part in self.parts:
            for w in range(part.windows, part.windows + part.held_out):
                rows.append(part.store.window(w * self.length, self.length))
        if not rows:
            raise ValueError("this blend holds nothing out (held_out=0)")
        out = torch.from_numpy(np.stack(rows).astype(np.int64))
        return out if count is None else out[:count]

    def describe(self) -> list[dict]:
        return [dict(store=str(p.store.prefix), weight=p.weight / sum(q.weight for q in self.parts),
                     tokens=p.store.tokens, windows=p.windows, held_out=p.held_out) for p in self.parts]


def parse_blend(items: list[str]) -> list[tuple[float, Path]]:
    """`--data` words as (weight, store prefix) pairs: "0.7 A 0.3 B", or "A B" (weighted by size)."""
    if not items:
        raise ValueError("no data given")
    weighted = _is_number(items[0])
    if weighted:
        if len(items) % 2:
            raise ValueError(f"a weighted blend is pairs of WEIGHT PATH; got {len(items)} words: {' '.join(items)}")
        pairs = []
        for weight, path in zip(items[::2], items[1::2]):
            if not _is_number(weight):
                raise ValueError(f"expected a weight before {path!r}, got {weight!r}")
            pairs.append((float(weight), Path(path)))
    else:
        if any(_is_number(i) for i in items):
            raise ValueError(f"either every path has a weight before it or none does: {' '.join(items)}")
        pairs = [(None, Path(i)) for i in items]
    for _, path in pairs:
        if not is_store(path):
            raise StoreError(f"{path}: not a token store (PREFIX.bin + PREFIX.idx, as `nanokit tokenize` writes); "
                             "a blend takes only token stores")
    return [(w, store_prefix(p)) for w, p in pairs]


def open_blend(items: list[str], length: int, seed: int = 0, held_out: int = 0) -> Blend:
    """A `Blend` from `--data` words; without weights, each store weighs its token count."""
    pairs = parse_blend(items)
    stores = [(w, TokenStore(p)) for w, p in pairs]
    return Blend([(w if w is not None else s.tokens, s) for w, s in stores], length, seed, held_out)


def looks_like_blend(items) -> bool:
    """Whether `--data` words name token stores (then they are read by memory map, not into memory)."""
    items = [items] if isinstance(items, (str, os.PathLike)) else list(items)
    return any(_is_number(str(i)) for i in items) or all(is_store(i) for i in items)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return not Path(text).exists()
