"""The thinking-budget controller at exact token positions, against a scripted model.

Most tests run twice: through `nano.generate`, and through the logits processor a TensorRT-LLM
bundle carries, called by a stand-in for TensorRT-LLM 1.2.1's engine loop (`Scripted` below)."""

from __future__ import annotations

import pytest

from nano.budget import default_grace
from scripted import A, B, CLOSE, EOS, NL, OPEN, TOOL_CLOSE, TOOL_OPEN, X, ScriptedModel, TrtllmScripted, sequence, thinker

N, G = 10, 3


@pytest.fixture(params=["nano.generate", "tensorrt-llm processor"])
def Scripted(request):
    """The scripted model through nano.generate, or through TensorRT-LLM's processor (two prefill chunks)."""
    return ScriptedModel if request.param == "nano.generate" else TrtllmScripted


def test_default_grace_is_ten_percent_and_at_least_one():
    assert [default_grace(b) for b in (0, 1, 9, 10, 19, 100, 1000)] == [1, 1, 1, 1, 1, 10, 100]


def test_closes_after_first_newline_inside_the_window(Scripted):
    # Newlines at reasoning positions 3 (before the budget: ignored) and N + 1 (inside the window).
    m = Scripted(thinker(100, newlines=[3, N + 1]))
    g = m.generate(budget=N, grace=G)
    assert g.reasoning_tokens == N + 2
    assert g.budget_hit
    assert g.token_ids[: N + 4] == [A, A, A, NL] + [A] * (N - 3) + [NL, CLOSE, NL]
    assert g.token_ids[N + 4 :] == [B] * 4 + [EOS]
    assert g.answer == "bbbb" and g.answer_tokens == 4


def test_newline_at_exactly_the_budget_closes_at_the_budget(Scripted):
    m = Scripted(thinker(100, newlines=[N - 1]))
    g = m.generate(budget=N, grace=G)
    assert g.reasoning_tokens == N
    assert g.token_ids[N - 1 : N + 2] == [NL, CLOSE, NL]


def test_newline_on_the_last_grace_token_closes_there(Scripted):
    m = Scripted(thinker(100, newlines=[N + G - 1]))
    g = m.generate(budget=N, grace=G)
    assert g.reasoning_tokens == N + G
    assert g.token_ids[N + G - 1 : N + G + 2] == [NL, CLOSE, NL]


def test_without_a_newline_closes_at_exactly_budget_plus_grace(Scripted):
    m = Scripted(thinker(100))
    g = m.generate(budget=N, grace=G)
    assert g.reasoning_tokens == N + G
    assert g.token_ids[: N + G + 2] == [A] * (N + G) + [CLOSE, NL]
    assert g.reasoning == "a" * (N + G)


@pytest.mark.parametrize("budget", [1, 5, 17, 64])
@pytest.mark.parametrize("grace", [None, 0, 1, 7])
def test_never_budget_plus_grace_plus_one(Scripted, budget, grace):
    g = Scripted(thinker(1000)).generate(budget=budget, grace=grace, max_new_tokens=2000)
    limit = budget + (default_grace(budget) if grace is None else grace)
    assert g.reasoning_tokens == limit
    assert g.token_ids[limit] == CLOSE


def test_model_closing_before_the_budget_is_left_alone_and_its_answer_is_not_counted(Scripted):
    # Bug seen elsewhere: counting continued into the answer and cut it. A 60-token answer after
    # 4 reasoning tokens, with budget 10 and grace 3: nothing may be forced.
    m = Scripted(thinker(4, answer_len=60))
    g = m.generate(budget=N, grace=G)
    assert not g.budget_hit
    assert g.reasoning_tokens == 4
    assert g.answer_tokens == 60
    assert g.token_ids == [A] * 4 + [CLOSE] + [B] * 60 + [EOS]


def test_second_think_block_after_the_budget_is_spent_is_closed_at_once(Scripted):
    # Bug seen elsewhere: the budget was not applied again to a second <think> block.
    def script(history):
        if CLOSE not in history:
            return A
        after = history[history.index(CLOSE) + 1 :]
        if after.count(B) < 2:
            return B
        if OPEN not in after:
            return OPEN
        return A if after.count(A) < 50 else EOS

    g = Scripted(script).generate(budget=N, grace=G)
    assert g.reasoning_tokens == N + G
    assert g.token_ids[: N + G + 2] == [A] * (N + G) + [CLOSE, NL]
    rest = g.token_ids[N + G + 2 :]
    assert rest[:6] == [B, B, OPEN, CLOSE, NL, A]  # reopened, closed with no reasoning token inside
    assert g.token_ids.count(CLOSE) == 2


def test_budget_counts_all_think_blocks_of_a_response_together(Scripted):
    def script(history):
        closes = history.count(CLOSE)
        if closes == 0:
            return A if len(history) < 4 else CLOSE  # first block: 4 tokens, closed by the model
        if closes == 1:
            return B if history[-1] == CLOSE else (OPEN if OPEN not in history else A)
        return B if history.count(B) < 3 else EOS

    g = Scripted(script).generate(budget=N, grace=G)
    second = N + G - 4
    assert g.token_ids == [A] * 4 + [CLOSE, B, OPEN] + [A] * second + [CLOSE, NL, B, B, EOS]
    assert g.reasoning_tokens == N + G and g.budget_hit
    assert g.reasoning == "a" * (N + G) and g.answer == "bbb" and g.answer_tokens == 3


def test_second_think_block_under_budget_continues_the_count(Scripted):
    tokens = [A] * 4 + [CLOSE, B, OPEN] + [A] * 40
    g = Scripted(sequence(tokens)).generate(budget=N, grace=G)
    assert g.reasoning_tokens == N + G
    assert g.token_ids[:7] == [A] * 4 + [CLOSE, B, OPEN]
    assert g.token_ids[7 : 7 + N + G - 4] == [A] * (N + G - 4)
    assert g.token_ids[7 + N + G - 4 : 7 + N + G - 2] == [CLOSE, NL]


def test_budget_zero_turns_reasoning_off_and_closes_a_block_the_model_opens(Scripted):
    m = Scripted(sequence([B, OPEN, A, A, B]))
    g = m.generate(budget=0)
    assert g.reasoning_tokens == 0
    assert g.token_ids[:4] == [B, OPEN, CLOSE, NL]
    assert g.budget_hit


def test_budget_zero_renders_the_empty_think_block():
    m = ScriptedModel(sequence([B, B]))
    text, reasoning = m.chat.render("Q?", think=False)
    assert text.endswith("<think></think>") and not reasoning
    g = m.generate(budget=0)
    assert g.answer == "bb" and g.reasoning == "" and not g.budget_hit


def test_think_false_is_reasoning_off_whatever_the_budget(Scripted):
    g = Scripted(sequence([OPEN, A, A])).generate(budget=50, think=False)
    assert g.token_ids[:3] == [OPEN, CLOSE, NL]
    assert g.reasoning_tokens == 0


def test_no_budget_never_forces(Scripted):
    g = Scripted(thinker(300)).generate(budget=None, max_new_tokens=1000)
    assert not g.budget_hit and g.reasoning_tokens == 300


def test_grace_zero_cuts_at_exactly_the_budget(Scripted):
    # Bug seen elsewhere: an off-by-one letting N + 1 tokens through.
    for budget in (1, 2, 10, 33):
        g = Scripted(thinker(1000)).generate(budget=budget, grace=0)
        assert g.reasoning_tokens == budget
        assert g.token_ids[budget] == CLOSE


def test_budget_applies_with_default_sampling_settings(Scripted):
    # Bug seen elsewhere: the budget was skipped unless some penalty or sampling setting was given.
    g = Scripted(thinker(1000)).generate(budget=N)
    assert g.budget_hit and g.reasoning_tokens == N + default_grace(N)


def test_budget_applies_when_sampling():
    g = ScriptedModel(thinker(1000)).generate(budget=N, grace=G, temperature=0.7, top_p=0.9, seed=1)
    assert g.budget_hit and g.reasoning_tokens <= N + G


def test_no_duplicate_close_after_a_forced_close(Scripted):
    # The model wants to close on its own right after being cut off: it may not close twice.
    def script(history):
        if CLOSE not in history:
            return A
        return CLOSE if history.count(X) < 2 else EOS

    g = Scripted(script).generate(budget=N, grace=G)
    assert g.token_ids.count(CLOSE) == 1
    assert "</think>" not in g.answer
    assert g.token_ids[N + G :] == [CLOSE, NL, X, X, EOS]  # the sampler fell back to the next choice


def test_never_forces_into_a_tool_call_in_the_answer(Scripted):
    call = [TOOL_OPEN] + [A] * 40 + [TOOL_CLOSE]
    g = Scripted(sequence([A, A, CLOSE, NL] + call)).generate(budget=5, grace=1)
    assert not g.budget_hit
    assert g.token_ids == [A, A, CLOSE, NL] + call + [EOS]
    assert g.answer == "<TOOLCALL>" + "a" * 40 + "</TOOLCALL>"


def test_forced_close_leaves_no_partial_tag():
    # Bug seen elsewhere: part of `</think>` left in the content. The model writes only "a", "b" and
    # newlines, so any "<", "/" or ">" in the text would be a piece of a tag.
    for budget, grace in [(N, G), (1, 0), (7, 2)]:
        whole = ScriptedModel(thinker(100, newlines=[N + 1])).generate(budget=budget, grace=grace)
        stream = ScriptedModel(thinker(100, newlines=[N + 1])).generate(budget=budget, grace=grace, stream=True)
        events = list(stream)
        assert whole.budget_hit and stream.result == whole
        assert not any(c in e.text for e in events for c in "</>")
        assert not any(c in whole.reasoning + whole.answer for c in "</>")
        kinds = [e.kind for e in events]
        assert kinds == sorted(kinds, key=["reasoning", "answer"].index)  # all reasoning, then all answer


def test_eos_inside_reasoning_ends_the_response(Scripted):
    g = Scripted(sequence([A, A, EOS])).generate(budget=N)
    assert g.token_ids == [A, A, EOS] and g.finish_reason == "eos"
    assert g.reasoning == "aa" and g.answer == ""


def test_max_new_tokens_stops_mid_reasoning(Scripted):
    g = Scripted(thinker(100)).generate(budget=None, max_new_tokens=7)
    assert g.token_ids == [A] * 7 and g.finish_reason == "length"


def test_one_prefill_then_one_token_per_step_even_when_the_budget_cuts():
    m = ScriptedModel(thinker(100))
    g = m.generate(budget=N, grace=G)
    assert g.budget_hit
    assert m.prefills == 1
    assert m.steps == len(g.token_ids) - 1  # the last token needs no step after it


def test_batch_rows_hit_their_budgets_independently(Scripted):
    budgets = [3, None, 0, 10]
    m = Scripted(thinker(20, answer_len=3))
    batch = m.generate(["Q?"] * 4, budget=budgets, grace=[0, None, None, 2])
    alone = [Scripted(thinker(20, answer_len=3)).generate(budget=b, grace=g) for b, g in zip(budgets, [0, None, None, 2])]
    assert batch == alone
    assert [g.reasoning_tokens for g in batch] == [3, 20, 0, 12]
    assert [g.budget_hit for g in batch] == [True, False, False, True]
