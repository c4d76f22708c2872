"""`nanokit serve` through the official `openai` client, as a user would use it: models, chat completions
with and without streaming (reasoning apart from the answer), completions, the per-request thinking
budget, requests the server refuses, and concurrent requests batched without mixing their answers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import running

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import nano  # noqa: E402
from demos.workstation.server import create_app  # noqa: E402

QUESTIONS = ["What is 12 + 7?", "What is 345 - 67?", "What is 8 * 9 + 1?", "What is 1000 - 1?"]


@pytest.fixture(scope="module")
def server():
    model = nano.load("nano-tiny", device="cpu")
    app = create_app(model, "nano-tiny", max_batch=4, default_max_tokens=256)
    with running(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), app, model


def test_models_and_a_chat_completion_with_its_reasoning_apart(server):
    client, _, model = server
    assert [m.id for m in client.models.list().data] == ["nano-tiny"]
    reply = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[0]}])
    message = reply.choices[0].message
    assert "\\boxed{19}" in message.content and "</think>" not in message.content
    assert message.reasoning_content and "<think>" not in message.reasoning_content
    local = nano.generate(model, QUESTIONS[0], max_new_tokens=256)
    assert (message.reasoning_content.strip(), message.content.strip()) == (local.reasoning.strip(), local.answer.strip())
    assert reply.usage.completion_tokens_details.reasoning_tokens == local.reasoning_tokens


def test_streaming_and_the_thinking_budget(server):
    client, _, model = server
    stream = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            stream=True, extra_body={"thinking_budget": 8})
    reasoning = content = ""
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    local = nano.generate(model, QUESTIONS[1], budget=8, max_new_tokens=256)
    assert local.budget_hit and (reasoning.strip(), content.strip()) == (local.reasoning.strip(), local.answer.strip())
    assert finish == "stop"
    nvext = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           extra_body={"nvext": {"max_thinking_tokens": 8}})
    assert nvext.choices[0].message.content.strip() == local.answer.strip()
    template = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                              extra_body={"chat_template_kwargs": {"thinking_budget": 8}})
    assert template.choices[0].message.content.strip() == local.answer.strip()
    disabled = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert not disabled.choices[0].message.reasoning_content
    off = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                         extra_body={"thinking_budget": 0})
    assert not off.choices[0].message.reasoning_content and off.usage.completion_tokens_details.reasoning_tokens == 0


def test_completions(server):
    client, _, _ = server
    reply = client.completions.create(model="nano-tiny", prompt=QUESTIONS[2], max_tokens=256)
    assert "\\boxed{73}" in reply.choices[0].text


def test_invalid_requests_get_a_4xx_naming_the_field(server):
    client, _, _ = server
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "user", "content": "hi"}], temperature=3), "temperature"),
        (dict(messages=[{"role": "user", "content": "hi"}], extra_body={"thinking_budget": -1}), "thinking_budget"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0]"),
        (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0), "max_tokens"),
    ]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="nano-tiny", **kwargs)
        assert caught.value.body["param"] == field and caught.value.body["message"].startswith(field)
    with pytest.raises(openai.NotFoundError, match="'gpt-9' is not served here"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_concurrent_requests_are_batched_and_not_mixed_up(server):
    client, app, model = server
    expected = {q: nano.generate(model, q, max_new_tokens=256).answer.strip() for q in QUESTIONS}
    before = app.state.batcher.batches

    def ask(q):
        reply = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": q}])
        return q, reply.choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, QUESTIONS * 2))
    assert all(answer == expected[q] for q, answer in answers)
    assert app.state.batcher.largest > 1 and app.state.batcher.batches - before < len(answers)


def test_a_client_that_leaves_mid_stream_frees_the_worker(server):
    client, app, model = server
    long = [{"role": "user", "content": "What is 9876 * 5432 * 1234 - 987?"}]
    stream = client.chat.completions.create(model="nano-tiny", messages=long, stream=True, max_tokens=2000)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away after a few tokens
    began = time.perf_counter()
    short = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           max_tokens=256)
    waited = time.perf_counter() - began
    alone = time.perf_counter()
    nano.generate(model, long, max_new_tokens=2000)
    full = time.perf_counter() - alone
    assert "\\boxed{19}" in short.choices[0].message.content
    assert waited < full  # the next request did not wait for the abandoned generation to run its course
