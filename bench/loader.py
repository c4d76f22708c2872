"""How fast the training data loader feeds the trainer, and how much memory it holds, on token
stores of a billion tokens and more.

Builds (once, under --dir) two stores of random int32 token ids, 0.7 and 0.3 of --tokens, in
documents of random lengths, and a --sparse-tokens store whose .bin is a sparse file (holes read as
zeros: its size is real, its content is not) with a real index of documents of 2,000 tokens. Then,
each in a fresh process, it reads the draws one process of --world would read for --steps steps of
--batch sequences of --seq-len tokens (`nano.samples.Blend.take`, as `prune.distill` calls it), with
the page cache dropped for the stores first (cold) or not (warm), and reports tokens/s against the
trainer's measured rate and the process's resident memory (/proc/self/status). Also times
`nanokit tokenize` (its worker processes) on real text, the source files of installed packages.

    python -m bench.loader --dir /tmp/nano-loader
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.record import write
from nano.store import StoreWriter, TokenStore, write_index

TRAINER_TOKENS_PER_S = 5349  # per GPU, `nanokit distill` at the 9B shape (bench/results/distill-throughput-nano-12b-v2-base-nano-9b-v2-2gpu-fused.json)
GIB = 1 << 30


def _memory() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # MiB
    return fields


def build_real(prefix: Path, tokens: int, seed: int) -> float:
    """A store of `tokens` random ids in documents of 1..8000 tokens; returns seconds (0 if it exists)."""
    if Path(f"{prefix}.idx").exists():
        return 0.0
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    with StoreWriter(prefix, np.int32) as writer:
        while writer.tokens < tokens:
            chunk = rng.integers(0, 131072, size=min(1 << 24, tokens - writer.tokens), dtype=np.int32)
            lengths = rng.integers(1, 8000, size=len(chunk) // 4000 + 2)
            for piece in np.split(chunk, np.cumsum(lengths)[np.cumsum(lengths) < len(chunk)]):
                writer.add(piece)
    return time.perf_counter() - started


def build_sparse(prefix: Path, tokens: int) -> None:
    if Path(f"{prefix}.idx").exists():
        return
    document = 2000
    lengths = np.full(tokens // document, document, dtype=np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 4)
    write_index(Path(f"{prefix}.idx"), np.int32, lengths)


def _drop_cache(prefixes) -> None:
    for prefix in prefixes:
        fd = os.open(f"{prefix}.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_draws(words: list[str], steps: int, batch: int, world: int, seq_len: int, cold: bool) -> dict:
    """In this process: the draws of rank 0 of `world` for `steps` steps, timed, with memory."""
    from nano.samples import open_blend, parse_blend

    if cold:
        _drop_cache([p for _, p in parse_blend(words)])
    before = _memory()  # python, numpy and torch imported: what any trainer process holds already
    blend = open_blend(words, seq_len)
    per = batch // world
    tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        rows = blend.take(range(step * batch, step * batch + per))
        tokens += rows.numel()
    seconds = time.perf_counter() - started
    after = _memory()
    return dict(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds),
                store_tokens=sum(p.store.tokens for p in blend.parts), rss_before_mib=before["VmRSS"],
                rss_after_mib=after["VmRSS"], rss_anon_mib=after["RssAnon"], rss_file_mib=after["RssFile"],
                peak_rss_mib=after["VmHWM"])


def _child(args) -> dict:
    command = [sys.executable, "-m", "bench.loader", "--child", json.dumps(args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tokenize_rate(out: Path, megabytes: int) -> dict:
    import site

    from nano.tokenize import tokenize

    files, size = [], 0
    for path in sorted(Path(site.getsitepackages()[0]).rglob("*.py")):
        files.append(path)
        size += path.stat().st_size
        if size >= megabytes << 20:
            break
    report = tokenize("nano-tiny", files, out, workers=os.cpu_count(), overwrite=True)
    return dict(scenario=f"nanokit tokenize, {size / 2**20:.0f} MiB of .py files, nano-tiny's byte-level tokenizer",
                tokens=report.tokens, seconds=report.seconds, tokens_per_s=round(report.tokens_per_second),
                workers=report.workers, documents=report.documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/nano-loader")
    parser.add_argument("--tokens", type=int, default=1_000_000_000)
    parser.add_argument("--sparse-tokens", type=int, default=10_000_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokenize-mib", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_draws(**json.loads(args.child))))
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    a, b, sparse = root / "real-a", root / "real-b", root / "sparse"
    write_seconds = build_real(a, int(0.7 * args.tokens), 1) + build_real(b, args.tokens - int(0.7 * args.tokens), 2)
    build_sparse(sparse, args.sparse_tokens)
    written = TokenStore(a).tokens + TokenStore(b).tokens
    draws = dict(steps=args.steps, batch=args.batch, world=args.world, seq_len=args.seq_len)
    scenarios = [
        ("blend 0.7/0.3 of two real stores, cold page cache", ["0.7", str(a), "0.3", str(b)], True),
        ("blend 0.7/0.3 of two real stores, warm page cache", ["0.7", str(a), "0.3", str(b)], False),
        (f"one sparse store of {args.sparse_tokens / 1e9:.0f}B tokens", [str(sparse)], True),
        ("blend 0.5/0.5: the sparse store and a real one, cold", ["0.5", str(sparse), "0.5", str(a)], True),
    ]
    rows = []
    for name, words, cold in scenarios:
        result = _child(dict(words=words, cold=cold, **draws))
        rows.append(dict(scenario=name, **result, x_trainer=round(result["tokens_per_s"] / TRAINER_TOKENS_PER_S)))
    rows.append(tokenize_rate(root / "tokenized", args.tokenize_mib))
    write("loader-throughput-cpu", rows,
          ["scenario", "store_tokens", "tokens", "seconds", "tokens_per_s", "x_trainer", "rss_before_mib", "rss_after_mib",
           "rss_anon_mib", "rss_file_mib", "peak_rss_mib"], "cpu",
          trainer_tokens_per_s=TRAINER_TOKENS_PER_S, target="tokens_per_s >= 50 x trainer; peak RSS < 1024 MiB",
          real_tokens_written=written, write_seconds=round(write_seconds, 1), draws=draws)


if __name__ == "__main__":
    main()
