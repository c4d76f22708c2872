"""Train nano-tiny, the small NemotronH hybrid that reasons about arithmetic (nano/arithmetic.py).

The training mix follows the Nemotron Nano 2 recipe: full reasoning traces; about 10% of samples
with reasoning off (an empty `<think></think>` and a direct answer); about 5% with the trace cut
at a random point, closed with `</think>`, and followed by the correct answer, which is what
teaches a model to answer well when a budget cuts it short. `--truncated 0` trains the control.

Samples are generated on the fly (every problem is fresh), rendered with the model's own chat
template exactly as `nano.generate` renders them, batched by length with a token budget, and the
loss is on the assistant's tokens only. The run is bounded by wall-clock time; the learning rate
follows a cosine over that time. The result is written as a Hugging Face checkpoint (bf16).

    python experiments/nano_tiny/train.py --out runs/main --minutes 8
    python experiments/nano_tiny/train.py --out runs/control --minutes 8 --truncated 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nano.arithmetic import answer_text, sample, trace  # noqa: E402
from nano.atomic import atomic_dir  # noqa: E402
from nano.chat import ChatFormat  # noqa: E402
from nano.checkpoint import write_checkpoint  # noqa: E402
from nano.tiny import END_OF_TURN, tiny_config, tiny_tokenizer  # noqa: E402

# A hybrid shaped like the 12B's pattern (Mamba/MLP pairs, attention every few), scaled down to
# 4.5M parameters: 9.0 MB in bf16.
MODEL = dict(
    hybrid_override_pattern="M-M-M*-M-M-M*-",
    hidden_size=256,
    intermediate_size=640,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=12,
    mamba_head_dim=32,
    n_groups=2,
    ssm_state_size=32,
    conv_kernel=4,
    chunk_size=64,
    max_position_embeddings=8192,
    initializer_range=0.02,
)

SYSTEM_PROMPTS = ["", "You are a careful calculator.", "Work it out step by step."]


def conversation(rng: random.Random, question: str, think: bool) -> list[dict]:
    """The question with the reasoning switch typed the ways users type it."""
    switch = "/think" if think else "/no_think"
    system = rng.choice(SYSTEM_PROMPTS)
    where = rng.random()
    if where < 0.4 and think:  # reasoning is on by default: often no switch at all
        messages = [{"role": "user", "content": question}]
    elif where < 0.7:
        messages = [{"role": "system", "content": f"{system} {switch}".strip()}, {"role": "user", "content": question}]
    else:
        messages = [{"role": "user", "content": f"{question} {switch}"}]
    if system and messages[0]["role"] != "system" and rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def make_sample(rng: random.Random, chat: ChatFormat, truncated: float, no_think: float) -> tuple[list[int], int]:
    """Token ids of one conversation and where the assistant's part (the loss) starts."""
    problem = sample(rng)
    roll = rng.random()
    think = roll >= no_think
    prompt, reasoning = chat.render(conversation(rng, problem.question, think))
    assert reasoning == think
    if not think:
        body = ""
    elif roll < no_think + truncated:
        steps = trace(problem)
        body = steps[: rng.randrange(len(steps))] + "</think>\n"
    else:
        body = trace(problem) + "\n</think>\n"
    prompt_ids = chat.encode(prompt)
    target_ids = chat.encode(body + answer_text(problem.value) + END_OF_TURN)
    return prompt_ids + target_ids, len(prompt_ids)


def batches(rng, chat, args, pad_id: int):
    """Endless (input_ids, labels) batches: a pool sorted by length, cut into token-budgeted batches."""
    while True:
        pool = []
        while len(pool) < args.pool:
            ids, start = make_sample(rng, chat, args.truncated, args.no_think)
            if len(ids) <= args.max_len:
                pool.append((ids, start))
        pool.sort(key=lambda s: len(s[0]))
        groups, current = [], []
        for s in pool:
            if current and (len(current) + 1) * len(s[0]) > args.batch_tokens:
                groups.append(current)
                current = []
            current.append(s)
        groups.append(current)
        rng.shuffle(groups)
        for group in groups:
            width = max(len(ids) for ids, _ in group)
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(group):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, start : len(ids)] = torch.tensor(ids[start:])
            yield input_ids, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training time")
    parser.add_argument("--truncated", type=float, default=0.05, help="share of truncated traces (0 for the control)")
    parser.add_argument("--no-think", type=float, default=0.10, help="share of samples with reasoning off")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="padded tokens per batch")
    parser.add_argument("--max-len", type=int, default=4096, help="longest sample kept (tokens)")
    parser.add_argument("--pool", type=int, default=4096, help="samples sorted by length at a time")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", type=json.loads, default={}, help="overrides of the model config (JSON)")
    args = parser.parse_args()

    from transformers import NemotronHForCausalLM

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    config = tiny_config(**dict(MODEL, **args.model))
    tokenizer = tiny_tokenizer(model_max_length=config.max_position_embeddings)
    chat = ChatFormat(tokenizer, config.eos_token_id)
    model = NemotronHForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(f"{params / 1e6:.2f}M parameters on {device}; {args.minutes} min; truncated {args.truncated}", flush=True)

    log, step, tokens, start = [], 0, 0, time.perf_counter()
    budget = args.minutes * 60
    data = batches(rng, chat, args, tokenizer.pad_token_id)
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, labels = next(data)
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int((labels != -100).sum())
        if step % 25 == 0:
            entry = {
                "step": step,
                "minutes": round(elapsed / 60, 2),
                "loss": round(loss.item(), 4),
                "grad_norm": round(norm.item(), 3),
                "lr": lr,
                "target_tokens": tokens,
            }
            log.append(entry)
            print(json.dumps(entry) + f"  {tokens / elapsed:,.0f} target tok/s", flush=True)

    model.eval()
    with atomic_dir(args.out, overwrite=True) as tmp:
        write_checkpoint(tmp, model.to(torch.bfloat16), tokenizer)
        recipe = {
            "steps": step,
            "minutes": args.minutes,
            "target_tokens": tokens,
            "parameters": params,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "model": dict(MODEL, **args.model),
            "log": log,
        }
        (tmp / "training.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"wrote {args.out}: {step} steps, {tokens:,} target tokens", flush=True)


if __name__ == "__main__":
    main()
