"""`nanokit export ...` and `nanokit build`: deployment bundles, and running what they need."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from nano.cli import whole_number
from nano.hardware import DEFAULT_RECIPE, QUANT_FORMATS, RECIPES, TARGETS

ENGINE_MISSING = 3  # exit status when the bundle's engine is not installed here (its commands are printed)


def _calibration(args: argparse.Namespace):
    """The --calib text as token samples for --quant, tokenized by the model's tokenizer."""
    if not args.calib:
        raise ValueError(f"--quant {args.quant} needs calibration text: --calib PATH (text, jsonl, parquet or token ids)")
    from transformers import AutoTokenizer

    from nano.shipped import resolve
    from nano.data import token_samples

    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model))
    return token_samples(args.calib, tokenizer, args.calib_samples, args.calib_len)


def cmd_export_trtllm(args: argparse.Namespace) -> int:
    from nano.cli import quiet_transformers
    from nano.memory import GIB

    from nano.config import context_length

    from .trtllm import export_trtllm, read_config, size

    quiet_transformers()
    config = read_config(args.model)
    if args.pp != 1:
        raise ValueError(f"--pp {args.pp}: pipeline parallelism is not written yet; use --tp alone (--pp 1)")
    args.context = args.context or context_length(config)
    found = size(config, args.gpu, args.context, args.batch, args.quant, args.recipe, args.tp)  # before reading any text
    if args.dry_run:
        from .trtllm import llm_options, options_yaml

        p = found.plan
        print(f"{args.model}: {args.quant or 'bf16'}, {p.batch} x {p.context} tokens on {args.gpu}: {p.total / GIB:.2f} of "
              f"{p.usable / GIB:.1f} GiB (weights {p.weights / GIB:.2f}, KV {p.kv_cache / GIB:.2f}, Mamba state "
              f"{(p.ssm_state + p.conv_state) / GIB:.2f}, workspace {p.workspace / GIB:.2f}); llm_options.yaml would be:")
        print(options_yaml(llm_options(p, args.tp), ""), end="")
        return 0
    if not args.out:
        raise ValueError("--out is required (the bundle folder)")
    calibration = _calibration(args) if args.quant else None
    manifest = export_trtllm(args.model, args.out, args.gpu, args.context, args.batch, args.quant, args.recipe,
                             calibration, device=args.device, tp=args.tp, force=args.force, progress=sys.stderr.isatty())
    target = manifest["target"]
    plan = __import__("json").loads((Path(args.out) / "plan.json").read_text())
    print(f"wrote {args.out}: {manifest['model']['parameters']} parameters, {args.quant or 'bf16'}, "
          f"{target['context']} tokens x batch {target['batch']} on {args.gpu}: "
          f"{plan['total'] / GIB:.2f} of {plan['usable'] / GIB:.1f} GiB")
    first = "build.sh" if "build" in manifest["commands"] else "serve.sh"
    print(f"next: nanokit build --bundle {args.out}   (or: sh {Path(args.out) / first})")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a deployment bundle (TensorRT-LLM, ONNX)",
                       description="Write a deployment bundle sized by the memory planner.")
    targets = p.add_subparsers(dest="target", required=True, metavar="ENGINE")
    t = targets.add_parser("trtllm", help="TensorRT-LLM's PyTorch backend (trtllm-serve, LLM)",
                           description="A Hugging Face checkpoint (bf16 or quantized by nvidia-modelopt), the "
                           "options YAML sized for the GPU and context, a launch script and a manifest.")
    t.add_argument("--model", required=True, help="checkpoint folder")
    t.add_argument("--gpu", required=True, help=f"one of {', '.join(TARGETS)}")
    t.add_argument("--context", type=whole_number(1),
                   help="max_seq_len (default: the model's own, max_position_embeddings: 131072 for Nano 2)")
    t.add_argument("--batch", type=whole_number(1), help="max_batch_size (default: as many full contexts as fit, at most 64)")
    t.add_argument("--tp", type=whole_number(1), default=1, help="tensor-parallel size (1, 2, 4 or 8): sized per GPU")
    t.add_argument("--pp", type=whole_number(1), default=1, help="pipeline-parallel size (only 1 is written so far)")
    t.add_argument("--quant", choices=list(QUANT_FORMATS), help="quantize through nvidia-modelopt")
    t.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="mamba-mlp: Mamba projections and MLPs (NVIDIA's Nano 2 recipe); mlp: MLPs only")
    t.add_argument("--calib", help="calibration text for --quant (text, jsonl, parquet, or token ids)")
    t.add_argument("--calib-samples", type=whole_number(1), default=256)
    t.add_argument("--calib-len", type=whole_number(8), default=512)
    t.add_argument("--device", help="where to calibrate (default cpu; cuda is much faster for real models)")
    t.add_argument("--out", help="the bundle folder (required unless --dry-run)")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.add_argument("--dry-run", action="store_true", help="size it and print the options; read config.json only")
    t.set_defaults(func=cmd_export_trtllm)

    e = targets.add_parser("edgellm", help="TensorRT Edge-LLM on Jetson, through its own exporter",
                           description="Run TensorRT Edge-LLM's exporter (and quantizer) on the checkpoint, completed "
                           "with what it reads, and write a bundle with the board's build and run commands, the "
                           "planner's fit on every Jetson board and a manifest.")
    e.add_argument("--model", required=True, help="checkpoint folder")
    e.add_argument("--out", help="the bundle folder (required unless --dry-run)")
    e.add_argument("--quant", choices=["int4_awq", "int8_sq", "fp8", "nvfp4", "mxfp8"],
                   help="Edge-LLM's quantizer (Orin runs int4_awq and int8_sq; the rest need Thor)")
    e.add_argument("--calib", help="calibration text for --quant (text, jsonl, parquet, or token ids)")
    e.add_argument("--calib-samples", type=whole_number(1), default=64)
    e.add_argument("--calib-len", type=whole_number(8), default=512)
    e.add_argument("--board", help="the Jetson board to size for (orin-8, orin-16, orin-32, orin-64, thor)")
    e.add_argument("--context", type=whole_number(2), help="--maxKVCacheCapacity (default: the longest that fits the "
                   "board, or the model's own)")
    e.add_argument("--max-input", type=whole_number(1), help="--maxInputLen, the longest prompt (default: 4096)")
    e.add_argument("--batch", type=whole_number(1), default=1, help="--maxBatchSize")
    e.add_argument("--exporter", help="path of tensorrt-edgellm-export (default: on PATH or beside this Python)")
    e.add_argument("--device", default="cpu", help="where Edge-LLM's quantizer calibrates (cpu, or cuda)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.add_argument("--dry-run", action="store_true", help="the boards' fit only; read config.json only")
    e.set_defaults(func=cmd_export_edgellm)

    o = targets.add_parser("onnx", help="ONNX graphs (prefill and one decode step) for TensorRT and Jetson",
                           description="Prefill and decode-step graphs with every cache (attention K/V, Mamba conv "
                           "and SSM state) as inputs and outputs, dynamic batch and sequence axes, weights as "
                           "external data, and a manifest of every input and output.")
    o.add_argument("--model", required=True, help="checkpoint folder")
    o.add_argument("--out", required=True, help="the bundle folder")
    o.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weights and activations (SSM state fp32)")
    o.add_argument("--quant", choices=["int4_awq"], help="INT4 AWQ weights (weight-only, blocks of 128)")
    o.add_argument("--calib", help="calibration text for --quant (text, jsonl, parquet, or token ids)")
    o.add_argument("--calib-samples", type=whole_number(1), default=64)
    o.add_argument("--calib-len", type=whole_number(8), default=512)
    o.add_argument("--batch", type=whole_number(1), default=1, help="largest batch the engines are built for")
    o.add_argument("--context", type=whole_number(2), help="longest sequence (default: the model's)")
    o.add_argument("--force", action="store_true", help="replace an existing --out")
    o.set_defaults(func=cmd_export_onnx)


def cmd_export_edgellm(args: argparse.Namespace) -> int:
    from nano.cli import quiet_transformers

    from .edgellm import export_edgellm, read_config, size

    quiet_transformers()
    config = read_config(args.model)
    context, rows = size(config, args.board, args.context, args.batch, args.quant)  # before reading any text
    if args.dry_run:
        print(f"{args.model}: {args.quant or 'fp16'} for TensorRT Edge-LLM, {args.batch} x {context} tokens")
        for r in rows:
            fits = (f"up to {r['max_context']} tokens" + (" (all)" if r["full_context"] else "")) if r["max_context"] else (
                "does not fit" if r["runs"] else "does not run this precision")
            print(f"  {r['board']:8} {r['usable_gib']:5.1f} GiB  weights {r['weights_gib']:6.2f} GiB  {fits}")
        return 0
    if not args.out:
        raise ValueError("--out is required (the bundle folder)")
    if Path(args.out).exists() and not args.force:  # before reading any text
        raise FileExistsError(f"{args.out} already exists; pass --force to replace it")
    calibration = _calibration(args) if args.quant else None
    manifest = export_edgellm(args.model, args.out, args.quant, args.board, args.context, args.batch, args.max_input,
                              calibration, exporter=args.exporter, device=args.device, force=args.force)
    target = manifest["target"]
    print(f"wrote {args.out}: {manifest['model']['parameters']} parameters, {args.quant or 'fp16'}, "
          f"{target['batch']} x {target['context']} tokens" + (f" on {args.board}" if args.board else "")
          + f"; exported by tensorrt-edgellm {manifest['exporter']['version'] or '(version unknown)'}")
    print(f"next, on the board: sh {Path(args.out) / 'build.sh'} && sh {Path(args.out) / 'run.sh'}   "
          f"(or nanokit build --bundle {args.out})")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from nano.cli import quiet_transformers

    from .onnx import export_onnx

    quiet_transformers()
    if args.quant and Path(args.out).exists() and not args.force:  # before reading any text
        raise FileExistsError(f"{args.out} already exists; pass --force to replace it")
    calibration = _calibration(args) if args.quant else None
    manifest = export_onnx(args.model, args.out, args.dtype, args.batch, args.context, force=args.force,
                           quant=args.quant, calibration=calibration)
    graphs = manifest["graphs"]
    print(f"wrote {args.out}: {manifest['model']['parameters']} parameters, {args.dtype}, opset {graphs['prefill']['opset']}; "
          f"prefill {len(graphs['prefill']['outputs']) - 1} caches out, decode {len(graphs['decode']['inputs']) - 1} in")
    print(f"next: nanokit build --bundle {args.out}   (or: sh {Path(args.out) / 'build.sh'} where TensorRT is)")
    return 0


def engine_available(kind: str) -> bool:
    if kind == "tensorrt-llm-pytorch":
        return importlib.util.find_spec("tensorrt_llm") is not None and shutil.which("trtllm-serve") is not None
    if kind == "tensorrt-llm-engine":
        return shutil.which("trtllm-build") is not None and shutil.which("trtllm-serve") is not None
    if kind == "onnx-tensorrt":
        return shutil.which("trtexec") is not None
    if kind == "tensorrt-edge-llm":
        return shutil.which(os.environ.get("LLM_BUILD", "llm_build")) is not None
    raise ValueError(f"bundle kind {kind!r} is not one this nanokit builds")


def bundle_steps(manifest: dict, serve: bool) -> list[list[str]]:
    """What building a bundle runs: its check or engine build, then (with `serve`) its server."""
    commands = manifest["commands"]
    first = commands["check"] if "check" in commands else commands["build"]
    return [first] + ([commands["serve"]] if serve else [])


def cmd_build(args: argparse.Namespace) -> int:
    from .bundle import read_manifest

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    commands = manifest["commands"]
    steps = bundle_steps(manifest, args.serve)
    shown = "\n".join(f"  cd {shlex.quote(str(bundle))} && {shlex.join(step)}" for step in steps)
    if args.dry_run:
        print(shown)
        return 0
    if not engine_available(manifest["kind"]):
        needs = {"tensorrt-llm-pytorch": "TensorRT-LLM (the tensorrt_llm module and trtllm-serve)",
                 "tensorrt-llm-engine": "TensorRT-LLM (trtllm-build and trtllm-serve)",
                 "onnx-tensorrt": "TensorRT (trtexec)",
                 "tensorrt-edge-llm": "TensorRT Edge-LLM on the board (llm_build, llm_inference)"}[manifest["kind"]]
        serve = (f"\n  cd {shlex.quote(str(bundle))} && {shlex.join(commands['serve'])}   # to serve"
                 if "serve" in commands and not args.serve else "")
        print(f"nanokit build: this bundle needs {needs}, which is not installed here. "
              f"Install it:\n  {manifest['install']}\nthen run:\n{shown}{serve}", file=sys.stderr)
        return ENGINE_MISSING
    for step in steps:
        print(f"+ {shlex.join(step)}", file=sys.stderr)
        status = subprocess.call(step, cwd=bundle)
        if status:
            print(f"nanokit build: {step[0]} exited with status {status}", file=sys.stderr)
            return status
    if not args.serve and "serve" in commands:
        done = "the bundle loads and generates" if "check" in commands else "the engine is built"
        print(f"{done}; serve it with: sh {bundle / 'serve.sh'}")
    elif "run" in commands:
        print(f"the engine is built; run it with: sh {bundle / 'run.sh'}")
    elif "serve" not in commands:
        print(f"the engines are built in {bundle}")
    return 0


def add_build(sub) -> None:
    p = sub.add_parser("build", help="check a bundle and run what its engine needs",
                       description="Verify a bundle's files against its manifest, then load it in its engine "
                       "and generate (and serve, with --serve). Where the engine is not installed, print the "
                       "exact commands and how to install it (exit status 3).")
    p.add_argument("--bundle", required=True, help="a folder written by nanokit export")
    p.add_argument("--serve", action="store_true", help="start the server after the check")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_build)
