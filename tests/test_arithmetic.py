"""The arithmetic task: problems, traces that reach the right value, answers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nano.arithmetic import Problem, answer_text, boxed, evaluate, parse, sample, trace

README_TRACE = """347+58*6-12
58*6[]
58*6|0|
5*6|4|8
*6|3|48
*6|0|348
58*[0]348
347+348-12
347+348|0|
34+34|1|5
3+3|0|95
+|0|695
695-12
695-12|0|
69-1|0|3
6-|0|83
-|0|683
683"""


def test_the_worked_example():
    problem = parse("What is 347 + 58 * 6 - 12?")
    assert problem == Problem((347, 58, 6, 12), ("+", "*", "-"))
    assert problem.value == 683
    assert trace(problem) == README_TRACE


def test_negative_values_and_borrows():
    # 12 - 347 borrows to the end, so the trace computes 347 - 12 and negates; then -335 + 5 = -(335 - 5).
    lines = trace(parse("What is 12 - 347 + 5?")).split("\n")
    assert lines[0] == "12-347+5" and "12-347|0|" in lines and "-|1|665" in lines and "347-12|0|" in lines
    assert "-335+5" in lines and "5-335|0|" in lines
    assert lines[-1] == "-330"


def test_long_multiplication_skips_zero_digits_and_shifts():
    lines = trace(parse("What is 12 * 305?")).split("\n")
    assert lines[:2] == ["12*305", "12*305[]"]
    assert "12*30[0]60" in lines and "12*3[00]60" in lines and "60+3600|0|" in lines
    assert lines[-1] == "3660"


numbers = st.integers(0, 9999)
operators = st.sampled_from("+-*")


@settings(max_examples=500, deadline=None)
@given(st.lists(numbers, min_size=2, max_size=4), st.data())
def test_every_trace_ends_with_the_value(nums, data):
    ops = data.draw(st.lists(operators, min_size=len(nums) - 1, max_size=len(nums) - 1))
    problem = Problem(tuple(nums), tuple(ops))
    assert problem.value == eval(problem.expression)
    assert trace(problem).split("\n")[-1] == str(problem.value)
    assert parse(problem.question) == problem


def test_samples_follow_the_distribution():
    rng = random.Random(0)
    problems = [sample(rng) for _ in range(3000)]
    assert {len(p.numbers) for p in problems} == {2, 3, 4}
    assert {len(str(n)) for p in problems for n in p.numbers} == {1, 2, 3, 4}
    assert {op for p in problems for op in p.operators} == {"+", "-", "*"}


def test_evaluate_follows_precedence():
    assert evaluate("2+3*4-5") == 9
    assert evaluate("2*3*4") == 24
    assert evaluate("0-9999*9999") == -99980001


def test_answers():
    assert answer_text(-42) == "The answer is \\boxed{-42}."
    assert boxed("so \\boxed{1} no, \\boxed{-7}.") == -7
    assert boxed("no box here") is None
    with pytest.raises(ValueError, match="not an arithmetic question"):
        parse("What is love?")
