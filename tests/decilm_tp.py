"""The forward of a DeciLM from TensorRT-LLM rank files, as tensor-parallel ranks compute it.

Each rank holds only its own tensors (`export.trtllm_checkpoint.rank_tensors`); where TensorRT-LLM
all-reduces (after row-parallel layers: attention.dense, ffn.proj) or all-gathers (after
column-parallel layers with gathered output: linear attention and FFN, lm_head), `reduce` and `gather`
combine the ranks' parts. In one process the ranks are a list and the combining is a sum or a
concatenation; under torch.distributed each process has one rank and they are the collectives.

Run as a script under torchrun it is a rank: `decilm_tp.py CHECKPOINT IDS.pt OUT.pt [gloo|nccl]`
(with nccl, each rank computes on its own GPU, in fp64).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from twins.decilm import _frequencies


def _norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, freqs):
    angles = positions[:, None] * freqs[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _attention(t, prefix, x, config, tp, freqs):
    """One rank's share: its query heads and KV heads, through its columns of the output projection."""
    d, heads = config["head_size"], config["num_attention_heads"] // tp
    kv = t[prefix + "attention.qkv.weight"].shape[0] // d - heads
    kv //= 2
    qkv = x @ t[prefix + "attention.qkv.weight"].T
    q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    length = x.shape[0]
    positions = torch.arange(length, dtype=torch.float64, device=x.device)
    q = _rope(q.view(length, heads, d), positions, freqs)
    k = _rope(k.view(length, kv, d), positions, freqs)
    v = v.view(length, kv, d)
    group = heads // kv
    outputs = []
    causal = torch.ones(length, length, device=x.device).triu(1).bool()
    for head in range(heads):
        scores = (q[:, head] @ k[:, head // group].T / math.sqrt(d)).masked_fill(causal, float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ v[:, head // group])
    return torch.cat(outputs, -1) @ t[prefix + "attention.dense.weight"].T


def forward(ranks: list[dict], config: dict, ids: torch.Tensor, tp: int, reduce, gather) -> torch.Tensor:
    """Logits (T, vocab) of one sequence from the ranks' tensors (fp64)."""
    ranks = [{k: v.double() for k, v in r.items()} for r in ranks]
    first = ranks[0]
    eps = config["norm_epsilon"]
    scaling = config["rotary_scaling"]
    freqs = _frequencies({"rope_theta": config["rotary_base"], "rope_scaling": scaling}, config["head_size"])
    freqs = freqs.to(first["transformer.ln_f.weight"].device)
    x = first["transformer.vocab_embedding.weight"][ids]
    for i, layer in enumerate(config["layer_configs"]):
        p = f"transformer.layers.{i}."
        attention, ffn = layer["attention"]["impl"], layer["ffn"]["impl"]
        if attention != "no_op":
            h = _norm(x, first[p + "input_layernorm.weight"], eps)
            if attention == "attention":
                x = x + reduce([_attention(t, p, h, config, tp, freqs) for t in ranks])
            else:
                x = x + gather([h @ t[p + "attention.weight"].T for t in ranks])
        if ffn != "no_op":
            h = _norm(x, first[p + "post_layernorm.weight"], eps)
            if ffn == "mlp":
                x = x + reduce([(F.silu(h @ t[p + "ffn.fc.weight"].T) * (h @ t[p + "ffn.gate.weight"].T))
                                @ t[p + "ffn.proj.weight"].T for t in ranks])
            else:
                x = x + gather([h @ t[p + "ffn.weight"].T for t in ranks])
    x = _norm(x, first["transformer.ln_f.weight"], eps)
    return gather([x @ t["lm_head.weight"].T for t in ranks])[:, : config["vocab_size"]]


def in_one_process(checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """All ranks in this process: the all-reduce is a sum, the all-gather a concatenation."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    tp = config["mapping"]["tp_size"]
    ranks = [load_file(Path(checkpoint) / f"rank{r}.safetensors") for r in range(tp)]
    return forward(ranks, config, ids, tp, reduce=lambda parts: sum(parts), gather=lambda parts: torch.cat(parts, -1))


def main() -> None:
    """One rank under torchrun (gloo): its own file only, the real collectives."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import load_file

    checkpoint, ids_file, out = sys.argv[1:4]
    backend = sys.argv[4] if len(sys.argv) > 4 else "gloo"
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{int(__import__('os').environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    assert config["mapping"]["tp_size"] == world
    mine = load_file(Path(checkpoint) / f"rank{rank}.safetensors", device=device)

    def reduce(parts):
        (part,) = parts
        dist.all_reduce(part)
        return part

    def gather(parts):
        (part,) = parts
        pieces = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(pieces, part.contiguous())
        return torch.cat(pieces, -1)

    logits = forward([mine], config, torch.load(ids_file).to(device), world, reduce, gather)
    if rank == 0:
        torch.save(logits.cpu(), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    main()
