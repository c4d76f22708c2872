"""Pruning's importance passes on a GPU (skipped without one): the runtime with mamba-ssm's Triton
kernels against transformers' forward with hooks, on the same weights."""

from __future__ import annotations

import pytest
import torch

import nano
from nano.tiny import build_tiny_checkpoint
from prune.importance import rank_layers, width_importance
from twins.importance import rank_layers_reference, width_importance_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPE = dict(hybrid_override_pattern="M-M*-M-M*-M-", hidden_size=256, intermediate_size=512, mamba_num_heads=16,
             mamba_head_dim=32, n_groups=4, ssm_state_size=64, chunk_size=64, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, initializer_range=0.02)


def test_importance_on_the_gpu_matches_the_transformers_twin(tmp_path):
    model = nano.load(build_tiny_checkpoint(tmp_path / "m", seed=2, **SHAPE), device="cuda", dtype=torch.float32)
    tokens = torch.randint(3, 267, (4, 256), generator=torch.Generator().manual_seed(0))
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = width_importance(model.model, tokens, batch_size=2)
    slow = width_importance_reference(model.model, tokens, batch_size=2)
    assert torch.allclose(fast.hidden, slow.hidden, rtol=1e-3)
    for name in ("ffn", "mamba_heads", "attention_heads"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert all(torch.allclose(a[i], b[i], rtol=1e-3, atol=1e-6) for i in a), name
    steps = rank_layers(model.model, tokens[:2], 2)
    twin = rank_layers_reference(model.model, tokens[:2], 2)
    assert [s.layer for s in steps] == [s.layer for s in twin]
    for a, b in zip(steps, twin):
        assert all(abs(a.scores[i] - b.scores[i]) <= 1e-3 * max(1e-3, b.scores[i]) for i in a.scores)


def test_the_triton_training_forward_matches_transformers(tmp_path):
    from prune.fast_training import use_fast_training

    folder = build_tiny_checkpoint(tmp_path / "t", seed=3, **SHAPE)
    plain, fast = (nano.load(folder, device="cuda", dtype=torch.float32).model for _ in range(2))
    assert "Triton" in use_fast_training(fast)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(3, 260, (2, 256), generator=torch.Generator().manual_seed(4)).cuda()
    losses = []
    for model in (plain, fast):
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name
