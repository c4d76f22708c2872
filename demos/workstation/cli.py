"""`nanokit serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch N|auto] [--context N] ...`."""

from __future__ import annotations

import argparse
import sys

MIB = 2**20


def engine_size(model, context: int, prefix_cache: int, gpu: str | None = None,
                most: int = 64) -> tuple[int, int, str]:
    """The engine's slots of `context` tokens each and the prompts it prefills together, by the planner,
    and a line saying why: on a GPU, as many slots as fit its memory (or the named `gpu` target's), at
    most `most`; on the CPU, 8."""
    from nano.hardware import PREFILL_ROWS
    from nano.memory import GIB, engine_plan
    from nano.memory import engine_size as plan_size

    if model.device.type != "cuda" and gpu is None:
        return 8, PREFILL_ROWS, "8 slots (the CPU's default)"
    if gpu is None:
        import torch

        free, _ = torch.cuda.mem_get_info(model.device)
        target = (free + torch.cuda.memory_allocated(model.device)) / GIB * 0.95  # the weights are already in
        where = f"{target:.1f} GiB of this GPU"
    else:
        try:
            target, where = float(gpu), f"{gpu} GiB"
        except ValueError:
            target, where = gpu, gpu
    slots, rows = plan_size(model.config, target, context, prefix_cache, most=most)
    if not slots:
        need = engine_plan(model.config, target, context, 1, prefix_cache, prefill_rows=1).total / GIB
        raise ValueError(f"not one request of {context} tokens fits {where}: it needs {need:.1f} GiB; "
                         "lower --context or --prefix-cache-mib")
    total = engine_plan(model.config, target, context, slots, prefix_cache, prefill_rows=rows).total / GIB
    together = "one prompt prefilled at a time, which leaves room for more slots" if rows == 1 else (
        f"up to {rows} prompts prefilled together")
    return slots, rows, f"{slots} slots (the planner: {total:.1f} GiB planned in {where}, at most {most}; {together})"


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("nanokit serve needs FastAPI and uvicorn: pip install 'nanokit[serve]'") from None
    import nano
    from nano.cli import quiet_transformers
    from nano.config import context_length
    from nano.hardware import PREFILL_ROWS

    from .server import create_app

    quiet_transformers()
    model = nano.load(args.model, device=args.device)
    name = args.name or getattr(model.path, "name", str(args.model))
    if args.context is not None and args.context > context_length(model.config):
        raise ValueError(f"--context {args.context} is past the model's context of {context_length(model.config)} tokens")
    context = args.context or context_length(model.config)
    prefix_cache = (args.prefix_cache_mib if args.prefix_cache_mib is not None
                    else 1024 if model.device.type == "cuda" else 256) * MIB
    rows = PREFILL_ROWS
    if args.batching == "static":
        slots, why = (8 if args.max_batch == "auto" else args.max_batch), "static batches"
    elif args.max_batch == "auto":
        slots, rows, why = engine_size(model, context, prefix_cache, args.gpu)
    else:
        slots, why = args.max_batch, f"{args.max_batch} slots (--max-batch)"
    app = create_app(model, name, max_batch=slots, default_max_tokens=args.max_tokens, batching=args.batching,
                     context=context, max_waiting=args.max_waiting, prefix_cache=prefix_cache, prefill_rows=rows,
                     progress=sys.stderr.isatty())
    print(f"serving {name} ({model.runtime_name()}) on http://{args.host}:{args.port}/v1: {args.batching} batching, "
          f"{why}, {context} tokens each")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _batch(text: str):
    from nano.cli import whole_number

    return text if text == "auto" else whole_number(1)(text)


def add_serve(sub) -> None:
    from nano.cli import whole_number

    p = sub.add_parser("serve", help="an OpenAI-compatible server with the thinking budget",
                       description="Serve /v1/chat/completions, /v1/completions and /v1/models; reasoning in "
                       "reasoning_content, a per-request thinking_budget (or nvext.max_thinking_tokens). Requests "
                       "join a running batch (continuous batching); past the queue the server answers 429.")
    p.add_argument("--model", default="nano-tiny", help="checkpoint folder, or a shipped model's name")
    p.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=whole_number(1), default=8000)
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: requests join the running batch (default); static: whole batches in turn")
    p.add_argument("--max-batch", type=_batch, default="auto",
                   help="requests decoding together (the engine's slots); auto: as many as the planner fits in the "
                   "GPU's memory at --context, at most 64 (8 on the CPU)")
    p.add_argument("--context", type=whole_number(16), help="tokens per request, prompt and answer (default: the model's)")
    p.add_argument("--prefix-cache-mib", type=whole_number(0),
                   help="memory for prefix snapshots (shared system prompts, conversations; default 1024 on a GPU, "
                   "256 on the CPU; 0: off)")
    p.add_argument("--max-waiting", type=whole_number(0), help="requests queued for a slot before 429 (default: 4 per slot)")
    p.add_argument("--gpu", help="plan the slots for this target (a10g, h100, ... or GiB) instead of this GPU")
    p.add_argument("--max-tokens", type=whole_number(1), default=1024, help="default max_tokens of a request")
    p.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.set_defaults(func=cmd_serve)
