"""`nanokit export trtllm` and `nanokit build`: the bundle against what TensorRT-LLM reads (its option
schema, its NemotronH config fields, its quantized-checkpoint formats), quantization through
nvidia-modelopt on a tiny model (calibrate, export, reload by a dequantizing twin), and bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trtllm_schema import SERVE_FLAGS, is_excluded, trtllm_name, validate

import nano
from nano.cli import main
from nano.config import layer_pattern
from nano.shapes import shape_config
from nano.tiny import build_tiny_checkpoint

SHAPE = dict(hybrid_override_pattern="M-M*-M-", hidden_size=128, intermediate_size=192, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("export") / "tiny", seed=1, **SHAPE)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "nano-12b"
    shape_config("nano-12b-v2-base").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "a10g"
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "a10g", "--context", "4096", "--batch", "2",
                 "--out", str(out)]) == 0
    return out


def test_the_bundle_holds_what_trtllm_serve_reads(bundle, tiny):
    from export.bundle import read_manifest

    manifest = read_manifest(bundle)  # every file's sha256 checked
    assert manifest["kind"] == "tensorrt-llm-pytorch" and manifest["target"] == dict(
        gpu="a10g", usable_bytes=int(22 * 2**30), context=4096, batch=2, tp=1)
    assert set(manifest["files"]) >= {"llm_options.yaml", "serve.sh", "plan.json", "checkpoint/config.json",
                                      "checkpoint/model.safetensors", "checkpoint/tokenizer.json"}
    options = yaml.safe_load((bundle / "llm_options.yaml").read_text())
    assert validate(options) == []
    assert options["max_seq_len"] == 4096 and options["max_batch_size"] == 2
    kv = options["kv_cache_config"]
    assert kv["enable_block_reuse"] is False and kv["mamba_ssm_cache_dtype"] == "float32"
    assert kv["max_tokens"] == 2 * 4096 and 0 < kv["free_gpu_memory_fraction"] <= 0.9
    plan = json.loads((bundle / "plan.json").read_text())
    assert plan["fits"] and plan["total"] <= plan["usable"] and plan["batch"] == 2
    serve = (bundle / "serve.sh").read_text().split("exec ", 1)[1]
    assert serve.startswith("trtllm-serve checkpoint ") and os.stat(bundle / "serve.sh").st_mode & stat.S_IXUSR
    assert {word for word in serve.split() if word.startswith("--")} <= SERVE_FLAGS
    # TensorRT-LLM reads the pattern and layer count, which transformers 5 does not save
    config = json.loads((bundle / "checkpoint" / "config.json").read_text())
    source = json.loads((tiny / "config.json").read_text())
    assert config["hybrid_override_pattern"] == layer_pattern(source) == SHAPE["hybrid_override_pattern"]
    assert config["num_hidden_layers"] == 7 and config["head_dim"] == source["head_dim"]


def test_the_bundled_checkpoint_generates_what_the_source_does(bundle, tiny):
    weights = load_file(bundle / "checkpoint" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    a = nano.load(bundle / "checkpoint", device="cpu", dtype=torch.bfloat16)
    b = nano.load(tiny, device="cpu", dtype=torch.bfloat16)
    prompt = "Count: 1 2 3"
    assert nano.generate(a, prompt, max_new_tokens=12).token_ids == nano.generate(b, prompt, max_new_tokens=12).token_ids


def _fake_tensorrt_llm(folder: Path) -> dict:
    """A stand-in `tensorrt_llm` package whose LLM checks its options as TorchLlmArgs would, a
    `trtllm-serve` on PATH, and `python3` as this interpreter."""
    package = folder / "tensorrt_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'''
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from trtllm_schema import validate

class _Output:
    text = " Paris"

class _Result:
    outputs = [_Output()]

class SamplingParams:
    def __init__(self, max_tokens=None, logits_processor=None):
        self.max_tokens, self.logits_processor = max_tokens, logits_processor

class LLM:
    def __init__(self, model, **options):
        problems = validate(dict(options, model=model))
        if problems:
            raise ValueError(problems)
        self.record = dict(model=model, options=options)

    def generate(self, prompts, params=None):
        import pickle, torch
        processor = pickle.loads(pickle.dumps(params.logits_processor))  # as the executor receives it
        logits = torch.zeros(1, 1, processor.tokens["vocab"])
        processor(7, logits, [[processor.tokens["open"]]], None, None)  # a prompt left inside reasoning
        self.record.update(processor=type(processor).__module__ + "." + type(processor).__name__,
                           open_masked=bool(torch.isinf(logits[0, 0, processor.tokens["open"]])))
        json.dump(self.record, open({str(folder / "llm.json")!r}, "w"))
        return [_Result() for _ in prompts]
''')
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtllm-serve").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "trtllm-serve").chmod(0o755)
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # this venv's, torch and all
    (bin_dir / "python3").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=f"{folder}{os.pathsep}{ROOT}")


def test_build_prints_the_commands_without_tensorrt_llm_and_runs_them_with_it(bundle, tmp_path):
    nanokit = [sys.executable, "-m", "nano.cli", "build", "--bundle", str(bundle)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    missing = subprocess.run(nanokit, capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 3
    assert "needs TensorRT-LLM (the tensorrt_llm module and trtllm-serve), which is not installed here" in missing.stderr
    assert "pypi.nvidia.com" in missing.stderr
    assert "from tensorrt_llm import LLM, SamplingParams" in missing.stderr and "sh serve.sh" in missing.stderr
    dry = subprocess.run([*nanokit, "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0 and "from tensorrt_llm import LLM, SamplingParams" in dry.stdout

    ran = subprocess.run(nanokit, capture_output=True, text=True, env=_fake_tensorrt_llm(tmp_path), timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "Paris" in ran.stdout and "the bundle loads and generates" in ran.stdout
    call = json.loads((tmp_path / "llm.json").read_text())
    assert call["model"] == "checkpoint"
    assert call["options"] == yaml.safe_load((bundle / "llm_options.yaml").read_text())
    # the check generates through the bundle's own budget processor, unpickled as the executor would
    assert call["processor"] == "nanokit_budget.ThinkingBudget" and call["open_masked"]


def test_build_refuses_a_bundle_changed_since_export(bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "checkpoint" / "config.json", "a") as f:
        f.write(" ")
    assert main(["build", "--bundle", str(copy), "--dry-run"]) == 2
    assert "checkpoint/config.json differs from the manifest" in capsys.readouterr().err
    assert main(["build", "--bundle", str(tmp_path), "--dry-run"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_export_refuses_bad_input_saying_what_would_work(tiny, twelve, bundle, tmp_path, capsys):
    def error(*args):
        assert main(["export", "trtllm", *args]) == 2
        return capsys.readouterr().err

    out = ["--out", str(tmp_path / "x")]
    assert "unknown GPU 'a11g'; known: a10g, l4, l40s" in error("--model", str(tiny), "--gpu", "a11g", *out)
    message = error("--model", str(twelve), "--gpu", "a10g", *out)
    assert "needs 27.18 GiB for 1 x 131072 tokens on a10g, which has 22.0 GiB usable: 5.18 GiB short" in message
    assert "it would fit with --quant int4_awq --recipe mamba-mlp" in message
    assert "fp8 does not run on a10g (Ampere" in error("--model", str(twelve), "--gpu", "a10g", "--quant", "fp8", *out)
    assert "orin-16 is a Jetson board" in error("--model", str(tiny), "--gpu", "orin-16", *out)
    assert "--quant fp8 needs calibration text" in error("--model", str(tiny), "--gpu", "h100", "--quant", "fp8", *out)
    assert "--context 999999 is beyond the model's" in error("--model", str(tiny), "--gpu", "h100", "--context",
                                                              "999999", *out)
    assert f"{bundle} already exists; pass --force" in error("--model", str(tiny), "--gpu", "a10g", "--out", str(bundle))
    assert not (tmp_path / "x").exists()


def test_the_9b_and_12b_sized_for_an_a10g_from_their_configs(twelve, tmp_path, capsys):
    nine = tmp_path / "nano-9b"
    shape_config("nano-9b-v2").save_pretrained(nine)
    assert main(["export", "trtllm", "--model", str(nine), "--gpu", "a10g", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "bf16, 1 x 131072 tokens on a10g: 19.79 of 22.0 GiB (weights 16.56, KV 2.00, Mamba state 0.13" in out
    options = yaml.safe_load(out.split("would be:\n", 1)[1])
    assert validate(options) == []
    assert options["max_seq_len"] == 131072 and options["max_batch_size"] == 1  # not 2048 Mamba states
    assert options["kv_cache_config"]["max_tokens"] == 131072
    assert main(["export", "trtllm", "--model", str(twelve), "--gpu", "a10g", "--quant", "int4_awq", "--dry-run"]) == 0
    assert "int4_awq, 2 x 131072 tokens on a10g: 21.02 of 22.0 GiB" in capsys.readouterr().out  # two full contexts


def test_a_tensor_parallel_bundle(tiny, tmp_path):
    out = tmp_path / "tp2"
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "h100", "--context", "2048", "--tp", "2",
                 "--out", str(out)]) == 0
    options = yaml.safe_load((out / "llm_options.yaml").read_text())
    assert validate(options) == [] and options["tensor_parallel_size"] == 2
    assert "--tp_size 2" in (out / "serve.sh").read_text()
    assert json.loads((out / "manifest.json").read_text())["target"]["tp"] == 2
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "h100", "--tp", "3", "--out", str(tmp_path / "x")]) == 2


def test_force_replaces_and_a_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    import export.trtllm

    out = tmp_path / "b"
    args = ["export", "trtllm", "--model", str(tiny), "--gpu", "h100", "--context", "2048", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert main([*args, "--force", "--batch", "3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["target"]["batch"] == 3 != first["target"]["batch"]

    def broken(path):
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(export.trtllm, "prepare_for_trtllm", broken)
    assert main([*args[:-1], str(tmp_path / "c")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial bundle, no temporary folder


# Quantization through nvidia-modelopt: calibrate on the CPU, export, and read the files back the way
# TensorRT-LLM does, through a dequantizing twin written here from the formats.

modelopt = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def dequantize(tensors: dict, name: str, quant: str) -> torch.Tensor:
    """The fp32 weight a quantized layer's tensors stand for (AWQ's pre-quant scale folded in)."""
    w = tensors[f"{name}.weight"]
    scale = tensors[f"{name}.weight_scale"].float()
    if quant == "fp8":
        assert w.dtype == torch.float8_e4m3fn and scale.dim() == 0
        return w.float() * scale
    if quant == "nvfp4":
        assert w.dtype == torch.uint8 and tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        codes = torch.stack([w & 0x0F, w >> 4], dim=-1).flatten(-2).long()  # element 2j is the low nibble
        values = E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()
        return values * scale.repeat_interleave(16, dim=-1) * tensors[f"{name}.weight_scale_2"].float()
    assert quant == "int4_awq" and w.dtype == torch.uint8
    nibbles = torch.stack([w & 0x0F, w >> 4], dim=1).reshape(-1, w.shape[1]).long()  # rows 2k, 2k+1
    q = nibbles - 16 * (nibbles >= 8)
    group = w.shape[1] // scale.shape[1]
    return q.float() * scale.repeat_interleave(group, dim=-1) * tensors[f"{name}.pre_quant_scale"].float()


def reload_dequantized(folder: Path, template_dir: Path, quant: str):
    """The tiny model with the exported checkpoint's tensors, quantized layers dequantized; and, for
    FP8, their inputs fake-quantized at the exported input scale (what the engine's FP8 GEMM sees)."""
    tensors = load_file(folder / "model.safetensors")
    quantized = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
    state = {}
    for key, value in tensors.items():
        module = key.rsplit(".", 1)[0]
        if module in quantized:
            if key.endswith(".weight"):
                state[key] = dequantize(tensors, module, quant)
            continue
        state[key] = value.float()
    model = nano.load(template_dir, device="cpu", dtype=torch.float32)
    model.model.load_state_dict({k.replace("backbone.", "model.", 1): v for k, v in state.items()}, strict=True)
    if quant == "fp8":
        modules = dict(model.model.named_modules())
        for name in quantized:
            s = tensors[f"{name}.input_scale"].float()
            modules[name.replace("backbone.", "model.", 1)].register_forward_pre_hook(
                lambda m, args, s=s: ((args[0].float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s,))
    return model, quantized


@pytest.mark.parametrize("quant, algo", [("fp8", "FP8"), ("int4_awq", "W4A16_AWQ"), ("nvfp4", "NVFP4")])
def test_quantized_checkpoints_are_what_trtllm_reads_and_reload_to_the_calibrated_model(tiny, tmp_path, quant, algo):
    from export.trtllm_quant import calibrate, export_quantized

    model = nano.load(tiny, device="cpu", dtype=torch.float32)  # fp32: the fake-quantized model's own rounding is exact
    original = {n: m.weight.detach().clone() for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)}
    calibration = torch.randint(3, 260, (8, 64), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(3, 260, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.model(input_ids=held_out).logits
    group = calibrate(model.model, quant, "mamba-mlp", calibration)
    fake_quant = None
    if quant != "nvfp4":  # modelopt's NVFP4 fake quantization runs on CUDA only
        with torch.no_grad():
            fake_quant = model.model(input_ids=held_out).logits
    out = tmp_path / quant
    out.mkdir()
    result = export_quantized(model.model, model.tokenizer, quant, "mamba-mlp", group, out)

    meta = json.loads((out / "hf_quant_config.json").read_text())
    assert meta["producer"]["name"] == "modelopt" and meta["quantization"]["quant_algo"] == algo
    assert meta["quantization"].get("group_size") == {"fp8": None, "int4_awq": 64, "nvfp4": 16}[quant]
    excluded = meta["quantization"]["exclude_modules"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == excluded
    # 192-wide MLP: AWQ groups of 64, not 128; the in_proj never AWQ-packed
    kinds = {"fp8": {"in_proj", "out_proj", "up_proj", "down_proj"}, "nvfp4": {"in_proj", "out_proj", "up_proj", "down_proj"},
             "int4_awq": {"out_proj", "up_proj", "down_proj"}}[quant]
    tensors = load_file(out / "model.safetensors")
    linears = sorted(k.removesuffix(".weight") for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2
                     and "embeddings" not in k)
    for name in linears:
        wanted = name.rsplit(".", 1)[-1] in kinds
        assert (f"{name}.weight_scale" in tensors) == wanted, name
        assert is_excluded(trtllm_name(name), excluded) == (not wanted), name  # as TensorRT-LLM decides
    for i in (0, 2, 5):
        assert is_excluded(trtllm_name(f"backbone.layers.{i}.mixer.conv1d"), excluded)
        assert tensors[f"backbone.layers.{i}.mixer.conv1d.weight"].dtype == torch.float32  # as calibrated: unquantized
    assert all(is_excluded(trtllm_name(f"backbone.layers.3.mixer.{p}_proj"), excluded) for p in "qkvo")
    assert result.layers == [n for n in linears if n.rsplit(".", 1)[-1] in kinds]
    if quant == "int4_awq":
        assert all(tensors[f"{n}.pre_quant_scale"].shape == (tensors[f"{n}.weight"].shape[1],) for n in result.layers)

    relative = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    if quant != "int4_awq":  # the scales and the packing as read: each weight within its format's rounding
        for name in result.layers:
            error = relative(dequantize(tensors, name, quant), original[name.replace("backbone.", "model.", 1)])
            assert 1e-3 < error < {"fp8": 0.04, "nvfp4": 0.15}[quant], (name, error)
    dequantized, _ = reload_dequantized(out, tiny, quant)
    with torch.no_grad():
        logits = dequantized.model(input_ids=held_out).logits
    if fake_quant is not None:
        # Read back, the files are nearer the calibrated model than the calibrated model is to the original
        # (they differ from it only where the bf16 export rounds a value across a quantization step).
        assert relative(logits, fake_quant) < 0.9 * relative(fake_quant, reference)
    assert 1e-3 < relative(logits, reference) < {"fp8": 0.2, "int4_awq": 0.4, "nvfp4": 0.4}[quant]


def test_quantized_export_from_the_command_line(tiny, tmp_path, capsys):
    import jinja2

    out = tmp_path / "fp8"
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "l40s", "--context", "4096", "--quant", "fp8",
                 "--calib", jinja2.__path__[0], "--calib-samples", "4", "--calib-len", "64", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["quant_algo"] == "FP8" and manifest["quantization"]["recipe"] == "mamba-mlp"
    assert (out / "checkpoint" / "hf_quant_config.json").exists()
    tensors = load_file(out / "checkpoint" / "model.safetensors")
    assert tensors["backbone.layers.0.mixer.conv1d.weight"].dtype == torch.bfloat16  # the rest stays bf16
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn
    assert validate(yaml.safe_load((out / "llm_options.yaml").read_text())) == []
