"""Rendering with the checkpoint's template, and the reasoning switches users type."""

from __future__ import annotations

import pytest

from nano.chat import ChatError, ChatFormat, reasoning_switch
from nano.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
EOS = [TOKENIZER.eos_token_id]
ON, OFF = "<think>\n", "<think></think>"


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(TOKENIZER, EOS)


def user(text):
    return {"role": "user", "content": text}


def system(text):
    return {"role": "system", "content": text}


def test_nano_2_format(chat):
    text, reasoning = chat.render("What is 2 + 2?")
    assert reasoning
    assert text == "<SPECIAL_10>System\n\n<SPECIAL_11>User\nWhat is 2 + 2?\n<SPECIAL_11>Assistant\n" + ON


def test_system_prompt_and_history(chat):
    messages = [
        system("You are terse."),
        user("hi"),
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\nhello"},
        user("again"),
    ]
    text, _ = chat.render(messages)
    assert text == (
        "<SPECIAL_10>System\nYou are terse.\n<SPECIAL_11>User\nhi\n<SPECIAL_11>Assistant\nhello\n<SPECIAL_12>\n"
        "<SPECIAL_11>User\nagain\n<SPECIAL_11>Assistant\n" + ON
    )


@pytest.mark.parametrize(
    "messages, think, on",
    [
        ([user("hi")], True, True),
        ([user("hi /no_think")], True, False),
        ([system("/no_think"), user("hi")], True, False),
        ([system("/no_think"), user("hi /think")], True, True),  # the last switch wins
        ([system("detailed thinking off"), user("hi")], True, False),  # Ultra's switch, honoured on Nano
        ([system("detailed thinking on"), user("hi /no_think")], True, False),
        ([user("hi /think")], False, False),  # think=False overrides what was typed
        ([system("detailed thinking on"), user("hi")], False, False),
    ],
)
def test_reasoning_switches(chat, messages, think, on):
    text, reasoning = chat.render(messages, think=think)
    assert reasoning is on
    assert text.endswith(ON if on else OFF)
    visible = text.replace("</think>", "")
    assert "/think" not in visible and "/no_think" not in visible and "detailed thinking" not in visible


def test_switch_detection():
    assert reasoning_switch([user("x")]) is None
    assert reasoning_switch([user("earlier I wrote <think>a</think> and /thinking")]) is None
    assert reasoning_switch([user("(/no_think)")]) is False
    assert reasoning_switch([system("You are helpful. /no_think"), user("x")]) is False
    assert reasoning_switch([{"role": "assistant", "content": "/no_think"}]) is None  # only system and user turns


def test_ultra_style_writes_the_system_prompt():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = ChatFormat(tokenizer, EOS, style="ultra")
    assert chat.render("hi")[0] == "<system>detailed thinking on<user>hi<assistant>"
    assert chat.render("hi", think=False)[0] == "<system>detailed thinking off<user>hi<assistant>"
    assert chat.render([system("Be brief. /no_think"), user("hi")])[0] == (
        "<system>Be brief.\ndetailed thinking off<user>hi<assistant>"
    )


def test_generic_style_passes_enable_thinking():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>\n{% endif %}"
    )
    chat = ChatFormat(tokenizer, EOS)
    assert chat.style == "generic"
    assert chat.render("hi")[0] == "hi<think>\n"
    assert chat.render("hi /no_think")[0] == "hi<think></think>"


def test_tokens_the_controller_needs(chat):
    think = chat.think
    assert TOKENIZER.decode([think.open]) == "<think>" and TOKENIZER.decode([think.close]) == "</think>"
    assert TOKENIZER.decode(list(think.close_sequence)) == "</think>\n"
    assert think.eos == tuple(EOS)
    ends = {TOKENIZER.decode([i]) for i in chat.line_end_ids.tolist()}
    assert ends == {"\n"}  # a byte-level vocabulary has one line-ending token


def test_unknown_style():
    with pytest.raises(ChatError, match="unknown chat style 'qwen'"):
        ChatFormat(TOKENIZER, EOS, style="qwen")


def test_no_end_token():
    with pytest.raises(ChatError, match="no end-of-sequence token"):
        ChatFormat(TOKENIZER, [None])
