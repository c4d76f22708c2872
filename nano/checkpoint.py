"""Loading and saving Hugging Face checkpoint folders of the NemotronH family.

`nano.load` reads what `save_pretrained` writes and nothing more: `config.json`, `model.safetensors`
or shards with `model.safetensors.index.json`, and the tokenizer files with a chat template. It
checks the folder before handing it to transformers, whose own loader would fill a missing tensor
with random values and only warn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import atomic_dir
from .chat import ChatFormat
from .config import ConfigError, check_supported, context_length, family, with_layer_fields
from .reference import ReferenceDecoder
from .kernels import select_kernels
from .runtime import HybridRuntime, describe
from .shipped import resolve

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file, or a file disagrees with the config or the index."""


@dataclass
class Model:
    """A loaded checkpoint: the transformers model, its tokenizer and config, and its chat format."""

    model: torch.nn.Module
    tokenizer: object
    config: object
    chat: ChatFormat
    path: Path | None = None
    runtime: str = "auto"  # "fast" (nano.runtime), "reference" (transformers), or "auto": fast on a GPU

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def family(self) -> str | None:
        """"nemotron_h" or "decilm" (`nano.config.family`)."""
        return family(self.config)

    def _fast(self) -> bool:
        if self.runtime not in ("auto", "fast", "reference"):
            raise ValueError(f"runtime must be 'auto', 'fast' or 'reference', got {self.runtime!r}")
        return self.runtime == "fast" or (self.runtime == "auto" and self.device.type == "cuda")

    def decoder(self, rows: int = 1, capacity: int | None = None):
        """A fresh decoder for one generation of `rows` sequences of up to `capacity` tokens."""
        if self.family == "decilm":
            from .decilm import DeciLMDecoder

            return DeciLMDecoder(self.model, rows, capacity or context_length(self.config))
        if self._fast():
            return HybridRuntime(self.model, rows, capacity or context_length(self.config))
        return ReferenceDecoder(self.model)

    def runtime_name(self) -> str:
        """What `decoder` would run, in words, without allocating anything."""
        if self.family == "decilm":
            from .decilm import DeciLMDecoder

            return DeciLMDecoder.name
        if self._fast():
            return describe(select_kernels(self.device), graphs=self.device.type == "cuda")
        return ReferenceDecoder.name

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a checkpoint folder that `nano.load` and `from_pretrained` read; all or nothing."""
        with atomic_dir(path, overwrite=overwrite) as tmp:
            write_checkpoint(tmp, self.model, self.tokenizer)
        return Path(path)


# transformers 5 names the fast tokenizer's class after its new backend; transformers 4 (which
# TensorRT-LLM pins) knows the same class by its old name, and transformers 5 reads the old name too.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def write_checkpoint(folder: str | os.PathLike, model, tokenizer, state_dict=None) -> None:
    """Save `model` and `tokenizer` into `folder` as a checkpoint every reader of the family takes:
    transformers 5 and 4, TensorRT-LLM, TensorRT Edge-LLM's exporter, and `nano.load`.

    The caller makes `folder` atomic. `state_dict` replaces the model's own tensors (as in
    `save_pretrained`)."""
    folder = Path(folder)
    model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(folder)
    complete_checkpoint(folder)


def complete_checkpoint(folder: str | os.PathLike) -> None:
    """Rewrite what transformers 5 saved in `folder` so that readers written for transformers 4 take it:
    a NemotronH config gets `hybrid_override_pattern` and `num_hidden_layers`, and the tokenizer's
    class gets the name both versions know."""
    folder = Path(folder)
    config_path = folder / CONFIG
    config = _read_json(config_path)
    if family(config) == "nemotron_h":
        completed = with_layer_fields(config, str(config_path))
        if completed != config:
            config_path.write_text(json.dumps(completed, indent=2) + "\n")
    portable_tokenizer(folder)


def portable_tokenizer(folder: str | os.PathLike) -> None:
    """Give the tokenizer in `folder` a class name that transformers 4 and 5 both know."""
    tokenizer_path = Path(folder) / "tokenizer_config.json"
    if tokenizer_path.exists():
        settings = _read_json(tokenizer_path)
        if settings.get("tokenizer_class") in _TOKENIZER_CLASSES:
            settings["tokenizer_class"] = _TOKENIZER_CLASSES[settings["tokenizer_class"]]
            tokenizer_path.write_text(json.dumps(settings, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _shard_shapes(path: Path) -> dict[str, list[int]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the checkpoint: name -> (file it is in, shape); read from the file headers."""
    index_path, single_path = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            listed = sorted(name for name, file in weight_map.items() if file == shard)
            if not shard_path.exists():
                raise CheckpointError(
                    f"{index_path}: weight_map names shard {shard!r} (for {len(listed)} tensors, "
                    f"first {listed[0]!r}), but {shard_path} does not exist"
                )
            shapes = _shard_shapes(shard_path)
            absent = [name for name in listed if name not in shapes]
            if absent:
                raise CheckpointError(
                    f"{shard_path}: {len(absent)} tensors that {INDEX_FILE} places in this shard are not in it, "
                    f"first {absent[0]!r}; the index and the shards do not belong together"
                )
            tensors.update({name: (shard, shapes[name]) for name in listed})
        return tensors
    if single_path.exists():
        return {name: (SINGLE_FILE, shape) for name, shape in _shard_shapes(single_path).items()}
    raise CheckpointError(f"{folder}: no weights (neither {SINGLE_FILE} nor {INDEX_FILE})")


def _canonical(name: str) -> str:
    # NVIDIA's own checkpoints name the trunk `backbone.`; transformers renames it `model.` on load.
    return "model." + name[len("backbone.") :] if name.startswith("backbone.") else name


def _check_tensors(folder: Path, hf_config) -> None:
    from transformers import NemotronHForCausalLM

    with torch.device("meta"):
        expected = {name: list(p.shape) for name, p in NemotronHForCausalLM(hf_config).state_dict().items()}
    found = {_canonical(name): where for name, where in checkpoint_tensors(folder).items()}
    # Routed experts are stored one tensor per expert and merged on load; their shapes are not compared.
    names = [name for name in expected if ".experts." not in name]
    missing = [name for name in names if name not in found]
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensors that {CONFIG} calls for are in no weight file, "
            f"first {missing[0]!r}; is {CONFIG} from another checkpoint?"
        )
    for name in names:
        file, shape = found[name]
        if shape != expected[name]:
            raise CheckpointError(
                f"{folder / file}: tensor {name!r} has shape {shape}, but {CONFIG} implies {expected[name]}"
            )


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_dtype(dtype, device: torch.device, hf_config) -> torch.dtype:
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on most CPUs are slow and no more exact
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.bfloat16


def load(path: str | os.PathLike, device=None, dtype=None) -> Model:
    """Load a NemotronH checkpoint folder, or a shipped checkpoint by name ("nano-tiny").

    `device` defaults to the GPU when there is one; `dtype` to fp32 on the CPU and the checkpoint's
    own dtype (bf16 for the published models) on a GPU.
    """
    from transformers import AutoTokenizer, NemotronHConfig, NemotronHForCausalLM

    folder = resolve(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (it does not exist or is a file)")
    config_path = folder / CONFIG
    if not config_path.exists():
        raise CheckpointError(
            f"{folder}: no {CONFIG}; a checkpoint folder holds {CONFIG}, {SINGLE_FILE} (or shards "
            f"with {INDEX_FILE}) and the tokenizer files"
        )
    raw = _read_json(config_path)
    try:
        kind = check_supported(raw, str(config_path), families=("nemotron_h", "decilm"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if kind == "decilm":
        return _load_decilm(folder, raw, device, dtype)
    hf_config = NemotronHConfig.from_pretrained(folder)
    _check_tensors(folder, hf_config)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")

    device = _default_device(device)
    dtype = _default_dtype(dtype, device, hf_config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = NemotronHForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()

    eos = [*_as_list(hf_config.eos_token_id), *_as_list(getattr(model.generation_config, "eos_token_id", None))]
    eos.append(tokenizer.eos_token_id)
    chat = ChatFormat(tokenizer, eos, source=str(folder))
    return Model(model=model, tokenizer=tokenizer, config=model.config, chat=chat, path=folder)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _load_decilm(folder: Path, raw: dict, device, dtype) -> Model:
    """A Llama-Nemotron NAS checkpoint into the toolkit's own definition (nano.decilm), checked tensor
    by tensor against its config first."""
    from transformers import PreTrainedTokenizerFast

    from .decilm import DeciConfig, DeciLMForCausalLM, rope_frequencies

    config = DeciConfig.of(raw, str(folder / CONFIG))
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    expected = {name: list(p.shape) for name, p in model.state_dict().items()}
    found = checkpoint_tensors(folder)
    if config.tied:
        expected.pop("lm_head.weight")
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors that {CONFIG} calls for are in no weight file, "
                              f"first {missing[0]!r}; is {CONFIG} from another checkpoint?")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise CheckpointError(f"{folder / found[name][0]}: tensor {name!r} has shape {found[name][1]}, but "
                                  f"{CONFIG} implies {shape}")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    device = _default_device(device)
    stored = raw.get("torch_dtype") or raw.get("dtype")
    dtype = _default_dtype(dtype, device, type("Stored", (), {"dtype": stored})())
    state = {}
    for shard in sorted({file for file, _ in found.values()}):
        with safe_open(str(folder / shard), framework="pt", device=str(device)) as f:
            state.update({k: f.get_tensor(k).to(dtype) for k in f.keys() if k in expected})
    if config.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rope_frequencies(config).to(device)
    model.eval()
    # AutoTokenizer would read config.json to pick a class and stop at the unknown model_type.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    eos = [*_as_list(raw.get("eos_token_id")), tokenizer.eos_token_id]
    chat = ChatFormat(tokenizer, eos, style="ultra", source=str(folder))  # "detailed thinking on/off"
    return Model(model=model, tokenizer=tokenizer, config=config, chat=chat, path=folder)
