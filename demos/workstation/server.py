"""An OpenAI-compatible server for a Nemotron model with the thinking budget: `nanokit serve`.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events or not),
`POST /v1/completions`. The reasoning comes back apart from the answer, as vLLM does:
`message.reasoning_content` (or `delta.reasoning_content` when streaming) and `content`. The thinking
budget is per request: `thinking_budget` (tokens of reasoning; 0 turns reasoning off), the same in
`chat_template_kwargs` (the form the TensorRT-LLM bundle's hook reads; `enable_thinking: false`
turns reasoning off), or NVIDIA's `nvext: {max_thinking_tokens}`; `thinking_grace` (top level or
in `chat_template_kwargs`) sets the window to finish a line.

Requests run continuously by default (`demos.workstation.batching`): each joins the engine's running
batch as soon as a slot is free, prefilled in chunks between decode steps, so a request never waits
for another to finish; a full queue is answered 429 with a Retry-After hint. `batching="static"`
runs waiting requests as whole `nano.generate` batches instead (for comparison). A client that
disconnects frees its slot at the next step.
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at
# definition time, inside create_app.


import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from nano.hardware import PREFILL_ROWS

from .batching import DONE, Busy, ContinuousBatcher, StaticBatcher, Ticket


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
    top_p = _number(body, "top_p", 1.0, float, 0, 1)
    if top_p == 0:
        raise RequestError("top_p", "must be above 0 and at most 1, got 0")
    return Ticket(prompt=prompt, budget=budget, grace=_first(_number(body, "thinking_grace", None, int, 0),
                                                           _number(template, "thinking_grace", None, int, 0)),
                  max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, float, 0, 2),
                  top_p=top_p, seed=_number(body, "seed", None, int))


def _joined(events: list) -> list[tuple[str, str]]:
    """Consecutive stream events of one kind as one (kind, text): a client that fell behind gets what
    piled up in as few chunks as the kinds allow."""
    out: list[tuple[str, str]] = []
    for event in events:
        if out and out[-1][0] == event.kind:
            out[-1] = (event.kind, out[-1][1] + event.text)
        else:
            out.append((event.kind, event.text))
    return out


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
    """OpenAI's usage: completion tokens are every token generated (the think tags, forced tokens and the
    end token too: what max_tokens bounds), of which reasoning tokens are those inside reasoning."""
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}


def create_app(model, model_name: str, max_batch: int = 8, default_max_tokens: int = 1024,
               batching: str = "continuous", context: int | None = None, max_waiting: int | None = None,
               prefix_cache: int = 0, prefill_rows: int = PREFILL_ROWS, progress: bool = False):
    """The FastAPI application serving `model` (a `nano.Model`) as `model_name`.

    `batching` "continuous" runs an engine of `max_batch` slots of `context` tokens (the model's
    context by default) with `prefix_cache` bytes of prefix snapshots, prefilling up to
    `prefill_rows` prompts together, refusing requests past `max_waiting` queued (4 per slot by
    default); "static" runs batches of up to `max_batch`. The engine captures its decode steps and
    short-prefill buckets before this returns (on a GPU; `progress` shows a bar).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    if batching == "continuous":
        batcher = ContinuousBatcher(model, slots=max_batch, context=context, max_waiting=max_waiting,
                                    prefix_cache=prefix_cache, prefill_rows=prefill_rows, progress=progress)
    elif batching == "static":
        batcher = StaticBatcher(model, max_batch)
    else:
        raise ValueError(f"batching must be 'continuous' or 'static', got {batching!r}")
    app = FastAPI(title="nanokit", docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    created = int(time.time())

    def error(status: int, message: str, field_name: str | None = None, kind: str = "invalid_request_error",
              headers: dict | None = None):
        return JSONResponse(status_code=status, headers=headers,
                            content={"error": {"message": message, "type": kind, "param": field_name, "code": None}})

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
                "resident", **batcher.stats()}

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
        try:
            batcher.submit(ticket)
        except Busy as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": str(e.retry_after)})
        except ValueError as e:  # the fields are checked above: what is left is the prompt (too long, say)
            field = "messages" if chat else "prompt"
            return error(400, f"{field}: {e}", field)
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
                events = [await ticket.events.get()]
                while events[-1] is not DONE and not ticket.events.empty():  # what piled up: one chunk per kind
                    events.append(ticket.events.get_nowait())
                finished = events[-1] is DONE
                for kind, text in _joined(events[:-1] if finished else events):
                    if chat:
                        yield chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})
                    else:
                        yield chunk(text=text)
                if finished:
                    break
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
