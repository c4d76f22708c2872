"""The fast runtime for NemotronH: static caches, chunked prefill, and a decode step replayed from a CUDA graph.

It runs the weights of a transformers `NemotronHForCausalLM` (no copy) with its own forward:
- caches allocated once per generation: K and V for the attention layers only, the conv window
  and the SSM state (fp32 by default, as NVIDIA requires for accuracy) for the Mamba layers;
- prefill in chunks of `prefill_chunk` tokens through all layers, carrying the Mamba states and
  filling the KV cache, so activations stay the size of one chunk whatever the prompt's length;
- mamba-ssm's Triton kernels for the chunk scan, the one-step state update and the fused norms
  (`nano.kernels`), their PyTorch twins where those are missing;
- on a GPU the whole decode step, with whatever the caller adds to it (the budget controller and
  the sampler in `nano.generate`), captured once in a CUDA graph and replayed per token.

The forward follows transformers' `NemotronHForCausalLM` step for step, including its choices:
the time step is clamped at `time_step_min` in the chunked scan and not in the one-step update.
Rows of a batch are left-padded: padded positions are masked in attention and zeroed at the
Mamba layers' inputs, as transformers does.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compiled import compiled
from .decoder import Decoder
from .hardware import PREFILL_BUCKET_WIDTHS, cache_columns, prefill_buckets, prefill_chunk, round_up
from .kernels import Kernels, select_kernels
from .layers import (KVCache, MambaCache, MambaDims, attention_out, conv_window, mamba_in_proj, mamba_out, mlp_down,
                     mlp_up, qkv, relu2, split_xbc)

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # older torch: chunks after the first fall back to an explicit mask
    causal_lower_right = None
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Not cuDNN's: on an H200 (torch 2.11) it is the default and plans each new sequence length anew,
    # 42-104 ms of host time per call, where prompts are a new length almost every time; flash or
    # memory-efficient attention take 0.1-0.7 ms (bench/results/sdpa-host-h200.json).
    _PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # older torch: whatever it picks
    sdpa_kernel, _PREFILL_ATTENTION = None, None


def describe(kernels: Kernels, graphs: bool) -> str:
    """The runtime in words: which kernels, and whether the decode step is a CUDA graph."""
    return f"fast ({kernels.name}{'; decode step in a CUDA graph' if graphs else ''})"


class HybridRuntime(Decoder):
    """A decoder (`prefill`, then `step` per token) for `rows` sequences of up to `capacity` tokens."""

    def __init__(
        self,
        model,
        rows: int,
        capacity: int,
        prefill_chunk: int = 4096,
        ssm_dtype: torch.dtype = torch.float32,
        kernels: Kernels | None = None,
        graphs: bool | None = None,
    ):
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.kernels = kernels or select_kernels(self.device)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.rows, self.capacity, self.prefill_chunk = rows, capacity, prefill_chunk
        self.eps = config.layer_norm_epsilon
        self.pattern = config.hybrid_override_pattern
        if set(self.pattern) - set("M*-"):
            raise ValueError(f"the fast runtime runs Mamba, attention and MLP layers; pattern {self.pattern!r} has others")
        self.layers = model.model.layers
        self.ssm_dtype = ssm_dtype
        self.caches = self._empty_caches(rows, capacity)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)  # where the next token goes
        self.start = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's first real token
        self.padded = False
        self.name = describe(self.kernels, self.graphs)
        self._tap = None  # set by `run_layers`: sees the activations of the layer being run
        self._buckets = None  # set by `bucket_prefills`: the caches and steps of prefills in a few shapes

    @property
    def columns(self) -> int:
        """The KV caches' width: what a decode step's mask covers."""
        return cache_columns(self.capacity)

    def _empty_caches(self, rows: int, capacity: int) -> list[MambaCache | KVCache | None]:
        """Zeroed caches for `rows` sequences of up to `capacity` tokens, one per layer (None for MLPs);
        the KV caches `cache_columns(capacity)` wide."""
        capacity, caches = cache_columns(capacity), []
        for kind, layer in zip(self.pattern, self.layers):
            if kind == "M":
                caches.append(MambaCache.empty(layer.mixer, rows, self.dtype, self.ssm_dtype, self.device))
            elif kind == "*":
                caches.append(KVCache.empty(layer.mixer, self.model.config.num_key_value_heads, rows, capacity,
                                            self.dtype, self.device))
            else:
                caches.append(None)
        return caches

    # The layers.

    def _mamba(self, x, mixer, cache: MambaCache, keep=None, live=None, index=None):
        """A Mamba2 mixer over x (rows, T, hidden); `keep` (rows, T) zeroes padded positions; in a
        decode step, rows where `live` (rows,) is false leave their state as it was (`index`: i for
        a live row i, -1 for the others, as the state update takes it)."""
        rows, length, _ = x.shape
        dims = MambaDims.of(mixer)
        heads, p, n, groups = dims.heads, dims.head_dim, dims.state, dims.groups
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        z, xbc, dt = mamba_in_proj(x, mixer)
        if self._tap is not None:
            self._tap("mamba_x", xbc[..., : dims.inner])
        if length == 1:
            step = compiled(_conv_step) if x.is_cuda else _conv_step
            xbc = step(cache.conv, xbc[:, 0], mixer.conv1d.weight[:, 0], mixer.conv1d.bias, live)[:, None]
        else:
            window = torch.cat([cache.conv, xbc.transpose(1, 2)], dim=2)
            cache.conv.copy_(window[:, :, 1 - dims.kernel :])
            xbc = F.silu(F.conv1d(window, mixer.conv1d.weight, mixer.conv1d.bias, groups=dims.conv_dim)).transpose(1, 2)
            if keep is not None:
                xbc = xbc * keep[..., None].to(xbc.dtype)
        xs, B, C = split_xbc(xbc, dims)
        if length == 1:
            y = self.kernels.state_update(
                cache.ssm, xs.reshape(rows, heads, p), dt[:, 0], cache.A, B.reshape(rows, groups, n),
                C.reshape(rows, groups, n), mixer.D, mixer.dt_bias, index=index,
            )
        else:
            y, final = self.kernels.chunk_scan(
                xs.reshape(rows, length, heads, p), dt, cache.A, B.reshape(rows, length, groups, n),
                C.reshape(rows, length, groups, n), mixer.D, mixer.dt_bias, cache.ssm,
                dt_limit=tuple(getattr(mixer, "time_step_limit", (0.0, math.inf))), chunk_size=mixer.chunk_size,
            )
            cache.ssm.copy_(final)
        return mamba_out(y.reshape(rows, length, dims.inner), z, mixer, self.kernels.gated_rms_norm)

    def _attention(self, x, attn, cache: KVCache, begin: int | None, valid=None, positions=None, row=None):
        """GQA attention over the cache; `begin` is the chunk's first position (None: one decode token,
        with `valid` (rows, capacity) marking the cache slots it may attend to, written at `positions`
        (rows,), one per row (`row`: 0..rows-1), or else at the shared `self.position`)."""
        rows, length, _ = x.shape
        q, k, v = qkv(x, attn)
        heads, kv, d = q.shape[1], k.shape[1], attn.head_dim
        if begin is None:
            if positions is None:
                index = self.position.view(1)
                cache.k.index_copy_(2, index, k)
                cache.v.index_copy_(2, index, v)
            else:
                cache.k[row, :, positions] = k[:, :, 0]
                cache.v[row, :, positions] = v[:, :, 0]
            # The query heads sharing a KV head attend as a group, no copy of the cache per query head;
            # plain matmuls, since fused attention kernels are built for many queries, not one.
            scores = torch.matmul(q.reshape(rows, kv, heads // kv, d), cache.k.transpose(2, 3)) * d**-0.5
            scores = scores.float().masked_fill_(~valid[:, None, None, :], float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), cache.v).reshape(rows, 1, heads * d)
        else:
            end = begin + length
            cache.k[:, :, begin:end] = k
            cache.v[:, :, begin:end] = v
            keys, values = cache.k[:, :, :end], cache.v[:, :, :end]
            with sdpa_kernel(_PREFILL_ATTENTION) if sdpa_kernel is not None else contextlib.nullcontext():
                out = self._prefill_attention(q, keys, values, begin, length, end, heads, kv)
            out = out.transpose(1, 2).reshape(rows, length, heads * d)
        if self._tap is not None:
            self._tap("attention", out)
        return attention_out(out, attn)

    def _prefill_attention(self, q, keys, values, begin: int, length: int, end: int, heads: int, kv: int):
        """Attention of a chunk's queries (positions begin..end-1) over the keys and values to `end`."""
        if self.padded or (begin > 0 and causal_lower_right is None):
            key_pos = torch.arange(end, device=q.device)
            query_pos = torch.arange(begin, end, device=q.device)
            mask = (key_pos[None, :] <= query_pos[:, None])[None] & (key_pos[None, None, :] >= self.start[:, None, None])
            mask |= key_pos[None, None, :] == query_pos[None, :, None]  # padded queries see themselves: no NaN
            group = heads // kv
            return F.scaled_dot_product_attention(
                q, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), attn_mask=mask[:, None]
            )
        if begin == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(length, end), enable_gqa=True)

    def _mlp(self, x, mlp):
        up = mlp_up(x, mlp)
        act = (compiled(relu2) if up.is_cuda and up.shape[1] == 1 else relu2)(up)
        if self._tap is not None:
            self._tap("mlp", act)
        return mlp_down(act, mlp)

    def _forward(self, hidden, begin: int | None, keep=None, positions=None, live=None):
        """All layers over hidden (rows, T, hidden); returns the final-normed last position (rows, hidden).
        A decode step of the first rows, each at its own position: `positions` and `live` (`step_slots`)."""
        valid, rows = None, hidden.shape[0]
        row = index = None
        if begin is None:  # one decode token: the cache slots each row attends to, shared by all attention layers
            slots = torch.arange(self.columns, device=hidden.device)
            if positions is None:
                valid = (slots[None, :] >= self.start[:, None]) & (slots[None, :] <= self.position)
            else:
                valid = slots[None, :] <= positions[:, None]
                row = torch.arange(rows, device=hidden.device)
            if live is not None:
                index = torch.where(live, row, -1)
        residual, out = None, hidden
        for kind, layer, cache in zip(self.pattern, self.layers, self.caches):
            cache = cache.first(rows) if cache is not None else None
            normed, residual = self.kernels.rms_norm(out, layer.norm.weight, self.eps, residual=residual)
            if kind == "M":
                out = self._mamba(normed, layer.mixer, cache, keep, live, index)
            elif kind == "*":
                out = self._attention(normed, layer.mixer, cache, begin, valid, positions, row)
            else:
                out = self._mlp(normed, layer.mixer)
        last = slice(-1, None)
        normed, _ = self.kernels.rms_norm(
            out[:, last], self.model.model.norm_f.weight, self.eps, residual=residual[:, last]
        )
        return normed[:, 0]

    def _logits(self, normed):
        return F.linear(normed, self.model.lm_head.weight).float()

    # The decoder interface.

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, width = input_ids.shape
        if rows != self.rows or width >= self.capacity:
            raise ValueError(f"prefill of {rows} x {width} tokens does not fit {self.rows} rows x {self.capacity}")
        self.start.copy_(width - attention_mask.sum(dim=1))
        self.padded = bool((self.start > 0).any())
        return self._prefill(input_ids, attention_mask)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`prefill` once `start` and `padded` are set."""
        rows, width = input_ids.shape
        embeddings = self.model.model.embeddings
        chunk = prefill_chunk(rows, self.prefill_chunk)
        for begin in range(0, width, chunk):
            end = min(begin + chunk, width)
            keep = attention_mask[:, begin:end] if self.padded else None
            normed = self._forward(embeddings(input_ids[:, begin:end]), begin, keep)
        self.position.fill_(width)
        return self._logits(normed)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self._forward(self.model.model.embeddings(tokens)[:, None], None)
        self.position += 1
        return self._logits(normed)

    # Rows at positions of their own, for the engine (`nano.engine`).

    @torch.no_grad()
    def step_slots(self, tokens: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """One token for each of the first len(tokens) rows (slots), row r's at `positions[r]`; the
        logits. Rows not `live` (free, or part way through a prefill) leave their Mamba state as it
        was and write their keys and values at `positions[r]`, which the engine points at the last
        cache column, one no live row attends to: a padding row never touches a live one's state."""
        return self._logits(self._forward(self.model.model.embeddings(tokens)[:, None], None, positions=positions,
                                          live=live))

    def slot(self, row: int) -> HybridRuntime:
        """A runtime of one row whose caches are row `row` of these (views): the engine prefills a
        request's slot through it while the others decode."""
        return self._view([None if c is None else c.row(row) for c in self.caches], 1, self.capacity)

    def _view(self, caches: list, rows: int, capacity: int) -> HybridRuntime:
        """This runtime (the same weights and kernels) over other caches, of `rows` rows."""
        view = copy.copy(self)
        view.caches, view.rows, view.capacity = caches, rows, capacity
        view.position = torch.zeros((), dtype=torch.long, device=self.device)
        view.start = torch.zeros(view.rows, dtype=torch.long, device=self.device)
        view.padded = False
        return view

    @torch.no_grad()
    def prefill_slots(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Fresh prompts (token ids) prefilled into rows `slots` of these caches, whatever those rows
        held before, as one left-padded batch; the logits of each prompt's last token.

        The engine's slots for requests admitted together are seldom adjacent, so the prefill runs
        on caches of its own, as long as the longest prompt, and each row then moves into its slot:
        the Mamba state as it is, the keys and values of the prompt's tokens to positions 0.. (left
        of them was padding). The batch is padded to a multiple of 16 tokens (`batch_width`), so that
        it comes in few shapes: libraries keep state per new shape (oneDNN's conv primitives on the
        CPU, about 60 KiB each; attention and Triton kernels on a GPU). Everything is sent to the
        device without waiting for it."""
        rows, longest = len(prompts), max(map(len, prompts), default=0)
        if rows != len(slots) or len(set(slots)) != rows or not all(prompts):
            raise ValueError(f"{rows} non-empty prompts need as many distinct slots, got {slots!r}")
        if longest >= self.capacity:
            raise ValueError(f"a prompt of {longest} tokens does not fit a capacity of {self.capacity}")
        bucket = self.prefill_bucket(rows, longest)
        if bucket is not None:  # rows and width padded to a bucket's, prefilled by its (graphed) step
            padded_rows, width = bucket
        else:
            padded_rows, width = rows, min(batch_width(longest), self.capacity - 1)
        ids = torch.zeros(padded_rows, width, dtype=torch.long)
        mask = torch.zeros(padded_rows, width, dtype=torch.long)
        # Each prompt token's (row, position) in the batch, and (slot, position) in these caches.
        source_row, source_pos, target_row, target_pos = [], [], [], []
        for row, (prompt, slot) in enumerate(zip(prompts, slots)):
            pad = width - len(prompt)
            ids[row, pad:] = torch.tensor(prompt)
            mask[row, pad:] = 1
            source_row += [row] * len(prompt)
            source_pos += range(pad, width)
            target_row += [slot] * len(prompt)
            target_pos += range(len(prompt))
        index, moves = (to_device(t, self.device) for t in (
            torch.tensor(slots), torch.tensor([source_row, source_pos, target_row, target_pos])))
        if bucket is not None:
            step, fresh = self._bucket_step(padded_rows, width)
            logits = step(to_device(torch.stack([ids, mask]), self.device))[:rows]
        else:
            ids, mask = to_device(ids, self.device), to_device(mask, self.device)
            fresh = self._view(self._empty_caches(rows, width + 1), rows, width + 1)
            fresh.start = width - mask.sum(dim=1)
            fresh.padded = any(len(p) < width for p in prompts)
            logits = fresh._prefill(ids, mask)
        source_row, source_pos, target_row, target_pos = moves
        for mine, theirs in zip(self.caches, fresh.caches):
            if isinstance(mine, MambaCache):
                theirs = theirs.first(rows)  # a bucket's rows of padding alone stay behind
                mine.conv.index_copy_(0, index, theirs.conv)
                mine.ssm.index_copy_(0, index, theirs.ssm)
            elif isinstance(mine, KVCache):
                for here, there in ((mine.k, theirs.k), (mine.v, theirs.v)):
                    here.transpose(1, 2)[target_row, target_pos] = there.transpose(1, 2)[source_row, source_pos]
        return logits

    def bucket_prefills(self, rows: int) -> None:
        """From now on `prefill_slots` runs batches of up to `rows` short prompts in a few shapes: the
        rows padded to a power of two (with rows of padding alone), the width to one of
        PREFILL_BUCKET_WIDTHS, at most PREFILL_BUCKET_TOKENS tokens in all. Each shape's prefill runs on
        one set of caches kept for the purpose and, on a GPU, is captured in a CUDA graph, all of them
        sharing one memory pool (one runs at a time, and its logits are copied out).

        Why: a short prefill launches about a thousand kernels, and eagerly the host takes longer to
        launch them than the device to run them (at the Nano-9B shape on an H200, 58 ms for one
        40-token prompt against a 5.7 ms decode step, bench/results/prefill-call-nano-9b-v2-h200.json),
        while every decoding stream waits; a new prompt length also made Triton compile its kernels
        anew, mid-load. Replayed, such a call costs its device time."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        caches = self._empty_caches(rows, max(PREFILL_BUCKET_WIDTHS) + 1)  # as the largest bucket's
        pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._buckets = _Buckets(prefill_buckets(rows), caches, pool, {})

    def prefill_bucket(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The (rows, width) bucket that `prefill_slots` runs `rows` prompts of up to `longest` tokens
        in, or None where they fit none (or there are no buckets): then they run eagerly as they are."""
        if self._buckets is None:
            return None
        return next(((r, w) for r, w in self._buckets.shapes if r >= rows and w >= longest), None)

    def warm_up_prefills(self, progress: bool = False) -> int:
        """Capture every bucket's prefill now (on prompts of padding alone, which touch no slot) rather
        than when a request first needs it; how many were captured."""
        if self._buckets is None or not self.graphs:
            return 0
        from tqdm.auto import tqdm

        captured = 0
        for rows, width in tqdm(self._buckets.shapes, desc="capture prefill buckets", disable=not progress):
            step, _ = self._bucket_step(rows, width)
            captured += step.prepare(torch.zeros(2, rows, width, dtype=torch.long, device=self.device))
        return captured

    def _bucket_step(self, rows: int, width: int):
        """The prefill of a (rows, width) bucket: a packed (2, rows, width) tensor of token ids and
        attention mask in, the logits of each row's last token out; and the view of the bucket caches
        it leaves each row's state in."""
        buckets = self._buckets
        if (rows, width) not in buckets.steps:
            fresh = self._view([None if c is None else c.first(rows) for c in buckets.caches], rows, width + 1)
            fresh.padded = True  # rows of padding alone may be among them; the mask covers unpadded rows too

            @torch.no_grad()
            def prefill(packed):
                ids, mask = packed[0], packed[1]
                for cache in fresh.caches:
                    if isinstance(cache, MambaCache):
                        cache.reset()  # keys and values need none: each position is written before it is read
                fresh.start.copy_(width - mask.sum(dim=1))
                return fresh._prefill(ids, mask)

            buckets.steps[rows, width] = self.graphed(prefill, pool=buckets.pool), fresh
        return buckets.steps[rows, width]

    @torch.no_grad()
    def extend(self, input_ids: torch.Tensor, begin: int) -> torch.Tensor:
        """A chunk of unpadded sequences (rows, T) at positions begin.. on top of what the caches
        hold (nothing, at 0): a prefill in pieces. The logits of its last token."""
        if begin + input_ids.shape[1] >= self.capacity:
            raise ValueError(f"tokens {begin}..{begin + input_ids.shape[1]} do not fit a capacity of {self.capacity}")
        return self._logits(self._forward(self.model.model.embeddings(input_ids), begin))

    # Whole sequences at once, for analysis (the pruner's importance passes).

    @torch.no_grad()
    def run_layers(self, stream: torch.Tensor, layers, observe=None) -> torch.Tensor:
        """The residual stream after running `layers` (indices, in order) over fresh sequences.

        `stream` (rows, T, hidden) enters the first of `layers` at position 0: the embeddings, or
        the stream some earlier call returned. Layers left out of `layers` are skipped, as if
        removed from the model. `stream` may have fewer rows than the runtime (the first rows of
        its caches serve), so that one runtime runs groups of any size up to `rows`.
        `observe(index, name, tensor)` sees, per layer: "norm" (the layer's normalised input),
        "mamba_x" (the x part of a Mamba input projection, before the conv), "attention" (the
        heads' output, before o_proj), "mlp" (after the squared ReLU).
        """
        rows, length, _ = stream.shape
        if rows > self.rows or length >= self.capacity:
            raise ValueError(f"{rows} x {length} tokens do not fit {self.rows} rows x {self.capacity}")
        self.padded = False
        self.start.zero_()
        for index in layers:
            kind, layer, cache = self.pattern[index], self.layers[index], self.caches[index]
            cache = cache.first(rows) if cache is not None else None
            tap = None if observe is None else (lambda name, tensor, i=index: observe(i, name, tensor))
            normed, _ = self.kernels.rms_norm(stream, layer.norm.weight, self.eps)
            if tap is not None:
                tap("norm", normed)
            self._tap = tap
            try:
                if kind == "M":
                    cache.reset()
                    out = self._mamba(normed, layer.mixer, cache)
                elif kind == "*":
                    out = self._attention(normed, layer.mixer, cache, 0)
                else:
                    out = self._mlp(normed, layer.mixer)
            finally:
                self._tap = None
            stream = stream + out
        return stream

    def final_norm(self, stream: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm of a residual stream: what the output head multiplies."""
        return self.kernels.rms_norm(stream, self.model.model.norm_f.weight, self.eps)[0]

    def graphed(self, step, generator=None, pool=None):
        """`step` (tokens -> outputs, calling `self.step` inside) replayed from a CUDA graph.

        The first calls run eagerly (compiling Triton kernels and warming up libraries); the next
        one is captured and every call after replays it. Each call is a real step. Without graphs
        (on the CPU), `step` itself.
        """
        if not self.graphs:
            return step
        return _GraphedStep(step, self.device, generator, pool=pool)


BATCH_ALIGN = 16


@dataclass
class _Buckets:
    shapes: list[tuple[int, int]]  # (rows, width), smallest first: the first that holds a batch is its bucket
    caches: list  # the prefills' own caches, as wide as the widest bucket
    pool: object  # the graphs' shared memory pool (None without graphs)
    steps: dict  # (rows, width) -> (step, the view of `caches` it fills)


def batch_width(longest: int) -> int:
    """The width of a batch of prompts prefilled together (`HybridRuntime.prefill_slots`): the longest
    rounded up to a multiple of BATCH_ALIGN."""
    return round_up(longest, BATCH_ALIGN)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without waiting: a plain copy from
    pageable memory would first wait for all the work queued on the device."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _conv_step(state, x, weight, bias, live=None):
    """One step of the Mamba conv: slide the window (state: the last kernel-1 inputs) by x, apply;
    rows where `live` is false keep their window."""
    window = torch.cat([state, x[..., None]], dim=-1)
    state.copy_(window[..., 1:] if live is None else torch.where(live[:, None, None], window[..., 1:], state))
    return conv_window(window, weight, bias, x.dtype)


class _GraphedStep:
    def __init__(self, step, device, generator=None, eager_calls: int = 2, pool=None):
        self.step, self.device, self.generator, self.eager_calls = step, device, generator, eager_calls
        self.pool = pool  # a memory pool shared with other graphs, none of which runs while this one does
        self.graph = None

    def prepare(self, tokens) -> bool:
        """Make the eager calls and the capture now, each a real step on `tokens`; whether there was
        anything left to do."""
        fresh = self.graph is None
        while self.graph is None:
            self(tokens)
        return fresh

    @torch.no_grad()
    def __call__(self, tokens):
        if self.graph is None:
            if self.eager_calls > 0:
                self.eager_calls -= 1
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    out = self.step(tokens)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return out
            self.tokens = tokens.clone()
            self.graph = torch.cuda.CUDAGraph()
            if self.generator is not None:
                self.graph.register_generator_state(self.generator)
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self.step(self.tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        # The graph's outputs are overwritten by the next replay: hand out copies.
        return self.out.clone() if isinstance(self.out, torch.Tensor) else tuple(t.clone() for t in self.out)
