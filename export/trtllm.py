"""`nanokit export trtllm`: a deployment bundle for TensorRT-LLM's PyTorch backend, sized before it starts.

TensorRT-LLM runs NemotronH through its PyTorch backend (`trtllm-serve`, `LLM(...)`), which reads a
Hugging Face checkpoint. What goes wrong on small GPUs is sizing: left at its defaults it reserves
the Mamba state for `max_batch_size` = 2048 sequences and takes 90% of free memory for the KV cache.
The bundle fixes every size from the planner (`nano.memory`):

    OUT/checkpoint/       the Hugging Face checkpoint, bf16 or quantized by modelopt (export.trtllm_quant)
    OUT/llm_options.yaml  options for `trtllm-serve --extra_llm_api_options` and `LLM(model, **options)`
    OUT/serve.sh          the launch command
    OUT/plan.json         the planner's figures for this target
    OUT/manifest.json     kind, model, target, commands, and each file's size and sha256

The options use only keys that TensorRT-LLM's `TorchLlmArgs` accepts (it refuses unknown ones):
max_seq_len, max_batch_size, max_num_tokens, enable_chunked_prefill, cuda_graph_config, and
kv_cache_config with enable_block_reuse false (no prefix reuse for Mamba layers),
mamba_ssm_cache_dtype float32 (its "auto" is the model's bf16 in TensorRT-LLM 1.0, which costs
accuracy), max_tokens (the KV cache the context needs, no more) and free_gpu_memory_fraction.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from nano.atomic import atomic_dir
from nano.config import ConfigError, check_supported, family, with_layer_fields
from nano.hardware import DEFAULT_RECIPE, PREFILL_CHUNK, TARGETS
from nano.memory import GIB, check_quant_runs_on, fit, format_count, parameter_count, usable_bytes

from .bundle import copy_tokenizer, write_manifest
from .trtllm_budget import BUNDLED, HOOK_PACKAGE, write_budget_packages

KIND = "tensorrt-llm-pytorch"
DEFAULT_MAX_BATCH = 64
JETSON = tuple(name for name in TARGETS if name.startswith(("orin", "thor")))
INSTALL = ("pip install tensorrt_llm --extra-index-url https://pypi.nvidia.com   "
           "(Linux x86-64 or SBSA with CUDA; see https://nvidia.github.io/TensorRT-LLM/installation/)")


def checkpoint_folder(model: str | Path) -> Path:
    """The checkpoint folder: `model` itself, or a shipped checkpoint's ("nano-tiny")."""
    from nano.shipped import resolve

    return resolve(model)


def read_config(model: str | Path) -> dict:
    path = checkpoint_folder(model) / "config.json"
    if not path.exists():
        raise ValueError(f"{model}: no config.json; --model is a Hugging Face checkpoint folder")
    config = json.loads(path.read_text())
    try:
        check_supported(config, str(path), families=("nemotron_h", "decilm"))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return config


def size(config: dict, gpu: str, context: int, batch: int | None, quant: str | None, recipe: str, tp: int = 1):
    """The planner's fit for this deployment (per GPU of `tp`); refuses what cannot run or does not fit,
    saying why."""
    usable_bytes(gpu)  # an unknown GPU is named with the known ones
    if gpu.lower() in JETSON:
        raise ValueError(f"{gpu} is a Jetson board: TensorRT-LLM's PyTorch backend does not run there; "
                         f"use `nanokit export onnx` and TensorRT Edge-LLM")
    decilm = family(config) == "decilm"
    if quant and decilm:
        raise ValueError(f"--quant {quant}: this export writes Llama-Nemotron NAS models in bf16; quantize them with "
                         f"TensorRT-LLM's examples/quantization/quantize.py")
    if quant:
        check_quant_runs_on(quant, gpu)
    limit = config.get("max_position_embeddings")
    if limit and context > limit:
        raise ValueError(f"--context {context} is beyond the model's {limit} positions (max_position_embeddings)")
    if tp not in (1, 2, 4, 8) and not decilm:
        raise ValueError(f"--tp {tp}: TensorRT-LLM runs NemotronH at tensor-parallel sizes 1, 2, 4 or 8")
    options = dict(quant=quant, recipe=recipe, tp=tp)
    found = fit(config, gpu, context, batch or 1, limit, **options)
    if not found.plan.fits:
        p = found.plan
        gpus = f"each of {tp} x {gpu}" if tp > 1 else gpu
        raise ValueError(f"the model needs {p.total / GIB:.2f} GiB for {p.batch} x {context} tokens on {gpus}, which has "
                         f"{p.usable / GIB:.1f} GiB usable: {found.shortfall / GIB:.2f} GiB short; {found.advice()}")
    if batch is None:  # as many whole-context sequences as fit, up to a serving default
        found = fit(config, gpu, context, max(1, min(found.max_batch, DEFAULT_MAX_BATCH)), limit, **options)
    return found


def llm_options(plan, tp: int = 1, hybrid: bool = True, budget: bool = True) -> dict:
    """TensorRT-LLM's options for a plan: sizes for exactly what the planner allowed. For a hybrid, no
    prefix reuse and an fp32 Mamba state; a DeciLM is read through its own modeling file."""
    kv_free = plan.usable - (plan.total - plan.kv_cache)  # memory left for the KV cache after the rest is loaded
    fraction = min(0.9, math.ceil(100 * 1.05 * plan.kv_cache / max(kv_free, 1)) / 100)
    if not hybrid:
        return {
            **({"tensor_parallel_size": tp} if tp > 1 else {}),
            "trust_remote_code": True,
            **({"disable_overlap_scheduler": True} if budget else {}),
            "max_seq_len": plan.context,
            "max_batch_size": plan.batch,
            "max_num_tokens": min(8192, plan.context * plan.batch),
            "enable_chunked_prefill": True,
            "kv_cache_config": {"max_tokens": plan.context * plan.batch, "free_gpu_memory_fraction": fraction},
        }
    return {
        **({"tensor_parallel_size": tp} if tp > 1 else {}),
        "trust_remote_code": True,  # the checkpoint's configuration code: transformers 4.57.3 has no NemotronH
        # The budget's logits processor must see each sampled token before the next step's logits; the
        # overlap scheduler hands it the ids a step late.
        "disable_overlap_scheduler": True,
        "max_seq_len": plan.context,
        "max_batch_size": plan.batch,
        "max_num_tokens": min(PREFILL_CHUNK, plan.context * plan.batch),
        "enable_chunked_prefill": True,
        "cuda_graph_config": {"max_batch_size": plan.batch, "enable_padding": True},
        "kv_cache_config": {
            "enable_block_reuse": False,
            "mamba_ssm_cache_dtype": "float32",
            "max_tokens": plan.context * plan.batch,
            "free_gpu_memory_fraction": fraction,
        },
    }


def options_yaml(options: dict, header: str) -> str:
    import yaml

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(options, sort_keys=False)


# Nano 2's template leaves the prompt inside reasoning (`<think>\n`): "nano-v3" files the output before
# `</think>` as reasoning. Llama-Nemotron's model writes `<think>` itself: "qwen3" looks for it.
REASONING_PARSER = {"nemotron_h": "nano-v3", "decilm": "qwen3"}

CHECK = ("import sys, yaml; sys.path.insert(0, '.'); from tensorrt_llm import LLM, SamplingParams; "
         "from nanokit_budget import ThinkingBudget; "
         "llm = LLM('checkpoint', **yaml.safe_load(open('llm_options.yaml'))); "
         "params = SamplingParams(max_tokens=64, logits_processor=ThinkingBudget(16)); "
         "print(llm.generate(['The capital of France is'], params)[0].outputs[0].text)")


def serve_command(tp: int = 1) -> list[str]:
    command = ["trtllm-serve", "checkpoint", "--backend", "pytorch", "--trust_remote_code",
               "--reasoning_parser", REASONING_PARSER["nemotron_h"], "--custom_module_dirs", HOOK_PACKAGE,
               "--extra_llm_api_options", "llm_options.yaml"]
    return command + (["--tp_size", str(tp)] if tp > 1 else [])


SERVE_SH = """#!/bin/sh
# {title}
# An OpenAI-compatible server on HOST:PORT (default 127.0.0.1:8000); more trtllm-serve flags pass through.
# Thinking budget: per request in chat_template_kwargs ({{"thinking_budget": 256, "thinking_grace": 16}}), or
# THINKING_BUDGET (and THINKING_GRACE) here for requests that give none (nanokit_serve_hook, nanokit_budget).
# Reasoning comes back in reasoning_content (nano-v3); with /no_think, also send
# chat_template_kwargs {{"enable_thinking": false}}, or the answer is filed as reasoning.
set -eu
cd "$(dirname "$0")"
export PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}"  # the executor's workers unpickle nanokit_budget
exec {command} --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8000}}" "$@"
"""


def export_trtllm(model: str | Path, out: str | Path, gpu: str, context: int = 131072, batch: int | None = None,
                  quant: str | None = None, recipe: str = DEFAULT_RECIPE, calibration=None, device: str | None = None,
                  tp: int = 1, force: bool = False, progress: bool = False) -> dict:
    """Write the bundle for `model` on `gpu` at `context` tokens into `out` (all at once); its manifest.

    `calibration` (samples, length) token ids are needed with `quant`."""
    import torch

    import nano
    from nano.checkpoint import write_checkpoint

    model = checkpoint_folder(model)
    config = read_config(model)
    found = size(config, gpu, context, batch, quant, recipe, tp)
    if family(config) == "decilm":
        return export_decilm(model, out, gpu, context, found, config, tp, force, progress)
    if quant and calibration is None:
        raise ValueError(f"--quant {quant} needs calibration text (--calib PATH)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    plan = found.plan
    loaded = nano.load(model, device=device or "cpu", dtype=torch.bfloat16)
    with atomic_dir(out, overwrite=force) as tmp:
        checkpoint = tmp / "checkpoint"
        checkpoint.mkdir()
        quantized = None
        if quant:
            from .trtllm_quant import quantize_and_export

            quantized = quantize_and_export(loaded.model, loaded.tokenizer, quant, recipe, calibration, checkpoint,
                                            progress=progress)
        else:
            write_checkpoint(checkpoint, loaded.model, loaded.tokenizer)
        prepare_for_trtllm(checkpoint)
        write_budget_packages(tmp, loaded.chat, config["vocab_size"])
        on_disk = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        gpus = f"{tp} x {gpu}" if tp > 1 else gpu
        title = (f"{Path(model).name} on {gpus} ({plan.usable / GIB:.1f} GiB usable each): {context} tokens x batch "
                 f"{plan.batch}, {quant or 'bf16'}; written by nanokit export trtllm")
        options = llm_options(plan, tp)
        header = (f"{title}\nFor trtllm-serve --extra_llm_api_options, or tensorrt_llm.LLM(model, **options).\n"
                  f"Planner: {plan.total / GIB:.2f} GiB of {plan.usable / GIB:.1f} (weights {plan.weights / GIB:.2f}, "
                  f"KV {plan.kv_cache / GIB:.2f}, Mamba state {(plan.ssm_state + plan.conv_state) / GIB:.2f}, "
                  f"workspace {plan.workspace / GIB:.2f}).\nmax_tokens caps the KV cache at what max_seq_len x "
                  f"max_batch_size needs; free_gpu_memory_fraction covers it with 5% to spare.")
        (tmp / "llm_options.yaml").write_text(options_yaml(options, header))
        serve = tmp / "serve.sh"
        serve.write_text(SERVE_SH.format(title=title, command=" ".join(serve_command(tp))))
        serve.chmod(0o755)
        plan_record = dict(plan.as_dict(), gpu=gpu, tp=tp, weights_on_disk=on_disk, max_context=found.max_context,
                           max_batch=found.max_batch)
        (tmp / "plan.json").write_text(json.dumps(plan_record, indent=2) + "\n")
        manifest = write_manifest(
            tmp, KIND,
            model={"source": str(Path(model).resolve()), "architecture": config.get("architectures", ["?"])[0],
                   "parameters": format_count(parameter_count(config))},
            target={"gpu": gpu, "usable_bytes": plan.usable, "context": context, "batch": plan.batch, "tp": tp},
            quantization=None if quantized is None else {
                "format": quant, "recipe": recipe, "quant_algo": quantized.quant_algo, "group_size": quantized.group_size,
                "layers": len(quantized.layers), "excluded": quantized.excluded},
            commands={"check": ["python3", "-c", CHECK], "serve": ["sh", "serve.sh"]},
            install=INSTALL,
        )
    return manifest


CONFIG_CODE = "configuration_nemotron_h.py"
AUTO_MAP = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"}
# What TensorRT-LLM's NemotronH reads that has no default there (see tests/data/trtllm_1_2_1_reads.json).
TRTLLM_REQUIRED = ("head_dim", "mamba_head_dim", "mamba_num_heads", "n_groups", "ssm_state_size", "conv_kernel",
                   "chunk_size")


def prepare_for_trtllm(checkpoint: Path) -> None:
    """Make a checkpoint folder written by transformers 5 one that TensorRT-LLM 1.2.1 loads.

    TensorRT-LLM reads the config with the transformers it pins (4.57.3), which has no NemotronH: the
    folder gets this project's configuration code and `auto_map` (`trust_remote_code` in the options
    and launch flags). Its layers read `hybrid_override_pattern`, `num_hidden_layers` (written by
    `write_checkpoint`) and `rms_norm_eps`. The think tags become ordinary tokens in the tokenizer,
    so that its default `skip_special_tokens` leaves `</think>` in the text its reasoning parser splits."""
    path = checkpoint / "config.json"
    config = with_layer_fields(json.loads(path.read_text()), str(path))
    missing = [k for k in TRTLLM_REQUIRED if config.get(k) is None]
    if missing:
        raise ValueError(f"{path}: TensorRT-LLM needs {', '.join(missing)} in config.json")
    if config.get("architectures") != ["NemotronHForCausalLM"]:
        raise ValueError(f"{path}: architectures {config.get('architectures')}; TensorRT-LLM loads NemotronHForCausalLM")
    config.update(rms_norm_eps=config["layer_norm_epsilon"], auto_map=AUTO_MAP)
    path.write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(BUNDLED / CONFIG_CODE, checkpoint / CONFIG_CODE)
    _think_tags_as_text(checkpoint / "tokenizer.json")


def _think_tags_as_text(path: Path) -> None:
    tokenizer = json.loads(path.read_text())
    for token in tokenizer.get("added_tokens", []):
        if token["content"] in ("<think>", "</think>"):
            token["special"] = False
    path.write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")


BUILD_SH = """#!/bin/sh
# {title}
# Builds the TensorRT engine from trtllm_checkpoint/ into engine/ (trtllm-build, TensorRT-LLM's classic path).
set -eu
cd "$(dirname "$0")"
exec {command} "$@"
"""

ENGINE_SERVE_SH = """#!/bin/sh
# {title}
# Serves the built engine (after build.sh) on HOST:PORT (default 127.0.0.1:8000) over {tp} GPUs.
set -eu
cd "$(dirname "$0")"
exec trtllm-serve engine --backend tensorrt --tokenizer tokenizer --tp_size {tp} --reasoning_parser qwen3 --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8000}}" "$@"
"""

PYTORCH_SERVE_SH = """#!/bin/sh
# {title}
# Or, without building: TensorRT-LLM's PyTorch backend on the Hugging Face checkpoint: pytorch_checkpoint/ holds
# its config (with this project's configuration code), the tokenizer, and links to the source's weights
# (MODEL_DIR for another copy). Reasoning comes back in reasoning_content (the qwen3 parser).
set -eu
cd "$(dirname "$0")"
export PYTHONPATH="$PWD${{PYTHONPATH:+:$PYTHONPATH}}"
exec trtllm-serve "${{MODEL_DIR:-pytorch_checkpoint}}" --backend pytorch --tp_size {tp} --trust_remote_code --reasoning_parser qwen3{hook} --extra_llm_api_options llm_options.yaml --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8000}}" "$@"
"""

ENGINE_KIND = "tensorrt-llm-engine"
DECILM_CONFIG_CODE = "configuration_decilm.py"


def _hf_folder_for_pytorch(source: Path, config: dict, bundle: Path) -> bool:
    """pytorch_checkpoint/: what TensorRT-LLM's PyTorch backend reads of a DeciLM, without copying its
    weights. transformers has no DeciLM at all, and the backend reads each block config by attribute:
    the config gets this project's configuration code in `auto_map`; the weights are links to the
    source's files. With single-token think tags, the thinking-budget packages too; returns whether."""
    from transformers import PreTrainedTokenizerFast

    from nano.chat import ChatError, ChatFormat
    from nano.checkpoint import INDEX_FILE, SINGLE_FILE, portable_tokenizer

    folder = bundle / "pytorch_checkpoint"
    copy_tokenizer(source, folder)
    portable_tokenizer(folder)
    shutil.copyfile(BUNDLED / DECILM_CONFIG_CODE, folder / DECILM_CONFIG_CODE)
    (folder / "config.json").write_text(json.dumps(
        dict(config, auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"}), indent=2) + "\n")
    weights = [source / INDEX_FILE] if (source / INDEX_FILE).exists() else []
    weights += sorted(source.glob("*.safetensors")) or [source / SINGLE_FILE]
    for file in weights:
        (folder / file.name).symlink_to(file.resolve())
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        eos = config.get("eos_token_id")
        chat = ChatFormat(tokenizer, [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id], style="ultra")
    except ChatError:  # no single-token <think> and </think>: no budget to control
        return False
    write_budget_packages(bundle, chat, config["vocab_size"])
    return True


def build_command(plan, tp: int) -> list[str]:
    return ["trtllm-build", "--checkpoint_dir", "trtllm_checkpoint", "--output_dir", "engine", "--gemm_plugin", "auto",
            "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable", "--max_batch_size", str(plan.batch),
            "--max_seq_len", str(plan.context), "--max_num_tokens", str(min(8192, plan.context * plan.batch)),
            "--workers", str(tp)]


def export_decilm(model, out, gpu: str, context: int, found, config: dict, tp: int, force: bool, progress: bool) -> dict:
    """A Llama-Nemotron NAS bundle: the TensorRT-LLM checkpoint split over `tp` ranks for trtllm-build,
    the tokenizer, build and serve scripts, and the PyTorch backend's options for the same sizes."""
    from nano.checkpoint import portable_tokenizer
    from nano.decilm_config import DeciConfig

    from .trtllm_checkpoint import write_trtllm_checkpoint

    out, source = Path(out), Path(model).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    plan, deci = found.plan, DeciConfig.of(config)
    gpus = f"{tp} x {gpu}" if tp > 1 else gpu
    title = (f"{source.name} on {gpus} ({plan.usable / GIB:.1f} GiB usable each): {context} tokens x batch "
             f"{plan.batch}, bf16; written by nanokit export trtllm")
    with atomic_dir(out, overwrite=force) as tmp:
        (tmp / "trtllm_checkpoint").mkdir()
        write_trtllm_checkpoint(source, tmp / "trtllm_checkpoint", deci, config, tp, "bfloat16", progress)
        copy_tokenizer(source, tmp / "tokenizer")
        portable_tokenizer(tmp / "tokenizer")
        budget = _hf_folder_for_pytorch(source, config, tmp)
        options = llm_options(plan, tp, hybrid=False, budget=budget)
        header = (f"{title}\nFor the PyTorch backend (serve_pytorch.sh, or tensorrt_llm.LLM(model, **options)); "
                  f"the engine path is build.sh then serve.sh.")
        (tmp / "llm_options.yaml").write_text(options_yaml(options, header))
        scripts = {"build.sh": BUILD_SH.format(title=title, command=" ".join(build_command(plan, tp))),
                   "serve.sh": ENGINE_SERVE_SH.format(title=title, tp=tp),
                   "serve_pytorch.sh": PYTORCH_SERVE_SH.format(title=title, tp=tp, hook=(
                       f" --custom_module_dirs {HOOK_PACKAGE}" if budget else ""))}
        for name, text in scripts.items():
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
        (tmp / "plan.json").write_text(json.dumps(dict(plan.as_dict(), gpu=gpu, tp=tp, max_context=found.max_context,
                                                       max_batch=found.max_batch), indent=2) + "\n")
        manifest = write_manifest(
            tmp, ENGINE_KIND,
            model={"source": str(source), "architecture": "DeciLMForCausalLM", "parameters": format_count(deci.parameters())},
            target={"gpu": gpu, "usable_bytes": plan.usable, "context": context, "batch": plan.batch, "tp": tp},
            quantization=None,
            commands={"build": ["sh", "build.sh"], "serve": ["sh", "serve.sh"], "serve_pytorch": ["sh", "serve_pytorch.sh"]},
            install=INSTALL,
        )
    return manifest
