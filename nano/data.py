"""Token samples for calibration and training: fixed-length samples from text, jsonl, parquet or saved token ids.

Text is read file by file (sorted by path, so a run is repeatable), tokenized, joined with the
end-of-sequence token between documents, and cut into samples of `length` tokens. A jsonl file
contributes the "text" field of each line, a parquet file its "text" column (needs pyarrow). A `.pt` or `.safetensors` file holds the samples
themselves: one integer tensor of shape (samples, length).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".cpp", ".js", ".html", ".tex"}
TENSOR_SUFFIXES = {".pt", ".safetensors"}


def _documents(path: Path | list[Path]):
    if isinstance(path, list):
        files = path
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = False
    for file in files:
        if file.suffix == ".jsonl":
            found = True
            for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{number}: not JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{file}:{number}: a jsonl line needs a string field 'text'")
                yield record["text"]
        elif file.suffix == ".parquet":
            found = True
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(file)
            if "text" not in table.column_names:
                raise ValueError(f"{file}: a parquet file needs a 'text' column; it has {table.column_names}")
            yield from (text for text in table.column("text").to_pylist() if text)
        elif file.suffix in TEXT_SUFFIXES or path == file or isinstance(path, list):
            found = True
            yield file.read_text(encoding="utf-8", errors="replace")
    if not found:
        raise ValueError(
            f"{path}: no text found; give text files ({', '.join(sorted(TEXT_SUFFIXES))}), jsonl files "
            f"with a 'text' field, parquet files with a 'text' column, or a {' / '.join(sorted(TENSOR_SUFFIXES))} file of token ids"
        )


def _load_tensor(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor of token ids, found {sorted(tensors)}")
        tokens = next(iter(tensors.values()))
    else:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"{path}: expected an integer tensor of shape (samples, length), got {type(tokens).__name__}"
                         + (f" {tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else ""))
    return tokens.long()


def token_samples(path, tokenizer, samples: int = 1024, length: int = 4096) -> torch.Tensor:
    """Up to `samples` samples of `length` tokens (LongTensor (n, length)) from `path` (a file, a
    folder, or a list of files read in that order)."""
    if samples < 1 or length < 2:
        raise ValueError(f"samples must be >= 1 and length >= 2, got samples={samples}, length={length}")
    if isinstance(path, (list, tuple)):
        return _pack(_documents([Path(p) for p in path]), tokenizer, samples, length, f"{len(path)} files")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: calibration data not found")
    if path.suffix in TENSOR_SUFFIXES:
        tokens = _load_tensor(path)
        if tokens.shape[1] < length:
            raise ValueError(f"{path}: samples are {tokens.shape[1]} tokens long, shorter than length={length}")
        return tokens[:samples, :length].contiguous()
    return _pack(_documents(path), tokenizer, samples, length, str(path))


def _pack(documents, tokenizer, samples: int, length: int, source: str) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    out: list[torch.Tensor] = []
    for text in documents:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        start = 0  # cut the samples, then drop what they used once (not a shift per sample)
        while len(buffer) - start >= length and len(out) < samples:
            out.append(torch.tensor(buffer[start : start + length]))
            start += length
        del buffer[:start]
        if len(out) == samples:
            break
    if not out:
        raise ValueError(f"{source}: the text makes fewer than {length} tokens, not even one sample")
    return torch.stack(out)
