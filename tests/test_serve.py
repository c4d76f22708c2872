"""`nanokit serve` through the official `openai` client, as a user would use it: models, chat completions
with and without streaming (reasoning apart from the answer), completions, the per-request thinking
budget, requests the server refuses, and concurrent requests batched without mixing their answers;
each with continuous batching (the engine) and static batching. Then what only the engine does: a
request joining a running batch, a slot freed when its client leaves, malformed requests beside
running ones, 429 past the queue, and the prefix cache."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import running

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import nano  # noqa: E402
from demos.workstation.server import create_app  # noqa: E402

QUESTIONS = ["What is 12 + 7?", "What is 345 - 67?", "What is 8 * 9 + 1?", "What is 1000 - 1?"]


@pytest.fixture(scope="module")
def model():
    return nano.load("nano-tiny", device="cpu")


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(request, model):
    app = create_app(model, "nano-tiny", max_batch=4, default_max_tokens=256, batching=request.param)
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
        (dict(messages=[{"role": "user", "content": "x " * 4500}]), "messages"),  # past the context of 8192
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
    before = app.state.batcher.stats().get("batches", 0)

    def ask(q):
        reply = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": q}])
        return q, reply.choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, QUESTIONS * 2))
    assert all(answer == expected[q] for q, answer in answers)
    stats = app.state.batcher.stats()
    assert stats["largest_batch"] > 1
    if stats["batching"] == "static":
        assert stats["batches"] - before < len(answers)
    else:  # where the worker's time went: the engine's steps (their waits for the device among them), the rest
        assert stats["engine"]["step_s"] >= stats["engine"]["device_wait_s"] >= 0
        assert stats["engine"]["step_s"] > 0 and stats["outside_step_s"] > 0


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


LONG = [{"role": "user", "content": "What is 9876 * 5432 * 1234 - 987?"}]


@pytest.fixture(scope="module")
def engine_server(model):
    app = create_app(model, "nano-tiny", max_batch=2, default_max_tokens=256, max_waiting=2, prefix_cache=1 << 26)
    with running(app) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), app


def _stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats") as reply:
        return json.load(reply)


def _post(url: str, body) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, dict(reply.headers), json.load(reply)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.load(e)


def test_a_request_joins_a_running_batch_instead_of_waiting_for_it(engine_server, model):
    url, client, _ = engine_server
    long = client.chat.completions.create(model="nano-tiny", messages=LONG, stream=True, max_tokens=1500)
    next(iter(long))
    short = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert "\\boxed{19}" in short.choices[0].message.content
    assert _stats(url)["active"] == 1  # the long one was still decoding when the short one had finished
    long.close()


def test_a_client_that_leaves_frees_its_slot_at_once(engine_server):
    url, client, _ = engine_server
    stream = client.chat.completions.create(model="nano-tiny", messages=LONG, stream=True, max_tokens=2000)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert _stats(url)["active"] == 1
    stream.close()
    deadline = time.perf_counter() + 5
    while _stats(url)["active"] and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert _stats(url)["active"] == 0  # freed within a few steps, not at the end of its 2000 tokens


def test_malformed_requests_beside_running_ones_are_refused_alone(engine_server, model):
    url, client, _ = engine_server
    expected = nano.generate(model, QUESTIONS[1], budget=8, max_new_tokens=256)
    answers = []

    def run():
        reply = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                               extra_body={"thinking_budget": 8}, stream=True)
        answers.append("".join(c.choices[0].delta.content or "" for c in reply if c.choices))

    thread = threading.Thread(target=run)
    thread.start()
    bad = [
        (b"{not json", "body"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinking_budget": "lots"}, "thinking_budget"),
        ({"messages": "hi"}, "messages"),
    ]
    for body, field in bad:
        status, _, reply = _post(url, body)
        assert status == 400 and reply["error"]["param"] == field, (body, reply)
    thread.join()
    assert len(answers) == 1 and answers[0].strip() == expected.answer.strip()


def test_past_the_queue_the_server_answers_429_with_a_retry_hint(engine_server, model):
    url, _, app = engine_server
    body = {"messages": LONG, "max_tokens": 300}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _post(url, body), range(8)))
    statuses = sorted(status for status, _, _ in replies)
    assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for status, headers, reply in replies:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "busy" in reply["error"]["message"]
            assert reply["error"]["type"] == "rate_limit_error"
    answers = {reply["choices"][0]["message"]["content"] for status, _, reply in replies if status == 200}
    assert len(answers) == 1  # every accepted request got the same, whole answer
    assert _stats(url)["refused"] == statuses.count(429)


def test_a_shared_system_prompt_hits_the_prefix_cache(engine_server, model):
    url, client, _ = engine_server
    # Long enough for the engine to keep its state (prefixes under 256 tokens cost less to prefill again).
    system = {"role": "system", "content": " ".join(["You work out arithmetic step by step and put the result in a box."]
                                                    * 5)}
    before = _stats(url)["prefix_cache"]
    for q in QUESTIONS:
        reply = client.chat.completions.create(model="nano-tiny", messages=[system, {"role": "user", "content": q}],
                                               extra_body={"thinking_budget": 16})
        local = nano.generate(model, [system, {"role": "user", "content": q}], budget=16, max_new_tokens=256)
        assert reply.choices[0].message.content.strip() == local.answer.strip()
    after = _stats(url)["prefix_cache"]
    assert after["lookups"] - before["lookups"] == len(QUESTIONS)
    assert after["hits"] - before["hits"] == len(QUESTIONS) - 1  # all but the first


def test_usage_counts_every_generated_token_up_to_max_tokens(server):
    client, _, model = server
    local = nano.generate(model, QUESTIONS[0], budget=8, max_new_tokens=256)
    reply = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           extra_body={"thinking_budget": 8})
    assert reply.usage.completion_tokens == len(local.token_ids) > local.reasoning_tokens + local.answer_tokens
    cut = client.chat.completions.create(model="nano-tiny", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                         max_tokens=5)
    assert cut.usage.completion_tokens == 5 and cut.choices[0].finish_reason == "length"
