"""The arithmetic task the shipped tiny model reasons about: problems, worked traces, answers.

A problem is 2 to 4 integers of up to 4 digits joined by + - * (usual precedence), asked as
"What is 347 + 58 * 6 - 12?". The answer ends with \\boxed{N}.

The trace is written for a small model with no positional encoding: every line is a state that
follows from the line above it by one local step, as a pen-and-paper column method would be
written if each step restated what is left. Digits are consumed from the right:

    347+58*6-12          the expression; the leftmost `*` goes first, then `+`/`-` left to right
    58*6[]               long multiplication: multiplicand*multiplier-left[zeros]accumulator
    58*6|0|              one-digit multiplication: digits-left*digit|carry|result
    5*6|4|8
    *6|3|48
    *6|0|348
    58*[0]348            the partial is shifted by the zeros and added to the accumulator
    347+348-12           the expression with the step's result in place
    347+348|0|           column addition: a-left+b-left|carry|result
    ...
    683                  the value

Subtraction a-b borrows column by column; if a borrow is left at the end, a < b, and the trace
computes b-a and negates it. With a negative running value -m: "-m+b" is b-m and "-m-b" is
-(m+b).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPERATORS = "+-*"
EVAL_SEED = 20261122  # the evaluation problems' seed (training uses 0 and 1)
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def expression(self) -> str:
        parts = [str(self.numbers[0])]
        for op, n in zip(self.operators, self.numbers[1:]):
            parts += [op, str(n)]
        return "".join(parts)

    @property
    def question(self) -> str:
        return "What is " + self.expression.replace("+", " + ").replace("-", " - ").replace("*", " * ") + "?"

    @property
    def value(self) -> int:
        return evaluate(self.expression)


def evaluate(expression: str) -> int:
    """The value of a +-* expression of non-negative integers, with the usual precedence."""
    terms, signs, current, sign = [], [], None, "+"
    for token in re.findall(r"\d+|[+*-]", expression):
        if token == "*":
            continue
        if token in "+-":
            terms.append(current)
            signs.append(sign)
            sign, current = token, None
            continue
        current = int(token) if current is None else current * int(token)
    terms.append(current)
    signs.append(sign)
    return sum(t if s == "+" else -t for t, s in zip(terms, signs))


def sample(rng: random.Random) -> Problem:
    """A random problem: 2 to 4 integers, each of 1 to 4 digits (equally likely), random operators."""
    count = rng.randint(2, 4)
    numbers = []
    for _ in range(count):
        digits = rng.randint(1, 4)
        numbers.append(rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1))
    return Problem(tuple(numbers), tuple(rng.choice(OPERATORS) for _ in range(count - 1)))


def parse(question: str) -> Problem:
    """The problem in a question such as "What is 347 + 58 * 6 - 12?"."""
    match = re.fullmatch(r"\s*What is ([\d+*\- ]+)\?\s*", question)
    if not match:
        raise ValueError(f"not an arithmetic question: {question!r}")
    tokens = re.findall(r"\d+|[+*-]", match.group(1))
    return Problem(tuple(int(t) for t in tokens[::2]), tuple(tokens[1::2]))


def answer_text(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}."


def boxed(text: str) -> int | None:
    """The last \\boxed{N} in a text, or None."""
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


# The column methods. Each returns its lines and the result's digits (possibly with leading zeros).


def _add(a: str, b: str, lines: list[str]) -> str:
    carry, result = 0, ""
    lines.append(f"{a}+{b}|0|")
    while a or b or carry:
        total = int(a[-1] if a else 0) + int(b[-1] if b else 0) + carry
        result, carry = str(total % 10) + result, total // 10
        a, b = a[:-1], b[:-1]
        lines.append(f"{a}+{b}|{carry}|{result}")
    return result


def _subtract(a: str, b: str, lines: list[str]) -> str:
    """a - b for non-negative a, b; a leading "-" when negative."""
    borrow, result, a0, b0 = 0, "", a, b
    lines.append(f"{a}-{b}|0|")
    while a or b:
        difference = int(a[-1] if a else 0) - int(b[-1] if b else 0) - borrow
        borrow, result = int(difference < 0), str(difference % 10) + result
        a, b = a[:-1], b[:-1]
        lines.append(f"{a}-{b}|{borrow}|{result}")
    if borrow:
        return "-" + _strip(_subtract(b0, a0, lines))
    return result


def _multiply_digit(a: str, d: str, lines: list[str]) -> str:
    carry, result = 0, ""
    lines.append(f"{a}*{d}|0|")
    while a or carry:
        product = int(a[-1] if a else 0) * int(d) + carry
        result, carry = str(product % 10) + result, product // 10
        a = a[:-1]
        lines.append(f"{a}*{d}|{carry}|{result}")
    return result


def _multiply(a: str, b: str, lines: list[str]) -> str:
    zeros, total = "", ""
    lines.append(f"{a}*{b}[]")
    while b:
        digit, b = b[-1], b[:-1]
        if digit != "0" or (not b and not total):
            partial = _strip(_multiply_digit(a, digit, lines)) + zeros
            total = partial if not total else _strip(_add(total, partial, lines))
        zeros += "0"
        lines.append(f"{a}*{b}[{zeros}]{total}")
    return total


def _strip(digits: str) -> str:
    return digits.lstrip("0") or "0"


def trace(problem: Problem) -> str:
    """The worked reasoning for a problem, one state per line, ending with the value."""
    lines = [problem.expression]
    # The expression as a list of signed tokens: numbers (digit strings) and operators.
    tokens = re.findall(r"\d+|[+*-]", problem.expression)
    negative = False  # the running value (tokens[0]) is negative
    while len(tokens) > 1:
        if "*" in tokens:
            i = tokens.index("*") - 1
            result = _strip(_multiply(tokens[i], tokens[i + 2], lines))
            tokens[i : i + 3] = [result]
        else:
            a, op, b = tokens[:3]
            if op == "+" and not negative:
                result, negative = _strip(_add(a, b, lines)), False
            elif op == "-" and not negative:
                result = _subtract(a, b, lines)
                negative = result.startswith("-")
                result = _strip(result.lstrip("-"))
            elif op == "+":  # -a + b = b - a
                result = _subtract(b, a, lines)
                negative = result.startswith("-")
                result = _strip(result.lstrip("-"))
            else:  # -a - b = -(a + b)
                result, negative = _strip(_add(a, b, lines)), True
            tokens[:3] = [result]
        lines.append(("-" if negative else "") + "".join(tokens))
    return "\n".join(lines)


def score(model, problems, budget, batch: int = 100, max_new_tokens: int = 4096, answer_room: int | None = 64) -> dict:
    """The project's own evaluation of `problems` at `budget` through `nano.generate`: accuracy (the
    answer's last \\boxed{N} is the value), how often it answered, hit the budget, and the tokens
    spent. With a budget, generation stops at budget + grace + `answer_room` tokens (room for the
    forced close and a 20-token answer, with margin; None: at `max_new_tokens` only)."""
    import time

    import nano
    from nano.budget import default_grace

    answered = hits = reasoning = answer_tokens = 0
    right = []
    if budget is not None and answer_room is not None:
        max_new_tokens = min(max_new_tokens, budget + default_grace(budget) + answer_room)
    start = time.perf_counter()
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        out = nano.generate(model, [p.question for p in chunk], budget=budget, max_new_tokens=max_new_tokens)
        for p, g in zip(chunk, out):
            value = boxed(g.answer)
            answered += value is not None
            right.append(value == p.value)
            hits += g.budget_hit
            reasoning += g.reasoning_tokens
            answer_tokens += g.answer_tokens
    n = len(problems)
    return {
        "budget": "unlimited" if budget is None else budget,
        "accuracy": sum(right) / n,
        "answered": answered / n,
        "budget_hit": hits / n,
        "mean_reasoning_tokens": reasoning / n,
        "mean_answer_tokens": answer_tokens / n,
        "seconds": round(time.perf_counter() - start, 1),
        "right": "".join("1" if r else "0" for r in right),  # per problem, for paired comparisons
    }
