"""A byte-level BPE tokenizer of the Nemotron Nano 2 size (131072 entries), trained offline, for
measuring tokenization at the real vocabulary size when the real tokenizer cannot be downloaded.

Nemotron-Nano-12B-v2's tokenizer is a byte-level BPE of 131072 entries. This one is of the same
kind and size: the `tokenizers` library's BPE with the ByteLevel pre-tokenizer (GPT-2's split
regex) and decoder, trained with `BpeTrainer(vocab_size=131072)` on text every install of this
project has, the .py/.md/.txt files of the installed packages (`site_packages_files`). The files
are split by a hash of their path: 1 in 3 may be trained on (`train` part, read in path order up
to a byte cap), the other 2 in 3 (`held_out` part) are for measuring on text it has not seen.
Its merges differ from the real tokenizer's, and so its tokens per byte; its work per byte (a
regex split, then merges looked up in tables of the same size) is what is measured.

It is saved as a transformers `PreTrainedTokenizerFast` folder (tokenizer.json,
tokenizer_config.json with eos_token "</s>") under ~/.cache/nanokit/ and reused when present, with
`training.json` beside it saying what it was trained on, how long it took and the size it reached.

    python -m bench.tokenizer_131k                 # build (or report) ~/.cache/nanokit/bpe-131k
    python -m bench.tokenizer_131k --train-mib 32 --dir /tmp/bpe-small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

VOCAB_SIZE = 131072
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
SUFFIXES = (".py", ".md", ".txt")
DEFAULT_DIR = Path.home() / ".cache" / "nanokit" / "bpe-131k"
DEFAULT_TRAIN_MIB = 128  # the whole train part (107 MiB on this install): 131072 reached in 15 s on 2 cores
PARTS = 3  # 1 in PARTS files may be trained on


def site_packages() -> Path:
    """The virtual environment's site-packages (the one this Python runs from)."""
    candidates = sorted(Path(sys.prefix).glob("lib/python3*/site-packages"))
    if not candidates:
        raise SystemExit(f"no lib/python3*/site-packages under {sys.prefix}")
    return candidates[0]


def _part(relative: str) -> str:
    return "train" if hashlib.sha1(relative.encode()).digest()[0] % PARTS == 0 else "held_out"


def site_packages_files(part: str, cap_bytes: int | None = None) -> list[Path]:
    """The .py/.md/.txt files of site-packages in `part` ("train" or "held_out"), sorted by path,
    up to `cap_bytes` of file size (the file that crosses the cap is the last one)."""
    root = site_packages()
    files, size = [], 0
    for path in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file() and not p.is_symlink()):
        if _part(str(path.relative_to(root))) != part:
            continue
        files.append(path)
        size += path.stat().st_size
        if cap_bytes is not None and size >= cap_bytes:
            break
    return files


def corpus_digest(files: list[Path]) -> str:
    """A digest of the file list with each file's size: the same text on another install, or not."""
    root = site_packages()
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(root)}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def train(folder: Path, train_mib: int = DEFAULT_TRAIN_MIB) -> dict:
    """Train the tokenizer on up to `train_mib` MiB of the `train` part and save it at `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = site_packages_files("train", train_mib << 20)
    text_bytes = sum(p.stat().st_size for p in files)

    def texts():
        for path in files:
            yield path.read_text(encoding="utf-8", errors="replace")

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    started = time.perf_counter()
    backend.train_from_iterator(texts(), trainer=trainer, length=len(files))
    seconds = time.perf_counter() - started
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    config = partial / "tokenizer_config.json"  # the class's name older transformers know too (5.x reads it the same)
    config.write_text(json.dumps(dict(json.loads(config.read_text()), tokenizer_class="PreTrainedTokenizerFast"), indent=2) + "\n")
    info = dict(kind="byte-level BPE (tokenizers: ByteLevel pre-tokenizer with its regex, ByteLevel decoder)",
                vocab_size_asked=VOCAB_SIZE, vocab_size_reached=backend.get_vocab_size(),
                special_tokens=SPECIAL_TOKENS, eos_token="</s>",
                trained_on=f"the 'train' part (1 in {PARTS} by a hash of the path) of {', '.join(SUFFIXES)} files "
                           f"under {site_packages()}, in path order, capped at {train_mib} MiB",
                train_mib_cap=train_mib, train_files=len(files), train_bytes=text_bytes,
                train_corpus_digest=corpus_digest(files), train_seconds=round(seconds, 1),
                cores=os.cpu_count(), tokenizers_version=__import__("tokenizers").__version__)
    (partial / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return info


def ensure(folder: str | os.PathLike = DEFAULT_DIR, train_mib: int = DEFAULT_TRAIN_MIB) -> tuple[Path, dict]:
    """The tokenizer folder, trained first if it is not there yet; and its training.json."""
    folder = Path(folder).expanduser()
    if not (folder / "tokenizer.json").is_file() or not (folder / "training.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        train(folder, train_mib)
    return folder, json.loads((folder / "training.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(DEFAULT_DIR))
    parser.add_argument("--train-mib", type=int, default=DEFAULT_TRAIN_MIB, help="cap on the training text")
    parser.add_argument("--retrain", action="store_true", help="train again even if the folder is there")
    args = parser.parse_args()
    if args.retrain:
        shutil.rmtree(Path(args.dir).expanduser(), ignore_errors=True)
    folder, info = ensure(args.dir, args.train_mib)
    print(folder)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
