"""Post-training quantization of a NemotronH checkpoint through nvidia-modelopt, for TensorRT-LLM.

modelopt calibrates (max for FP8 and NVFP4, AWQ-lite for INT4) and writes the quantized Hugging Face
checkpoint; this module decides what is quantized and fixes what TensorRT-LLM's loader needs:
- only the linear layers of the recipe's groups (`nano.hardware.RECIPES`: NVIDIA's published Nano 2
  recipe quantizes the Mamba projections and the MLPs; attention, the conv, embeddings and the head
  stay in 16 bits), each named exactly in modelopt's config, and checked after calibration;
- INT4 AWQ with the largest group size (128, 64 or 32) that divides every quantized layer's input
  (the 9B's MLP width, 15680, is not a multiple of 128), and never on the Mamba in_proj;
- `exclude_modules` in `hf_quant_config.json` (and `ignore` in config.json) listing every module
  left in 16 bits by its checkpoint name, which TensorRT-LLM matches with fnmatch;
- AWQ's `pre_quant_scale` present for every quantized layer: modelopt folds it into the norm before
  a layer and drops it, and TensorRT-LLM's loader reads it unconditionally (ones are then exact).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from nano.checkpoint import complete_checkpoint
from nano.memory import quantized_groups

# Our format name -> (modelopt's base config, the quant_algo TensorRT-LLM reads).
FORMATS = {
    "fp8": ("FP8_DEFAULT_CFG", "FP8"),
    "int4_awq": ("INT4_AWQ_CFG", "W4A16_AWQ"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4"),
}

# The linear layers (by their last name) of each quantizable parameter group of nano.memory.
GROUP_LAYERS = {"mlp": ("up_proj", "down_proj"), "mamba_in_proj": ("in_proj",), "mamba_out_proj": ("out_proj",)}

INSTALL = "pip install nvidia-modelopt requests   (or: pip install 'nanokit[quant]')"


def _modelopt():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modelopt warns about untested transformers versions on import
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise ValueError(f"quantization needs nvidia-modelopt, which is not importable here ({e}); {INSTALL}") from None
    return mtq, export_hf_checkpoint


def layers_to_quantize(model, quant: str, recipe: str) -> list[str]:
    """Module names (as `model.named_modules()` gives them) of the linear layers the recipe quantizes."""
    wanted = {name for group in quantized_groups(quant, recipe) for name in GROUP_LAYERS[group]}
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in wanted]


def awq_group_size(model, names: list[str]) -> int:
    """The largest of 128, 64, 32 that divides the input width of every layer in `names`."""
    modules = dict(model.named_modules())
    widths = {modules[n].in_features for n in names}
    for size in (128, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"INT4 AWQ needs input widths divisible by 32; these layers have {sorted(widths)}")


def quant_config(mtq, model, quant: str, names: list[str]) -> dict:
    """modelopt's config for `quant` with every quantizer off except those of `names`."""
    base = copy.deepcopy(getattr(mtq, FORMATS[quant][0]))
    entries = {e["quantizer_name"]: e for e in base["quant_cfg"] if isinstance(e, dict) and "quantizer_name" in e}
    weight, activation = entries["*weight_quantizer"], entries["*input_quantizer"]
    if quant == "int4_awq":
        weight = copy.deepcopy(weight)
        weight["cfg"]["block_sizes"] = {**weight["cfg"]["block_sizes"], -1: awq_group_size(model, names)}
    rules = [{"quantizer_name": "*", "enable": False}]
    for name in names:
        rules.append({**weight, "quantizer_name": f"{name}.weight_quantizer"})
        rules.append({**activation, "quantizer_name": f"{name}.input_quantizer"})
    return {"quant_cfg": rules, "algorithm": base["algorithm"]}


@dataclass
class Quantized:
    quant: str
    recipe: str
    quant_algo: str
    layers: list[str]  # the quantized layers' checkpoint names
    excluded: list[str]  # modules with weights left in 16 bits, by checkpoint name
    group_size: int | None


def calibrate(model, quant: str, recipe: str, calibration: torch.Tensor, progress: bool = False) -> int | None:
    """Insert modelopt's quantizers on the recipe's layers and calibrate them on `calibration`
    (samples, length) token ids; `model` is then the fake-quantized model. Returns the group size."""
    from tqdm.auto import tqdm

    mtq, _ = _modelopt()
    names = layers_to_quantize(model, quant, recipe)
    if not names:
        raise ValueError(f"recipe {recipe!r} finds no layers to quantize in this model")
    config = quant_config(mtq, model, quant, names)
    device = next(model.parameters()).device

    def forward_loop(m):
        with torch.no_grad():
            for sample in tqdm(calibration, desc=f"calibrate {quant}", unit="sample", disable=not progress):
                m(input_ids=sample[None].to(device), use_cache=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, config, forward_loop)
    modules = dict(model.named_modules())
    enabled = sorted(n.removesuffix(".weight_quantizer") for n, m in modules.items()
                     if n.endswith(".weight_quantizer") and getattr(m, "is_enabled", False))
    if enabled != sorted(names):  # modelopt's matching rules are its own: check they did what was asked
        raise RuntimeError(f"modelopt quantized {len(enabled)} layers where {len(names)} were asked: "
                           f"{sorted(set(enabled) ^ set(names))[:6]}")
    return config["quant_cfg"][1]["cfg"].get("block_sizes", {}).get(-1) if quant != "fp8" else None


def export_quantized(model, tokenizer, quant: str, recipe: str, group_size: int | None, out: Path) -> Quantized:
    """Write a calibrated model as a quantized Hugging Face checkpoint into the folder `out` (which the
    caller makes atomic), with the metadata TensorRT-LLM reads."""
    _, export_hf_checkpoint = _modelopt()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    tokenizer.save_pretrained(out)
    complete_checkpoint(out)
    return _fix_checkpoint(out, quant, recipe, group_size)


def quantize_and_export(model, tokenizer, quant: str, recipe: str, calibration: torch.Tensor, out: Path,
                        progress: bool = False) -> Quantized:
    """`calibrate`, then `export_quantized`."""
    group_size = calibrate(model, quant, recipe, calibration, progress)
    return export_quantized(model, tokenizer, quant, recipe, group_size, out)


def _fix_checkpoint(folder: Path, quant: str, recipe: str, group_size: int | None) -> Quantized:
    """Rewrite the quantization metadata from the tensors actually written, and add the AWQ scales
    TensorRT-LLM expects."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(folder.glob("*.safetensors"))
    keys = {}
    for file in files:
        with safe_open(file, "pt") as f:
            keys.update({k: (file, f.get_slice(k).get_shape()) for k in f.keys()})
    quantized = sorted(k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale"))
    excluded = sorted(k.removesuffix(".weight") for k, (_, shape) in keys.items()
                      if k.endswith(".weight") and len(shape) >= 2 and k.removesuffix(".weight") not in quantized)
    if quant == "int4_awq":
        missing = {}
        for name in quantized:
            if f"{name}.pre_quant_scale" not in keys:
                file, shape = keys[f"{name}.weight"]
                missing.setdefault(file, {})[f"{name}.pre_quant_scale"] = torch.ones(shape[1], dtype=torch.bfloat16)
        for file, extra in missing.items():
            with safe_open(file, "pt") as f:
                tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
            save_file({**tensors, **extra}, file, metadata=metadata)
        if len(files) > 1 and missing:
            index = folder / "model.safetensors.index.json"
            data = json.loads(index.read_text())
            data["weight_map"].update({k: file.name for file, extra in missing.items() for k in extra})
            index.write_text(json.dumps(data, indent=2) + "\n")
    quant_algo = FORMATS[quant][1]
    section = {"quant_algo": quant_algo, "kv_cache_quant_algo": None, "exclude_modules": excluded}
    if quant == "int4_awq":
        section.update(group_size=group_size, has_zero_point=False, pre_quant_scale=True)
    elif quant == "nvfp4":
        section.update(group_size=group_size)
    hf_quant = folder / "hf_quant_config.json"
    producer = json.loads(hf_quant.read_text())["producer"] if hf_quant.exists() else {"name": "modelopt"}
    hf_quant.write_text(json.dumps({"producer": producer, "quantization": section}, indent=2) + "\n")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    inline = config.get("quantization_config")
    if isinstance(inline, dict):
        inline["ignore"] = excluded
        inline["quant_algo"] = quant_algo
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    return Quantized(quant, recipe, quant_algo, quantized, excluded, group_size)
