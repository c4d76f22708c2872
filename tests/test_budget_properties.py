"""Property-based tests: the tensor controller against its plain-Python twin, and the rule's invariants."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nano.budget import ANSWER, CONTROL, END, PAD, REASONING, BudgetController, BudgetRow, default_grace
from scripted import A, B, CLOSE, EOS, NL, OPEN, SPACE, TOKENIZER, X, ScriptedModel, sequence

MODEL = ScriptedModel()
THINK = MODEL.chat.think
LINE_END = MODEL.chat.line_end_ids
VOCAB = MODEL.config.vocab_size

# Mostly reasoning-like text, with tags, newlines and the end token mixed in.
token = st.sampled_from([A] * 6 + [B, SPACE, NL, NL, OPEN, CLOSE, EOS])
row = st.fixed_dictionaries(
    {
        "budget": st.one_of(st.none(), st.integers(0, 30)),
        "grace": st.one_of(st.none(), st.integers(0, 8)),
        "thinking": st.booleans(),
        "max_new": st.integers(0, 80),
        "proposals": st.lists(token, min_size=80, max_size=80),
    }
)


def run_fast(rows):
    controller = BudgetController(
        THINK,
        LINE_END,
        VOCAB,
        [r["budget"] for r in rows],
        [r["grace"] for r in rows],
        [r["thinking"] for r in rows],
        [r["max_new"] for r in rows],
    )
    tokens, kinds = [], []
    for step in range(80):
        logits = torch.zeros(len(rows), VOCAB)
        logits[:, X] = 5.0
        for i, r in enumerate(rows):
            logits[i, r["proposals"][step]] = 10.0
        controller.mask_logits(logits)
        t, k = controller.advance(logits.argmax(dim=-1))
        tokens.append(t.tolist())
        kinds.append(k.tolist())
    per_row = lambda table, i: [step[i] for step in table]  # noqa: E731
    return [(per_row(tokens, i), per_row(kinds, i), bool(controller.hit[i])) for i in range(len(rows))]


def run_spec(r):
    spec = BudgetRow(THINK, set(LINE_END.tolist()), r["budget"], r["grace"], r["thinking"], r["max_new"])
    tokens, kinds = [], []
    for proposed in r["proposals"]:
        t, k = spec.step(proposed if spec.allowed(proposed) else X)
        tokens.append(t)
        kinds.append(k)
    return tokens, kinds, spec.hit


@settings(max_examples=300, deadline=None)
@given(st.lists(row, min_size=1, max_size=4))
def test_tensor_controller_matches_the_plain_python_rule(rows):
    assert run_fast(rows) == [run_spec(r) for r in rows]


@settings(max_examples=300, deadline=None)
@given(row)
def test_rule_invariants(r):
    tokens, kinds, hit = run_spec(r)
    live = [(t, k) for t, k in zip(tokens, kinds) if k != PAD]
    ends = [i for i, (_, k) in enumerate(live) if k == END]
    assert len(live) == (ends[0] + 1 if ends else r["max_new"])

    reasoning = sum(k == REASONING for _, k in live)
    if r["budget"] is None:
        assert not hit
    else:
        grace = default_grace(r["budget"]) if r["grace"] is None else r["grace"]
        assert reasoning <= r["budget"] + grace

    # Tags alternate, starting from the prompt's state; no tag is ever doubled.
    thinking = r["thinking"]
    for t, k in live:
        if t in (OPEN, CLOSE) and k == CONTROL:
            assert t == (CLOSE if thinking else OPEN)
            thinking = not thinking
    # A control token that is not a tag is the newline of a forced close, right after its `</think>`.
    for i, (t, k) in enumerate(live):
        if k == CONTROL and t not in (OPEN, CLOSE):
            assert t == NL and live[i - 1] == (CLOSE, CONTROL)


@settings(max_examples=150, deadline=None)
@given(
    proposals=st.lists(token, min_size=1, max_size=60),
    budget=st.one_of(st.none(), st.integers(0, 20)),
    grace=st.one_of(st.none(), st.integers(0, 5)),
)
def test_streamed_text_adds_up_to_the_fields(proposals, budget, grace):
    model = ScriptedModel(sequence(proposals))
    whole = model.generate(budget=budget, grace=grace, max_new_tokens=80)
    stream = ScriptedModel(sequence(proposals)).generate(budget=budget, grace=grace, max_new_tokens=80, stream=True)
    events = list(stream)
    assert stream.result == whole
    assert "".join(e.text for e in events if e.kind == "reasoning") == whole.reasoning
    assert "".join(e.text for e in events if e.kind == "answer") == whole.answer
    assert all(e.text and "<think>" not in e.text and "</think>" not in e.text for e in events)
    # The fields hold exactly the tokens the plain-Python rule calls reasoning and answer.
    thinking = budget != 0  # the prompt opens reasoning unless the budget turns it off
    spec = run_spec(dict(budget=budget, grace=grace, thinking=thinking, max_new=80, proposals=proposals + [EOS] * 80))
    text = {kind: "".join(TOKENIZER.decode([t]) for t, k in zip(spec[0], spec[1]) if k == kind) for kind in (REASONING, ANSWER)}
    assert whole.reasoning == text[REASONING].lstrip()
    assert whole.answer == text[ANSWER].lstrip()
    assert whole.token_ids == [t for t, k in zip(spec[0], spec[1]) if k != PAD]
