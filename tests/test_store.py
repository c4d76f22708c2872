"""Token stores: the format against Megatron's own reader and writer (megatron-core 0.16.1 from PyPI,
megatron/core/datasets/indexed_dataset.py: `IndexedDataset`, `IndexedDatasetBuilder`) and against
bytes built here from the format's description; atomic writes; blends drawn by position alone."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nano.cli import main
from nano.samples import BLOCK, Blend, Permutation, ShortDataError, apportion, open_blend, parse_blend
from nano.store import StoreError, StoreWriter, TokenStore, token_dtype
from nano.tokenize import tokenize

DOCUMENTS = [[5, 6, 7], [1], [65000, 2, 3, 4, 9], [8, 8]]


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                   reason="megatron-core is not installed (pip install megatron-core==0.16.1)")


def _spec_bytes(documents, dtype) -> tuple[bytes, bytes]:
    """.bin and .idx built from the format's description alone, field by field."""
    itemsize = np.dtype(dtype).itemsize
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[np.dtype(dtype)]
    lengths = [len(d) for d in documents]
    pointers = [sum(lengths[:i]) * itemsize for i in range(len(lengths))]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(documents)) + struct.pack("<Q", len(documents) + 1)
    idx += b"".join(struct.pack("<i", n) for n in lengths)
    idx += b"".join(struct.pack("<q", p) for p in pointers)
    idx += b"".join(struct.pack("<q", i) for i in range(len(documents) + 1))
    fmt = {2: "<H", 4: "<i"}[itemsize]
    return b"".join(struct.pack(fmt, t) for d in documents for t in d), idx


def _write(prefix, documents, dtype):
    with StoreWriter(prefix, dtype) as writer:
        for d in documents:
            writer.add(d)
    return prefix


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_the_writer_writes_the_specified_bytes_and_the_reader_reads_them(tmp_path, dtype):
    _write(tmp_path / "ours", DOCUMENTS, dtype)
    binary, index = _spec_bytes(DOCUMENTS, dtype)
    assert (tmp_path / "ours.bin").read_bytes() == binary
    assert (tmp_path / "ours.idx").read_bytes() == index
    (tmp_path / "spec.bin").write_bytes(binary)
    (tmp_path / "spec.idx").write_bytes(index)
    with TokenStore(tmp_path / "spec") as store:
        assert store.dtype == np.dtype(dtype) and store.sequences == 4 and store.tokens == 11
        assert [store.sequence(i).tolist() for i in range(4)] == DOCUMENTS
        assert store.window(2, 4).tolist() == [7, 1, 65000, 2]
        assert store.document_indices.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_what_we_write(tmp_path, dtype):
    indexed = _megatron()
    _write(tmp_path / "ours", DOCUMENTS, dtype)
    dataset = indexed.IndexedDataset(str(tmp_path / "ours"), mmap=True)
    assert len(dataset) == 4 and dataset.index.dtype == dtype
    assert [dataset[i].tolist() for i in range(4)] == DOCUMENTS
    assert dataset.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert dataset.get(2, offset=1, length=2).tolist() == [2, 3]


def test_we_read_what_megatron_writes_documents_of_several_sequences_included(tmp_path):
    indexed = _megatron()
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, 3]), [3])
    builder.add_document(torch.tensor([4, 5, 6, 7, 8]), [2, 3])  # one document, two sequences
    builder.add_item(torch.tensor([131071]))
    builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    with TokenStore(tmp_path / "theirs") as store:
        assert store.dtype == np.int32 and store.sequences == 4 and store.tokens == 9
        assert [store.sequence(i).tolist() for i in range(4)] == [[1, 2, 3], [4, 5], [6, 7, 8], [131071]]
        assert store.document_indices.tolist() == [0, 1, 3, 4]
        assert store.window(0, 9).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 131071]


def test_dtype_follows_the_vocabulary_as_megatron_picks_it():
    indexed = _megatron()
    for vocab in (267, 65499, 65500, 131072):
        assert token_dtype(vocab) == np.dtype(indexed.DType.optimal_dtype(vocab))


def test_a_failed_write_leaves_nothing_and_an_old_store_intact(tmp_path):
    _write(tmp_path / "s", DOCUMENTS, np.uint16)
    before = (tmp_path / "s.bin").read_bytes(), (tmp_path / "s.idx").read_bytes()
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", np.uint16, overwrite=True) as writer:
        writer.add([1, 2, 3])
        raise RuntimeError("killed")
    assert ((tmp_path / "s.bin").read_bytes(), (tmp_path / "s.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]
    with pytest.raises(StoreError, match="already there"):
        StoreWriter(tmp_path / "s", np.uint16)
    with pytest.raises(StoreError, match=r"token ids 0\.\.70000 do not fit uint16"), \
            StoreWriter(tmp_path / "t", np.uint16) as writer:
        writer.add([0, 70000])
    assert not list(tmp_path.glob("t.*"))


def test_broken_stores_are_refused_with_the_reason(tmp_path):
    with pytest.raises(StoreError, match="no token store here: x.idx is missing"):
        TokenStore(tmp_path / "x")
    _write(tmp_path / "s", DOCUMENTS, np.uint16)
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(StoreError, match="not from the same write"):
        TokenStore(tmp_path / "s")
    (tmp_path / "h.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "h.bin").write_bytes(b"")
    with pytest.raises(StoreError, match="not a Megatron indexed dataset index"):
        TokenStore(tmp_path / "h")
    (tmp_path / "p.bin.partial").write_bytes(b"")
    (tmp_path / "p.idx.partial").write_bytes(b"")
    with pytest.raises(StoreError, match="a write did not finish"):
        TokenStore(tmp_path / "p")


def test_permutations_are_bijections_one_at_a_time_and_all_at_once():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4099):
        for seed in (0, 5, 2**70 + 3):
            one_by_one = [Permutation(n, seed)(i) for i in range(n)]
            assert sorted(one_by_one) == list(range(n))
            assert Permutation(n, seed).table().tolist() == one_by_one
    assert [Permutation(1000, 1)(i) for i in range(20)] != [Permutation(1000, 2)(i) for i in range(20)]
    with pytest.raises(IndexError):
        Permutation(10, 0)(10)


def test_apportion_sums_and_follows_the_weights():
    assert apportion([0.7, 0.3], 10) == [7, 3]
    assert apportion([1, 1, 1], 10) == [4, 3, 3]
    assert sum(apportion([0.123, 0.456, 0.421], BLOCK)) == BLOCK


@pytest.fixture()
def two_stores(tmp_path):
    a = _write(tmp_path / "a", [list(range(i * 10, i * 10 + 10)) for i in range(50)], np.uint16)  # 500 tokens
    b = _write(tmp_path / "b", [[1000 + i for i in range(300)]], np.int32)
    return a, b


def test_a_blend_draws_each_window_once_per_pass_in_its_share(two_stores):
    a, b = (TokenStore(p) for p in two_stores)
    blend = Blend([(0.7, a), (0.3, b)], length=10, seed=3)
    assert [p.windows for p in blend.parts] == [50, 30] and len(blend) == 80
    located = [blend.locate(i) for i in range(BLOCK)]
    counts = Counter(part for part, _ in located)
    assert [counts[0], counts[1]] == blend.shares == apportion([0.7, 0.3], BLOCK)
    for part, windows in ((0, 50), (1, 30)):
        draws = [w for p, w in located if p == part]  # in position order
        for start in range(0, len(draws) - windows, windows):  # every pass covers every window once
            assert sorted(draws[start : start + windows]) == list(range(windows))
        assert draws[:windows] != draws[windows : 2 * windows]  # a new order per pass
    rows = blend.take(range(100, 110))
    for row, (part, window) in zip(rows, located[100:110]):
        store = (a, b)[part]
        assert row.tolist() == store.window(window * 10, 10).tolist()
    again = Blend([(0.7, a), (0.3, b)], length=10, seed=3)
    assert torch.equal(again.take(range(5000, 5010)), blend.take(range(5000, 5010)))  # position alone
    assert not torch.equal(Blend([(0.7, a), (0.3, b)], 10, seed=4).take(range(10)), blend.take(range(10)))


def test_held_out_windows_never_reach_training(two_stores):
    a, b = (TokenStore(p) for p in two_stores)
    blend = Blend([(1, a), (1, b)], length=10, held_out=4)
    assert [(p.windows, p.held_out) for p in blend.parts] == [(48, 2), (28, 2)]
    held = {tuple(r) for r in blend.held_out_samples().tolist()}
    assert len(held) == 4
    assert not held & {tuple(r) for r in blend.take(range(2000)).tolist()}


def test_blend_words_and_their_errors(two_stores, tmp_path):
    a, b = two_stores
    assert parse_blend(["0.7", str(a), "0.3", f"{b}.idx"]) == [(0.7, a), (0.3, b)]
    sized = open_blend([str(a), str(b)], length=10)
    assert [p.weight for p in sized.parts] == [500, 300]
    with pytest.raises(ValueError, match="pairs of WEIGHT PATH"):
        parse_blend(["0.7", str(a), "0.3"])
    with pytest.raises(ValueError, match="every path has a weight before it or none does"):
        parse_blend([str(a), "0.3", str(b)])
    with pytest.raises(StoreError, match="not a token store"):
        parse_blend(["1", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="blend weights must be positive"):
        open_blend(["0", str(a), "1", str(b)], length=10)
    with pytest.raises(ShortDataError, match="500 tokens make 0 samples of length=1000; give a shorter --length"):
        open_blend([str(a)], length=1000)


# Tokenizing.

TEXTS = ["first document\nwith two lines", "", "second: caf\u00e9", "third " * 50]


def _tokenizer():
    from nano.tokenize import load_tokenizer

    return load_tokenizer("nano-tiny")


def _expected(texts):
    tok = _tokenizer()
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts if t]


def test_tokenize_writes_each_document_and_its_eos_the_same_for_any_worker_count(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    one = tokenize("nano-tiny", [tmp_path / "in.jsonl"], tmp_path / "one", field="body", workers=1)
    two = tokenize("nano-tiny", [tmp_path / "in.jsonl"], tmp_path / "two", field="body", workers=2)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()
    with TokenStore(tmp_path / "one") as store:
        assert [store.sequence(i).tolist() for i in range(store.sequences)] == _expected(TEXTS)
    assert one.documents == two.documents == 3 and one.tokens == store.tokens
    manifest = json.loads((tmp_path / "one.json").read_text())
    assert manifest["documents"] == 3 and manifest["field"] == "body" and manifest["dtype"] == "uint16"


def test_tokenize_reads_parquet_and_datasets_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet", row_group_size=2)
    tokenize("nano-tiny", [tmp_path / "in.parquet"], tmp_path / "pq", workers=1)
    with TokenStore(tmp_path / "pq") as store:
        assert [store.sequence(i).tolist() for i in range(store.sequences)] == _expected(TEXTS)
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": TEXTS[::-1]}),
                          "test": datasets.Dataset.from_dict({"content": TEXTS})}).save_to_disk(tmp_path / "hf")
    tokenize("nano-tiny", [tmp_path / "hf"], tmp_path / "hf-store", field="content", workers=1)
    with TokenStore(tmp_path / "hf-store") as store:
        assert [store.sequence(i).tolist() for i in range(store.sequences)] == _expected(TEXTS[::-1])
    # Without `datasets`, its Arrow files are read straight: the same store.
    script = ("import sys; sys.modules['datasets'] = None\n"
              "from nano.tokenize import tokenize\n"
              f"tokenize('nano-tiny', [{str(tmp_path / 'hf')!r}], {str(tmp_path / 'arrow')!r}, field='content', "
              "split='train', workers=1)\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "arrow.bin").read_bytes() == (tmp_path / "hf-store.bin").read_bytes()
    with pytest.raises(ValueError, match="no split 'validation' \\(give --split\\); it has train, test"):
        tokenize("nano-tiny", [tmp_path / "hf"], tmp_path / "v", field="content", split="validation", workers=1)
    assert not list(tmp_path.glob("v.*"))


def test_a_tokenize_that_fails_leaves_no_store(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"in.jsonl:2: not JSON"):
        tokenize("nano-tiny", [tmp_path / "in.jsonl"], tmp_path / "out", workers=1)
    assert not list(tmp_path.glob("out*"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"needs a string field 'text' \(give --field\); this one has \['txt'\]"):
        tokenize("nano-tiny", [tmp_path / "bad.jsonl"], tmp_path / "out", workers=1)


def test_the_tokenize_command(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n")
    assert main(["tokenize", "--tokenizer", "nano-tiny", "--data", str(tmp_path / "a.txt"), "--out",
                 str(tmp_path / "s"), "--workers", "1"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["tokenize", "--tokenizer", "nano-tiny", "--data", str(tmp_path / "a.txt"), "--out",
                 str(tmp_path / "s"), "--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["tokenize", "--tokenizer", str(tmp_path / "none"), "--data", str(tmp_path / "a.txt"), "--out",
                 str(tmp_path / "t")]) == 2
    assert "no tokenizer folder here" in capsys.readouterr().err


def test_token_samples_from_a_store_are_the_blend_draws(two_stores):
    from nano.data import token_samples

    a, _ = two_stores
    rows = token_samples(str(a), None, samples=8, length=10)
    assert torch.equal(rows, open_blend([str(a)], 10).take(range(8)))
    assert token_samples(str(a), None, samples=1000, length=10).shape == (50, 10)  # no window twice


def test_prune_calibrates_on_a_blend_of_stores(tiny_dir, tmp_path, capsys):
    import jinja2

    files = sorted(Path(jinja2.__path__[0]).glob("*.py"))
    tokenize(tiny_dir, files[::2], tmp_path / "even", workers=1)
    tokenize(tiny_dir, files[1::2], tmp_path / "odd", workers=1)
    layers = len(json.loads((tiny_dir / "config.json").read_text())["hybrid_override_pattern"]) - 1
    words = ["0.5", str(tmp_path / "even"), "0.5", str(tmp_path / "odd")]
    assert main(["prune", "--teacher", str(tiny_dir), "--layers", str(layers), "--calib", *words, "--samples", "4",
                 "--length", "32", "--layer-samples", "2", "--out", str(tmp_path / "pruned")]) == 0
    record = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert record["calibration"]["samples"] == 4 and record["calibration"]["path"] == " ".join(words)
    assert "calibration: 4 samples of 32 tokens from 0.5" in capsys.readouterr().err
