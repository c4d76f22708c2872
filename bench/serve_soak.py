"""Mixed load on `nanokit serve` (continuous batching) for a long time, watching for leaks.

The server runs in this process; a child process keeps `--clients` clients busy for `--minutes`
with a mix of requests: streamed and whole; thinking budgets 0, 8, 64 and none; greedy and sampled
(seeded); single questions, a shared system prompt and conversations of a few turns (the prefix
cache); clients that leave after a few tokens; malformed requests. Every `--every` seconds this
process samples its resident memory (as it is, and after glibc's malloc_trim gives back what the
allocator holds free, which tells fragmentation from memory in use), Python's object count and the
engine's state. At the end,
with the load gone, every slot must be free and nothing queued; resident memory after the first
`--settle` minutes against the end says whether anything grows with the requests served.

    python -m bench.serve_soak --minutes 30
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import threading
import time

from bench.serve_load import _serve

SYSTEM = {"role": "system", "content": "You work out arithmetic one step per line and put the result in a box."}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trimmed_rss_mib() -> float | None:
    """Resident memory after glibc gives back the free memory it holds (malloc_trim): what is still in
    use, apart from the allocator's fragmentation across threads. None where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return round(rss_mib(), 1)


def _request(rng: random.Random) -> tuple[dict | bytes, str]:
    """One request of the mix, and what it is."""
    from nano.arithmetic import sample

    question = sample(rng).question
    roll = rng.random()
    if roll < 0.1:
        return rng.choice([b"{not json", {"messages": []}, {"messages": [{"role": "user", "content": "hi"}],
                                                            "top_p": 0}, {"messages": "hi"}]), "malformed"
    shape = rng.random()
    if shape < 0.4:
        messages = [{"role": "user", "content": question}]
    elif shape < 0.7:
        messages = [SYSTEM, {"role": "user", "content": question}]
    elif shape < 0.9:
        turns = rng.randint(1, 2)
        messages = [SYSTEM]
        for _ in range(turns):
            earlier = sample(rng)
            messages += [{"role": "user", "content": earlier.question},
                         {"role": "assistant", "content": f"\\boxed{{{earlier.value}}}"}]
        messages.append({"role": "user", "content": question})
    else:
        messages = [{"role": "user", "content": " ".join(rng.choice(["why", "how", "sky", "blue", "sum", "of", "two"])
                                                           for _ in range(rng.randint(40, 200)))}]
    body = {"model": "model", "messages": messages, "max_tokens": rng.randint(16, 400),
            "stream": rng.random() < 0.75}
    budget = rng.choice([0, 8, 64, None])
    if budget is not None:
        body["thinking_budget"] = budget
    if rng.random() < 0.3:
        body.update(temperature=0.8, seed=rng.randint(0, 10**6))
    kind = "leave" if body["stream"] and rng.random() < 0.2 else ("stream" if body["stream"] else "whole")
    return body, kind


def _soak_client(host: str, port: int, seed: int, stop_at: float, records: list, lock) -> None:
    import http.client

    rng = random.Random(seed)
    while time.perf_counter() < stop_at:
        body, kind = _request(rng)
        connection = http.client.HTTPConnection(host, port, timeout=600)
        status, error = None, None
        try:
            data = body if isinstance(body, bytes) else json.dumps(body)
            connection.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
            reply = connection.getresponse()
            status = reply.status
            if kind == "leave" and status == 200:
                for i, _ in enumerate(reply):
                    if i == rng.randint(2, 10):
                        break  # the client goes away mid-stream
            else:
                text = reply.read().decode()
                if status == 200 and kind == "stream" and "data: [DONE]" not in text:
                    error = "stream ended without [DONE]"
                if status == 200 and '"error"' in text and kind == "stream":
                    error = "an error event in the stream"
        except Exception as e:  # counted, not raised
            error = f"{type(e).__name__}: {e}"
        finally:
            connection.close()
        with lock:
            records.append(dict(kind=kind, status=status, error=error))


def _client_process(url: str, clients: int, seconds: float, out) -> None:
    host, port = url.removeprefix("http://").split(":")
    records, lock = [], threading.Lock()
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=_soak_client, args=(host, int(port), i, stop_at, records, lock))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(records)


def main() -> None:
    import multiprocessing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nano-tiny")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--settle", type=float, default=3, help="minutes before the baseline sample")
    parser.add_argument("--prefix-cache-mib", type=float, default=8, help="small, so it is full before the baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="added to the results file's name")
    parser.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                        help="do not prefill once at every chunk length before the load")
    args = parser.parse_args()

    import torch
    import transformers

    import nano
    from bench.record import write
    from demos.workstation.server import create_app

    transformers.logging.set_verbosity_error()
    model = nano.load(args.model, device=args.device)
    app = create_app(model, "model", max_batch=args.slots, default_max_tokens=256, context=2048,
                     prefix_cache=int(args.prefix_cache_mib * 2**20))
    batcher = app.state.batcher
    if args.prewarm:
        # The CPU build of torch keeps some native state per new prefill length (oneDNN's conv primitives,
        # about 30 MiB over every length up to the chunk; serve-growth-probe-cpu.json): fill it before the
        # baseline, so that growth after it is growth with the requests served.
        view = batcher.engine.runtime.slot(0)
        for length in range(1, batcher.engine.prefill_chunk + 1):
            view.extend(torch.randint(0, len(model.tokenizer), (1, length), device=model.device), 0)
    server, url = _serve(app)
    samples, began = [], time.perf_counter()

    def sample() -> dict:
        stats = batcher.stats()
        return dict(minute=round((time.perf_counter() - began) / 60, 2), rss_mib=round(rss_mib(), 1),
                    rss_trimmed_mib=trimmed_rss_mib(), python_objects=len(gc.get_objects()),
                    finished=stats["finished"], active=stats["active"],
                    waiting=stats["waiting"], live_tickets=len(batcher.live),
                    prefix_entries=stats["prefix_cache"]["entries"], prefix_mib=round(stats["prefix_cache"]["bytes"]
                                                                                      / 2**20, 1))

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_client_process, args=(url, args.clients, args.minutes * 60, out))
    child.start()
    samples.append(sample())
    records = None
    while records is None:
        try:
            records = out.get(timeout=args.every)
        except Exception:  # the queue's Empty: time for a sample
            samples.append(sample())
            print(json.dumps(samples[-1]), flush=True)
    child.join()
    deadline = time.perf_counter() + 60
    while (batcher.engine.busy or batcher.live) and time.perf_counter() < deadline:
        time.sleep(0.1)  # the last requests of clients that left finish or are cancelled
    gc.collect()
    samples.append(sample())
    server.should_exit = True
    baseline = next((s for s in samples if s["minute"] >= args.settle), samples[0])
    end = samples[-1]
    kinds = {k: sum(r["kind"] == k for r in records) for k in ("stream", "whole", "leave", "malformed")}
    failures = [r for r in records if r["error"] or (r["kind"] != "malformed" and r["status"] != 200)
                or (r["kind"] == "malformed" and r["status"] != 400)]
    row = dict(minutes=args.minutes, requests=len(records), **kinds, failures=len(failures),
               finished_by_engine=end["finished"], rss_start_mib=samples[0]["rss_mib"],
               rss_baseline_mib=baseline["rss_mib"], rss_end_mib=end["rss_mib"],
               rss_growth_after_baseline_mib=round(end["rss_mib"] - baseline["rss_mib"], 1),
               rss_trimmed_baseline_mib=baseline["rss_trimmed_mib"], rss_trimmed_end_mib=end["rss_trimmed_mib"],
               objects_baseline=baseline["python_objects"], objects_end=end["python_objects"],
               active_end=end["active"], waiting_end=end["waiting"], live_tickets_end=end["live_tickets"],
               prefix_entries_end=end["prefix_entries"])
    write(f"serve-soak-{args.model}-{args.device}{args.tag}", [row], list(row), args.device, model=args.model,
          slots=args.slots, clients=args.clients, torch=torch.__version__, baseline_minute=baseline["minute"],
          prewarm=args.prewarm,
          first_failures=[dict(f) for f in failures[:5]], samples=samples)


if __name__ == "__main__":
    main()
