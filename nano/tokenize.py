"""Text to a token store: documents tokenized in worker processes, each followed by the EOS token,
written in order as one sequence each into Megatron's indexed format (`nano.store`).

The main process reads the documents (`nano.data.documents`: text, jsonl, parquet, a `datasets`
folder) and hands them out in chunks; at most a few chunks per worker are in flight, so memory stays
flat however large the input. Chunks come back in the order they went out, so the store is the same
for any number of workers (tested against one worker, which tokenizes in-process). The store is
written under `.partial` names and renamed into place at the end, with a JSON manifest beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .store import StoreWriter, store_prefix, token_dtype

CHUNK_CHARS = 1 << 20  # about a megabyte of text per task
CHUNK_DOCUMENTS = 1024
IN_FLIGHT = 4  # chunks per worker queued or being tokenized


@dataclass
class TokenizeReport:
    prefix: str
    tokenizer: str
    sources: list[str]
    field: str
    documents: int
    tokens: int
    dtype: str
    vocab_size: int
    eos_token_id: int
    workers: int
    seconds: float
    files: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a folder (a checkpoint's, or a tokenizer's alone) or a shipped model's name."""
    from transformers import AutoTokenizer

    from .shipped import resolve

    folder = resolve(path)
    if not folder.is_dir():
        raise ValueError(f"{path}: no tokenizer folder here (give a checkpoint or tokenizer folder, or nano-tiny)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = sys.maxsize  # documents of any length: the samples are cut later
    return tokenizer


def _vocabulary(tokenizer) -> int:
    return max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)


_worker_tokenizer = None


def _start_worker(path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = load_tokenizer(path)


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's documents as one flat int64 array (each ending in EOS) and their lengths."""
    tokenizer = tokenizer or _worker_tokenizer
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eos
    for doc, end, length in zip(ids, ends, lengths):
        flat[end - length : end - 1] = doc
    return flat, lengths


def _chunks(documents):
    chunk, chars = [], 0
    for text in documents:
        if not text:
            continue
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(chunks, tokenizer_path: str, tokenizer, workers: int):
    """(flat ids, lengths) per chunk, in input order; `workers` processes, or this one for 1."""
    if workers == 1:
        for chunk in chunks:
            yield _encode(chunk, tokenizer)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= workers * IN_FLIGHT:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def tokenize(tokenizer_path: str | os.PathLike, sources: list[str | os.PathLike], out: str | os.PathLike,
             field: str = "text", split: str = "train", workers: int | None = None, overwrite: bool = False,
             progress: bool = False) -> TokenizeReport:
    """Tokenize the documents of `sources` into a store at `out` (a prefix: out.bin, out.idx, out.json)."""
    from tqdm.auto import tqdm

    from .data import documents

    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer_path}: the tokenizer has no EOS token to end documents with")
    prefix = store_prefix(out)
    manifest = Path(f"{prefix}.json")
    dtype = token_dtype(_vocabulary(tokenizer))
    started = time.perf_counter()

    def all_documents():
        for path in paths:
            yield from documents(path, field, split)

    bar = tqdm(desc="tokenize", unit="doc", disable=not progress, smoothing=0.1)
    try:
        with StoreWriter(prefix, dtype, overwrite=overwrite) as writer:
            for flat, lengths in _encoded(_chunks(all_documents()), str(tokenizer_path), tokenizer, workers):
                for piece in np.split(flat, np.cumsum(lengths)[:-1]):
                    writer.add(piece)
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
            if not writer.lengths:
                raise ValueError(f"{', '.join(map(str, paths))}: no documents (every one was empty)")
            counts = len(writer.lengths), writer.tokens
    finally:
        bar.close()
    report = TokenizeReport(
        prefix=str(prefix), tokenizer=str(tokenizer_path), sources=[str(p) for p in paths], field=field,
        documents=counts[0], tokens=counts[1], dtype=str(dtype), vocab_size=_vocabulary(tokenizer),
        eos_token_id=tokenizer.eos_token_id, workers=workers, seconds=round(time.perf_counter() - started, 3),
        files=[f"{prefix.name}.bin", f"{prefix.name}.idx"],
    )
    partial = manifest.with_name(manifest.name + ".partial")
    partial.write_text(json.dumps({"format": "megatron-indexed (MMIDIDX v1)", **asdict(report)}, indent=2) + "\n")
    os.replace(partial, manifest)
    return report
