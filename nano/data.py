"""Documents and token samples: the text a tokenizer reads, and fixed-length samples for calibration
and training from text, jsonl, parquet, a Hugging Face datasets folder, or saved token ids.

Text is read file by file (sorted by path, so a run is repeatable). A jsonl file contributes one
field of each line, a parquet file or a `datasets` folder one column ("text" unless told; pyarrow
reads them). `token_samples` tokenizes the documents, joins them with the end-of-sequence token
and cuts samples of `length` tokens, all in memory: for data at scale, `nanokit tokenize` writes
a token store on disk (`nano.store`) that training reads by memory map (`nano.samples`). A `.pt`
or `.safetensors` file holds the samples themselves: one integer tensor of shape (samples, length).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".cpp", ".js", ".html", ".tex"}
TENSOR_SUFFIXES = {".pt", ".safetensors"}



def is_dataset_folder(path: Path) -> bool:
    """A folder written by Hugging Face `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def documents(path: Path | list[Path], field: str = "text", split: str = "train"):
    """The documents under `path` (a file, a folder, a `datasets` folder, or a list of files read
    in that order), one string each: a text file whole, each jsonl line's `field`, a parquet
    file's or a dataset's `field` column."""
    if isinstance(path, list):
        files = path
    elif is_dataset_folder(path):
        yield from _dataset_documents(path, field, split)
        return
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = False
    for file in files:
        if file.suffix == ".jsonl":
            found = True
            yield from _jsonl_documents(file, field)
        elif file.suffix == ".parquet":
            found = True
            yield from _parquet_documents(file, field)
        elif file.suffix in TEXT_SUFFIXES or path == file or isinstance(path, list):
            found = True
            yield file.read_text(encoding="utf-8", errors="replace")
    if not found:
        raise ValueError(
            f"{path}: no text found; give text files ({', '.join(sorted(TEXT_SUFFIXES))}), jsonl files "
            f"with a {field!r} field, parquet files with a {field!r} column, a Hugging Face datasets folder "
            f"(save_to_disk), or a {' / '.join(sorted(TENSOR_SUFFIXES))} file of token ids"
        )


def _jsonl_documents(file: Path, field: str):
    with open(file, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{file}:{number}: a jsonl line needs a string field {field!r} (give --field); "
                                 f"this one has {keys}")
            yield record[field]


def _pyarrow(what: str, where: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(f"{where}: reading {what} needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _parquet_documents(file: Path, field: str):
    parquet = _pyarrow("parquet", file).parquet.ParquetFile(file)
    if field not in parquet.schema_arrow.names:
        raise ValueError(f"{file}: no {field!r} column (give --field); it has {parquet.schema_arrow.names}")
    for batch in parquet.iter_batches(columns=[field]):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _column(table, field: str, where: Path):
    if field not in table.column_names:
        raise ValueError(f"{where}: no {field!r} column (give --field); it has {table.column_names}")
    for batch in table.select([field]).to_batches():
        yield from (text for text in batch.column(0).to_pylist() if text)


def _dataset_documents(folder: Path, field: str, split: str):
    """A `datasets` save_to_disk folder, read with `datasets` where it is installed, else its Arrow
    files straight (the same rows: save_to_disk writes the rows themselves, in order)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ValueError(f"{folder}: no split {split!r} (give --split); it has {', '.join(splits)}")
        folder = folder / split
    try:
        import datasets
    except ImportError:
        pa = _pyarrow("a datasets folder", folder)
        state = json.loads((folder / "state.json").read_text())
        for entry in state["_data_files"]:
            with pa.memory_map(str(folder / entry["filename"])) as source:
                yield from _column(pa.ipc.open_stream(source).read_all(), field, folder)
        return
    dataset = datasets.load_from_disk(str(folder))
    if field not in dataset.column_names:
        raise ValueError(f"{folder}: no {field!r} column (give --field); it has {dataset.column_names}")
    for batch in dataset.select_columns([field]).iter(batch_size=1000):
        yield from (text for text in batch[field] if text)


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
    folder, or a list of files read in that order), or from token stores: a store's prefix, or
    `--data`-style words blending several ("0.7 A 0.3 B"), drawn as `nano.samples.Blend` draws them."""
    if samples < 1 or length < 2:
        raise ValueError(f"samples must be >= 1 and length >= 2, got samples={samples}, length={length}")
    from .samples import looks_like_blend, open_blend

    if looks_like_blend(path):
        blend = open_blend([str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path], length)
        return blend.take(range(min(samples, len(blend))))
    if isinstance(path, (list, tuple)):
        return _pack(documents([Path(p) for p in path]), tokenizer, samples, length, f"{len(path)} files")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: calibration data not found")
    if path.suffix in TENSOR_SUFFIXES:
        tokens = _load_tensor(path)
        if tokens.shape[1] < length:
            raise ValueError(f"{path}: samples are {tokens.shape[1]} tokens long, shorter than length={length}")
        return tokens[:samples, :length].contiguous()
    return _pack(documents(path), tokenizer, samples, length, str(path))


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
        from .samples import ShortDataError

        raise ShortDataError(f"{source}: the text makes {len(buffer)} tokens (an end-of-sequence token after each "
                             f"document included), fewer than length={length}: not even one sample", len(buffer), length)
    return torch.stack(out)
