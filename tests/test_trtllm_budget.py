"""The thinking budget a TensorRT-LLM bundle carries: its processor against nano.generate, the way
TensorRT-LLM 1.2.1 calls it (tests/trtllm_standin.py), and the hook that wires it into trtllm-serve.

The rule's own cases run through both in tests/test_budget.py; here: what is particular to the
engine (repeated prefill calls, late ids, pickling) and to the server hook."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nano.budget
from scripted import A, B, CLOSE, EOS, NL, OPEN, SPACE, ScriptedModel, TrtllmScripted, bundled_budget, sequence, thinker

N, G = 10, 3


def test_the_bundled_rule_is_nano_budget_verbatim():
    package = Path(bundled_budget().__file__).parent
    assert (package / "rule.py").read_bytes() == Path(nano.budget.__file__).read_bytes()


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_repeated_prefill_calls_change_nothing(chunks):
    model = TrtllmScripted(thinker(100, newlines=[N + 1]), prefill_chunks=chunks)
    g = model.generate(budget=N, grace=G)
    assert g == ScriptedModel(thinker(100, newlines=[N + 1])).generate(budget=N, grace=G)
    prompt_calls = [c for c in model.engine.calls if c[1] == g.prompt_tokens]
    assert len(prompt_calls) == chunks  # each prefill chunk called with the prompt alone
    assert {c[2] for c in model.engine.calls} == {(1, 1, model.config.vocab_size)}
    assert len(model.engine.calls) == chunks - 1 + len(g.token_ids)  # then once per sampled token


def test_ids_arriving_a_step_late_are_refused_not_cut_late():
    # TensorRT-LLM's overlap scheduler appends each token a step late; the rule would then cut a token
    # late, which the processor notices at the first forced token.
    with pytest.raises(RuntimeError, match="disable_overlap_scheduler: true"):
        TrtllmScripted(thinker(100), overlap=True).generate(budget=N, grace=G)


def test_late_ids_that_never_meet_a_forced_token_pass_unchanged():
    g = TrtllmScripted(thinker(5), overlap=True).generate(budget=None)
    assert g == ScriptedModel(thinker(5)).generate(budget=None)


def test_one_processor_keeps_each_request_apart():
    ThinkingBudget = bundled_budget().ThinkingBudget
    processor = ThinkingBudget(2, 0)
    open_prompt = [5, OPEN, NL]
    for req_id in (1, 2):
        logits = torch.zeros(1, 1, 300)
        processor(req_id, logits, [open_prompt], None, None)
    logits = torch.zeros(1, 1, 300)
    processor(1, logits, [open_prompt + [A, A]], None, None)  # request 1 spent its budget
    assert torch.isinf(logits).sum() == 299 and logits[0, 0, CLOSE] == 0
    logits = torch.zeros(1, 1, 300)
    processor(2, logits, [open_prompt + [A]], None, None)  # request 2 has not: only <think> is barred
    assert torch.isinf(logits).sum() == 1 and torch.isinf(logits[0, 0, OPEN])
    assert processor.state(1)["budget_hit"] and not processor.state(2)["budget_hit"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: TensorRT-LLM hands the processor CUDA logits")
def test_the_processor_on_cuda_logits_gives_what_nano_generate_gives():
    scripts = [thinker(100, newlines=[N + 1]), thinker(4, answer_len=30), sequence([A, A, CLOSE, NL, B, OPEN, A, A])]
    for script in scripts:
        for budget, grace in [(N, G), (0, None), (None, None), (3, 0)]:
            on_gpu = TrtllmScripted(script, logits_device="cuda").generate(budget=budget, grace=grace)
            assert on_gpu == ScriptedModel(script).generate(budget=budget, grace=grace)


@pytest.mark.parametrize("value", [-1, 1.5, "ten", True])
def test_bad_budgets_are_refused_by_name(value):
    ThinkingBudget = bundled_budget().ThinkingBudget
    with pytest.raises(ValueError, match=rf"budget must be a whole number .* got {value!r}"):
        ThinkingBudget(value)
    with pytest.raises(ValueError, match=rf"grace must be a whole number .* got {value!r}"):
        ThinkingBudget(10, value)


proposal = st.sampled_from([A] * 6 + [B, SPACE, NL, NL, OPEN, CLOSE, EOS])


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(proposal, min_size=1, max_size=60), budget=st.one_of(st.none(), st.integers(0, 20)),
       grace=st.one_of(st.none(), st.integers(0, 6)), think=st.booleans(), chunks=st.integers(1, 3))
def test_any_proposals_give_what_nano_generate_gives(tokens, budget, grace, think, chunks):
    settings_ = dict(budget=budget, grace=grace, think=think, max_new_tokens=70)
    through_engine = TrtllmScripted(sequence(tokens), prefill_chunks=chunks).generate(**settings_)
    assert through_engine == ScriptedModel(sequence(tokens)).generate(**settings_)


# --- the trtllm-serve hook, against a stand-in for tensorrt_llm.serve.openai_protocol ---


class _SamplingParams:
    def __init__(self, logits_processor=None):
        self.logits_processor = logits_processor


class _ChatCompletionRequest:
    """As in 1.2.1's openai_protocol: chat_template_kwargs is a field; to_sampling_params builds
    SamplingParams without a logits processor (its arguments vary between releases)."""

    def __init__(self, chat_template_kwargs=None):
        self.chat_template_kwargs = chat_template_kwargs

    def to_sampling_params(self, vocab_size=32000, gather_generation_logits=False, reasoning_parser=None, backend=None):
        return _SamplingParams()


@pytest.fixture
def hook(monkeypatch):
    bundled_budget()  # nanokit_budget importable, as serve.sh's PYTHONPATH makes it
    from export.trtllm_budget import BUNDLED

    fake = types.ModuleType("tensorrt_llm")
    serve = types.ModuleType("tensorrt_llm.serve")
    protocol = types.ModuleType("tensorrt_llm.serve.openai_protocol")
    protocol.ChatCompletionRequest = type("ChatCompletionRequest", (_ChatCompletionRequest,), {})
    fake.serve, serve.openai_protocol = serve, protocol
    for name, module in [("tensorrt_llm", fake), ("tensorrt_llm.serve", serve), ("tensorrt_llm.serve.openai_protocol", protocol)]:
        monkeypatch.setitem(sys.modules, name, module)
    module = types.ModuleType("nanokit_serve_hook")
    exec(compile((BUNDLED / "serve_hook.py").read_text(), "nanokit_serve_hook/__init__.py", "exec"), module.__dict__)
    monkeypatch.delenv("THINKING_BUDGET", raising=False)
    monkeypatch.delenv("THINKING_GRACE", raising=False)
    return protocol.ChatCompletionRequest, module


def test_the_hook_attaches_a_budget_a_request_asks_for(hook):
    Request, module = hook
    ThinkingBudget = bundled_budget().ThinkingBudget
    params = Request({"thinking_budget": 64, "thinking_grace": 4}).to_sampling_params(131072, False, "nano-v3", "pytorch")
    (processor,) = params.logits_processor
    assert isinstance(processor, ThinkingBudget) and (processor.budget, processor.grace) == (64, 4)
    assert Request().to_sampling_params().logits_processor is None  # no budget asked: nothing attached
    assert Request({"enable_thinking": False}).to_sampling_params().logits_processor is None
    module.install(Request)  # installing twice wraps once
    assert len(Request({"thinking_budget": 8}).to_sampling_params().logits_processor) == 1


def test_the_hook_takes_the_servers_default_and_refuses_bad_values(hook, monkeypatch):
    Request, _ = hook
    monkeypatch.setenv("THINKING_BUDGET", "128")
    (processor,) = Request().to_sampling_params().logits_processor
    assert (processor.budget, processor.grace) == (128, None)
    (processor,) = Request({"thinking_budget": 0}).to_sampling_params().logits_processor
    assert processor.budget == 0  # the request's own value wins, 0 included
    with pytest.raises(ValueError, match=r"thinking_budget must be a whole number .* got '-3'"):
        Request({"thinking_budget": "-3"}).to_sampling_params()
    with pytest.raises(ValueError, match=r"thinking_grace must be a whole number .* got 2.5"):
        Request({"thinking_budget": 10, "thinking_grace": 2.5}).to_sampling_params()
