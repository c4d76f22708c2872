"""`nanokit serve --model DIR [--host 127.0.0.1] [--port 8000]`."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("nanokit serve needs FastAPI and uvicorn: pip install 'nanokit[serve]'") from None
    import nano
    from nano.cli import quiet_transformers

    from .server import create_app

    quiet_transformers()
    model = nano.load(args.model, device=args.device)
    name = args.name or getattr(model.path, "name", str(args.model))
    app = create_app(model, name, max_batch=args.max_batch, default_max_tokens=args.max_tokens)
    print(f"serving {name} ({model.runtime_name()}) on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_serve(sub) -> None:
    from nano.cli import whole_number

    p = sub.add_parser("serve", help="an OpenAI-compatible server with the thinking budget",
                       description="Serve /v1/chat/completions, /v1/completions and /v1/models; reasoning in "
                       "reasoning_content, a per-request thinking_budget (or nvext.max_thinking_tokens).")
    p.add_argument("--model", default="nano-tiny", help="checkpoint folder, or a shipped model's name")
    p.add_argument("--name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=whole_number(1), default=8000)
    p.add_argument("--max-batch", type=whole_number(1), default=8, help="requests run together at most")
    p.add_argument("--max-tokens", type=whole_number(1), default=1024, help="default max_tokens of a request")
    p.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.set_defaults(func=cmd_serve)
