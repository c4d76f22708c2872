"""Load test of `nanokit serve`: continuous against static batching, in one run, at several loads.

For each batching (`--batching`, both by default) one server is started in this process (uvicorn
on loopback) with `--max-batch` slots (or batch rows) and warmed up: the engine captures every
decode step it can meet when it starts, and each load's number of clients sends one short request
each (static batching meets a batch of that size). Then, at each of `--clients` in turn, each
server is loaded for `--seconds` by that many concurrent streaming clients (`--rounds` times,
alternating which batching goes first): each client sends a request, reads its stream to the end,
and sends the next. The clients run in a child process (threads, http.client), so they do not
take the server's interpreter lock.

Workloads (`--workload`):
- arithmetic: nano-tiny's questions (`nano.arithmetic`), `--max-tokens` 512;
- system-prompt: the same questions after one shared system prompt of about `--system-tokens`
  tokens: the prefix cache's hit rate and the tokens it saved are reported;
- long: prompts of `--prompt-tokens` random characters (one token each with the byte-level
  tokenizer of the random-weight shapes) and answers of `--max-tokens`.

Mix-ups. With a trained model (nano-tiny) every question's greedy answer alone is computed first
(`nano.generate`); a response is `mismatched` if it differs, and `mixed_up` if it is another
question's answer. With random weights (`--shape`) answers carry no meaning, so each request asks
for its own number of tokens (`--max-tokens` less 0..15 by request) from a model that never ends
its turn: a response whose token count (usage.completion_tokens, every generated token) is not the
one it asked for is `mixed_up`. A few mismatches of each load are kept in the results file.

    python -m bench.serve_load --model nano-tiny --clients 8 32 64 --seconds 30
    python -m bench.serve_load --shape nano-9b-v2 --clients 8 32 64 --seconds 30
    python -m bench.serve_load --shape nano-9b-v2 --workload long --prompt-tokens 32768 --max-tokens 1024 --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import socket
import string
import sys
import threading
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# The clients: a child process, torch-free.

def _one_request(host: str, port: int, job: dict) -> dict:
    """Send one streaming chat request and read it to the end; what came back, and when."""
    import http.client

    streamed = job.get("stream", True)
    body = {"model": "model", "messages": job["messages"], "stream": streamed, "max_tokens": job["max_tokens"]}
    if streamed:
        body["stream_options"] = {"include_usage": True}
    if job.get("budget") is not None:
        body["thinking_budget"] = job["budget"]
    began = time.perf_counter()
    first, answer, usage, error, status, retry = None, "", None, None, None, None
    connection = http.client.HTTPConnection(host, port, timeout=3600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        status = reply.status
        if status != 200:
            error = f"HTTP {status}: {reply.read()[:200]!r}"
            retry = reply.getheader("retry-after")
        elif not streamed:  # one JSON body: its first token is its last
            data = json.loads(reply.read())
            usage, answer = data["usage"], data["choices"][0]["message"]["content"] or ""
            first = time.perf_counter()
        else:
            for raw in reply:  # server-sent events, a line at a time
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    error = data["error"]["message"]
                    continue
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        first = first or time.perf_counter()
                        answer += delta.get("content") or ""
    except Exception as e:  # counted, not raised: the report says how many
        error = f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    end = time.perf_counter()
    return dict(job=job["index"], status=status, error=error, retry_after=float(retry) if retry else None,
                began=began, first=(first or end) - began, total=end - began,
                tokens=(usage or {}).get("completion_tokens", 0), answer=answer)


def _client_process(url: str, jobs: list[dict], clients: int, seconds: float, out) -> None:
    host, port = url.removeprefix("http://").split(":")
    records, lock = [], threading.Lock()
    began = time.perf_counter()
    stop_at = began + seconds

    def client(index: int) -> None:
        turn = index
        while time.perf_counter() < stop_at or (seconds <= 0 and turn == index):  # at least once
            record = _one_request(host, int(port), jobs[turn % len(jobs)])
            record["at"] = record.pop("began") - began  # since the load began
            if record["status"] == 429:  # refused: come back when the server says
                time.sleep(record["retry_after"] or 1.0)
            turn += clients
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(dict(records=records, wall=time.perf_counter() - began))


def load(url: str, jobs: list[dict], clients: int, seconds: float) -> tuple[list[dict], float]:
    """Records of `clients` closed-loop streaming clients over `jobs` for `seconds`, and the wall time."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_client_process, args=(url, jobs, clients, seconds, out))
    child.start()
    while True:
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the client process ended with status {child.exitcode} and no results") from None
    child.join()
    return result["records"], result["wall"]


# The server side.

def _serve(app, name: str):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name=name).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def thread_cpu_seconds() -> dict[str, float]:
    """The CPU seconds each of this process's threads has used, by thread name (from Linux's /proc;
    empty elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        used[thread.name] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return used


# The threads of a server: the batcher's worker, and the event loop that writes the streams.
WORKER = {"continuous": "nano-engine", "static": "nano-batcher"}


def jobs_for(args, model, trained: bool) -> tuple[list[dict], dict]:
    """The requests of the workload, and each question's expected answer alone (trained models)."""
    import nano
    from nano.arithmetic import sample

    rng = random.Random(7)
    system = None
    if args.workload == "system-prompt":
        words = " ".join(rng.choice(["Work", "out", "each", "step", "on", "a", "line", "of", "its", "own", "then",
                                     "box", "the", "result", "carefully", "and", "check", "it"])
                         for _ in range(args.system_tokens // 4))
        system = {"role": "system", "content": words}
    jobs, expected = [], {}
    for i in range(args.questions):
        if args.workload == "long":
            text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(args.prompt_tokens))
        else:
            text = sample(rng).question
        messages = ([system] if system else []) + [{"role": "user", "content": text}]
        max_tokens = args.max_tokens if trained else args.max_tokens - i % 16
        jobs.append(dict(index=i, messages=messages, max_tokens=max_tokens, budget=args.budget))
    if trained:
        results = nano.generate(model, [j["messages"] for j in jobs], budget=args.budget, max_new_tokens=args.max_tokens)
        expected = {j["index"]: r.answer for j, r in zip(jobs, results)}
    return jobs, expected


def tokens_while_sending(records: list[dict], seconds: float) -> float:
    """Tokens streamed while the clients were still sending (the load's first `seconds`), each request's
    tokens taken as spread evenly from its first to its last. The whole load's rate also counts the
    drain after the clients stop, when fewer requests are left running: at a few clients that costs
    continuous batching, whose clients' requests end at different times, more than static batching,
    whose batch ends together."""
    count = 0.0
    for r in records:
        if r["error"] is not None or not r["tokens"]:
            continue
        first, last = r["at"] + r["first"], r["at"] + r["total"]
        if last <= first:
            count += r["tokens"] * (first <= seconds)
        else:
            count += r["tokens"] * max(0.0, min(last, seconds) - first) / (last - first)
    return count


def summarise(records: list[dict], wall: float, jobs: list[dict], expected: dict, seconds: float) -> dict:
    done = [r for r in records if r["error"] is None]
    refused = sum(r["status"] == 429 for r in records)
    if expected:
        answers = set(expected.values())
        mismatched = [r for r in done if r["answer"] != expected[r["job"]]]
        mixed = [r for r in mismatched if r["answer"] in answers]
    else:
        mismatched = mixed = [r for r in done if r["tokens"] != jobs[r["job"]]["max_tokens"]]
    samples = [dict(job=r["job"], got=r["answer"][-120:] if expected else r["tokens"],
                    expected=expected[r["job"]][-120:] if expected else jobs[r["job"]]["max_tokens"])
               for r in mismatched[:5]]
    return dict(
        mismatch_samples=samples,
        requests=len(records), errors=len(records) - len(done) - refused, refused_429=refused,
        mixed_up=len(mixed), mismatched=len(mismatched), seconds=round(wall, 1),
        tokens_per_s=round(sum(r["tokens"] for r in done) / wall, 1),
        sending_tokens_per_s=round(tokens_while_sending(records, seconds) / seconds, 1) if seconds > 0 else None,
        first_token_p50_s=round(percentile([r["first"] for r in done], 0.5), 3),
        first_token_p95_s=round(percentile([r["first"] for r in done], 0.95), 3),
        latency_p50_s=round(percentile([r["total"] for r in done], 0.5), 3),
        latency_p95_s=round(percentile([r["total"] for r in done], 0.95), 3),
        latency_p99_s=round(percentile([r["total"] for r in done], 0.99), 3),
    )


def _measure(app, url: str, jobs: list[dict], expected: dict, batching: str, clients: int, seconds: float,
             round_: int, warm_up_s: float, streamed: bool = True) -> dict:
    """One load on one server: the clients' summary, with the engine's and prefix cache's counts over it.
    With `streamed` false the clients ask for whole responses, so the server writes one body a request
    rather than a chunk a step: what the streams' writing costs the batcher is the difference."""
    before, cpu = app.state.batcher.stats(), thread_cpu_seconds()
    records, wall = load(url, [dict(j, stream=streamed) for j in jobs], clients, seconds)
    after, cpu_after = app.state.batcher.stats(), thread_cpu_seconds()
    used = {k: round(v - cpu.get(k, 0.0), 2) for k, v in cpu_after.items()}
    row = dict(batching=batching, clients=clients, round=round_, streamed=streamed, **summarise(records, wall, jobs, expected, seconds),
               largest_batch=after["largest_batch"], warm_up_s=round(warm_up_s, 1),
               worker_cpu_s=used.get(WORKER[batching]), server_cpu_s=used.get(f"server-{batching}"))
    if batching == "continuous":
        row.update({k: round(v - before["engine"][k], 3) for k, v in after["engine"].items()},
                   outside_step_s=round(after["outside_step_s"] - before["outside_step_s"], 3))
        row["wall_ms_per_step"] = round(1e3 * wall / row["steps"], 2) if row["steps"] else None
        hits = after["prefix_cache"]["hits"] - before["prefix_cache"]["hits"]
        lookups = after["prefix_cache"]["lookups"] - before["prefix_cache"]["lookups"]
        row.update(prefix_hit_rate=round(hits / lookups, 3) if lookups else 0.0,
                   prefix_tokens_reused=after["prefix_cache"]["tokens_reused"] - before["prefix_cache"]["tokens_reused"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nano-tiny", help="a checkpoint (ignored with --shape)")
    parser.add_argument("--shape", help="a published shape with random weights (nano.shapes), e.g. nano-9b-v2")
    parser.add_argument("--workload", choices=("arithmetic", "system-prompt", "long"), default="arithmetic")
    parser.add_argument("--batching", nargs="+", choices=("continuous", "static"), default=["static", "continuous"])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=1,
                        help="loads per batching at each client count, alternating which batching goes first")
    parser.add_argument("--max-batch", type=int, help="slots or batch rows (default: the most clients)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, help="thinking budget of every request (default: none)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--prefix-cache-mib", type=int, default=1024)
    parser.add_argument("--device")
    parser.add_argument("--tag", default="", help="added to the results file's name")
    parser.add_argument("--responses", nargs="+", choices=("streamed", "whole"), default=["streamed"],
                        help="each load once per kind of response: streamed (server-sent events) or whole")
    parser.add_argument("--switch-interval", type=float,
                        help="the server process's thread switch interval in seconds (sys.setswitchinterval)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    import torch
    import transformers

    from bench.record import write
    import nano
    from demos.workstation.server import create_app

    transformers.logging.set_verbosity_error()
    if args.shape:
        from bench.random_weights import random_model

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = random_model(args.shape, device, endless=True)
        name = args.shape
    else:
        model = nano.load(args.model, device=args.device)
        name = args.model
    trained = not args.shape
    jobs, expected = jobs_for(args, model, trained)
    longest = max(len(model.chat.encode(model.chat.render(j["messages"])[0])) for j in jobs)
    context = longest + args.max_tokens + 8
    slots = args.max_batch or max(args.clients)
    servers = {}
    for batching in args.batching:  # every server up and warmed before any load, so loads can alternate
        app = create_app(model, "model", max_batch=slots, default_max_tokens=args.max_tokens, batching=batching,
                         context=context, prefix_cache=args.prefix_cache_mib * 2**20)
        server, url = _serve(app, f"server-{batching}")
        warm = [dict(j, max_tokens=8, index=i) for i, j in enumerate((jobs * slots)[:slots])]
        began = time.perf_counter()
        for clients in sorted({*args.clients, slots}):  # each client sends one request: static meets its batch sizes
            load(url, warm[:clients], clients, 0.0)
        servers[batching] = app, server, url, time.perf_counter() - began
    rows = []
    for clients in args.clients:
        for round_ in range(args.rounds):
            order = args.batching if round_ % 2 == 0 else args.batching[::-1]  # ABBA: neither always goes first
            for batching in order:
                app, _, url, warm_up_s = servers[batching]
                for responses in args.responses:
                    rows.append(_measure(app, url, jobs, expected, batching, clients, args.seconds, round_, warm_up_s,
                                         streamed=responses == "streamed"))
                    print(json.dumps(rows[-1]), flush=True)
    extra = {}
    for batching, (app, server, _, _) in servers.items():
        server.should_exit = True
        extra[f"{batching}_server"] = app.state.batcher.stats()
    columns = ["batching", "clients", "round", "streamed", "requests", "errors", "refused_429", "mixed_up", "mismatched", "tokens_per_s",
               "sending_tokens_per_s",
               "first_token_p50_s", "first_token_p95_s", "latency_p50_s", "latency_p95_s", "latency_p99_s",
               "largest_batch", "prefix_hit_rate", "wall_ms_per_step", "step_s", "device_wait_s", "outside_step_s",
               "worker_cpu_s", "server_cpu_s"]
    device = str(model.device)
    suffix = f"-{args.workload}" if args.workload != "arithmetic" else ""
    write(f"serve-load-{name}{suffix}-{'cuda' if model.device.type == 'cuda' else 'cpu'}{args.tag}", rows, columns,
          device, model=name, runtime=model.runtime_name(), dtype=str(model.dtype), slots_or_rows=slots,
          context=context, workload=args.workload, max_tokens=args.max_tokens, budget=args.budget,
          seconds_per_load=args.seconds, rounds=args.rounds, mixed_up_check="answers alone" if trained else "token counts",
          switch_interval_s=sys.getswitchinterval(), **extra)


if __name__ == "__main__":
    main()
