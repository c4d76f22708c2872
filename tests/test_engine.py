"""The continuous-batching engine (nano/engine.py) on the CPU: every request through it equals the
same request alone through `nano.generate`, however requests join, wait, leave and share slots."""

from __future__ import annotations

import pytest
import torch

import nano
from nano.engine import Engine, sample_rows
from nano.runtime import batch_width

PROMPTS = [
    "What is 347 + 58 * 6 - 12?",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    "A much longer question, so that its prompt takes several prefill chunks: why is the sky blue at noon?",
    "2 + 2?",
    "Tell me about Mamba layers.",
]
BUDGETS = [6, None, 0, 3, 12]


@pytest.fixture(scope="module")
def fast(tiny_dir):
    """The tiny model through the fast runtime, which the engine runs (the same arithmetic as alone)."""
    model = nano.load(tiny_dir, device="cpu")
    model.runtime = "fast"
    return model


@pytest.fixture(scope="module")
def alone(fast):
    return [nano.generate(fast, p, budget=b, max_new_tokens=24) for p, b in zip(PROMPTS, BUDGETS)]


def test_requests_through_the_engine_equal_each_alone(fast, alone):
    # Three slots for five requests: two wait and take freed slots; a chunk of 8 prompt tokens
    # makes the long prompts prefill over several steps while the others decode past them.
    engine = Engine(fast, slots=3, context=256, prefill_chunk=8)
    requests = [engine.submit(p, budget=b, max_new_tokens=24) for p, b in zip(PROMPTS, BUDGETS)]
    engine.step()
    assert [r.state for r in requests].count("waiting") == 2
    engine.run()
    assert [r.result for r in requests] == alone
    assert all(r.state == "finished" and r.slot is None for r in requests) and engine.active() == 0
    assert engine.counts["step_s"] > engine.counts["device_wait_s"] >= 0


def test_prompts_admitted_together_are_prefilled_as_one_batch_and_equal_each_alone(fast, alone, monkeypatch):
    engine = Engine(fast, slots=5, context=256, prefill_rows=3)
    batches = []
    prefill_slots = engine.runtime.prefill_slots
    monkeypatch.setattr(engine.runtime, "prefill_slots",
                        lambda prompts, slots: batches.append(list(slots)) or prefill_slots(prompts, slots))
    requests = [engine.submit(p, budget=b, max_new_tokens=24) for p, b in zip(PROMPTS, BUDGETS)]
    engine.run()
    assert batches == [[0, 1, 2], [3, 4]]  # at most three prompts a call
    assert [r.result for r in requests] == alone


def test_with_prefill_buckets_every_whole_prompt_goes_through_them_and_equals_it_alone(fast, alone, monkeypatch):
    """Bucketed (on a GPU, graphed) prefills, on the CPU run eagerly: a prompt alone goes through a
    bucket too, rather than straight into its slot; a prompt in chunks never does."""
    engine = Engine(fast, slots=3, context=256, prefill_rows=2, prefill_buckets=True)
    batches, prefill_slots = [], engine.runtime.prefill_slots
    monkeypatch.setattr(engine.runtime, "prefill_slots",
                        lambda prompts, slots: batches.append(list(slots)) or prefill_slots(prompts, slots))
    first = engine.submit(PROMPTS[0], budget=BUDGETS[0], max_new_tokens=24)
    engine.step()
    assert batches == [[0]] and first.state == "decoding"
    requests = [first] + [engine.submit(p, budget=b, max_new_tokens=24) for p, b in zip(PROMPTS[1:], BUDGETS[1:])]
    engine.run()
    assert [r.result for r in requests] == alone
    assert sum(map(len, batches)) == len(PROMPTS)
    assert not Engine(fast, slots=3, context=256, prefill_rows=2).runtime.prefill_bucket(1, 5)  # CPU default: none

    chunked = Engine(fast, slots=2, context=256, prefill_chunk=8, prefill_buckets=True)
    monkeypatch.setattr(chunked.runtime, "prefill_slots", lambda *args: pytest.fail("a chunked prompt in a bucket"))
    request = chunked.submit(PROMPTS[2], budget=BUDGETS[2], max_new_tokens=24)
    chunked.run()
    assert request.result == alone[2]


def test_while_others_decode_a_prefill_with_room_waits_one_step_for_company(fast, alone, monkeypatch):
    def engine_logging_batches(prefill_rows):
        engine = Engine(fast, slots=4, context=256, prefill_rows=prefill_rows)
        batches, prefill_slots = [], engine.runtime.prefill_slots
        monkeypatch.setattr(engine.runtime, "prefill_slots",
                            lambda prompts, slots: batches.append(list(slots)) or prefill_slots(prompts, slots))
        first = engine.submit(PROMPTS[0], budget=BUDGETS[0], max_new_tokens=24)
        engine.step()  # nothing decodes yet: no wait
        assert first.state == "decoding"
        return engine, batches, first

    engine, batches, first = engine_logging_batches(prefill_rows=3)
    one = engine.submit(PROMPTS[3], budget=BUDGETS[3], max_new_tokens=24)
    engine.step()  # admitted, and the decode goes on without it
    assert one.state == "prefilling" and one.prefilled == 0 and engine.counts["prefill_calls"] == 1
    two = engine.submit(PROMPTS[4], budget=BUDGETS[4], max_new_tokens=24)
    engine.step()  # its step of waiting is over, and the prompt admitted meanwhile goes with it
    assert batches == [[one.slot, two.slot]] and one.state == two.state == "decoding"
    late = engine.submit(PROMPTS[1], budget=BUDGETS[1], max_new_tokens=24)
    engine.step()
    assert late.state == "prefilling"
    engine.step()  # no company came: it goes alone
    assert late.state == "decoding" and len(batches) == 1
    engine.run()
    assert [first.result, one.result, two.result, late.result] == [alone[0], alone[3], alone[4], alone[1]]
    assert engine.counts["prefill_calls"] == 3 and engine.counts["prompts_together"] == 2
    assert engine.counts["steps"] > engine.counts["decode_steps"] > 0

    engine, batches, first = engine_logging_batches(prefill_rows=2)
    pair = [engine.submit(PROMPTS[i], budget=BUDGETS[i], max_new_tokens=24) for i in (3, 4)]
    engine.step()  # a full batch does not wait
    assert batches == [[r.slot for r in pair]] and all(r.state == "decoding" for r in pair)
    engine.run()
    assert [r.result for r in pair] == [alone[3], alone[4]]


def test_a_batch_of_prompts_keeps_within_one_prefill_chunk_with_its_padding(fast):
    lengths = [len(fast.chat.encode(fast.chat.render(p)[0])) for p in PROMPTS[:3]]
    chunk = batch_width(max(lengths)) * 2  # room for two of the longest with their padding, not three
    engine = Engine(fast, slots=3, context=256, prefill_chunk=chunk)
    for p in PROMPTS[:3]:
        engine.submit(p, max_new_tokens=4)
    engine.step()
    assert [r is not None and r.state for r in engine.in_slot].count("decoding") == 2
    engine.run()


def test_a_request_joining_a_running_batch_equals_it_alone(fast, alone):
    engine = Engine(fast, slots=4, context=256, prefill_chunk=8)
    first = engine.submit(PROMPTS[0], budget=BUDGETS[0], max_new_tokens=24)
    while len(first.tokens) < 4:
        engine.step()
    assert first.state == "decoding" and engine.counts["padding_rows"] == 0  # slot 0 alone: bucket 1
    late = engine.submit(PROMPTS[2], budget=BUDGETS[2], max_new_tokens=24)
    engine.run()
    assert first.result == alone[0] and late.result == alone[2]
    # Late joined when first had 4 of its 24 tokens, so it decoded on alone in slot 1, in bucket 2:
    # slot 0, free by then, was those steps' padding row.
    assert engine.counts["padding_rows"] > 0


def test_a_cancelled_request_frees_its_slot_at_once_and_the_others_go_on(fast, alone):
    engine = Engine(fast, slots=2, context=256, prefill_chunk=8)
    keep = engine.submit(PROMPTS[0], budget=BUDGETS[0], max_new_tokens=24)
    leave = engine.submit(PROMPTS[4], budget=BUDGETS[4], max_new_tokens=24)
    waiting = engine.submit(PROMPTS[1], budget=BUDGETS[1], max_new_tokens=24)
    while len(leave.tokens) < 3:
        engine.step()
    slot = leave.slot
    engine.cancel(leave)
    assert leave.state == "cancelled" and engine.in_slot[slot] is None and not engine.live[slot]
    assert len(leave.result.token_ids) == len(leave.tokens) < 24
    engine.run()
    assert keep.result == alone[0] and waiting.result == alone[1]
    engine.cancel(keep)  # cancelling a finished request changes nothing
    assert keep.state == "finished"


def test_warm_up_wants_an_idle_engine_and_has_nothing_to_capture_without_graphs(fast):
    engine = Engine(fast, slots=2, context=256, prefill_chunk=8)
    assert engine.warm_up() == 0  # the CPU runs its steps eagerly: no graphs to capture
    engine.submit(PROMPTS[3], max_new_tokens=4)
    with pytest.raises(RuntimeError, match="idle engine; 0 requests are in slots and 1 waiting"):
        engine.warm_up()
    engine.step()
    with pytest.raises(RuntimeError, match="1 requests are in slots"):
        engine.warm_up()
    engine.run()
    assert engine.warm_up() == 0


def test_padding_rows_leave_every_other_slots_state_alone(fast):
    """A decode step over slots some of which are not live: those keep their Mamba state and
    their keys and values but for the scratch column, whatever the step computes for them."""
    engine = Engine(fast, slots=3, context=64)
    runtime = engine.runtime
    for cache in runtime.caches:  # states no decode step would leave as they are
        if cache is not None:
            for t in vars(cache).values():
                if t.dtype.is_floating_point and t.dim() > 1:
                    t.normal_()
    before = [None if c is None else {k: t.clone() for k, t in vars(c).items()} for c in runtime.caches]
    live = torch.tensor([True, False, True])
    positions = torch.tensor([5, engine.scratch, 9])
    runtime.step_slots(torch.tensor([3, 4, 5]), positions, live)
    for cache, saved in zip(runtime.caches, before):
        if cache is None:
            continue
        for name, tensor in vars(cache).items():
            if name in ("k", "v"):
                assert torch.equal(tensor[1, :, : engine.scratch], saved[name][1, :, : engine.scratch])
                assert not torch.equal(tensor[0, :, 5], saved[name][0, :, 5])
            elif tensor.dim() > 1:
                assert torch.equal(tensor[1], saved[name][1]), name
                assert not torch.equal(tensor[0], saved[name][0]), name


def test_sampling_is_per_request_whatever_shares_the_batch(fast):
    settings = dict(budget=5, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)
    solo = Engine(fast, slots=1, context=256)
    one = solo.generate([PROMPTS[0]], **settings)[0]
    crowd = Engine(fast, slots=4, context=256, prefill_chunk=8)
    others = [crowd.submit(p, temperature=1.0, seed=i, max_new_tokens=16) for i, p in enumerate(PROMPTS[1:4])]
    mine = crowd.submit(PROMPTS[0], **settings)
    crowd.run()
    assert mine.result == one and all(r.finished for r in others)
    assert crowd.generate([PROMPTS[0]], **{**settings, "seed": 12})[0] != one


def test_the_sampler_draws_from_the_shaped_distribution():
    """The exponential race with hashed noise: greedy at temperature 0; over many seeds, each token
    about as often as its top-p-renormalised probability."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 4000
    tiled = logits.repeat(rows, 1)
    seeds, steps = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    greedy = sample_rows(tiled.clone(), torch.zeros(rows), torch.ones(rows), seeds, steps)
    assert (greedy == 0).all()
    drawn = sample_rows(tiled.clone(), torch.ones(rows), torch.ones(rows), seeds, steps)
    assert (torch.bincount(drawn, minlength=4) / rows - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03
    nucleus = sample_rows(tiled.clone(), torch.ones(rows), torch.full((rows,), 0.75), seeds, steps)
    assert (torch.bincount(nucleus, minlength=4) / rows - torch.tensor([0.625, 0.375, 0, 0])).abs().max() < 0.03
    later = sample_rows(tiled.clone(), torch.ones(rows), torch.ones(rows), seeds, steps + 1)
    assert (later != drawn).float().mean() > 0.3  # the next step draws afresh


def test_bad_requests_are_refused_naming_the_value(fast):
    engine = Engine(fast, slots=2, context=64)
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(temperature=-1), "temperature must be a number >= 0, got -1"),
        (dict(top_p=0), "top_p must be in (0, 1], got 0"),
        (dict(budget=-3), "budget must be a non-negative integer or None, got -3"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            engine.submit("hi", **settings)
    with pytest.raises(ValueError, match="the engine's context is 64 tokens"):
        engine.submit("word " * 200)
    with pytest.raises(ValueError, match="slots must be a positive integer, got 0"):
        Engine(fast, slots=0)
    assert not engine.busy  # nothing refused was queued


SYSTEM = ("You answer questions about arithmetic and nothing else, in the worked style: one step per line, "
          "then the result in a box.")


def _conversation(question: str, history: tuple = ()) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": question}]


def test_a_shared_system_prompt_is_prefilled_once_and_answers_stay_the_same(fast):
    questions = ["What is 12 + 7?", "What is 3 * 9?", "Name a prime.", "What is 40 - 2?"]
    prompts = [_conversation(q) for q in questions]
    alone = [nano.generate(fast, p, budget=6, max_new_tokens=20) for p in prompts]
    engine = Engine(fast, slots=2, context=512, prefill_chunk=16, prefix_cache=1 << 26, prefix_min_tokens=16)
    first = engine.submit(prompts[0], budget=6, max_new_tokens=20)
    engine.run()  # the first stores the system turn's state (and the whole of its conversation)
    later = [engine.submit(p, budget=6, max_new_tokens=20) for p in prompts[1:]]
    engine.run()
    assert [r.result for r in (first, *later)] == alone
    system_turn = len(fast.chat.encode(fast.chat.turn_ends(prompts[0])[0]))
    assert first.reused == 0 and all(r.reused == system_turn for r in later)
    stats = engine.prefix.stats()
    assert stats["lookups"] == 4 and stats["hits"] == 3 and stats["tokens_reused"] == 3 * system_turn


def test_the_next_turn_of_a_conversation_starts_where_the_last_prompt_ended(fast):
    turn1 = _conversation("What is 12 + 7?")
    turn2 = _conversation("And times 2?", history=(turn1[1], {"role": "assistant", "content": "19"}))
    engine = Engine(fast, slots=2, context=512, prefill_chunk=16, prefix_cache=1 << 26, prefix_min_tokens=16)
    engine.generate([turn1], budget=4, max_new_tokens=12)
    second = engine.submit(turn2, budget=4, max_new_tokens=12)
    engine.run()
    # The first prompt's last turn end (its user turn) is stored; the second begins with it.
    assert second.reused == len(fast.chat.encode(fast.chat.turn_ends(turn1)[-1]))
    assert second.result == nano.generate(fast, turn2, budget=4, max_new_tokens=12)


def test_snapshots_past_the_capacity_evict_the_least_recently_used(fast):
    systems = [f"{SYSTEM} Variant {i} of the instructions." for i in range(3)]
    prompts = [[{"role": "system", "content": s}, {"role": "user", "content": "What is 5 + 5?"}] for s in systems]
    probe = Engine(fast, slots=1, context=512, prefix_cache=1 << 26, prefix_min_tokens=16)
    probe.generate(prompts[:1], max_new_tokens=2)
    one = max(s.bytes for s in probe.prefix.entries.values())
    engine = Engine(fast, slots=1, context=512, prefill_chunk=16, prefix_cache=2 * one,  # room for two
                    prefix_min_tokens=16)
    results = engine.generate(prompts, budget=3, max_new_tokens=10)
    assert results == [nano.generate(fast, p, budget=3, max_new_tokens=10) for p in prompts]
    stats = engine.prefix.stats()
    assert stats["evicted"] >= 1 and stats["bytes"] <= 2 * one and stats["hits"] == 0
    again = engine.submit(prompts[2], budget=3, max_new_tokens=10)  # the newest is still there
    engine.run()
    assert again.reused > 0 and again.result == results[2]


def test_a_snapshot_restored_into_another_slot_is_the_state_it_was_taken_from(fast):
    from nano.prefix_cache import restore, take

    engine = Engine(fast, slots=2, context=64)
    source, target = engine.runtime.slot(0), engine.runtime.slot(1)
    source.extend(torch.tensor([[5, 6, 7, 8, 9, 10]]), 0)
    snapshot = take(source.caches, 6, list(range(6)))
    for cache in target.caches:
        for t in ([] if cache is None else [getattr(cache, n) for n in ("conv", "ssm", "k", "v") if hasattr(cache, n)]):
            t.normal_()
    restore(target.caches, snapshot)
    for a, b in zip(source.caches, target.caches):
        if a is None:
            continue
        for name in ("conv", "ssm") if hasattr(a, "ssm") else ("k", "v"):
            x, y = getattr(a, name), getattr(b, name)
            if name in ("k", "v"):
                x, y = x[:, :, :6], y[:, :, :6]
            assert torch.equal(x, y), name


def test_the_prefix_cache_refuses_a_bad_capacity(fast):
    with pytest.raises(ValueError, match="capacity must be a number of bytes >= 0, got -1"):
        Engine(fast, slots=1, context=64, prefix_cache=-1)
