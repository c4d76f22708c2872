"""Cutting a NemotronH model down to a smaller one, every tensor consistently.

What is kept is chosen by importance (`prune.importance`) and always kept in its original order,
so that keeping everything gives back the same model:
- embedding channels: the columns of the embeddings and the output head, every RMSNorm's weight,
  the input columns of every projection that reads the residual stream and the output rows of
  every projection that writes it;
- MLP neurons: rows of up_proj, columns of down_proj (the same count in every MLP layer, each
  layer choosing its own by its own scores);
- Mamba heads: the same number in every group (heads share B and C within a group), so the
  groups, B, C and the gated norm's groups stay intact; a head takes its z, x and dt rows of the
  input projection, its x channels of the conv, its A_log, D and dt_bias, its channels of the
  gated norm and its columns of out_proj;
- attention heads: whole query heads, the same number per KV group, K and V kept;
- layers: dropped whole, the layer pattern rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nano.config import ATTENTION, MAMBA, MLP

from .importance import Importance
from .targets import Plan, check_plan, pruned_config_dict


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: the earlier index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _top_per_group(scores: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """The k highest of `scores` chosen evenly from `groups` contiguous groups, in index order."""
    per_group = scores.numel() // groups
    kept = [_top(scores[g * per_group : (g + 1) * per_group], k // groups) + g * per_group for g in range(groups)]
    return torch.cat(kept)


def _channels(heads: torch.Tensor, size: int) -> torch.Tensor:
    """The channel indices of whole heads of `size` channels each."""
    return (heads[:, None] * size + torch.arange(size)).flatten()


@dataclass
class Kept:
    """The indices each dimension keeps."""

    hidden: torch.Tensor
    ffn: dict[int, torch.Tensor]
    mamba_heads: dict[int, torch.Tensor]
    attention_heads: dict[int, torch.Tensor]


def choose(config, importance: Importance, plan: Plan) -> Kept:
    """What to keep of each dimension: the most important, by `importance`."""
    check_plan(config, plan)
    pattern = config.hybrid_override_pattern
    kept = Kept(hidden=_top(importance.hidden, plan.hidden), ffn={}, mamba_heads={}, attention_heads={})
    for i, kind in enumerate(pattern):
        if i in plan.drop:
            continue
        if kind == MLP:
            kept.ffn[i] = _top(importance.ffn[i], plan.ffn)
        elif kind == MAMBA:
            kept.mamba_heads[i] = _top_per_group(importance.mamba_heads[i], config.n_groups, plan.mamba_heads)
        elif kind == ATTENTION:
            scores = importance.attention_heads.get(i, torch.ones(config.num_attention_heads))
            kept.attention_heads[i] = _top_per_group(scores, config.num_key_value_heads, plan.attention_heads)
    return kept


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return tensor
    return tensor.index_select(dim, index.to(tensor.device))


def _linear(module, rows=None, cols=None) -> dict[str, torch.Tensor]:
    out = {"weight": _take(_take(module.weight, 0, rows), 1, cols)}
    if module.bias is not None:
        out["bias"] = _take(module.bias, 0, rows)
    return out


def _mamba_tensors(mixer, heads: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    inner = mixer.num_heads * mixer.head_dim
    groups_width = 2 * mixer.n_groups * mixer.ssm_state_size
    channels = _channels(heads, mixer.head_dim)
    # The input projection's rows: z (inner), then x (inner), B and C (groups_width), then dt (heads).
    in_rows = torch.cat([
        channels,
        inner + channels,
        2 * inner + torch.arange(groups_width),
        2 * inner + groups_width + heads,
    ])
    # The conv runs over x, B and C.
    conv_channels = torch.cat([channels, inner + torch.arange(groups_width)])
    out = {f"in_proj.{k}": v for k, v in _linear(mixer.in_proj, in_rows, hidden).items()}
    out.update({f"conv1d.{k}": v for k, v in _linear(mixer.conv1d, conv_channels).items()})
    out.update({f"out_proj.{k}": v for k, v in _linear(mixer.out_proj, hidden, channels).items()})
    for name in ("A_log", "D", "dt_bias"):
        out[name] = _take(getattr(mixer, name), 0, heads)
    out["norm.weight"] = _take(mixer.norm.weight, 0, channels)
    return out


def _attention_tensors(attn, heads: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    channels = _channels(heads, attn.head_dim)
    out = {}
    for name, rows, cols in (("q_proj", channels, hidden), ("k_proj", None, hidden), ("v_proj", None, hidden),
                             ("o_proj", hidden, channels)):
        out.update({f"{name}.{k}": v for k, v in _linear(getattr(attn, name), rows, cols).items()})
    return out


def _mlp_tensors(mlp, neurons: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"up_proj.{k}": v for k, v in _linear(mlp.up_proj, neurons, hidden).items()}
    out.update({f"down_proj.{k}": v for k, v in _linear(mlp.down_proj, hidden, neurons).items()})
    return out


@torch.no_grad()
def pruned_state_dict(model, kept: Kept, drop) -> dict[str, torch.Tensor]:
    """The tensors of the pruned model, named as transformers names them."""
    hidden = kept.hidden
    base = model.model
    state = {
        "model.embeddings.weight": _take(base.embeddings.weight, 1, hidden),
        "model.norm_f.weight": _take(base.norm_f.weight, 0, hidden),
        "lm_head.weight": _take(model.lm_head.weight, 1, hidden),
    }
    pattern = model.config.hybrid_override_pattern
    new_index = 0
    for i, (kind, layer) in enumerate(zip(pattern, base.layers)):
        if i in drop:
            continue
        prefix = f"model.layers.{new_index}."
        state[prefix + "norm.weight"] = _take(layer.norm.weight, 0, hidden)
        if kind == MAMBA:
            tensors = _mamba_tensors(layer.mixer, kept.mamba_heads[i], hidden)
        elif kind == ATTENTION:
            tensors = _attention_tensors(layer.mixer, kept.attention_heads[i], hidden)
        elif kind == MLP:
            tensors = _mlp_tensors(layer.mixer, kept.ffn[i], hidden)
        else:
            raise ValueError(f"layer {i} is of kind {kind!r}; pruning handles 'M', '*' and '-' layers")
        state.update({prefix + "mixer." + k: v for k, v in tensors.items()})
        new_index += 1
    return state


def slice_model(model, importance: Importance, plan: Plan):
    """The pruned transformers `NemotronHForCausalLM`: `plan`'s sizes, the most important parts kept."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**pruned_config_dict(model.config, plan))
    kept = choose(model.config, importance, plan)
    state = pruned_state_dict(model, kept, set(plan.drop))
    with torch.device("meta"):
        pruned = NemotronHForCausalLM(config)
    pruned.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        pruned.tie_weights()
    return pruned.eval()
