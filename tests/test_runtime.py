"""The fast runtime and its kernels against their slow twins and transformers' reference, on the CPU."""

from __future__ import annotations

import importlib.util
import math
import sys
import textwrap

import pytest
import torch

import nano
from nano.kernels import (
    causal_conv1d_silu,
    chunk_scan_torch,
    gated_rms_norm_torch,
    load_mamba_ssm,
    rms_norm_torch,
    state_update_torch,
)
from nano.hardware import cache_columns
from nano.layers import KVCache
from nano.runtime import HybridRuntime
from twins.scan import chunk_scan_sequential


def scan_inputs(rows=2, length=37, heads=4, p=8, groups=2, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        x=r(rows, length, heads, p),
        dt=r(rows, length, heads) - 2,
        A=-torch.rand(heads, generator=g) * 4,
        B=r(rows, length, groups, n),
        C=r(rows, length, groups, n),
        D=r(heads),
        dt_bias=r(heads) * 0.5,
        initial_state=r(rows, heads, p, n),
    )


@pytest.mark.parametrize("length, chunk", [(1, 8), (8, 8), (37, 8), (37, 64), (100, 16)])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, math.inf)])
def test_chunked_scan_matches_the_sequential_scan(length, chunk, dt_limit):
    inputs = scan_inputs(length=length)
    y_slow, state_slow = chunk_scan_sequential(**inputs, dt_limit=dt_limit)
    y_fast, state_fast = chunk_scan_torch(**inputs, dt_limit=dt_limit, chunk_size=chunk)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state_fast, state_slow, rtol=1e-4, atol=1e-4)


def test_one_step_update_is_one_step_of_the_scan():
    inputs = scan_inputs(length=1)
    y_scan, state_scan = chunk_scan_sequential(**inputs)
    state = inputs["initial_state"].clone()
    y = state_update_torch(state, inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0], inputs["D"], inputs["dt_bias"])
    torch.testing.assert_close(y, y_scan[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_scan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_channels_last_conv_is_the_depthwise_causal_conv(with_bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 19, 12, generator=g, requires_grad=True)
    weight = torch.randn(12, 1, 4, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g, requires_grad=True) if with_bias else None
    twin = torch.nn.functional.silu(torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, padding=3, groups=12)[..., :19])
    twin = twin.transpose(1, 2)
    fast = causal_conv1d_silu(x, weight, bias)
    assert torch.allclose(fast, twin, atol=1e-6)
    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(fast.square().sum(), inputs)
    twin_grads = torch.autograd.grad(twin.square().sum(), inputs)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, twin_grads))


def test_norms_match_transformers_modules(tiny):
    layer = tiny.model.model.layers[0]
    x = torch.randn(3, 5, tiny.config.hidden_size)
    normed, summed = rms_norm_torch(x, layer.norm.weight, tiny.config.layer_norm_epsilon, residual=x)
    torch.testing.assert_close(normed, layer.norm(2 * x))
    torch.testing.assert_close(summed, 2 * x)
    mixer = layer.mixer
    inner = mixer.num_heads * mixer.head_dim
    y, z = torch.randn(3, 5, inner), torch.randn(3, 5, inner)
    torch.testing.assert_close(
        gated_rms_norm_torch(y, z, mixer.norm.weight, mixer.norm.variance_epsilon, inner // mixer.n_groups), mixer.norm(y, z)
    )


def prompt_batch(model, texts):
    ids = [model.chat.encode(model.chat.render(t)[0]) for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), 3)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        input_ids[row, width - len(row_ids) :] = torch.tensor(row_ids)
        mask[row, width - len(row_ids) :] = 1
    return input_ids, mask


@pytest.mark.parametrize("chunk", [7, 4096])
@pytest.mark.parametrize("texts", [["What is 2 + 2? Please explain in detail."], ["hi", "What is 2 + 2? Please explain in detail.", "x"]])
def test_prefill_and_64_decode_steps_match_the_reference(tiny, chunk, texts):
    input_ids, mask = prompt_batch(tiny, texts)
    reference = tiny.decoder()  # transformers' forward and cache
    fast = HybridRuntime(tiny.model, len(texts), input_ids.shape[1] + 64, prefill_chunk=chunk)
    torch.testing.assert_close(fast.prefill(input_ids, mask), reference.prefill(input_ids, mask), rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(64):
        tokens = torch.randint(11, 260, (len(texts),), generator=g)
        torch.testing.assert_close(fast.step(tokens), reference.step(tokens), rtol=1e-4, atol=1e-4)


def test_generate_with_the_fast_runtime_equals_the_reference(tiny_dir):
    prompts = ["What is 12 * 7?", "Tell me about hybrid models, in some detail.", "hi"]
    fast = nano.load(tiny_dir)
    fast.runtime = "fast"
    reference = nano.load(tiny_dir)
    assert reference.runtime_name() == "reference (transformers)"
    assert fast.runtime_name().startswith("fast (PyTorch")
    kwargs = dict(budget=[5, None, 0], max_new_tokens=40)
    assert nano.generate(fast, prompts, **kwargs) == nano.generate(reference, prompts, **kwargs)
    stream = nano.generate(fast, prompts[1], budget=8, max_new_tokens=30, stream=True)
    list(stream)
    assert stream.result == nano.generate(reference, prompts[1], budget=8, max_new_tokens=30)


@pytest.mark.parametrize("buckets", [False, True], ids=["eager", "bucketed"])
def test_prompts_prefilled_together_into_slots_equal_each_prefilled_alone_into_its_slot(tiny, buckets):
    """The engine's batched prefill (left-padded, on caches of its own, moved into scattered slots)
    against the obvious way: each prompt extended alone into its slot. Bucketed, three prompts run
    in a bucket of four rows (one of padding alone) on caches a previous call has left its state in."""
    prompts = [tiny.chat.encode(tiny.chat.render(t)[0]) for t in ["hi", "What is 2 + 2? Please explain in detail.", "x y"]]
    slots = [3, 0, 2]
    together = HybridRuntime(tiny.model, 4, 128, prefill_chunk=16)  # several chunks, padding in the first
    alone = HybridRuntime(tiny.model, 4, 128)
    if buckets:
        together.bucket_prefills(4)
        assert together.prefill_bucket(3, max(map(len, prompts))) == (4, 128)  # the longest is 65-128 tokens
        together.prefill_slots([prompts[1][::-1]], [3])  # state left in the bucket caches; slot 3 is overwritten
    for mine, theirs in zip(together.caches, alone.caches):  # earlier contents, the same in both
        for name in ("conv", "ssm", "k", "v"):
            if hasattr(mine, name):
                getattr(theirs, name).copy_(getattr(mine, name).normal_())
    logits = together.prefill_slots(prompts, slots)
    for row, (prompt, slot) in enumerate(zip(prompts, slots)):
        view = alone.slot(slot)
        for cache in view.caches:
            if hasattr(cache, "ssm"):
                cache.reset()  # as the engine does on admission
        alone_logits = view.extend(torch.tensor([prompt]), 0)
        torch.testing.assert_close(logits[row : row + 1], alone_logits, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(together.caches, alone.caches):
        if mine is None:
            continue
        if hasattr(mine, "ssm"):
            torch.testing.assert_close(mine.conv, theirs.conv, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.ssm, theirs.ssm, rtol=1e-4, atol=1e-4)
        else:
            for slot, prompt in zip(slots, prompts):  # the prompt's keys and values; past them, what was there
                for here, there in ((mine.k, theirs.k), (mine.v, theirs.v)):
                    torch.testing.assert_close(here[slot, :, : len(prompt)], there[slot, :, : len(prompt)],
                                               rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.k[1], theirs.k[1])  # the slot not prefilled: untouched
            torch.testing.assert_close(mine.k[:, :, 100:], theirs.k[:, :, 100:])


def test_prefill_attention_never_asks_for_cudnn(tiny, monkeypatch):
    """cuDNN's attention plans each new sequence length anew (tens of ms of host time on an H200,
    bench/results/sdpa-host-h200.json): the prefill's attention must run with it switched off."""
    seen = []
    attention = HybridRuntime._prefill_attention

    def recording(self, *args):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return attention(self, *args)

    monkeypatch.setattr(HybridRuntime, "_prefill_attention", recording)
    runtime = HybridRuntime(tiny.model, 2, 64, prefill_chunk=8)
    input_ids, mask = prompt_batch(tiny, ["hi", "What is 2 + 2?"])  # padded, in several chunks
    runtime.prefill(input_ids[:, -20:], mask[:, -20:])
    runtime.slot(0).extend(torch.tensor([[5, 6, 7]]), 30)
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and only there


def test_prefill_slots_refuses_what_does_not_fit(tiny):
    runtime = HybridRuntime(tiny.model, 2, 8)
    with pytest.raises(ValueError, match="2 non-empty prompts need as many distinct slots, got \\[1, 1\\]"):
        runtime.prefill_slots([[5], [6]], [1, 1])
    with pytest.raises(ValueError, match="a prompt of 8 tokens does not fit a capacity of 8"):
        runtime.prefill_slots([[5] * 8], [0])
    for rows in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=f"rows must be a positive integer, got {rows!r}"):
            runtime.bucket_prefills(rows)


def test_prompts_too_long_or_too_many_for_a_bucket_are_prefilled_as_they_are(tiny):
    from nano.hardware import PREFILL_BUCKET_TOKENS, PREFILL_BUCKET_WIDTHS, prefill_buckets

    shapes = prefill_buckets(6)
    assert shapes == [(r, w) for r in (1, 2, 4, 6) for w in PREFILL_BUCKET_WIDTHS if r * w <= PREFILL_BUCKET_TOKENS]
    assert (6, 128) in shapes and (6, 256) not in shapes and shapes == sorted(shapes)
    bucketed, plain = HybridRuntime(tiny.model, 2, 512), HybridRuntime(tiny.model, 2, 512)
    bucketed.bucket_prefills(2)
    widest = max(PREFILL_BUCKET_WIDTHS)
    assert bucketed.prefill_bucket(2, widest) == (2, widest) and bucketed.prefill_bucket(2, widest + 1) is None
    assert bucketed.prefill_bucket(3, 5) is None and plain.prefill_bucket(1, 5) is None
    prompts = [list(range(3, 3 + widest + 1)), [7, 8, 9]]
    torch.testing.assert_close(bucketed.prefill_slots(prompts, [1, 0]), plain.prefill_slots(prompts, [1, 0]))
    for mine, theirs in zip(bucketed.caches, plain.caches):
        for name in ("conv", "ssm", "k", "v"):
            if hasattr(mine, name):
                torch.testing.assert_close(getattr(mine, name), getattr(theirs, name))


def test_kv_caches_are_as_wide_as_the_capacity_rounded_to_64_columns(tiny):
    from nano.engine import Engine

    for capacity, columns in ((1, 64), (64, 64), (65, 128), (1025, 1088)):
        assert cache_columns(capacity) == columns
        runtime = HybridRuntime(tiny.model, 1, capacity)
        assert {c.k.shape[2] for c in runtime.caches if isinstance(c, KVCache)} == {columns}
        assert runtime.columns == columns and runtime.slot(0).columns == columns
    # The engine's caches hold its context and one scratch column for padding rows.
    engine = Engine(tiny, slots=2, context=128)
    assert engine.runtime.columns == 192 and engine.scratch == 128


def test_capacity_is_checked(tiny):
    runtime = HybridRuntime(tiny.model, 1, 8)
    with pytest.raises(ValueError, match="does not fit 1 rows x 8"):
        runtime.prefill(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))


def test_unknown_runtime_is_refused(tiny_dir):
    model = nano.load(tiny_dir)
    model.runtime = "turbo"
    with pytest.raises(ValueError, match="runtime must be 'auto', 'fast' or 'reference', got 'turbo'"):
        nano.generate(model, "hi")


def test_mamba_ssm_loads_without_its_package_init(tmp_path, monkeypatch):
    # A stand-in for the pure-Python wheel: an __init__ that needs compiled code, Triton modules that do not.
    package = tmp_path / "mamba_ssm"
    (package / "ops" / "triton").mkdir(parents=True)
    (package / "__init__.py").write_text("import selective_scan_cuda\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "__init__.py").write_text("")
    for module, function in [
        ("ssd_combined", "mamba_chunk_scan_combined"),
        ("selective_state_update", "selective_state_update"),
        ("layer_norm", "rms_norm_fn"),
        ("layernorm_gated", "rmsnorm_fn"),
    ]:
        (package / "ops" / "triton" / f"{module}.py").write_text(textwrap.dedent(f"def {function}(*a, **k):\n    return '{module}'\n"))
    (tmp_path / "mamba_ssm-2.3.2.post1.dist-info").mkdir()
    (tmp_path / "mamba_ssm-2.3.2.post1.dist-info" / "METADATA").write_text("Name: mamba-ssm\nVersion: 2.3.2.post1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="selective_scan_cuda"):
        import mamba_ssm  # noqa: F401  (what transformers runs into)
    sys.modules.pop("mamba_ssm", None)
    kernels, reason = load_mamba_ssm()
    assert reason == "mamba-ssm 2.3.2.post1"
    assert kernels["chunk_scan"]() == "ssd_combined" and kernels["state_update"]() == "selective_state_update"
    assert not [name for name in sys.modules if name.startswith("mamba_ssm")], "sys.modules left as it was"


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None, reason="mamba-ssm is installed here")
def test_without_mamba_ssm_the_reason_is_given():
    assert load_mamba_ssm() == (None, "mamba-ssm is not installed")


def test_a_function_that_cannot_compile_runs_uncompiled():
    from nano.compiled import _Compiled

    def branchy(x):
        return x + 1 if x.sum().item() > 0 else x - 1  # reads a value: no single graph

    fn = _Compiled(branchy)
    with pytest.warns(UserWarning, match="torch.compile of branchy failed"):
        assert fn(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert fn.failed and fn(-torch.ones(2)).tolist() == [-2.0, -2.0]
