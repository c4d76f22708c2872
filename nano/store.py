"""Token stores on disk in Megatron's indexed dataset format (PREFIX.bin and PREFIX.idx), written
and read here by memory map, without Megatron.

The format, as megatron-core 0.16.1 writes and reads it (megatron/core/datasets/indexed_dataset.py,
`_IndexWriter`, `_IndexReader`, `IndexedDatasetBuilder`):

- PREFIX.idx, little-endian: the 9 bytes b"MMIDIDX\\x00\\x00"; the version (uint64, 1); the token
  dtype's code (uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16);
  the sequence count S (uint64); the document count D (uint64); the length of every sequence
  (int32 x S); its byte offset in .bin (int64 x S); the document indices (int64 x D: 0, then the
  number of sequences written when each document ended); an int8 mode per sequence follows only
  in multimodal stores, which this module neither writes nor reads.
- PREFIX.bin: the tokens of every sequence, back to back.

Here a document is one sequence (Megatron's `preprocess_data.py` with `--append-eod` does the same),
so the document indices are 0, 1, ..., S. Tokens are uint16 when the vocabulary is under 65500 and
int32 otherwise (Megatron's `DType.optimal_dtype`).

Writing is atomic: both files are written under `.partial` names and renamed into place at the end,
the index last, so a killed run leaves no PREFIX.idx, and a store without one is not a store.
Reading maps the files and touches only what is asked for: a sample's tokens are copied out and
their pages handed back to the kernel, so a process reading a store of any size stays small; the
map is marked for random access, since without that every fault reads ahead far past the sample.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, the two counts
_PAGE = mmap.PAGESIZE


class StoreError(ValueError):
    """A path that is not a complete, well-formed token store."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron picks for a vocabulary of `vocab_size` ids."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def store_prefix(path: str | os.PathLike) -> Path:
    """The prefix of a store named by its prefix, its .idx or its .bin."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".idx", ".bin") else path


def is_store(path: str | os.PathLike) -> bool:
    prefix = store_prefix(path)
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()


class StoreWriter:
    """Write documents of token ids into a new store at `prefix`, one sequence each.

    Use it as a context manager: on a clean exit the store is renamed into place; on an exception
    the partial files are removed and nothing is left at `prefix`.
    """

    def __init__(self, prefix: str | os.PathLike, dtype, overwrite: bool = False):
        self.prefix = store_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise StoreError(f"token dtype {self.dtype} has no code in the format; known: {sorted(map(str, CODES))}")
        self.bin, self.idx = Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")
        if not overwrite and (self.bin.exists() or self.idx.exists()):
            raise StoreError(f"{self.prefix}: a store is already there (.bin or .idx); pass overwrite (--overwrite) to replace it")
        self.lengths = array("q")
        self.tokens = 0
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self._file = None

    def __enter__(self) -> StoreWriter:
        self.bin.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(_partial(self.bin), "wb")
        return self

    def add(self, tokens) -> None:
        """Append one document (a sequence of token ids; empty documents are skipped)."""
        ids = np.asarray(tokens)
        if ids.size == 0:
            return
        if ids.ndim != 1:
            raise StoreError(f"a document is a flat sequence of token ids, got shape {ids.shape}")
        if self._limit is not None and (ids.min() < 0 or ids.max() > self._limit):
            raise StoreError(f"token ids {ids.min()}..{ids.max()} do not fit {self.dtype} (0..{self._limit})")
        if ids.size > np.iinfo(np.int32).max:
            raise StoreError(f"a document of {ids.size} tokens is longer than the format's int32 lengths allow")
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(ids.size)
        self.tokens += ids.size

    def __exit__(self, kind, value, traceback) -> None:
        self._file.close()
        if kind is not None:
            _partial(self.bin).unlink(missing_ok=True)
            _partial(self.idx).unlink(missing_ok=True)
            return
        try:
            write_index(_partial(self.idx), self.dtype, np.frombuffer(self.lengths, dtype=np.int64))
            self.idx.unlink(missing_ok=True)  # an old store, if any, stops being one before its .bin changes
            os.replace(_partial(self.bin), self.bin)
            os.replace(_partial(self.idx), self.idx)
        except BaseException:
            _partial(self.bin).unlink(missing_ok=True)
            _partial(self.idx).unlink(missing_ok=True)
            raise


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_index(path: Path, dtype, lengths: np.ndarray, document_indices: np.ndarray | None = None) -> None:
    """Write a .idx for sequences of `lengths` stored back to back (one document each by default)."""
    count = len(lengths)
    pointers = np.zeros(count, dtype=np.int64)
    if count:
        np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    documents = np.arange(count + 1, dtype=np.int64) if document_indices is None else document_indices
    with open(path, "wb") as f:
        f.write(HEADER + struct.pack("<Q", VERSION) + struct.pack("<B", CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", count) + struct.pack("<Q", len(documents)))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(documents, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


class TokenStore:
    """A store opened for reading: its tokens as one stream (the documents in order), by memory map.

    Opening reads the 34-byte header and checks the two files agree (the last sequence ends where
    .bin ends); the per-sequence arrays are mapped, not read.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = store_prefix(prefix)
        idx, bin_ = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        if not idx.is_file():
            partial = " (a .partial file is there: a write did not finish)" if _partial(idx).exists() else ""
            raise StoreError(f"{self.prefix}: no token store here: {idx.name} is missing{partial}")
        if not bin_.is_file():
            raise StoreError(f"{self.prefix}: {bin_.name} is missing beside {idx.name}")
        with open(idx, "rb") as f:
            head = f.read(_FIXED)
        if len(head) < _FIXED or head[: len(HEADER)] != HEADER:
            raise StoreError(f"{idx}: not a Megatron indexed dataset index (no {HEADER!r} header)")
        version, code = struct.unpack("<Q", head[9:17])[0], head[17]
        if version != VERSION or code not in DTYPES:
            raise StoreError(f"{idx}: version {version}, dtype code {code}; readable: version 1, codes {sorted(DTYPES)}")
        self.dtype = np.dtype(DTYPES[code])
        self.sequences, self.document_count = struct.unpack("<QQ", head[18:34])
        expected = _FIXED + self.sequences * (4 + 8) + self.document_count * 8
        if idx.stat().st_size not in (expected, expected + self.sequences):  # + int8 modes (multimodal)
            raise StoreError(f"{idx}: {idx.stat().st_size} bytes, but its counts need {expected}")
        size = bin_.stat().st_size
        self.tokens = size // self.dtype.itemsize
        self._idx = np.memmap(idx, mode="r", dtype=np.uint8) if self.sequences else None
        if self.sequences:
            last = self.sequences - 1
            end = int(self.pointers[last]) + int(self.lengths[last]) * self.dtype.itemsize
            if end != size or int(self.pointers[0]) != 0:
                raise StoreError(f"{bin_}: {size} bytes, but {idx.name}'s sequences end at byte {end}: the two "
                                 "files are not from the same write")
        self._file = open(bin_, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if self._map is not None:
            self._map.madvise(mmap.MADV_RANDOM)  # samples are scattered: read-ahead would read megabytes for each

    @property
    def lengths(self) -> np.ndarray:
        return self._idx[_FIXED : _FIXED + 4 * self.sequences].view(np.int32)

    @property
    def pointers(self) -> np.ndarray:
        start = _FIXED + 4 * self.sequences
        return self._idx[start : start + 8 * self.sequences].view(np.int64)

    @property
    def document_indices(self) -> np.ndarray:
        start = _FIXED + 12 * self.sequences
        return self._idx[start : start + 8 * self.document_count].view(np.int64)

    def window(self, start: int, count: int) -> np.ndarray:
        """A copy of `count` tokens of the stream from token `start`; the pages read are released."""
        if start < 0 or count < 0 or start + count > self.tokens:
            raise IndexError(f"tokens {start}..{start + count} of a store of {self.tokens}")
        offset, size = start * self.dtype.itemsize, count * self.dtype.itemsize
        out = np.frombuffer(self._map, dtype=self.dtype, count=count, offset=offset).copy()
        first = offset - offset % _PAGE
        self._map.madvise(mmap.MADV_DONTNEED, first, offset + size - first)
        return out

    def sequence(self, index: int) -> np.ndarray:
        """A copy of sequence `index` (a document, in stores written here)."""
        if not 0 <= index < self.sequences:
            raise IndexError(f"sequence {index} of a store of {self.sequences}")
        return self.window(int(self.pointers[index]) // self.dtype.itemsize, int(self.lengths[index]))

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TokenStore({str(self.prefix)!r}: {self.tokens:,} tokens, {self.sequences:,} sequences, {self.dtype})"
