"""A Llama-Nemotron NAS (DeciLM) config.json read into what the toolkit needs: the layers' block configs.

Each layer's `block_configs` entry makes its attention GQA with its own `n_heads_in_group`, a single
linear layer (`replace_with_linear`) or nothing (`no_op`), and its FFN a gated SiLU MLP of width
`ffn_mult` (2 * ffn_mult * hidden / 3 rounded up to 256), a linear layer or nothing. Pure Python:
the planner and the exporters read it without torch; `nano.decilm` is the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .hardware import round_up

GQA, LINEAR, NONE, GATED = "gqa", "linear", "none", "gated"


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The gated FFN's intermediate width for `ffn_mult`: int(2 * mult * hidden / 3) up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return round_up(width, 256)


@dataclass(frozen=True)
class Block:
    """One layer's choice: attention GQA / linear / none (with its KV heads), FFN gated / linear / none."""

    attention: str
    kv_heads: int
    ffn: str
    intermediate: int


@dataclass(frozen=True)
class DeciConfig:
    vocab: int
    hidden: int
    heads: int
    head_dim: int
    blocks: tuple[Block, ...]
    eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_positions: int = 131072
    tied: bool = False

    @classmethod
    def of(cls, config: Any, source: str = "config.json") -> DeciConfig:
        """From a config.json dict (or an object with the same attributes)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        entries = get("block_configs")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{source}: block_configs must be a non-empty list (one entry per layer)")
        if get("num_hidden_layers") not in (None, len(entries)):
            raise ValueError(f"{source}: num_hidden_layers {get('num_hidden_layers')} but {len(entries)} block_configs")
        blocks = []
        for i, entry in enumerate(entries):
            entry = entry if isinstance(entry, dict) else vars(entry)
            attention = entry.get("attention") or {}
            ffn = entry.get("ffn") or {}
            attention = attention if isinstance(attention, dict) else vars(attention)
            ffn = ffn if isinstance(ffn, dict) else vars(ffn)
            for part, what in (("attention", attention), ("ffn", ffn)):
                for unsupported in ("sparsify", "window_length", "num_sink_tokens"):
                    if what.get(unsupported):
                        raise ValueError(f"{source}: block_configs[{i}].{part}.{unsupported} = {what[unsupported]!r} "
                                         f"is not supported (only dense full attention)")
            if attention.get("no_op"):
                kind, kv = NONE, 0
            elif attention.get("replace_with_linear"):
                kind, kv = LINEAR, 0
            else:
                group = attention.get("n_heads_in_group")
                if not group or heads % group:
                    raise ValueError(f"{source}: block_configs[{i}].attention.n_heads_in_group is {group!r}; it "
                                     f"must divide num_attention_heads {heads}")
                kind, kv = GQA, heads // group
            if ffn.get("no_op"):
                ffn_kind, width = NONE, 0
            elif ffn.get("replace_with_linear"):
                ffn_kind, width = LINEAR, 0
            elif ffn.get("intermediate_size"):  # the newer Puzzle format names the width itself
                ffn_kind, width = GATED, int(ffn["intermediate_size"])
            else:
                if not ffn.get("ffn_mult"):
                    raise ValueError(f"{source}: block_configs[{i}].ffn has neither ffn_mult nor intermediate_size")
                ffn_kind, width = GATED, ffn_width(ffn["ffn_mult"], hidden)
            blocks.append(Block(kind, kv, ffn_kind, width))
        scaling = get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3",):
            raise ValueError(f"{source}: rope_scaling type {scaling.get('rope_type')!r}; supported: llama3")
        return cls(vocab=get("vocab_size"), hidden=hidden, heads=heads, head_dim=get("head_dim") or hidden // heads,
                   blocks=tuple(blocks), eps=get("rms_norm_eps", 1e-5), rope_theta=get("rope_theta", 500000.0),
                   rope_scaling=scaling, max_positions=get("max_position_embeddings", 131072),
                   tied=bool(get("tie_word_embeddings", False)))

    @property
    def vocab_size(self) -> int:  # the names generation reads from a transformers config
        return self.vocab

    @property
    def max_position_embeddings(self) -> int:
        return self.max_positions

    def block_parameters(self, block: Block) -> dict[str, int]:
        """Parameters of one layer by group: attention, ffn, norms."""
        h, q = self.hidden, self.heads * self.head_dim
        attention = {GQA: h * q + 2 * h * block.kv_heads * self.head_dim + q * h, LINEAR: h * h, NONE: 0}[block.attention]
        ffn = {GATED: 3 * h * block.intermediate, LINEAR: h * h, NONE: 0}[block.ffn]
        norms = h * ((block.attention != NONE) + (block.ffn != NONE))
        return {"attention": attention, "ffn": ffn, "norms": norms}

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.hidden + sum(sum(self.block_parameters(b).values()) for b in self.blocks)
