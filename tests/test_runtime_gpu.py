"""The fast runtime on a GPU (skipped without one): Triton kernels against their twins, the runtime
against transformers' NemotronHForCausalLM on the same weights, graphs against eager."""

from __future__ import annotations

import math

import pytest
import torch

import nano
from nano.kernels import (
    gated_rms_norm_torch,
    load_mamba_ssm,
    rms_norm_torch,
    select_kernels,
    state_update_torch,
    triton_kernels,
)
from nano.runtime import HybridRuntime
from twins.scan import chunk_scan_sequential

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Mamba heads, state and groups as Nano's (head dim 64 here, 80 there), narrower and shallower.
SHAPE = dict(
    hybrid_override_pattern="M-M*-M-M*-",
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=16,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
    chunk_size=128,
    max_position_embeddings=8192,
    initializer_range=0.02,
)


@pytest.fixture(scope="module")
def triton():
    mamba, reason = load_mamba_ssm()
    if mamba is None:
        pytest.skip(f"mamba-ssm's Triton kernels are not available: {reason}")
    return triton_kernels(mamba)


@pytest.fixture(scope="module")
def gpu_dir(tmp_path_factory):
    from nano.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "shape", seed=1, **SHAPE)


def test_the_runtime_says_which_kernels_it_uses(gpu_dir, triton):
    model = nano.load(gpu_dir, device="cuda")
    assert "mamba-ssm" in model.runtime_name() and "Triton" in model.runtime_name() and "CUDA graph" in model.runtime_name()
    assert select_kernels(torch.device("cuda")).name == triton.name


def test_triton_scan_and_update_match_the_sequential_twin(triton):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    rows, length, heads, p, groups, n = 2, 300, 16, 64, 8, 128
    inputs = dict(x=r(rows, length, heads, p), dt=r(rows, length, heads) - 3, A=-torch.rand(heads, device="cuda") * 4,
                  B=r(rows, length, groups, n) * 0.3, C=r(rows, length, groups, n) * 0.3, D=r(heads), dt_bias=r(heads) * 0.3,
                  initial_state=r(rows, heads, p, n))
    limit = (1e-3, math.inf)
    y, state = triton.chunk_scan(**inputs, dt_limit=limit, chunk_size=128)
    y_ref, state_ref = chunk_scan_sequential(**inputs, dt_limit=limit)
    # The Triton kernel's fp32 dot products run in TF32 (10-bit mantissa): errors of order 1e-3 relative.
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state, state_ref, rtol=2e-2, atol=2e-2)
    step = {k: v[:, 0] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items() if k != "initial_state"}
    s1, s2 = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    torch.testing.assert_close(triton.state_update(s1, **step), state_update_torch(s2, **step), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)


def test_triton_norms_match_the_twins(triton):
    x, res, w = torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16), torch.randn(3, 7, 512, device="cuda", dtype=torch.bfloat16), torch.rand(512, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(triton.rms_norm(x, w, 1e-5, residual=res), rms_norm_torch(x, w, 1e-5, residual=res)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    z = torch.randn_like(x)
    torch.testing.assert_close(triton.gated_rms_norm(x, z, w, 1e-5, 64), gated_rms_norm_torch(x, z, w, 1e-5, 64), rtol=2e-2, atol=2e-2)


def close_in_bf16(got, want):
    """Logits agree to bf16 precision: small error against their scale, same ranking at the top."""
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.03 * scale, f"max error {(got - want).abs().max():.4f} against scale {scale:.2f}"
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_and_64_decode_steps_match_transformers(gpu_dir, triton, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = nano.load(gpu_dir, device="cuda", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(11, 260, (2, 700), generator=g, device="cuda")
    mask = torch.ones_like(ids)
    model.runtime = "reference"
    reference = model.decoder()
    fast = HybridRuntime(model.model, 2, 700 + 64, prefill_chunk=256, kernels=triton)
    pairs = [(fast.prefill(ids, mask), reference.prefill(ids, mask))]
    for _ in range(64):
        tokens = torch.randint(11, 260, (2,), generator=g, device="cuda")
        pairs.append((fast.step(tokens), reference.step(tokens)))
    for got, want in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        else:
            close_in_bf16(got, want)


def test_graphed_generation_equals_eager(gpu_dir, triton):
    model = nano.load(gpu_dir, device="cuda", dtype=torch.bfloat16)
    prompts = ["What is 12 * 7?", "Tell me about hybrid models, in some detail.", "hi"]
    graphed = nano.generate(model, prompts, budget=[5, None, 0], max_new_tokens=40)
    eager = HybridRuntime.graphed
    try:
        HybridRuntime.graphed = lambda self, step, generator=None: step
        assert nano.generate(model, prompts, budget=[5, None, 0], max_new_tokens=40) == graphed
    finally:
        HybridRuntime.graphed = eager
    sampled = [nano.generate(model, prompts, budget=8, max_new_tokens=30, temperature=0.8, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_nano_tiny_on_the_fast_runtime(triton):
    from nano.arithmetic import boxed

    model = nano.load("nano-tiny", device="cuda")
    g = nano.generate(model, "What is 347 + 58 * 6 - 12?")
    assert boxed(g.answer) == 683 and g.reasoning_tokens == 157
