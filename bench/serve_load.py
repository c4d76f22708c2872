"""Load test of `nanokit serve`: N concurrent streaming clients on loopback for a bounded time.

Starts the server in this process (uvicorn on a free port), then `--clients` threads each send
streaming chat requests with the official openai client until `--seconds` have passed. Every prompt
is an arithmetic question whose greedy answer is known beforehand (from `nano.generate` alone), so a
response mixed up with another's is caught. Reports requests, errors, mix-ups, latency percentiles
(time to first token and to the end), tokens/s over all clients, and the batches the server ran.

    python -m bench.serve_load --clients 8 --seconds 60
"""

from __future__ import annotations

import argparse
import random
import socket
import threading
import time


from bench.record import write

import nano
from nano.arithmetic import sample


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    import openai
    import uvicorn

    from demos.workstation.server import create_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nano-tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--device")
    args = parser.parse_args()

    model = nano.load(args.model, device=args.device)
    rng = random.Random(7)
    questions = [sample(rng).question for _ in range(args.questions)]
    expected = {q: g.answer.strip() for q, g in zip(questions, nano.generate(model, questions, max_new_tokens=512))}
    app = create_app(model, "model", max_batch=args.max_batch, default_max_tokens=512)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    records, lock = [], threading.Lock()
    stop_at = time.perf_counter() + args.seconds

    def client(index: int) -> None:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        turn = index
        while time.perf_counter() < stop_at:
            question = questions[turn % len(questions)]
            turn += args.clients
            began, first, answer, error, tokens = time.perf_counter(), None, "", None, 0
            try:
                for chunk in api.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                                         stream=True, max_tokens=512):
                    delta = chunk.choices[0].delta if chunk.choices else None
                    if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
                        first = first or time.perf_counter()
                        answer += delta.content or ""
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
            except Exception as e:  # counted, not raised: the report says how many
                error = f"{type(e).__name__}: {e}"
            with lock:
                records.append(dict(first=(first or time.perf_counter()) - began, total=time.perf_counter() - began,
                                    tokens=tokens, error=error, mixed=error is None and answer.strip() != expected[question]))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    server.should_exit = True
    done = [r for r in records if r["error"] is None]
    row = dict(
        clients=args.clients, seconds=round(wall, 1), requests=len(records), errors=len(records) - len(done),
        mixed_up=sum(r["mixed"] for r in done), tokens_per_s=round(sum(r["tokens"] for r in done) / wall, 1),
        first_token_p50_s=round(percentile([r["first"] for r in done], 0.5), 3),
        first_token_p95_s=round(percentile([r["first"] for r in done], 0.95), 3),
        latency_p50_s=round(percentile([r["total"] for r in done], 0.5), 3),
        latency_p95_s=round(percentile([r["total"] for r in done], 0.95), 3),
        latency_p99_s=round(percentile([r["total"] for r in done], 0.99), 3),
        batches=app.state.batcher.batches, largest_batch=app.state.batcher.largest,
    )
    errors = sorted({r["error"] for r in records if r["error"]})[:3]
    write(f"serve-load-{args.model}-{'cuda' if model.device.type == 'cuda' else 'cpu'}", [row], list(row),
          str(model.device), model=args.model, runtime=model.runtime_name(), max_batch=args.max_batch,
          first_errors=errors)


if __name__ == "__main__":
    main()
