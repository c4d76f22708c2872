"""Tensor-parallel DeciLM over NCCL: rank files of a tiny heterogeneous DeciLM, each rank's forward on its own GPU
(tests/decilm_tp.py) with NCCL's all-reduce and all-gather, against the unsharded reference logits.

    python -m bench.decilm_tp_nccl --gpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.record import write
from export.trtllm_checkpoint import write_trtllm_checkpoint
from nano.decilm_config import DeciConfig
from nano.tiny import build_tiny_decilm_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference twin and the block layout live with the tests

from twins.decilm import reference_logits  # noqa: E402
from test_decilm_tp import TP_BLOCKS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_decilm_checkpoint(tmp / "m", seed=5, std=0.1, block_configs=TP_BLOCKS, hidden_size=128,
                                             num_attention_heads=16, head_dim=8, vocab_size=290)
        raw = json.loads((model / "config.json").read_text())
        ids = torch.randint(3, 267, (19,), generator=torch.Generator().manual_seed(2))
        torch.save(ids, tmp / "ids.pt")
        expected = reference_logits(raw, load_file(model / "model.safetensors"), ids.tolist())
        for tp in [n for n in (2, 4, 8) if n <= args.gpus]:
            checkpoint = tmp / f"tp{tp}"
            checkpoint.mkdir()
            write_trtllm_checkpoint(model, checkpoint, DeciConfig.of(raw), raw, tp, dtype="float32")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp),
                                  str(ROOT / "tests" / "decilm_tp.py"), str(checkpoint), str(tmp / "ids.pt"),
                                  str(tmp / f"out{tp}.pt"), "nccl"], env=env, capture_output=True, text=True, timeout=300)
            if run.returncode:
                rows.append(dict(tp=tp, backend="nccl", error=run.stderr[-300:]))
                continue
            got = torch.load(tmp / f"out{tp}.pt")
            rows.append(dict(tp=tp, backend="nccl", max_abs_error=float((got - expected).abs().max()),
                             max_abs_logit=float(expected.abs().max()), equal_to_1e_9=bool(torch.allclose(got, expected, atol=1e-9, rtol=0))))
    write("decilm-tp-nccl", rows, list(dict.fromkeys(k for r in rows for k in r)), "cuda")


if __name__ == "__main__":
    main()
