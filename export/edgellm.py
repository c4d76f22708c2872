"""`nanokit export edgellm`: the hybrid for TensorRT Edge-LLM, NVIDIA's runtime on Jetson, through its own exporter.

Edge-LLM (`pip install tensorrt-edgellm`, 0.11.0) exports on an x86 host into its own graph (one
ragged graph over `inputs_embeds`, a paged KV cache, conv and SSM state tensors and its plugins)
and builds the engine on the board. What it needs from the checkpoint, found by running it (0.11.0):

- `num_hidden_layers` in config.json (transformers 5 no longer writes it: `KeyError` otherwise);
- 16-bit weights throughout (fp32 norms stop its fp16 linears);
- a chat template (it stops after writing the graph without one) and the tokenizer files (it
  goes on without them, and the board's runtime fails later);
- for its quantizer, `use_cache: false` (transformers 5.14.1's cache has no slot for MLP layers);
  the quantized checkpoint then names its tensors `model.*`, which the exporter skips without an
  error (it loads 1 of 149 tensors): they are renamed `backbone.*` here, and an exporter log that
  reports any tensor skipped is an error.

The bundle:

    OUT/onnx/llm/       what tensorrt-edgellm-export wrote: model.onnx and model.onnx.data, config.json
                        (its runtime's), embedding.safetensors, tokenizer.json, chat_template.jinja
    OUT/build.sh        llm_build on the board: the engine into OUT/engine, sized by the planner
    OUT/run.sh          llm_inference on input.json
    OUT/input.json      a request in Edge-LLM's input format (reasoning on, and one with /no_think)
    OUT/plan.json       every Jetson board at this precision: whether it fits, the longest context
    OUT/export.log      the exporter's (and quantizer's) own log
    OUT/manifest.json   kind, model, target, commands, every file's size and sha256
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nano.atomic import atomic_dir
from nano.config import ConfigError, check_supported, context_length, layer_pattern
from nano.hardware import ARCHITECTURES, JETSON_PRECISIONS, TARGETS
from nano.memory import GIB, format_count, jetson_plan, largest, parameter_count

from .bundle import write_manifest
from .trtllm import checkpoint_folder

KIND = "tensorrt-edge-llm"
EXPORTER = "tensorrt-edgellm-export"
QUANTIZER = "tensorrt-edgellm-quantize"
# Edge-LLM's quantization formats, and the planner's precision each is counted at.
QUANT_PRECISION = {"int4_awq": "int4", "int8_sq": "int8", "fp8": "fp8", "nvfp4": "nvfp4", "mxfp8": "fp8"}
ON_ORIN = ("int4_awq", "int8_sq")  # Orin runs FP16, INT8 and INT4 engines; the rest need Thor
INSTALL = ("on the host: pip install \"nanokit[edgellm]\" (or Edge-LLM's own pins in a virtual environment: "
           "pip install torch==2.13.0 \"tensorrt-edgellm[export]==0.11.0\", then --exporter ENV/bin/tensorrt-edgellm-export); "
           "on the board: build TensorRT Edge-LLM from source (https://github.com/NVIDIA/TensorRT-Edge-LLM), "
           "which gives llm_build and llm_inference")
REQUIRED_OUTPUT = ("model.onnx", "model.onnx.data", "config.json", "embedding.safetensors", "tokenizer.json",
                   "chat_template.jinja")
_LOADED = re.compile(r"Loaded (\d+) tensors, skipped (\d+)")


class ExporterError(RuntimeError):
    """Edge-LLM's exporter or quantizer failed, or wrote something incomplete."""


def find_tool(name: str, exporter: str | Path | None = None) -> Path:
    """Edge-LLM's console script `name`: beside `exporter` when given, else on PATH or beside this Python."""
    if exporter is not None:
        exporter = Path(exporter)
        if not exporter.is_file():
            raise ValueError(f"--exporter {exporter}: no such file; give the path of {EXPORTER}")
        found = exporter if name == EXPORTER else exporter.with_name(name)
        if not found.is_file():
            raise ValueError(f"{found}: not found beside --exporter {exporter}; install tensorrt-edgellm's tools there")
        return found
    for candidate in (shutil.which(name), Path(sys.executable).with_name(name)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ValueError(f"{name} (TensorRT Edge-LLM) is not installed here; {INSTALL.split('; on the board')[0]}")


def read_config(model: str | Path) -> dict:
    model = checkpoint_folder(model)
    path = model / "config.json"
    if not path.exists():
        raise ValueError(f"{model}: no config.json; --model is a Hugging Face checkpoint folder")
    config = json.loads(path.read_text())
    try:
        check_supported(config, str(path), families=("nemotron_h",))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    heads, groups = config.get("mamba_num_heads"), config.get("n_groups")
    if heads and groups and heads % groups:
        raise ValueError(f"{path}: n_groups {groups} does not divide mamba_num_heads {heads}")
    folder = Path(model)
    if not (folder / "tokenizer.json").exists():
        raise ValueError(f"{folder}: no tokenizer.json; Edge-LLM's runtime reads the fast tokenizer's file")
    template = (folder / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text() if (folder / "tokenizer_config.json").exists() else "{}")
    if not template:
        raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json); Edge-LLM needs one")
    return config


def precision(quant: str | None) -> str:
    return "fp16" if quant is None else QUANT_PRECISION[quant]


def _plan(config: dict, board: str, context: int, batch: int, quant: str | None):
    # Edge-LLM keeps every state in fp16 (its runtime config: kv, recurrent and conv state dtypes).
    return jetson_plan(config, board, context, batch, precision(quant), ssm_dtype="fp16")


def jetson_fit(config: dict, quant: str | None, batch: int) -> list[dict]:
    """Every Jetson board: whether it runs this precision, its weights, and the longest context that fits."""
    limit = context_length(config)
    rows = []
    for board in (name for name in TARGETS if name.startswith(("orin", "thor"))):
        runs = precision(quant) in JETSON_PRECISIONS[ARCHITECTURES[board]] and (
            quant is None or quant in ON_ORIN or ARCHITECTURES[board] == "blackwell")
        longest = largest(lambda n: _plan(config, board, n, batch, quant).fits, limit) if runs else 0
        rows.append(dict(board=board, usable_gib=TARGETS[board], runs=runs, precision=precision(quant),
                         weights_gib=round(_plan(config, board, 1, batch, quant).weights / GIB, 2),
                         max_context=longest, full_context=longest == limit))
    return rows


def size(config: dict, board: str | None, context: int | None, batch: int, quant: str | None) -> tuple[int, list[dict]]:
    """The context the engine is built for and the boards' fit; refuses a board that cannot run it."""
    if quant is not None and quant not in QUANT_PRECISION:
        raise ValueError(f"--quant {quant}: Edge-LLM quantizes to {', '.join(QUANT_PRECISION)}")
    limit = context_length(config)
    if context is not None and context > limit:
        raise ValueError(f"--context {context} is beyond the model's {limit} positions (max_position_embeddings)")
    rows = jetson_fit(config, quant, batch)
    if board is None:
        return context or limit, rows
    board = board.lower()
    row = next((r for r in rows if r["board"] == board), None)
    if row is None:
        jetsons = [r["board"] for r in rows]
        raise ValueError(f"--board {board}: not a Jetson board; known: {', '.join(jetsons)}")
    if not row["runs"]:
        raise ValueError(f"--quant {quant}: {board} does not run {precision(quant)} engines (Orin runs fp16, int8 "
                         f"and int4: --quant int8_sq or int4_awq)")
    if not row["max_context"]:
        others = [q for q in ("int8_sq", "int4_awq") if jetson_fit(config, q, batch)[rows.index(row)]["max_context"]]
        hint = f"; it would fit with --quant {' or --quant '.join(others)}" if others and quant is None else ""
        raise ValueError(f"the model's {precision(quant)} weights ({row['weights_gib']} GiB) and state for batch {batch} "
                         f"do not fit {board} ({row['usable_gib']} GiB usable){hint}")
    if context is not None and context > row["max_context"]:
        raise ValueError(f"--context {context} does not fit {board} at {precision(quant)} with batch {batch}: "
                         f"at most {row['max_context']} tokens")
    return context or row["max_context"], rows


def _run(command: list[str], log, env: dict | None = None, what: str = "") -> str:
    """Run one of Edge-LLM's tools, its output appended to `log`; its text, or ExporterError."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, **(env or {})))
    log.write(done.stdout)
    log.flush()
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-12:])
        raise ExporterError(f"{what or Path(command[0]).name} exited with status {done.returncode}:\n{tail}")
    return done.stdout


def _stage(model: str | Path, folder: Path, use_cache: bool = True) -> None:
    """The checkpoint as Edge-LLM reads it: bf16 throughout, the layer fields written out."""
    import torch

    import nano
    from nano.checkpoint import write_checkpoint

    loaded = nano.load(model, device="cpu", dtype=torch.bfloat16)
    write_checkpoint(folder, loaded.model, loaded.tokenizer)
    if not use_cache:
        path = folder / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), use_cache=False), indent=2) + "\n")


def _backbone_names(folder: Path) -> None:
    """Rename the quantizer's `model.*` tensors to the `backbone.*` the exporter reads, file by file."""
    from safetensors.torch import load_file, save_file

    from nano.checkpoint import complete_checkpoint

    index = folder / "model.safetensors.index.json"
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        if any(name.startswith("model.") for name in tensors):
            renamed = {("backbone." + name[6:] if name.startswith("model.") else name): t for name, t in tensors.items()}
            save_file(renamed, file, metadata={"format": "pt"})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {("backbone." + k[6:] if k.startswith("model.") else k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
    complete_checkpoint(folder)


def _calibration_file(path: Path, calib, tokenizer_dir: Path) -> None:
    """Calibration text as Edge-LLM's quantizer reads a local data set: one {"article": text} per line."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(path, "w") as f:
        for sample in calib:
            f.write(json.dumps({"article": tokenizer.decode(sample.tolist())}) + "\n")


def _check_export(out: Path, log_text: str) -> None:
    counts = _LOADED.findall(log_text)
    if not counts:
        raise ExporterError("the exporter's log does not say how many tensors it loaded; see export.log")
    loaded, skipped = (int(x) for x in counts[-1])
    if skipped or not loaded:
        raise ExporterError(f"the exporter loaded {loaded} tensors and skipped {skipped}: the graph would hold "
                            f"untrained weights; see export.log")
    missing = [name for name in REQUIRED_OUTPUT if not (out / name).exists()]
    if missing:
        raise ExporterError(f"the exporter did not write {', '.join(missing)} into {out}")


BUILD_SH = """#!/bin/sh
# {title}
# On the board, with TensorRT Edge-LLM built there (its llm_build on PATH, or LLM_BUILD=path/to/llm_build):
# builds the engine from onnx/llm into engine/, for {batch} sequence(s) of up to {context} tokens.
set -eu
cd "$(dirname "$0")"
exec "${{LLM_BUILD:-llm_build}}" --onnxDir onnx/llm --engineDir engine --maxBatchSize {batch} --maxInputLen {max_input} --maxKVCacheCapacity {context} "$@"
"""

RUN_SH = """#!/bin/sh
# {title}
# After build.sh: answers the requests of input.json (or the file given) into output.json.
set -eu
cd "$(dirname "$0")"
exec "${{LLM_INFERENCE:-llm_inference}}" --engineDir engine --inputFile "${{1:-input.json}}" --outputFile "${{2:-output.json}}"
"""


def sample_input(max_new_tokens: int) -> dict:
    """A request file in Edge-LLM's input format: reasoning on, then off. The Nano 2 template switches
    reasoning by `/think` and `/no_think` in the turns, not by the `enable_thinking` field."""
    return {
        "batch_size": 1, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_generate_length": max_new_tokens,
        "apply_chat_template": True, "add_generation_prompt": True,
        "requests": [
            {"messages": [{"role": "user", "content": "What is 347 + 58 * 6 - 12?"}]},
            {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "What is 12 + 7?"}]},
        ],
    }


def export_edgellm(model: str | Path, out: str | Path, quant: str | None = None, board: str | None = None,
                   context: int | None = None, batch: int = 1, max_input: int | None = None, calibration=None,
                   exporter: str | Path | None = None, device: str = "cpu", force: bool = False) -> dict:
    """Write the Edge-LLM bundle for `model` into `out` (all at once); its manifest.

    `calibration` (samples, length) token ids are needed with `quant`."""
    model = checkpoint_folder(model)
    config = read_config(model)
    context, rows = size(config, board, context, batch, quant)
    max_input = max_input or min(context, 4096)
    if max_input > context:
        raise ValueError(f"--max-input {max_input} is longer than the context ({context})")
    export_tool = find_tool(EXPORTER, exporter)
    quant_tool = find_tool(QUANTIZER, exporter) if quant else None
    if quant and calibration is None:
        raise ValueError(f"--quant {quant} needs calibration text (--calib PATH)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    source = Path(model).resolve()
    with atomic_dir(out, overwrite=force) as tmp, tempfile.TemporaryDirectory(prefix="nanokit-edgellm-") as work:
        work = Path(work)
        with open(tmp / "export.log", "w") as log:
            stage = work / "checkpoint"
            _stage(model, stage, use_cache=quant is None)
            if quant:
                calib = work / "calibration.jsonl"
                _calibration_file(calib, calibration, stage)
                quantized = work / "quantized"
                _run([str(quant_tool), "llm", "--model_dir", str(stage), "--output_dir", str(quantized),
                      "--quantization", quant, "--device", device, "--num_samples", str(len(calibration))], log,
                     env={"EDGELLM_QUANT_DATASET_CNN_DAILYMAIL": str(calib)}, what=QUANTIZER)
                _backbone_names(quantized)
                stage = quantized
            text = _run([str(export_tool), str(stage), str(tmp / "onnx")], log, what=EXPORTER)
        _check_export(tmp / "onnx" / "llm", text)
        title = (f"{source.name} for TensorRT Edge-LLM, {precision(quant)}" + (f" on {board}" if board else "")
                 + f": {batch} x {context} tokens; written by nanokit export edgellm")
        scripts = {"build.sh": BUILD_SH.format(title=title, batch=batch, context=context, max_input=max_input),
                   "run.sh": RUN_SH.format(title=title)}
        for name, script in scripts.items():
            (tmp / name).write_text(script)
            (tmp / name).chmod(0o755)
        (tmp / "input.json").write_text(json.dumps(sample_input(min(1024, context - 1)), indent=2) + "\n")
        chosen = next((r for r in rows if r["board"] == board), None) if board else None
        (tmp / "plan.json").write_text(json.dumps({"board": board, "context": context, "batch": batch,
                                                   "max_input": max_input, "precision": precision(quant),
                                                   "chosen": chosen, "boards": rows}, indent=2) + "\n")
        runtime = json.loads((tmp / "onnx" / "llm" / "config.json").read_text())
        manifest = write_manifest(
            tmp, KIND,
            model={"source": str(source), "architecture": "NemotronHForCausalLM",
                   "parameters": format_count(parameter_count(config)), "pattern": layer_pattern(config)},
            target={"board": board, "context": context, "batch": batch, "max_input": max_input},
            quantization=None if quant is None else {"format": quant, "precision": precision(quant)},
            exporter={"tool": EXPORTER, "version": _version(export_tool), "runtime_config": runtime.get("edgellm_version")},
            commands={"build": ["sh", "build.sh"], "run": ["sh", "run.sh"]},
            install=INSTALL,
        )
    return manifest


def _version(tool: Path) -> str | None:
    """The tensorrt-edgellm release beside `tool`, from its environment's metadata."""
    python = tool.with_name("python")
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('tensorrt-edgellm'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None
