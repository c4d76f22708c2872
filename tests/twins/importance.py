"""The slow, obvious twins of pruning's importance passes: the same measures through transformers'
own forward, with module hooks for the width scores and layers taken out of the layer list for the
depth ranking. `prune.importance` (the layers through the fast runtime) must match them."""

from __future__ import annotations

import torch

from nano.config import ATTENTION, MAMBA, MLP
from nano.runtime import HybridRuntime
from prune.importance import Importance, LayerStep, _batches, _distance, _steps, _Sums


@torch.no_grad()
def width_importance_reference(model, tokens: torch.Tensor, batch_size: int = 8) -> Importance:
    """`prune.importance.width_importance` through transformers' forward and module hooks."""
    device = next(model.parameters()).device
    sums = _Sums()
    hooks = []
    pattern = model.config.hybrid_override_pattern
    for i, (kind, layer) in enumerate(zip(pattern, model.model.layers)):
        hooks.append(layer.norm.register_forward_hook(lambda m, a, out, i=i: sums(i, "norm", out)))
        mixer = layer.mixer
        if kind == MAMBA:
            inner = mixer.num_heads * mixer.head_dim
            hooks.append(mixer.in_proj.register_forward_hook(
                lambda m, a, out, i=i, inner=inner: sums(i, "mamba_x", out[..., inner : 2 * inner])
            ))
        elif kind == ATTENTION:
            hooks.append(mixer.o_proj.register_forward_pre_hook(lambda m, a, i=i: sums(i, "attention", a[0])))
        elif kind == MLP:
            hooks.append(mixer.down_proj.register_forward_pre_hook(lambda m, a, i=i: sums(i, "mlp", a[0])))
    try:
        for batch in _batches(tokens, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
            sums.samples += batch.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
    return sums.importance(model)




@torch.no_grad()
def rank_layers_reference(model, tokens: torch.Tensor, remove, metric: str = "kl", batch_size: int = 2) -> list[LayerStep]:
    """`prune.importance.rank_layers` through transformers' forward, each candidate a model with its layers taken
    out of the layer list: the slow twin."""
    pattern = model.config.hybrid_override_pattern
    device = next(model.parameters()).device
    layers = model.model.layers
    batches = [b.to(device) for b in _batches(tokens, batch_size)]
    count = sum(b.numel() for b in batches)

    def normed(batch, keep):
        model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
        try:
            return model.model(input_ids=batch, use_cache=False).last_hidden_state
        finally:
            model.model.layers = layers

    references = [normed(b, range(len(pattern))) for b in batches]

    def score_round(removed, candidates):
        scores = {}
        for i in candidates:
            keep = [j for j in range(len(pattern)) if j not in removed and j != i]
            total = sum(_distance(model, normed(b, keep), r, b, metric).item() for b, r in zip(batches, references))
            scores[i] = total / count
        return scores

    return _steps(pattern, remove, score_round)


@torch.no_grad()
def rank_layers_one_by_one(model, tokens: torch.Tensor, remove, metric: str = "kl",
                           batch_size: int = 2) -> list[LayerStep]:
    """`prune.importance.rank_layers` as it was before its candidates ran side by side: through the
    same runtime, each candidate run on its own from the stream entering the layer it skips."""
    pattern = model.config.hybrid_override_pattern
    device = next(model.parameters()).device
    batches = [b.to(device) for b in _batches(tokens, batch_size)]
    runtimes = {rows: HybridRuntime(model, rows, tokens.shape[1] + 1, prefill_chunk=tokens.shape[1])
                for rows in {b.shape[0] for b in batches}}
    everything = range(len(pattern))
    references = []
    for b in batches:
        runtime = runtimes[b.shape[0]]
        references.append(runtime.final_norm(runtime.run_layers(model.model.embeddings(b), everything)))
    count = sum(b.numel() for b in batches)

    def score_round(removed, candidates):
        active = [i for i in everything if i not in removed]
        sums = {i: 0.0 for i in candidates}
        for batch, reference in zip(batches, references):
            runtime = runtimes[batch.shape[0]]
            stream = model.model.embeddings(batch)
            entering = {}
            for i in active:
                entering[i] = stream
                stream = runtime.run_layers(stream, [i])
            for i in candidates:
                after = [j for j in active if j > i]
                out = runtime.run_layers(entering[i], after) if after else entering[i]
                sums[i] += _distance(model, runtime.final_norm(out), reference, batch, metric).item()
        return {i: s / count for i, s in sums.items()}

    return _steps(pattern, remove, score_round)
