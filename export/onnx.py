"""`nanokit export onnx`: the hybrid model as ONNX graphs for TensorRT (and TensorRT Edge-LLM on Jetson).

The bundle:

    OUT/prefill/model.onnx (+ model.onnx.data)   input_ids -> logits, present caches
    OUT/decode/model.onnx  (+ model.onnx.data)   input_ids, past caches -> logits, present caches
    OUT/tokenizer/, OUT/config.json              to encode prompts and read the shapes
    OUT/build.sh                                 trtexec builds of both graphs (TensorRT)
    OUT/manifest.json                            opset, every input and output (name, dtype, shape), files

Graphs come from `torch.onnx.export` (the dynamo exporter) of `export.onnx_model`, with dynamic batch,
sequence and past-sequence axes and the weights as external data. Everything is standard ONNX: the
selective scan is written with cumulative sums, einsums and masks (no plugin is needed).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from nano.atomic import atomic_dir
from nano.memory import format_count, parameter_count

from .bundle import copy_tokenizer, write_manifest
from .onnx_model import HybridDecode, HybridPrefill

KIND = "onnx-tensorrt"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
INSTALL = ("TensorRT (trtexec) from https://developer.nvidia.com/tensorrt, or JetPack on a Jetson board; "
           "TensorRT Edge-LLM builds these graphs on the device")


def _examples(model, dtype: torch.dtype, batch: int = 2):
    """Example inputs for tracing: a prompt, and caches of the right shapes for one decode step. The
    prompt spans more than one scan chunk and is not a multiple of it, so that no branch of the scan's
    padding is specialised into the graph."""
    config, names = model.config, HybridPrefill(model).cache_names()[0]
    length = config.chunk_size + 5
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    past = []
    for name in names:
        i = int(name.split(".")[1])
        mixer = model.model.layers[i].mixer
        if name.startswith("past_key_values"):
            past.append(torch.zeros(batch, mixer.k_proj.weight.shape[0] // mixer.head_dim, length, mixer.head_dim, dtype=dtype))
        elif name.startswith("past_conv"):
            past.append(torch.zeros(batch, mixer.conv_dim, mixer.conv_kernel_size - 1, dtype=dtype))
        else:
            past.append(torch.zeros(batch, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size))
    return ids, past


def _export(module, args, input_names, output_names, dynamic_shapes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
        program.save(str(path), external_data=True)


def describe_graph(path: Path) -> dict:
    """Opset and every input and output (name, dtype, shape with the dynamic axes named)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)

    def io(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "inputs": io(graph.graph.input), "outputs": io(graph.graph.output)}


def trtexec_commands(graphs: dict, batch: int, context: int, dtype: str) -> list[list[str]]:
    """trtexec builds of both graphs with shape ranges: 1 to `batch` rows, 1 to `context` tokens."""
    commands = []
    for name, info in graphs.items():
        lows, opts, highs = [], [], []
        for spec in info["inputs"]:
            dims = {"batch": (1, 1, batch), "sequence": (1, min(512, context), context),
                    "past_sequence": (1, min(512, context), context - 1)}
            shape = [dims[d] if isinstance(d, str) else (d, d, d) for d in spec["shape"]]
            for out, k in ((lows, 0), (opts, 1), (highs, 2)):
                out.append(f"{spec['name']}:" + "x".join(str(s[k]) for s in shape))
        command = ["trtexec", f"--onnx={name}/model.onnx", f"--saveEngine={name}.engine", f"--minShapes={','.join(lows)}",
                   f"--optShapes={','.join(opts)}", f"--maxShapes={','.join(highs)}"]
        commands.append(command + (["--fp16"] if dtype == "fp16" else []))
    return commands


BUILD_SH = """#!/bin/sh
# {title}
# Builds TensorRT engines from both graphs with trtexec (on the Jetson itself for Orin and Thor).
set -eu
cd "$(dirname "$0")"
{commands}
"""


def export_onnx(model: str | Path, out: str | Path, dtype: str = "fp16", batch: int = 1, context: int | None = None,
                force: bool = False, quant: str | None = None, calibration: torch.Tensor | None = None) -> dict:
    """Write the ONNX bundle of `model` into `out` (all at once); its manifest. With quant="int4_awq",
    the linear layers run from INT4 weights (export.onnx_int4), calibrated on `calibration` token ids."""
    import nano

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; the ONNX export writes {', '.join(DTYPES)}")
    if quant not in (None, "int4_awq"):
        raise ValueError(f"--quant {quant!r}; the ONNX export writes int4_awq")
    if quant and calibration is None:
        raise ValueError(f"--quant {quant} needs calibration text (--calib PATH)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    loaded = nano.load(model, device="cpu", dtype=DTYPES[dtype])
    if loaded.family == "decilm":
        raise ValueError(f"{model}: the ONNX export is for the hybrid (NemotronH) family")
    hf = loaded.model
    context = context or hf.config.max_position_embeddings
    layers = None
    if quant:
        from .onnx_int4 import calibrate_awq

        with torch.autocast("cpu", enabled=False):
            layers = calibrate_awq(nano.load(model, device="cpu", dtype=torch.float32).model, calibration)
    prefill, decode = HybridPrefill(hf).eval(), HybridDecode(hf).eval()
    past_names, present_names = prefill.cache_names()
    ids, past = _examples(hf, DTYPES[dtype])
    rows = torch.export.Dim("batch", min=1, max=max(2, batch))
    sequence = torch.export.Dim("sequence", min=1, max=context)
    past_sequence = torch.export.Dim("past_sequence", min=1, max=context)
    with atomic_dir(out, overwrite=force) as tmp:
        _export(prefill, (ids,), ["input_ids"], ["logits", *present_names], {"input_ids": {0: rows, 1: sequence}},
                tmp / "prefill" / "model.onnx")
        cache_axes = tuple({0: rows, 2: past_sequence} if n.startswith("past_key_values") else {0: rows}
                           for n in past_names)
        _export(decode, (ids[:, :1], *past), ["input_ids", *past_names], ["logits", *present_names],
                ({0: rows}, cache_axes), tmp / "decode" / "model.onnx")
        quantized = {}
        if layers:
            from .onnx_int4 import apply_to_graph

            for name in ("prefill", "decode"):
                quantized[name] = apply_to_graph(tmp / name / "model.onnx", hf, layers, DTYPES[dtype])
        source = Path(loaded.path)
        copy_tokenizer(source, tmp / "tokenizer")
        shutil.copy2(source / "config.json", tmp / "config.json")
        graphs = {name: describe_graph(tmp / name / "model.onnx") for name in ("prefill", "decode")}
        if graphs["prefill"]["inputs"][0]["shape"] != ["batch", "sequence"]:  # the exporter fixed an axis
            raise RuntimeError(f"the prefill graph's input_ids came out {graphs['prefill']['inputs'][0]['shape']}, "
                               f"not dynamic (batch, sequence)")
        title = f"{source.name}: ONNX ({dtype}), batch up to {batch}, context up to {context}; written by nanokit export onnx"
        commands = trtexec_commands(graphs, batch, context, dtype)
        (tmp / "build.sh").write_text(BUILD_SH.format(title=title, commands="\n".join(" ".join(c) for c in commands)))
        (tmp / "build.sh").chmod(0o755)
        manifest = write_manifest(
            tmp, KIND,
            model={"source": str(source.resolve()), "architecture": "NemotronHForCausalLM",
                   "parameters": format_count(parameter_count(hf.config))},
            target={"dtype": dtype, "batch": batch, "context": context},
            quantization=None if not layers else {
                "format": "int4_awq", "block_size": 128, "layers": len(layers), "rewritten": quantized,
                "alphas": {n: layer.alpha for n, layer in layers.items()}},
            graphs=graphs,
            commands={"build": ["sh", "build.sh"]},
            install=INSTALL,
        )
    return manifest


def providers(bundle: Path) -> list:
    """onnxruntime's execution providers for a bundle, best first, among those installed: TensorRT
    (which builds engines from the graphs and caches them in the bundle: the ONNX route's engines, as
    onnxruntime-gpu on a Jetson or a workstation runs them), then CUDA, then the CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = []
    if "TensorrtExecutionProvider" in available:
        fp16 = any(spec["dtype"] == "float16" for spec in describe_graph(bundle / "decode" / "model.onnx")["outputs"])
        chosen.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_fp16_enable": fp16,
                                                      "trt_engine_cache_path": str(bundle / "trt_cache")}))
    chosen += [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
    return chosen


def onnx_sessions(bundle: str | Path, exact: bool = False):
    """onnxruntime sessions of a bundle's prefill and decode graphs, on the best provider installed.
    `exact` keeps onnxruntime from fusing INT4 dequantization into its own kernels, which quantize
    activations too."""
    import onnxruntime as ort

    bundle = Path(bundle)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return tuple(ort.InferenceSession(str(bundle / name / "model.onnx"), options, providers=providers(bundle))
                 for name in ("prefill", "decode"))


def greedy(bundle: str | Path, input_ids: list[int], new_tokens: int, exact: bool = False) -> list[int]:
    """Greedy generation driven entirely through onnxruntime: prefill once, then one decode step per token."""
    import numpy as np

    prefill, decode = onnx_sessions(bundle, exact)
    past_names = [i.name for i in decode.get_inputs()][1:]
    outputs = prefill.run(None, {"input_ids": np.array([input_ids], dtype=np.int64)})
    token, generated = outputs[0][:, -1].argmax(-1), []
    for _ in range(new_tokens):
        generated.append(int(token[0]))
        outputs = decode.run(None, {"input_ids": token[:, None].astype(np.int64), **dict(zip(past_names, outputs[1:]))})
        token = outputs[0][:, -1].argmax(-1)
    return generated

