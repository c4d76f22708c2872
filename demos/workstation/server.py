"""An OpenAI-compatible server for a Nemotron model with the thinking budget: `nanokit serve`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events or not),
`POST /v1/completions`. The reasoning comes back apart from the answer, as vLLM does:
`message.reasoning_content` (or `delta.reasoning_content` when streaming) and `content`. The thinking
budget is per request: `thinking_budget` (tokens of reasoning; 0 turns reasoning off), the same in
`chat_template_kwargs` (the form the TensorRT-LLM bundle's hook reads; `enable_thinking: false`
turns reasoning off), or NVIDIA's `nvext: {max_thinking_tokens}`; `thinking_grace` (top level or
in `chat_template_kwargs`) sets the window to finish a line.

Requests are batched: one worker thread takes whatever requests are waiting (up to `max_batch`, those
with the same sampling settings) and runs them as one `nano.generate` batch through the same budget
controller, streaming each row to its request. A client that disconnects stops receiving, and a
batch whose clients have all gone stops early, freeing the worker for the next one.
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at
# definition time, inside create_app.


import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nano

DONE = object()  # the end of a request's events


@dataclass
class Ticket:
    """One request waiting for, or in, a batch: its events arrive on `events`."""

    prompt: Any
    budget: int | None
    grace: int | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    loop: asyncio.AbstractEventLoop | None = None  # the server's loop, which reads `events`
    events: asyncio.Queue | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # the client disconnected
    result: Any = None
    error: str | None = None

    def key(self) -> tuple:
        return (self.temperature, self.top_p, self.seed)

    def put(self, item) -> None:
        """From the worker thread: hand an event (or DONE) to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Batcher:
    """Runs waiting requests in batches through `nano.generate` on one worker thread."""

    def __init__(self, model, max_batch: int = 8, gather_s: float = 0.01):
        self.model, self.max_batch, self.gather_s = model, max_batch, gather_s
        self.waiting: queue.Queue[Ticket] = queue.Queue()
        self.batches = 0  # batches run, and the largest, for the page and the load test
        self.largest = 0
        threading.Thread(target=self._work, daemon=True, name="nano-batcher").start()

    def submit(self, ticket: Ticket) -> Ticket:
        self.waiting.put(ticket)
        return ticket

    def _gather(self) -> list[Ticket]:
        first = self.waiting.get()
        batch, others = [first], []
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch:
            try:
                ticket = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if ticket.key() == first.key() else others).append(ticket)
        for ticket in others:  # different sampling settings: the next batch
            self.waiting.put(ticket)
        return [t for t in batch if not t.gone.is_set()]

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                continue
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                self._run(batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                for ticket in batch:
                    ticket.error = f"{type(e).__name__}: {e}"
            for ticket in batch:
                ticket.put(DONE)

    def _run(self, batch: list[Ticket]) -> None:
        first = batch[0]
        stream = nano.generate(  # a row's budget of 0 turns its reasoning off
            self.model, [t.prompt for t in batch], budget=[t.budget for t in batch], grace=[t.grace for t in batch],
            max_new_tokens=max(t.max_tokens for t in batch), temperature=first.temperature, top_p=first.top_p,
            seed=first.seed, stream=True,
        )
        for event in stream:
            ticket = batch[event.row]
            if not ticket.gone.is_set():
                ticket.put(event)
            if all(t.gone.is_set() for t in batch):
                return  # everyone left: stop here
        for ticket, result in zip(batch, stream.result):
            ticket.result = result


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), naming the field at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(name, f"must be between {low} and {high}, got {value!r}")
    return kind(value)


def parse_request(body: Any, chat: bool, default_max_tokens: int) -> Ticket:
    """A ticket from an OpenAI request body; RequestError names the field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") \
                    or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}]", "must have a role (system, user, assistant) and string content")
        prompt = messages
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt", "must be a non-empty string")
    nvext = body.get("nvext") or {}
    if not isinstance(nvext, dict):
        raise RequestError("nvext", "must be an object")
    template = body.get("chat_template_kwargs") or {}  # the form the TensorRT-LLM bundle's hook reads
    if not isinstance(template, dict):
        raise RequestError("chat_template_kwargs", "must be an object")
    budget = _number(body, "thinking_budget", None, int, 0)
    if budget is None:
        budget = _number(template, "thinking_budget", None, int, 0)
    if budget is None:
        budget = _number(nvext, "max_thinking_tokens", None, int, 0)
    if budget is None and template.get("enable_thinking") is False:
        budget = 0
    max_tokens = _number(body, "max_completion_tokens", None, int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", default_max_tokens, int, 1)
    if body.get("n", 1) != 1:
        raise RequestError("n", f"only 1 is supported, got {body.get('n')!r}")
    return Ticket(prompt=prompt, budget=budget, grace=_first(_number(body, "thinking_grace", None, int, 0),
                                                           _number(template, "thinking_grace", None, int, 0)),
                  max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, float, 0, 2),
                  top_p=_number(body, "top_p", 1.0, float, 0, 1), seed=_number(body, "seed", None, int))


def _first(*values):
    return next((v for v in values if v is not None), None)


def memory_in_use(model) -> int:
    """Bytes the model's process holds: allocated on its GPU, or resident in RAM on the CPU."""
    import os

    import torch

    if model.device.type == "cuda":
        return torch.cuda.memory_allocated(model.device)
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _usage(result) -> dict:
    completion = result.reasoning_tokens + result.answer_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}


def create_app(model, model_name: str, max_batch: int = 8, default_max_tokens: int = 1024):
    """The FastAPI application serving `model` (a `nano.Model`) as `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="nanokit", docs_url=None, redoc_url=None)
    batcher = Batcher(model, max_batch)
    app.state.batcher = batcher
    created = int(time.time())

    def error(status: int, message: str, field_name: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": field_name,
                                                                   "code": None}})

    @app.exception_handler(RequestValidationError)
    async def invalid_json(request, exc):
        return error(400, f"body: not valid JSON ({exc.errors()[0].get('msg', 'unreadable')})", "body")

    page = (Path(__file__).parent / "page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/stats")
    async def stats():
        return {"memory_bytes": memory_in_use(model), "memory_kind": "on the GPU" if model.device.type == "cuda" else
                "resident", "batches": batcher.batches, "largest_batch": batcher.largest}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanokit"}]}

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
        except Exception:
            return error(400, "body: not valid JSON", "body")
        try:
            ticket = parse_request(body, chat, default_max_tokens)
        except RequestError as e:
            return error(400, str(e), e.field)
        if body.get("model", model_name) != model_name:
            return error(404, f"model: {body.get('model')!r} is not served here; this server has {model_name!r}",
                         "model", "model_not_found")
        ticket.loop, ticket.events = asyncio.get_running_loop(), asyncio.Queue()
        batcher.submit(ticket)
        name = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream(request, ticket, name, chat), media_type="text/event-stream")
        return await _whole(ticket, name, chat)

    async def _whole(ticket: Ticket, name: str, chat: bool):
        while await ticket.events.get() is not DONE:
            pass
        if ticket.error:
            return error(500, ticket.error, kind="server_error")
        r = ticket.result
        finish = "length" if r.finish_reason == "length" else "stop"
        if chat:
            message = {"role": "assistant", "content": r.answer, "reasoning_content": r.reasoning or None}
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            text = (f"<think>{r.reasoning}</think>" if r.reasoning else "") + r.answer
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": name, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": _usage(r)}

    async def _stream(request: Request, ticket: Ticket, name: str, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | None = None, text: str | None = None, finish=None, usage=None) -> str:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": delta or {}} if chat else {"text": text or ""})
            data = {"id": name, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                if await request.is_disconnected():
                    ticket.gone.set()
                    return
                event = await ticket.events.get()
                if event is DONE:
                    break
                if chat:
                    yield chunk({"reasoning_content": event.text} if event.kind == "reasoning" else {"content": event.text})
                else:
                    yield chunk(text=event.text)
            if ticket.error:
                yield f"data: {json.dumps({'error': {'message': ticket.error, 'type': 'server_error'}})}\n\n"
            elif ticket.result is not None:
                r = ticket.result
                yield chunk(finish="length" if r.finish_reason == "length" else "stop", usage=_usage(r))
            yield "data: [DONE]\n\n"
        finally:
            ticket.gone.set()  # whether it finished or the client left, nothing more is read

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app
