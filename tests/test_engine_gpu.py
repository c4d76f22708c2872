"""The engine on a GPU (skipped without one): mamba-ssm's Triton kernels, a CUDA graph per bucket,
padding rows skipped by the state-update kernel; every request still equals itself alone."""

from __future__ import annotations

import pytest
import torch

import nano
from nano.engine import Engine
from nano.hardware import prefill_buckets
from nano.kernels import load_mamba_ssm
from nano.runtime import HybridRuntime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROBLEMS = ["What is 347 + 58 * 6 - 12?", "What is 12 * 7?", "What is 9 - 4 * 2?", "What is 81 + 19?",
            "What is 6 * 6 - 5?", "What is 100 - 37?", "What is 3 + 4 * 5?"]
BUDGETS = [None, 16, 0, 32, None, 8, 64]


@pytest.fixture(scope="module")
def model():
    if load_mamba_ssm()[0] is None:
        pytest.skip("mamba-ssm's Triton kernels are not available")
    return nano.load("nano-tiny", device="cuda", dtype=torch.float32)


def test_requests_through_the_graphed_engine_equal_each_alone(model):
    alone = [nano.generate(model, p, budget=b, max_new_tokens=200) for p, b in zip(PROBLEMS, BUDGETS)]
    engine = Engine(model, slots=4, context=1024, prefill_chunk=16)
    assert engine.runtime.graphs and "mamba-ssm" in engine.runtime.name
    requests = [engine.submit(p, budget=b, max_new_tokens=200) for p, b in zip(PROBLEMS, BUDGETS)]
    engine.run()
    assert [r.result for r in requests] == alone
    assert {rows for rows, _ in engine._steps} > {1}  # more than one bucket was captured


def test_the_graphed_engine_equals_the_eager_engine(model):
    def run(graphs):
        engine = Engine(model, slots=8, context=1024, prefill_chunk=16, graphs=graphs)
        # Odd requests greedy, even ones sampled: steps switch between the greedy and the sampling graphs.
        requests = [engine.submit(p, budget=b, max_new_tokens=120, temperature=0.7 * (i % 2 == 0), seed=i)
                    for i, (p, b) in enumerate(zip(PROBLEMS, BUDGETS))]
        engine.run()
        return [r.result for r in requests]

    assert run(graphs=True) == run(graphs=False)


def test_padding_rows_leave_other_slots_alone_with_the_triton_update(model):
    runtime = HybridRuntime(model.model, 3, 65)
    for cache in runtime.caches:
        if cache is not None:
            for t in vars(cache).values():
                if t.dtype.is_floating_point and t.dim() > 1:
                    t.normal_()
    before = [None if c is None else {k: t.clone() for k, t in vars(c).items()} for c in runtime.caches]
    live = torch.tensor([True, False, True], device="cuda")
    runtime.step_slots(torch.tensor([3, 4, 5], device="cuda"), torch.tensor([5, 64, 9], device="cuda"), live)
    for cache, saved in zip(runtime.caches, before):
        for name, tensor in ({} if cache is None else vars(cache)).items():
            if name in ("k", "v"):
                assert torch.equal(tensor[1, :, :64], saved[name][1, :, :64])
            elif tensor.dim() > 1:
                assert torch.equal(tensor[1], saved[name][1]) and not torch.equal(tensor[0], saved[name][0]), name


def test_a_shared_system_prompt_through_the_prefix_cache_on_the_gpu(model):
    system = {"role": "system", "content": "You work out arithmetic step by step and put the result in a box."}
    prompts = [[system, {"role": "user", "content": p}] for p in PROBLEMS]
    alone = [nano.generate(model, p, budget=b, max_new_tokens=200) for p, b in zip(prompts, BUDGETS)]
    engine = Engine(model, slots=4, context=1024, prefill_chunk=16, prefix_cache=1 << 28, prefix_min_tokens=16)
    first = engine.submit(prompts[0], budget=BUDGETS[0], max_new_tokens=200)
    engine.run()
    rest = [engine.submit(p, budget=b, max_new_tokens=200) for p, b in zip(prompts[1:], BUDGETS[1:])]
    engine.run()
    assert [r.result for r in (first, *rest)] == alone
    assert all(r.reused > 0 for r in rest) and engine.prefix.stats()["hits"] == len(rest)


def test_a_warmed_up_engine_captures_nothing_while_serving_and_still_equals_each_alone(model):
    alone = [nano.generate(model, p, budget=b, max_new_tokens=200) for p, b in zip(PROBLEMS, BUDGETS)]
    engine = Engine(model, slots=4, context=1024)  # whole prompts: they prefill in buckets
    # Decode buckets 1, 2, 4, greedy and sampling; prefill buckets of 1, 2 and 4 rows in five widths each.
    assert engine.warm_up() == 2 * len(engine.buckets) + len(prefill_buckets(4)) == 6 + 15
    steps, prefills = dict(engine._steps), dict(engine.runtime._buckets.steps)
    assert all(step.graph is not None for step in steps.values())
    assert all(step.graph is not None for step, _ in prefills.values())
    assert engine.warm_up() == 0  # nothing left to capture
    requests = [engine.submit(p, budget=b, max_new_tokens=200) for p, b in zip(PROBLEMS, BUDGETS)]
    engine.run()
    assert [r.result for r in requests] == alone
    assert engine._steps == steps and engine.runtime._buckets.steps == prefills  # nothing captured meanwhile
    assert engine.counts["prompts_together"] == len(PROBLEMS)  # every prompt went through a bucket


def test_graphed_prefill_buckets_equal_eager_ones(model):
    """Each bucket's graph replayed (after its two eager calls and the capture) against the same
    buckets run eagerly: logits and every slot's state; the slots not prefilled untouched."""
    prompts = [model.chat.encode(model.chat.render(p)[0]) for p in PROBLEMS]
    graphed, eager = HybridRuntime(model.model, 8, 1024), HybridRuntime(model.model, 8, 1024, graphs=False)
    assert graphed.graphs and not eager.graphs
    for runtime in (graphed, eager):
        runtime.bucket_prefills(4)
    for mine, theirs in zip(graphed.caches, eager.caches):
        for name in ("conv", "ssm", "k", "v"):
            if hasattr(mine, name):
                getattr(theirs, name).copy_(getattr(mine, name).normal_())
    untouched = [None if c is None else {k: t[7].clone() for k, t in vars(c).items() if t.dim() > 1}
                 for c in graphed.caches]
    calls = [(prompts[i : i + n], [(3 * i + k) % 7 for k in range(n)]) for n in (1, 3, 2) for i in range(4)]
    for batch, slots in calls * 3:  # every shape called at least three times: eagerly twice, then captured
        torch.testing.assert_close(graphed.prefill_slots(batch, slots), eager.prefill_slots(batch, slots),
                                   rtol=1e-5, atol=1e-5)
    assert all(step.graph is not None for step, _ in graphed._buckets.steps.values())  # replayed in the end
    for mine, theirs, saved in zip(graphed.caches, eager.caches, untouched):
        for name in ("conv", "ssm", "k", "v"):
            if hasattr(mine, name):
                torch.testing.assert_close(getattr(mine, name), getattr(theirs, name), rtol=1e-5, atol=1e-5)
                assert torch.equal(getattr(mine, name)[7], saved[name])  # slot 7 was never prefilled
