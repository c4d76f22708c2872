"""`nano.generate` on a GPU (skipped where there is none): same semantics, state on the device."""

from __future__ import annotations

import pytest
import torch

import nano
from nano.budget import default_grace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["What is 12 * 7?", "Tell me about Mamba layers, please, in some detail.", "hi"]


@pytest.fixture(scope="module")
def gpu_models(tiny_dir):
    return {dtype: nano.load(tiny_dir, device="cuda", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budget_semantics_hold_on_the_gpu(gpu_models, dtype):
    model = gpu_models[dtype]
    assert model.device.type == "cuda"
    for budget in (0, 1, 7, 20):
        g = nano.generate(model, PROMPTS[1], budget=budget, max_new_tokens=60)
        assert g.reasoning_tokens <= budget + default_grace(budget)
        assert g.token_ids.count(model.chat.think.close) <= 1 + g.token_ids.count(model.chat.think.open)


def test_batch_equals_alone_and_stream_equals_whole_on_the_gpu(gpu_models):
    model = gpu_models[torch.float32]
    budgets = [5, None, 0]
    batch = nano.generate(model, PROMPTS, budget=budgets, max_new_tokens=40)
    assert batch == [nano.generate(model, p, budget=b, max_new_tokens=40) for p, b in zip(PROMPTS, budgets)]
    stream = nano.generate(model, PROMPTS, budget=budgets, max_new_tokens=40, stream=True)
    events = list(stream)
    assert stream.result == batch
    assert "".join(e.text for e in events if e.row == 0 and e.kind == "answer") == batch[0].answer


def test_gpu_matches_cpu_greedy(tiny_dir, gpu_models):
    cpu = nano.load(tiny_dir, device="cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert nano.generate(gpu_models[torch.float32], PROMPTS[0], budget=8, max_new_tokens=30) == nano.generate(
            cpu, PROMPTS[0], budget=8, max_new_tokens=30
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
