"""How fast `nanokit tokenize` turns text into a token store with a tokenizer of the real size, and
how much memory it holds, against what the distillation trainer consumes.

The tokenizer is a byte-level BPE of 131072 entries, Nemotron Nano 2's kind and size, trained
offline on one part of the installed packages' .py/.md/.txt files (`bench.tokenizer_131k`; built
once, then reused from ~/.cache/nanokit/bpe-131k). The corpus is the other part, held out from the
training (2 in 3 files by a hash of the path, about 216 MB here; `--mib` caps it), read once
before the runs so that every run finds it in the page cache. Each run is `nano.tokenize.tokenize`
over the corpus's files in path order, in a fresh process, with `--workers` 1 (in-process) and 2
(spawned workers); the 1-worker run twice, as a user gets it (the `tokenizers` library then
encodes each chunk on all cores, in Rust threads) and with those threads held to one
(TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1, as the spawned workers are): that is the rate
of one tokenizing core. Reported per run: documents, tokens, MB of text (10^6 bytes of files),
seconds, tokens/s, MB/s, the main process's peak resident memory (VmHWM), the workers' (the largest
one's peak from getrusage, and the most all of them held at once, sampled from /proc), and CPU
seconds of the main process (importing transformers and loading the tokenizer included) and of the
workers. The stores of all runs must be byte-identical (.bin and .idx; the module promises the same
store for any number of workers): their SHA-256 are recorded, and a difference fails the run.

    python -m bench.tokenize_throughput
    python -m bench.tokenize_throughput --workers 1 2 --dir /tmp/nano-tokenize
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.record import write
from bench.tokenizer_131k import DEFAULT_DIR, corpus_digest, ensure, site_packages_files

TRAINER_TOKENS_PER_S = 5349  # per GPU, `nanokit distill` at the 9B shape, one H100 (bench/results/distill-throughput-nano-12b-v2-base-nano-9b-v2-2gpu-fused.json)
RECOVERY_TOKENS = 2.5e9  # NVIDIA's distillation tokens for the first recovery (Minitron)
MB = 1e6


def _status(pid: str | int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


class WorkerSampler(threading.Thread):
    """Every `interval` s: the resident memory of this process's worker children (spawned
    multiprocessing workers, not the resource tracker), their sum, and each one's peak."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak_sum, self.peaks, self.samples = interval, threading.Event(), 0.0, {}, 0

    def _workers(self):
        for children in Path("/proc/self/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        yield pid
                except OSError:
                    pass

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            total = 0.0
            for pid in self._workers():
                try:
                    status = _status(pid)
                except (OSError, KeyError, IndexError):
                    continue
                total += status.get("VmRSS", 0.0)
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), status.get("VmHWM", 0.0))
            self.peak_sum = max(self.peak_sum, total)
            self.samples += 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def run_one(tokenizer: str, files: list[str], out: str, workers: int) -> dict:
    """In this process: tokenize `files` into a store at `out` with `workers`, timed, with memory."""
    from nano.tokenize import tokenize

    before = _status("self")["VmRSS"]
    sampler = WorkerSampler()
    sampler.start()
    cpu_before = time.process_time()
    wall = time.perf_counter()
    report = tokenize(tokenizer, files, out, workers=workers, overwrite=True)
    wall = time.perf_counter() - wall
    main_cpu = time.process_time() - cpu_before
    sampler.stop.set()
    sampler.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    text_bytes = sum(os.path.getsize(f) for f in files)
    row = dict(workers=workers, documents=report.documents, tokens=report.tokens,
               mb_text=round(text_bytes / MB, 1), seconds=report.seconds,
               tokens_per_s=round(report.tokens / report.seconds), mb_per_s=round(text_bytes / MB / report.seconds, 2),
               tokens_per_byte=round(report.tokens / text_bytes, 4), wall_seconds_with_tokenizer_load=round(wall, 3),
               main_cpu_s=round(main_cpu, 1), main_rss_before_mib=round(before, 1),
               main_peak_rss_mib=round(_status("self")["VmHWM"], 1), dtype=report.dtype, vocab_size=report.vocab_size)
    if workers > 1:
        row.update(worker_cpu_s=round(children.ru_utime + children.ru_stime, 1),
                   worker_peak_rss_mib=round(children.ru_maxrss / 1024, 1),  # the largest reaped child's peak
                   workers_peak_rss_sum_mib=round(sampler.peak_sum, 1), worker_rss_samples=sampler.samples)
    prefix = Path(report.prefix)
    row.update(bin_sha256=_sha256(Path(f"{prefix}.bin")), idx_sha256=_sha256(Path(f"{prefix}.idx")),
               bin_bytes=os.path.getsize(f"{prefix}.bin"))
    return row


ONE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def _child(args: dict, env: dict) -> dict:
    command = [sys.executable, "-m", "bench.tokenize_throughput", "--child", json.dumps(args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/nano-tokenize", help="where the stores and the file list go")
    parser.add_argument("--tokenizer", default=str(DEFAULT_DIR), help="the 131k tokenizer's folder (built if absent)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mib", type=int, default=None, help="cap on the held-out corpus (default: all of it)")
    parser.add_argument("--name", default="tokenize-throughput-bpe131k-cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = json.loads(args.child)
        child["files"] = Path(child["files"]).read_text().split("\n")
        print(json.dumps(run_one(**child)))
        return

    folder, training = ensure(args.tokenizer)
    files = site_packages_files("held_out", None if args.mib is None else args.mib << 20)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    listing = root / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    text_bytes = 0
    for path in files:  # into the page cache: every run reads from memory
        text_bytes += len(path.read_bytes())
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = [(w, env) for w in args.workers for env in ([{}, ONE_THREAD] if w == 1 else [{}])]
    rows = []
    for workers, env in runs:
        name = f"store-w{workers}" + ("-one-thread" if env else "")
        row = _child(dict(tokenizer=str(folder), files=str(listing), out=str(root / name), workers=workers), env)
        row = {"workers": workers, "threads": "1 per process" if env or workers > 1 else "all cores (in-process)", **row}
        row["x_trainer_gpus"] = round(row["tokens_per_s"] / TRAINER_TOKENS_PER_S, 1)
        row["hours_for_2.5B"] = round(RECOVERY_TOKENS / row["tokens_per_s"] / 3600, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    identical = len({(r["bin_sha256"], r["idx_sha256"]) for r in rows}) == 1
    one = next((r for r in rows if r["workers"] == 1 and r["threads"] == "1 per process"), rows[0])
    per_core = one["tokens_per_s"] / one["workers"]
    comparison = {
        "trainer_tokens_per_s_per_gpu": TRAINER_TOKENS_PER_S,
        "trainer_measured_on": "one H100, `nanokit distill` at the 9B shape",
        "tokens_per_s_per_core": round(per_core),
        "gpus_fed_per_core": round(per_core / TRAINER_TOKENS_PER_S, 1),
        "recovery_tokens": RECOVERY_TOKENS,
        "hours_for_recovery_tokens_on_one_core": round(RECOVERY_TOKENS / per_core / 3600, 2),
        "note": "per core = the 1-worker run with the tokenizer's threads held to one (tokenized in the main "
                "process, which also reads the files and writes the store); "
                "this tokenizer's tokens per byte are its own, not the real Nemotron tokenizer's",
    }
    print(json.dumps(comparison, indent=2))
    write(args.name, rows,
          ["workers", "threads", "documents", "tokens", "mb_text", "seconds", "tokens_per_s", "mb_per_s", "main_peak_rss_mib",
           "worker_peak_rss_mib", "workers_peak_rss_sum_mib", "main_cpu_s", "worker_cpu_s", "x_trainer_gpus",
           "hours_for_2.5B"], "cpu",
          tokenizer=dict(folder=str(folder), **training),
          corpus=dict(description="the held-out part (2 in 3 files by a hash of the path, none trained on) of the "
                                  ".py/.md/.txt files of the installed packages, in path order, page cache warm",
                      files=len(files), bytes=text_bytes, mb=round(text_bytes / MB, 1), digest=corpus_digest(files),
                      mib_cap=args.mib),
          stores_identical=identical, comparison=comparison, cores=os.cpu_count(),
          load_average_before=load_before, load_average_after=load_after)
    if not identical:
        raise SystemExit("the stores differ between worker counts: " + ", ".join(
            f"{r['workers']} ({r['threads']}): {r['bin_sha256'][:12]}/{r['idx_sha256'][:12]}" for r in rows))


if __name__ == "__main__":
    main()
